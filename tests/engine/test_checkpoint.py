"""Checkpoint reading: ArchConfig from config.json, sharded and single-file weights, and one clear
CheckpointError line for every way a folder can be wrong."""

import json
import os
import shutil

import pytest
import torch

from pdserve.engine.checkpoint import iter_tensors, load_arch_config
from pdserve.engine.models.loader import load_model
from pdserve.tools.make_model import make_model
from pdserve.wire.errors import CheckpointError


@pytest.fixture
def llama_copy(model_dirs, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(model_dirs["llama"], path)
    return str(path)


def edit_config(path, **changes):
    file = os.path.join(path, "config.json")
    with open(file) as f:
        config = json.load(f)
    config.update(changes)
    with open(file, "w") as f:
        json.dump(config, f)


def load_error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(path, torch.float32, "cpu", progress=False)
    message = str(info.value)
    assert "\n" not in message and message
    return message


def test_arch_config_per_family(model_dirs):
    llama, qwen, mistral = (load_arch_config(model_dirs[f]) for f in ("llama", "qwen2", "mistral"))
    assert (llama.architecture, llama.qkv_bias, llama.o_bias, llama.tie_word_embeddings) == (
        "LlamaForCausalLM",
        False,
        False,
        False,
    )
    assert (qwen.architecture, qwen.qkv_bias, qwen.o_bias, qwen.tie_word_embeddings) == (
        "Qwen2ForCausalLM",
        True,
        False,
        True,
    )
    assert mistral.architecture == "MistralForCausalLM" and mistral.max_position_embeddings == 2048
    assert llama.head_dim == 16 and llama.num_key_value_heads == 2 and llama.rope_scaling is None
    assert llama.eos_token_ids == frozenset(
        {1, 4}
    )  # <|end_of_text|> from config, <|im_end|> from generation_config


def test_llama3_rope_and_v5_rope_parameters_are_read(llama_copy):
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    edit_config(llama_copy, rope_scaling=scaling, rope_theta=500000.0)
    legacy = load_arch_config(llama_copy)
    edit_config(
        llama_copy, rope_scaling=None, rope_theta=None, rope_parameters={**scaling, "rope_theta": 500000.0}
    )
    assert load_arch_config(llama_copy) == legacy
    assert legacy.rope_theta == 500000.0 and legacy.rope_scaling.factor == 8.0


def test_sliding_window_applies_per_layer_and_no_longer_caps_the_context(llama_copy):
    edit_config(llama_copy, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=512)
    arch = load_arch_config(llama_copy)
    assert arch.sliding_window == 512 and arch.layer_windows == (512, 512)
    assert arch.max_position_embeddings == arch.config_max_position_embeddings == 2048


@pytest.mark.parametrize(
    "fields,windows",
    [
        (dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"], sliding_window=64), (64, 0)),
        (dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], sliding_window=64), (0, 0)),
        (
            dict(
                model_type="qwen2",
                architectures=["Qwen2ForCausalLM"],
                sliding_window=64,
                use_sliding_window=True,
                max_window_layers=1,
            ),
            (0, 64),
        ),
        (
            dict(
                model_type="mistral",
                architectures=["MistralForCausalLM"],
                sliding_window=64,
                layer_types=["full_attention", "sliding_attention"],
            ),
            (0, 64),
        ),
    ],
)
def test_which_layers_slide_follows_transformers(llama_copy, fields, windows):
    edit_config(llama_copy, **fields)
    assert load_arch_config(llama_copy).layer_windows == windows


def test_bad_layer_types_are_refused_at_load(llama_copy):
    edit_config(
        llama_copy,
        architectures=["MistralForCausalLM"],
        model_type="mistral",
        sliding_window=64,
        layer_types=["sliding_attention", "chunked_attention"],
    )
    with pytest.raises(CheckpointError, match="chunked_attention"):
        load_arch_config(llama_copy)


def test_sharded_checkpoint_loads_like_a_single_file(model_dirs, tmp_path):
    sharded = str(tmp_path / "sharded")
    make_model(sharded, family="llama", preset="tiny", seed=0, max_shard_bytes=40_000, progress=False)
    files = os.listdir(sharded)
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert sum(f.endswith(".safetensors") for f in files) > 2
    one = dict(iter_tensors(model_dirs["llama"], progress=False))
    many = dict(iter_tensors(sharded, progress=False))
    assert one.keys() == many.keys() and all(torch.equal(one[k], many[k]) for k in one)


def test_dtype_cast_on_read(model_dirs):
    name, tensor = next(iter_tensors(model_dirs["llama"], dtype=torch.bfloat16, progress=False))
    assert tensor.dtype == torch.bfloat16


def test_missing_folder(tmp_path):
    assert "does not exist" in load_error(str(tmp_path / "nowhere"))


def test_file_instead_of_folder(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    assert "not a folder" in load_error(str(file))


def test_no_config(llama_copy):
    os.remove(os.path.join(llama_copy, "config.json"))
    assert "no config.json" in load_error(llama_copy)


def test_bad_json(llama_copy):
    with open(os.path.join(llama_copy, "config.json"), "w") as f:
        f.write("{not json")
    assert "not valid JSON" in load_error(llama_copy)


def test_missing_required_field(llama_copy):
    file = os.path.join(llama_copy, "config.json")
    with open(file) as f:
        config = json.load(f)
    del config["hidden_size"]
    with open(file, "w") as f:
        json.dump(config, f)
    assert "hidden_size" in load_error(llama_copy)


def test_no_weights(llama_copy):
    os.remove(os.path.join(llama_copy, "model.safetensors"))
    assert "no weights" in load_error(llama_copy)


def test_truncated_safetensors(llama_copy):
    file = os.path.join(llama_copy, "model.safetensors")
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size // 2)
    message = load_error(llama_copy)
    assert "model.safetensors" in message and "corrupt or truncated" in message


def test_garbage_safetensors(llama_copy):
    with open(os.path.join(llama_copy, "model.safetensors"), "wb") as f:
        f.write(b"\x00" * 3)
    assert "corrupt or truncated" in load_error(llama_copy)


def test_missing_shard(tmp_path):
    path = str(tmp_path / "sharded")
    make_model(path, family="llama", preset="tiny", max_shard_bytes=40_000, progress=False)
    shard = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[1]
    os.remove(os.path.join(path, shard))
    assert f"shard {shard}" in load_error(path)


def test_missing_tensor(llama_copy):
    from safetensors.torch import load_file, save_file

    file = os.path.join(llama_copy, "model.safetensors")
    tensors = load_file(file)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    assert "model.layers.1.self_attn.k_proj.weight is missing" in load_error(llama_copy)


def test_shape_mismatch(llama_copy):
    edit_config(llama_copy, intermediate_size=96)
    message = load_error(llama_copy)
    assert (
        "mlp." in message and "has shape" in message and "config.json implies" in message and "96" in message
    )


def test_extra_layer_in_weights_is_reported(llama_copy):
    edit_config(llama_copy, num_hidden_layers=1)
    assert "unexpected tensor model.layers.1." in load_error(llama_copy)


def test_unsupported_architecture(llama_copy):
    edit_config(llama_copy, architectures=["GPT2LMHeadModel"])
    message = load_error(llama_copy)
    assert "GPT2LMHeadModel is not supported" in message
    assert all(a in message for a in ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"))


def test_unsupported_rope_type(llama_copy):
    edit_config(llama_copy, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    assert "rope type 'yarn' is not supported" in load_error(llama_copy)


def test_errors_are_pdserve_errors_for_the_cli():
    from pdserve.wire.errors import PdserveError

    assert issubclass(CheckpointError, PdserveError)
