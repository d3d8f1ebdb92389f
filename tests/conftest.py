"""Suite-wide setup. Triton kernels run under the interpreter without a GPU; that switch must be set before
any kernel module is imported (triton reads it when @triton.jit decorates), so it is set here, first."""

import os
import shutil

if not shutil.which("nvidia-smi"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The oracle is transformers' own modeling code: since 5.25 it swaps in Hugging Face hub kernels by default
# when their distribution is installed (tests/test_distribution.py covers that default on its own).
os.environ.setdefault("USE_HUB_KERNELS", "NO")

import pytest  # noqa: E402

# Fixtures shared across folders live in tests/harness/ and reach every test from here, never by import.
pytest_plugins = [
    "tests.harness.servers",
    "tests.harness.fake_node",
    "tests.harness.nodes",
    "tests.harness.kv_pair",
]


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


FAMILIES = ("llama", "qwen2", "mistral", "qwen3", "gemma2", "gemma3", "mixtral", "qwen3_moe")


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Tiny random checkpoints, one per family, written once per session by `pdserve make-model`'s code."""
    from pdserve.tools.make_model import make_model

    root = tmp_path_factory.mktemp("models")
    made = {}
    for family in FAMILIES:
        path = root / f"tiny-{family}"
        make_model(str(path), family=family, preset="tiny", seed=0, dtype="float32")
        made[family] = str(path)
    return made


@pytest.fixture(scope="session")
def model_dir(model_dirs):
    """The tiny llama checkpoint, for tests that need just one model."""
    return model_dirs["llama"]
