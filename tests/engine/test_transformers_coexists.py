"""Our top-level packages must not shadow what transformers probes for: it looks for a distribution called
`kernels` (the Hugging Face kernel hub) and imports it when it thinks it is there. With pdserve installed (and
the repository root on sys.path), transformers must still import, see no hub `kernels`, and generate."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUR_PACKAGES = (
    "engine",
    "kernels",
    "kvconnector",
    "node_runtime",
    "prefill_node",
    "decode_node",
    "proxy",
    "bench",
)


def test_transformers_imports_and_generates_beside_our_packages(model_dirs):
    code = (
        "import torch, transformers\n"
        "from transformers.utils import import_utils\n"
        "assert not import_utils.is_kernels_available(), 'transformers mistook our kernels package for the "
        "hub one'\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"path = {model_dirs['llama']!r}\n"
        "tok = AutoTokenizer.from_pretrained(path)\n"
        "model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)\n"
        "ids = tok('The quick brown fox', return_tensors='pt').input_ids\n"
        "out = model.generate(ids, max_new_tokens=5, do_sample=False)\n"
        "assert out.shape[1] == ids.shape[1] + 5\n"
        "import kernels\n"
        "assert kernels.__file__.startswith(" + repr(ROOT) + "), kernels.__file__\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_no_other_package_name_is_probed_by_transformers():
    import transformers.utils.import_utils as import_utils

    with open(import_utils.__file__) as f:
        probed = set(re.findall(r"""_is_package_available\(\s*["']([\w.-]+)["']""", f.read()))
    assert "kernels" in probed  # the one we know about, handled above
    assert not (probed - {"kernels"}) & set(OUR_PACKAGES)
