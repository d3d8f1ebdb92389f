"""Bad checkpoints of the newer families are refused at load, naming the tensor in the checkpoint's own words:
an expert's projection missing, misshapen or beyond num_experts, Qwen3's per-head norms missing. And
`--load-format dummy` (random weights from config.json alone, for benchmarks) serves a folder with no weights,
which the default load format refuses."""

import os
import shutil

import pytest
import torch

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.models.loader import load_model
from pdserve.tools.make_model import make_model
from pdserve.wire.errors import ConfigError
from tests.engine.test_checkpoint import edit_config, load_error


def copy_of(model_dirs, family, tmp_path) -> str:
    path = tmp_path / family
    shutil.copytree(model_dirs[family], path)
    return str(path)


def edit_tensors(path, edit) -> None:
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "family,name",
    [
        ("qwen3_moe", "model.layers.0.mlp.experts.2.down_proj.weight"),
        ("qwen3_moe", "model.layers.0.mlp.gate.weight"),  # the router
        ("mixtral", "model.layers.1.block_sparse_moe.experts.3.w3.weight"),
        ("qwen3", "model.layers.1.self_attn.q_norm.weight"),
        ("gemma2", "model.layers.0.pre_feedforward_layernorm.weight"),
    ],
)
def test_missing_tensor_is_named(family, name, model_dirs, tmp_path):
    path = copy_of(model_dirs, family, tmp_path)
    edit_tensors(path, lambda t: t.pop(name))
    assert f"tensor {name} is missing" in load_error(path)


@pytest.mark.parametrize(
    "family,name",
    [
        ("mixtral", "model.layers.0.block_sparse_moe.experts.1.w1.weight"),
        ("qwen3_moe", "model.layers.0.mlp.experts.0.up_proj.weight"),
        ("qwen3", "model.layers.0.self_attn.k_norm.weight"),
    ],
)
def test_misshapen_tensor_is_named(family, name, model_dirs, tmp_path):
    path = copy_of(model_dirs, family, tmp_path)
    edit_tensors(path, lambda t: t.update({name: t[name][..., :-1].contiguous()}))
    message = load_error(path)
    assert f"tensor {name} has shape" in message and "config.json implies" in message


def test_expert_beyond_num_experts_is_reported(model_dirs, tmp_path):
    path = copy_of(model_dirs, "qwen3_moe", tmp_path)
    edit_config(path, num_experts=3)  # the weights hold 4 experts, top-2 still fits
    assert "unexpected tensor model.layers.0.mlp.experts.3." in load_error(path)


def test_unsupported_architecture_lists_every_family(model_dirs, tmp_path):
    path = copy_of(model_dirs, "gemma3", tmp_path)
    edit_config(path, architectures=["Gemma3ForConditionalGeneration"])
    message = load_error(path)
    assert "Gemma3ForConditionalGeneration is not supported" in message
    for arch in (
        "Qwen3ForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "MixtralForCausalLM",
        "Qwen3MoeForCausalLM",
    ):
        assert arch in message


def test_dummy_load_format_serves_a_folder_without_weights(tmp_path):
    path = str(tmp_path / "config-only")
    make_model(path, family="qwen3_moe", preset="tiny", weights=False, progress=False)
    assert not any(f.endswith(".safetensors") for f in os.listdir(path))
    assert "no weights" in load_error(path)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    runs = []
    for _ in range(2):
        llm = LLM(model=path, device="cpu", load_format="dummy", seed=3)
        runs.append(llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}], params)[0].outputs[0].token_ids)
    assert len(runs[0]) == 5 and runs[0] == runs[1]  # seeded: the same weights again

    def weights(seed):
        model, _ = load_model(path, torch.float32, "cpu", load_format="dummy", seed=seed)
        return torch.cat([p.flatten() for p in model.parameters()])

    first = weights(0)
    assert 0 < float(first.abs().max()) <= 1e-3
    assert not torch.equal(first, weights(1))


def test_bad_load_format_is_a_config_error(model_dirs):
    with pytest.raises(ConfigError, match="--load-format must be one of auto, dummy"):
        LLM(model=model_dirs["llama"], device="cpu", load_format="pt")


def drop_config_key(path, key) -> None:
    import json

    file = os.path.join(path, "config.json")
    with open(file) as f:
        config = json.load(f)
    del config[key]
    with open(file, "w") as f:
        json.dump(config, f)


@pytest.mark.parametrize(
    "family,tied", [("gemma2", True), ("gemma3", True), ("qwen3", False), ("mixtral", False)]
)
def test_tie_word_embeddings_defaults_as_transformers_does(family, tied, model_dirs, tmp_path):
    """Hub configs leave out values equal to their class's default: Gemma's configs default to tied
    embeddings, the others to a separate head. A Gemma checkpoint without the key must load tied."""
    from pdserve.engine.checkpoint import load_arch_config

    path = copy_of(model_dirs, family, tmp_path)
    drop_config_key(path, "tie_word_embeddings")
    assert load_arch_config(path).tie_word_embeddings is tied


@pytest.mark.parametrize(
    "family,changes,message",
    [
        ("qwen3_moe", {"num_experts_per_tok": 5}, "num_experts_per_tok must be 1..4"),
        ("mixtral", {"num_experts_per_tok": 0}, "num_experts_per_tok must be 1..4"),
        ("mixtral", {"hidden_act": "gelu_pytorch_tanh"}, "the experts' hidden_act must be silu"),
        ("qwen3_moe", {"decoder_sparse_step": 0}, "decoder_sparse_step must be at least 1"),
        (
            "gemma3",
            {"sliding_window_pattern": 0, "layer_types": None},
            "sliding_window_pattern must be at least 1",
        ),
        ("mistral", {"sliding_window": -4}, "sliding_window must be positive"),
    ],
)
def test_config_values_a_forward_would_trip_on_are_refused_at_load(
    family, changes, message, model_dirs, tmp_path
):
    path = copy_of(model_dirs, family, tmp_path)
    edit_config(path, **changes)
    assert message in load_error(path)


def test_qwen3_moe_without_experts_is_dense():
    """num_experts 0 makes every Qwen3-MoE layer a dense MLP in transformers; so here."""
    from pdserve.engine.model_features import moe_config

    assert moe_config({"model_type": "qwen3_moe", "num_experts": 0, "num_experts_per_tok": 2}, 2) is None
