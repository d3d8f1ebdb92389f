"""A long prompt's logprob records cross the node wire in pieces, each under the frame limit, that put back
together give every record in order."""

import pytest

from pdserve.wire.frames import DEFAULT_MAX_HEADER
from pdserve.wire.node_messages import PromptLogprobs, make_codec, prompt_logprob_pieces


def records(n: int, k: int) -> list:
    return [None] + [[list(range(k)), [-1.0 / (i + 1)] * k, -2.5, i] for i in range(1, n)]


@pytest.mark.parametrize("n,k", [(1, 3), (2, 0), (3000, 0), (5000, 20), (60_000, 20)])
def test_pieces_fit_a_frame_and_cover_the_prompt(n, k):
    entries = records(n, k)
    codec = make_codec(b"s" * 32)
    pieces = prompt_logprob_pieces("r1", entries)
    got, next_start = [None], 1
    for piece in pieces:
        assert piece.start == next_start
        size = sum(len(part) for part in codec.encode(piece, context=b"to:x"))
        assert size < DEFAULT_MAX_HEADER
        back = codec.decode_frame(b"".join(codec.encode(piece, context=b"to:x")), context=b"to:x")[0]
        assert isinstance(back, PromptLogprobs)
        got.extend(back.entries)
        next_start += len(piece.entries)
    assert got == entries
    assert (len(pieces) > 1) == (n >= 5000)  # small prompts go whole


def test_start_zero_is_refused():
    with pytest.raises(ValueError):
        PromptLogprobs(request_id="r", start=0, entries=[]).check()
