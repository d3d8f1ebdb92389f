"""kernels.dispatch picks the reference on CPU, Triton on CUDA or when PDSERVE_KERNELS=triton; `import
kernels` stays light."""

import subprocess
import sys

import pytest
import torch

from pdserve.kernels import dispatch, rms_norm
from pdserve.kernels.silu_and_mul import silu_and_mul_ref

ENTRY_POINTS = [
    "rms_norm",
    "apply_rotary",
    "apply_rotary_and_write_kv",
    "silu_and_mul",
    "fused_moe",
    "write_kv_cache",
    "paged_prefill_attention",
    "paged_decode_attention",
    "gather_blocks",
    "scatter_blocks",
]


def test_entry_points_exist():
    for name in ENTRY_POINTS:
        assert callable(getattr(dispatch, name)), name


@pytest.mark.parametrize("mode,want", [("auto", "ref"), ("ref", "ref"), ("triton", "triton"), ("", "ref")])
def test_mode_picks_backend(mode, want, monkeypatch):
    calls = []
    monkeypatch.setattr(rms_norm, "rms_norm", lambda *a: calls.append("triton"))
    monkeypatch.setattr(rms_norm, "rms_norm_ref", lambda *a: calls.append("ref"))
    monkeypatch.setenv("PDSERVE_KERNELS", mode)
    dispatch.rms_norm(torch.ones(3, 4), torch.ones(4), 1e-6)
    assert calls == [want]


def test_bad_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PDSERVE_KERNELS", "cuda")
    with pytest.raises(ValueError, match="PDSERVE_KERNELS"):
        dispatch.silu_and_mul(torch.ones(2, 4))


def test_forced_triton_runs_under_interpreter(monkeypatch):
    monkeypatch.setenv("PDSERVE_KERNELS", "triton")
    x = torch.randn(3, 10)
    torch.testing.assert_close(dispatch.silu_and_mul(x), silu_and_mul_ref(x))


def test_package_import_is_light():
    code = "import sys, pdserve.kernels; assert 'torch' not in sys.modules and 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
