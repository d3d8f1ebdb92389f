"""Incremental detokenizer: deltas, multi-byte characters, left context, stop strings.

Two tokenizers built here with the `tokenizers` library, both splitting CJK and emoji into byte tokens:
a GPT-2-style byte-level BPE and a Llama-style Metaspace + byte-fallback BPE (which drops the leading space of
a sequence, so the detokenizer's left context matters)."""

import subprocess
import sys

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pdserve.wire.detokenizer import IncrementalDetokenizer

TEXT = "hello world 世界 🎉 ok hello 👩‍💻 done"


def _byte_level() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["hello world, this is a small corpus", "the quick brown fox jumps over the lazy dog"] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def _metaspace() -> Tokenizer:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    pieces = [
        "▁",
        "h",
        "e",
        "l",
        "o",
        "w",
        "r",
        "d",
        "k",
        "n",
        "▁h",
        "▁he",
        "▁hel",
        "▁hell",
        "▁hello",
        "▁w",
        "▁wo",
        "▁wor",
        "▁worl",
        "▁world",
        "▁o",
        "▁ok",
        "▁d",
        "▁do",
        "▁don",
        "▁done",
    ]
    for p in pieces:
        vocab.setdefault(p, len(vocab))
    merges = [
        ("▁", "h"),
        ("▁h", "e"),
        ("▁he", "l"),
        ("▁hel", "l"),
        ("▁hell", "o"),
        ("▁", "w"),
        ("▁w", "o"),
        ("▁wo", "r"),
        ("▁wor", "l"),
        ("▁worl", "d"),
        ("▁", "o"),
        ("▁o", "k"),
        ("▁", "d"),
        ("▁d", "o"),
        ("▁do", "n"),
        ("▁don", "e"),
    ]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.add_special_tokens(["<s>", "</s>"])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tok


@pytest.fixture(scope="module", params=["byte_level", "metaspace"])
def tok(request):
    return _byte_level() if request.param == "byte_level" else _metaspace()


def _split(tok, prompt: str, completion: str):
    """Prompt ids, generated ids, and the generated text as decoding the whole sequence shows it."""
    prompt_ids = tok.encode(prompt).ids
    all_ids = tok.encode(prompt + completion).ids
    assert all_ids[: len(prompt_ids)] == prompt_ids
    gen = all_ids[len(prompt_ids) :]
    expected = tok.decode(all_ids)[len(tok.decode(prompt_ids)) :]
    return prompt_ids, gen, expected


def _stream(detok, ids, step=1):
    deltas = []
    for i in range(0, len(ids), step):
        deltas.append(detok.add(ids[i : i + step]))
        if detok.finished:
            break
    deltas.append(detok.finish())
    return deltas


@pytest.mark.parametrize("step", [1, 2, 3])
def test_deltas_concatenate_to_full_decode(tok, step):
    prompt_ids, gen, expected = _split(tok, "hello", " " + TEXT)
    detok = IncrementalDetokenizer(tok, prompt_ids)
    deltas = _stream(detok, gen, step)
    assert "".join(deltas) == detok.text == expected
    assert detok.token_ids == gen and detok.stopped is None


