"""Flags as vLLM reads them: --kv-transfer-config's kv_connector_extra_config (old top-level spellings
refused, naming the new place), vLLM's other keys checked, --dtype auto and its aliases, --kv-events-config,
--max- logprobs and --served-model-name; bad values are one clear error line naming the flag."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.config import KVTransferConfig
from pdserve.engine.model_runner import resolve_dtype
from pdserve.launch.cli import main
from pdserve.node_runtime.node_cli import kv_events_config
from pdserve.wire.errors import ConfigError


def test_extra_config_holds_connector_keys():
    cfg = KVTransferConfig.from_json(
        '{"kv_connector": "cuda_ipc", "kv_role": "kv_consumer", "kv_rank": 1, "kv_parallel_size": 2, '
        '"kv_buffer_size": 5e9, "engine_id": "d0", "kv_connector_extra_config": {"copy": "torch"}}'
    )
    assert cfg.extra == {"copy": "torch"}
    assert (cfg.kv_rank, cfg.kv_parallel_size, cfg.kv_buffer_size, cfg.engine_id) == (1, 2, 5e9, "d0")


@pytest.mark.parametrize(
    "text,words",
    [
        ('{"copy": "torch"}', "kv_connector_extra_config"),
        ('{"kv_timeout": 3}', "kv_connector_extra_config"),
        ('{"kv_bogus": 1}', "unknown key"),
        ('{"kv_rank": -1}', "kv_rank"),
        ('{"kv_parallel_size": 0}', "kv_parallel_size"),
        ('{"kv_connector_extra_config": [1]}', "must be a JSON object"),
        ('{"kv_connector_extra_config": {"copy": "cuda"}}', "copy"),
        ('{"kv_connector": "NixlConnector"}', "kv_connector"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_kv_transfer_config_is_one_clear_error(text, words):
    with pytest.raises(ConfigError, match=words):
        KVTransferConfig.from_json(text)


def test_cli_names_the_flag(capsys):
    assert main(["decode", "--model", "/nonexistent", "--kv-transfer-config", '{"copy": "torch"}']) == 2
    err = capsys.readouterr().err
    assert "--kv-transfer-config" in err and "kv_connector_extra_config" in err and "Traceback" not in err
    assert main(["decode", "--model", "/nonexistent", "--max-logprobs", "99"]) == 2
    assert "--max-logprobs" in capsys.readouterr().err
    assert main(["decode", "--model", "/nonexistent", "--kv-events-config", '{"publisher": "kafka"}']) == 2
    assert "--kv-events-config" in capsys.readouterr().err


def test_dtype_auto_and_aliases():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_dtype("half", cpu) == torch.float16
    assert resolve_dtype("float", cpu) == torch.float32
    assert resolve_dtype("auto", cpu, "bfloat16") == torch.float32  # CPU computes in float32
    assert resolve_dtype("auto", cuda, "float16") == torch.float16  # the checkpoint's dtype
    assert resolve_dtype("auto", cuda, "bfloat16") == torch.bfloat16
    assert resolve_dtype("auto", cuda, "float32") == torch.bfloat16  # vLLM downcasts float32 checkpoints
    assert resolve_dtype("auto", cuda, None) == torch.bfloat16


def test_kv_events_config():
    assert kv_events_config(None, "127.0.0.1") is None
    assert kv_events_config('{"enable_kv_cache_events": false}', "127.0.0.1") is None
    on = kv_events_config('{"enable_kv_cache_events": true, "publisher": "zmq", "topic": "kv"}', "10.0.0.1")
    assert on == {"endpoint": "tcp://10.0.0.1:5557", "topic": "kv", "hwm": 100_000}
    for bad in (
        '{"publisher": "kafka"}',
        '{"unknown": 1}',
        '{"enable_kv_cache_events": true, "endpoint": 5}',
    ):
        with pytest.raises(ConfigError, match="--kv-events-config"):
            kv_events_config(bad, "127.0.0.1")
