"""The model runner's start-up and profiling paths, exercised on CPU so a GPU start cannot trip on them
first."""

import pytest
import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.model_runner import ModelRunner, resolve_device, resolve_dtype


def test_profile_forward_runs_on_a_fresh_runner(model_dir):
    runner = ModelRunner(
        EngineConfig.create(
            model=model_dir, device="cpu", max_num_batched_tokens=40, num_gpu_blocks_override=8
        )
    )
    assert runner.on_layer_done is None and runner.graphs is None
    before = runner.kv_cache.clone()
    runner._profile_peak_memory()  # the forward a GPU start runs before sizing the cache
    assert torch.equal(runner.kv_cache, before)  # it writes only its own scratch cache
    assert runner.num_blocks == 8 and runner.kv_cache.shape[2] == 8


def test_layer_hook_sees_every_layer_in_order(model_dir):
    from pdserve.engine.scheduler_output import ScheduledRequest

    runner = ModelRunner(EngineConfig.create(model=model_dir, device="cpu", num_gpu_blocks_override=4))
    seen = []
    runner.on_layer_done = seen.append
    runner.execute([ScheduledRequest("r", [5, 6, 7], 0, [2], is_decode=False, samples=True)], [0])
    assert seen == list(range(runner.arch.num_hidden_layers))


def test_device_and_dtype_defaults():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


@pytest.mark.gpu
def test_auto_device_names_the_current_gpu():
    """torch.cuda.set_device refuses a bare "cuda" (torch 2.11): "auto" must resolve to an indexed device."""
    device = resolve_device("auto")
    assert device.type == "cuda" and device.index == torch.cuda.current_device()
    torch.cuda.set_device(device)
