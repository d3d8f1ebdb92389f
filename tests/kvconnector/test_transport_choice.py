"""Transport selection and refusals that need no GPU."""
import pytest
import torch

from kvconnector.transport import DataPlaneConfig, create_data_plane
from kvconnector.transport_nccl import SAME_GPU, NcclDataPlane
from kvconnector.wire import Handshake


def hs(uuid, **dp):
    return Handshake(engine_id="e", role="kv_consumer", model="m", dtype="bfloat16", block_size=16, num_layers=2,
                     num_kv_heads=2, head_dim=8, hash_algorithm="h", transport="nccl", device_uuid=uuid,
                     data_plane={"store_port": 1, "nonce": 2, **dp})


def test_factory_names():
    assert create_data_plane("tcp", DataPlaneConfig()).name == "tcp"
    with pytest.raises(ValueError, match="tcp, ucx or nccl"):
        create_data_plane("rdma", DataPlaneConfig())


def test_nccl_refuses_cpu_and_same_gpu_pointing_to_ucx():
    with pytest.raises(ValueError, match="GPU memory only"):
        create_data_plane("nccl", DataPlaneConfig(device="cpu"))
    plane = object.__new__(NcclDataPlane)
    plane.backend = "nccl"
    why = plane.check_peer(hs("GPU-1234"), hs("GPU-1234"))
    assert why == SAME_GPU and "Duplicate GPU detected" in why and "'ucx'" in why
    assert plane.check_peer(hs("GPU-1234"), hs("GPU-5678")) == ""
    assert "not on a GPU" in plane.check_peer(hs("GPU-1234"), hs(""))


def test_connector_rejects_caches_that_do_not_match_its_config():
    from kvconnector.connector import ConnectorConfig
    from kvconnector.producer import KVProducer
    cfg = ConnectorConfig(model="m", dtype="float16", block_size=16, num_layers=2, num_kv_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="do not match"):
        KVProducer(cfg, torch.zeros(2, 2, 4, 16, 2, 4, dtype=torch.float16), on_free=lambda r: None)
