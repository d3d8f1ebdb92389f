"""Transport selection and refusals that need no GPU."""

import pytest
import torch

from pdserve.kvconnector.transport import DataPlaneConfig, create_data_plane


def test_factory_names():
    caches = [torch.zeros(2, 4, 16, 2, 8)]
    assert create_data_plane("tcp", DataPlaneConfig(), caches).name == "tcp"
    with pytest.raises(ValueError, match="tcp, cuda_ipc"):
        create_data_plane("rdma", DataPlaneConfig(), caches)


def test_cuda_ipc_refuses_a_cache_in_host_memory():
    with pytest.raises(ValueError, match="CUDA device"):
        create_data_plane("cuda_ipc", DataPlaneConfig(), [torch.zeros(2, 4, 16, 2, 8)])


def test_connector_rejects_caches_that_do_not_match_its_config():
    from pdserve.kvconnector.connector import ConnectorConfig
    from pdserve.kvconnector.producer import KVProducer

    cfg = ConnectorConfig(model="m", dtype="float16", block_size=16, num_layers=2, num_kv_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="do not match"):
        KVProducer(cfg, torch.zeros(2, 2, 4, 16, 2, 4, dtype=torch.float16))
