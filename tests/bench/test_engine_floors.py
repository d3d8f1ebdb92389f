"""bench/engine_floors.py's arithmetic for a mixture of experts: FLOP count the experts a token runs, bytes
the experts a step touches (all of them at a long prefill, top-k at batch 1)."""

import pytest

from bench.engine_floors import Shape
from pdserve.tools.make_model import PRESETS, build_config


def shape(family, preset):
    return Shape.from_config(preset, build_config(family, PRESETS[preset], "bfloat16"))


def test_qwen3_moe_counts_total_and_active_parameters():
    s = shape("qwen3_moe", "qwen3-30b-a3b")
    assert s.total_params == pytest.approx(30.5e9, rel=0.01)  # the model card's 30.5B
    expert = 3 * 2048 * 768
    assert s.layer_linear_params - s.touched_linear_params(0) == 8 * expert * 48  # top 8 of 128 per token
    assert s.weight_bytes(1) < 0.25 * s.weight_bytes_per_step  # batch 1 reads 8 experts a layer
    assert s.weight_bytes(100_000) == pytest.approx(s.weight_bytes_per_step)  # a long prefill reads all


def test_expected_experts_touched_grows_with_tokens():
    s = shape("qwen3_moe", "qwen3-30b-a3b")
    touched = [s.touched_linear_params(n) for n in (1, 8, 64, 4096)]
    assert touched == sorted(touched) and touched[0] < touched[-1]


def test_dense_shape_is_unchanged_by_the_moe_terms():
    s = shape("llama", "llama-3.1-8b")
    assert (
        s.experts == 0
        and s.touched_linear_params(1) == s.touched_linear_params(4096) == s.layer_linear_params
    )
    assert s.total_params == pytest.approx(8.03e9, rel=0.01)
