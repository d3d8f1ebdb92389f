import subprocess
import sys

import msgpack
import pytest

from pdserve.wire.sampling_params import SamplingParams


def test_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.max_tokens, p.logprobs) == (1, 1.0, 1.0, 0, 16, None)
    assert p.stop == [] and p.stop_token_ids == [] and not p.greedy
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(top_k=-1).top_k == 0
    assert isinstance(SamplingParams(temperature=1).temperature, float)


@pytest.mark.parametrize(
    "kwargs,greedy",
    [
        ({"temperature": 0}, True),
        ({"temperature": 0.0, "top_p": 0.5}, True),
        ({"top_k": 1}, True),
        ({"temperature": 1e-7}, True),
        ({"temperature": 0.7}, False),
        ({"top_k": 2}, False),
    ],
)
def test_greedy(kwargs, greedy):
    assert SamplingParams(**kwargs).greedy is greedy


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.1}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"n": 0}, "n must"),
        ({"n": 1.0}, "n must"),
        ({"seed": "x"}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop": [3]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
    ],
)
def test_bad_params_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_wire_round_trip_through_msgpack():
    p = SamplingParams(
        n=2,
        temperature=0.8,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        seed=-3,
        stop=["\n\n", "User:"],
        stop_token_ids=[7],
        max_tokens=None,
        min_tokens=2,
        ignore_eos=True,
        logprobs=5,
        skip_special_tokens=False,
        include_stop_str_in_output=True,
    )
    wire = msgpack.unpackb(msgpack.packb(p.to_dict()), raw=False)
    assert SamplingParams.from_dict(wire) == p


def test_from_dict_rejects_bad_wire_input():
    with pytest.raises(ValueError, match="unknown sampling params: bogus"):
        SamplingParams.from_dict({"temperature": 0.5, "bogus": 1})
    with pytest.raises(ValueError, match="version"):
        SamplingParams.from_dict({"version": 99})
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.from_dict({"top_p": 2})
    with pytest.raises(ValueError, match="map"):
        SamplingParams.from_dict([1, 2])


def test_clone():
    p = SamplingParams(temperature=0.5, seed=1)
    q = p.clone(seed=2)
    assert (q.seed, q.temperature, p.seed) == (2, 0.5, 1)


def test_sampling_params_imports_no_torch():
    code = "import sys, pdserve.wire.sampling_params; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
