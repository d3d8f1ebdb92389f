"""`pdserve make-model`: complete folders, the presets' real shapes, determinism, a greedy-friendly init, the
CLI."""

import argparse
import hashlib
import json
import os

import pytest
import torch

from pdserve.tools.make_model import FAMILIES, PRESETS, build_config, make_model, register_cli, weight_specs
from pdserve.tools.make_tokenizer import family_special_tokens
from pdserve.wire.errors import ConfigError
from pdserve.wire.tokenizer import load_tokenizer

FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
}


def digest(path: str) -> dict:
    return {
        name: hashlib.sha256(open(os.path.join(path, name), "rb").read()).hexdigest()
        for name in sorted(os.listdir(path))
    }


def test_folder_is_complete(model_dirs):
    for family, path in model_dirs.items():
        assert FILES <= set(os.listdir(path)), family
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        assert (config["architectures"][0], config["model_type"]) == FAMILIES[family]
        assert config["torch_dtype"] == "float32" and config["vocab_size"] == 1024
        chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]
        text = load_tokenizer(path).apply_chat_template(chat, add_generation_prompt=False)
        assert family_special_tokens(family)["end_of_turn"] in text, family


def test_same_seed_same_bytes_other_seed_other_weights(model_dirs, tmp_path):
    again = make_model(str(tmp_path / "again"), family="llama", preset="tiny", seed=0, progress=False)
    other = make_model(str(tmp_path / "other"), family="llama", preset="tiny", seed=1, progress=False)
    assert digest(again) == digest(model_dirs["llama"])
    different = {k for k, v in digest(other).items() if v != digest(again)[k]}
    assert different == {"model.safetensors"}


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_big_presets_have_the_real_shapes(family):
    qwen = build_config(family, PRESETS["qwen2.5-0.5b"], "bfloat16")
    llama = build_config(family, PRESETS["llama-3.1-8b"], "bfloat16")
    assert (
        qwen["hidden_size"],
        qwen["num_hidden_layers"],
        qwen["num_attention_heads"],
        qwen["num_key_value_heads"],
        qwen["intermediate_size"],
        qwen["vocab_size"],
    ) == (896, 24, 14, 2, 4864, 151936)
    assert qwen["tie_word_embeddings"] is True and llama["tie_word_embeddings"] is False
    assert llama["rope_theta"] == 500000.0 and llama["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    params = {name: sum(s.numel for s in weight_specs(c)) for name, c in (("qwen", qwen), ("llama", llama))}
    qkv_bias = 0 if family != "qwen2" else 24 * (896 + 2 * 128)
    assert (
        params["qwen"] == 494_032_768 - 24 * (896 + 2 * 128) + qkv_bias
    )  # Qwen2.5-0.5B's count, with its biases
    assert abs(params["llama"] - 8_030_261_248) <= 32 * (4096 + 2 * 1024)  # Llama-3.1-8B's count


def test_big_vocab_tokenizer_covers_every_id(tmp_path):
    from pdserve.tools.make_tokenizer import write_tokenizer_files
    from pdserve.wire.tokenizer import load_tokenizer

    write_tokenizer_files(str(tmp_path), 151936, "qwen2", model_max_length=32768)
    tok = load_tokenizer(str(tmp_path))
    assert tok.vocab_size == 151936
    assert tok.decode([151935]).startswith("<|reserved_")
    assert None not in tok.convert_ids_to_tokens(range(151936))


def test_greedy_decoding_is_not_degenerate(model_dirs):
    """Every tiny model's greedy continuation varies, and the top-1 logit usually leads by a clear margin."""
    from transformers import AutoModelForCausalLM

    prompt = torch.randint(10, 1000, (1, 12), generator=torch.Generator().manual_seed(3))
    for family, path in model_dirs.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            out = model.generate(
                prompt, max_new_tokens=16, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
        tokens = out.sequences[0, 12:].tolist()
        assert len(set(tokens)) >= 6, (family, tokens)
        top2 = torch.stack(out.logits)[:, 0].topk(2, dim=-1).values
        assert (top2[:, 0] - top2[:, 1]).median() > 0.3, family


def test_rewriting_a_folder_drops_the_old_shards(tmp_path):
    path = str(tmp_path / "m")
    make_model(path, family="llama", preset="tiny", max_shard_bytes=40_000, progress=False)
    make_model(path, family="llama", preset="tiny", progress=False)
    assert sorted(f for f in os.listdir(path) if f.startswith("model")) == ["model.safetensors"]


def test_bad_arguments_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="--family"):
        make_model(str(tmp_path), family="gpt2")
    with pytest.raises(ConfigError, match="--preset"):
        make_model(str(tmp_path), preset="huge")


def test_cli_writes_a_model(tmp_path):
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    args = parser.parse_args(
        [
            "make-model",
            str(tmp_path / "m"),
            "--family",
            "mistral",
            "--preset",
            "tiny",
            "--seed",
            "5",
            "--dtype",
            "bfloat16",
        ]
    )
    assert args.func(args) == 0
    with open(tmp_path / "m" / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