def test_multibyte_characters_come_out_whole(tok):
    prompt_ids, gen, expected = _split(tok, "ok", " 世界 🎉 👩‍💻")
    assert len(gen) > len(expected.split()), "the test needs characters split across tokens"
    detok = IncrementalDetokenizer(tok, prompt_ids)
    deltas = [detok.add(t) for t in gen] + [detok.finish()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == expected
    # a character's bytes produce no text until its last byte arrives, then the whole character at once
    assert "世" in deltas and "🎉" in "".join(deltas) and deltas.count("") >= 2


def test_no_prompt_context(tok):
    ids = tok.encode(TEXT).ids
    detok = IncrementalDetokenizer(tok, [])
    assert "".join(_stream(detok, ids)) == tok.decode(ids)


def test_skip_special_tokens():
    tok = _byte_level()
    eos = tok.token_to_id("</s>")
    ids = tok.encode("hello world").ids + [eos]
    assert IncrementalDetokenizer(tok, [], skip_special_tokens=True).add(ids) == "hello world"
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    assert detok.add(ids) + detok.finish() == "hello world</s>"


@pytest.mark.parametrize("step", [1, 4, 100])
def test_stop_string_straddling_tokens_cuts_at_first_occurrence(tok, step):
    prompt_ids, gen, expected = _split(tok, "hi", " hello world hello world again")
    stop = "o wor"  # spans the tokens "hello" and "world"
    detok = IncrementalDetokenizer(tok, prompt_ids, stop=[stop])
    deltas = _stream(detok, gen, step)
    cut = expected.index(stop)
    assert detok.text == expected[:cut] == "".join(deltas)
    assert detok.stopped == stop and detok.finished
    # the token that completed the stop is the last one kept, whatever the batching
    kept = detok.num_tokens
    assert stop in tok.decode(prompt_ids + gen[:kept])[len(tok.decode(prompt_ids)) :]
    assert stop not in tok.decode(prompt_ids + gen[: kept - 1])[len(tok.decode(prompt_ids)) :]
    assert detok.add(gen[kept:]) == "" and detok.num_tokens == kept


def test_include_stop_str_in_output(tok):
    prompt_ids, gen, expected = _split(tok, "hi", " hello world hello world")
    detok = IncrementalDetokenizer(tok, prompt_ids, stop="world", include_stop_str_in_output=True)
    assert "".join(_stream(detok, gen)) == detok.text == expected[: expected.index("world") + 5]


def test_earliest_completed_stop_wins():
    tok = _byte_level()
    ids = tok.encode("abcdef").ids
    for step in (1, len(ids)):
        detok = IncrementalDetokenizer(tok, [], stop=["cdef", "bcd", "xyz"])
        assert "".join(_stream(detok, ids, step)) == "a" and detok.stopped == "bcd"


def test_streaming_holds_back_possible_stop_prefix():
    tok = _byte_level()
    detok = IncrementalDetokenizer(tok, [], stop=["END!"])
    shown = ""
    for ch in "the EN":
        shown += detok.add(tok.encode(ch).ids)
    assert shown == "the " and detok.text == "the EN"  # "EN" might begin "END!"
    shown += detok.add(tok.encode("D?").ids)  # it did not
    assert shown == "the END?"
    shown += detok.add(tok.encode(" END").ids)
    assert shown == "the END? "
    shown += detok.finish()  # no stop came: the held tail is released at the end
    assert shown == detok.text == "the END? END" and detok.stopped is None


def test_stop_string_in_prompt_is_ignored():
    tok = _byte_level()
    detok = IncrementalDetokenizer(tok, tok.encode("say STOP").ids, stop=["STOP"])
    assert detok.add(tok.encode(" go on").ids) + detok.finish() == " go on" and detok.stopped is None


def test_stop_with_multibyte_text(tok):
    prompt_ids, gen, expected = _split(tok, "ok", " 世界 🎉 ok 👩‍💻")
    detok = IncrementalDetokenizer(tok, prompt_ids, stop=["🎉"])
    deltas = _stream(detok, gen)
    assert "".join(deltas) == detok.text == expected[: expected.index("🎉")]
    assert all("\ufffd" not in d for d in deltas)


def test_detokenizer_imports_no_torch():
    code = (
        "import sys; import pdserve.wire, pdserve.wire.detokenizer, pdserve.wire.sampling_params; "
        "from pdserve.wire.sampling_params import SamplingParams; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_random_splits_batches_and_stops_match_full_decode(tok):
    """Fuzz (fixed seed): random prompt/output split points, add() batch sizes and stop strings."""
    import random

    rng = random.Random(0)
    pieces = ["hello world 世界 🎉 ok", "日本語のテキスト 😀😃 hello", "done 👩‍💻 ok"]
    checked = 0
    for _ in range(300):
        ids = tok.encode("".join(rng.choice(pieces) for _ in range(3))).ids
        k = rng.randrange(len(ids))
        prompt_ids, gen = ids[:k], ids[k:]
        if tok.decode(prompt_ids).endswith("\ufffd"):  # prompt cut inside a character: only must not crash
            detok = IncrementalDetokenizer(tok, prompt_ids)
            assert "".join(_stream(detok, gen)) == detok.text
            continue
        expected = tok.decode(ids)[len(tok.decode(prompt_ids)) :]
        stop = None
        if rng.random() < 0.5:
            a = rng.randrange(len(expected))
            stop = expected[a : a + rng.randint(1, 3)]
            expected = expected[: expected.index(stop)]
        detok = IncrementalDetokenizer(tok, prompt_ids, stop=stop)
        deltas = _stream(detok, gen, step=rng.randint(1, 4))
        assert "".join(deltas) == detok.text == expected
        assert detok.stopped == stop
        checked += 1
    assert checked > 50
