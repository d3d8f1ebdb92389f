"""Each family's chat template as make-model writes it: the family's own format, rendered and encoded by the
proxy (pdserve/proxy/chat_messages.py over pdserve/wire/tokenizer.py) exactly as transformers does, with every
marker one special token."""

import pytest

from pdserve.proxy.chat_messages import check_messages, render_chat
from pdserve.proxy.errors import APIError
from pdserve.tools.make_tokenizer import (
    FAMILY_SPECIAL_TOKENS,
    family_special_tokens,
    family_token_ids,
    special_token_ids,
    write_tokenizer_files,
)
from pdserve.wire.tokenizer import load_tokenizer

FAMILIES = ("llama", "qwen2", "mistral", "qwen3", "gemma2", "gemma3", "mixtral", "qwen3_moe")
VOCAB = 1024

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Tell me a joke."},
]
_CHATML = (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nTell me a joke.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
_INST = "<s>[INST] Be brief.\n\nHi [/INST] Hello!</s>[INST] Tell me a joke. [/INST]"
_GEMMA = (
    "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
    "<start_of_turn>user\nTell me a joke.<end_of_turn>\n<start_of_turn>model\n"
)
EXPECTED = {  # CONVERSATION with the generation prompt, written out by hand from each family's format
    "llama": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nTell me a joke.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "qwen2": _CHATML,
    "qwen3": _CHATML,
    "qwen3_moe": _CHATML,
    "mistral": _INST,
    "mixtral": _INST,
    "gemma2": _GEMMA,
    "gemma3": _GEMMA,
}
EXPECTED_TOKENS = {
    "llama": {
        "bos": "<|begin_of_text|>",
        "eos": "<|end_of_text|>",
        "pad": "<|pad|>",
        "end_of_turn": "<|eot_id|>",
    },
    "qwen2": {"bos": None, "eos": "<|endoftext|>", "pad": "<|pad|>", "end_of_turn": "<|im_end|>"},
    "mistral": {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "end_of_turn": "</s>"},
    "gemma2": {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "end_of_turn": "<end_of_turn>"},
}
EXPECTED_TOKENS.update(
    qwen3=EXPECTED_TOKENS["qwen2"],
    qwen3_moe=EXPECTED_TOKENS["qwen2"],
    mixtral=EXPECTED_TOKENS["mistral"],
    gemma3=EXPECTED_TOKENS["gemma2"],
)
EXPECTED_IDS = {
    f: {
        "bos": None if f.startswith("qwen") else 0,
        "eos": 1,
        "pad": 2,
        "end_of_turn": 1 if f in ("mistral", "mixtral") else 4,
    }
    for f in FAMILIES
}
MARKERS = {  # what each format writes, beyond bos/eos
    "llama": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "qwen2": ["<|im_start|>", "<|im_end|>"],
    "qwen3": ["<|im_start|>", "<|im_end|>", "<think>", "</think>"],
    "qwen3_moe": ["<|im_start|>", "<|im_end|>", "<think>", "</think>"],
    "mistral": ["[INST]", "[/INST]"],
    "mixtral": ["[INST]", "[/INST]"],
    "gemma2": ["<start_of_turn>", "<end_of_turn>"],
    "gemma3": ["<start_of_turn>", "<end_of_turn>"],
}
CHATS = [
    CONVERSATION,
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {
            "role": "user",
            "content": [{"type": "text", "text": "part one, "}, {"type": "text", "text": "part two"}],
        }
    ],
    [
        {"role": "user", "content": "  padded  "},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "ünïcödé 日本語 🙂"},
        {"role": "assistant", "content": "open"},
    ],
]


@pytest.fixture(scope="module", params=FAMILIES)
def tok(request, tmp_path_factory):
    """(family, ours, transformers'): the tokenizer files written once per family."""
    from transformers import AutoTokenizer

    path = str(tmp_path_factory.mktemp(f"tok-{request.param}"))
    write_tokenizer_files(path, vocab_size=VOCAB, family=request.param, model_max_length=256)
    return request.param, load_tokenizer(path), AutoTokenizer.from_pretrained(path)


def proxy_ids(ours, messages, **body):
    """The prompt ids the proxy sends for a chat request with these messages and body fields."""
    return render_chat(body, check_messages(messages), ours)


def hf_ids(hf, messages, **kwargs) -> list[int]:
    ids = hf.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_proxy_renders_and_encodes_as_transformers_does(tok, generation_prompt):
    _, ours, hf = tok
    for messages in CHATS:
        text = ours.apply_chat_template(messages, add_generation_prompt=generation_prompt)
        assert text == hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        expected = hf_ids(hf, messages, add_generation_prompt=generation_prompt)
        assert proxy_ids(ours, messages, add_generation_prompt=generation_prompt) == expected, messages


def test_rendered_text_is_the_family_format(tok):
    family, ours, hf = tok
    ids = proxy_ids(ours, CONVERSATION)
    assert ours.decode(ids, skip_special_tokens=False) == EXPECTED[family]
    assert (
        hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == EXPECTED[family]
    )


def test_bos_once_and_only_for_families_that_have_it(tok):
    family, ours, hf = tok
    ids = proxy_ids(ours, CONVERSATION)
    bos = family_token_ids(family)["bos"]
    if bos is None:
        assert ours.bos_token_id is None and hf.bos_token_id is None
        assert ours.encode("hello")[0] not in ours.all_special_ids
    else:
        assert ids[0] == bos and ids.count(bos) == 1  # the template's bos, not the post-processor's again
        assert ours.encode("hello")[0] == bos == hf.encode("hello")[0]


def test_every_marker_is_one_special_id(tok):
    family, ours, hf = tok
    tokens = family_special_tokens(family)
    assert tokens == EXPECTED_TOKENS[family]
    assert family_token_ids(family) == EXPECTED_IDS[family]
    named = [t for t in tokens.values() if t is not None]
    for i, marker in enumerate(FAMILY_SPECIAL_TOKENS[family]):
        assert (
            ours.encode(marker, add_special_tokens=False)
            == [i]
            == hf.encode(marker, add_special_tokens=False)
        )
        assert i in ours.all_special_ids
    assert set(MARKERS[family]) | set(named) <= set(FAMILY_SPECIAL_TOKENS[family])
    assert special_token_ids(family) == {t: i for i, t in enumerate(FAMILY_SPECIAL_TOKENS[family])}
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == (tokens["bos"], tokens["eos"], tokens["pad"])
    assert ours.eos_token_ids == {family_token_ids(family)["eos"]}  # no config.json here: the tokenizer's own
    assert ours.vocab_size == len(hf) == VOCAB


@pytest.mark.parametrize(
    "roles",
    [("user", "user"), ("system", "assistant"), ("user", "assistant", "system", "user"), ("user", "tool")],
)
def test_formats_without_system_turns_reject_roles_that_do_not_alternate(tok, roles):
    family, ours, hf = tok
    messages = [{"role": r, "content": "x"} for r in roles]
    if family not in ("mistral", "mixtral", "gemma2", "gemma3"):
        assert proxy_ids(ours, messages) == hf_ids(hf, messages, add_generation_prompt=True)
        return
    with pytest.raises(APIError) as caught:
        proxy_ids(ours, messages)
    error = caught.value.body()["error"]
    assert (
        caught.value.status == 400
        and error["type"] == "invalid_request_error"
        and error["param"] == "messages"
    )
    assert "roles must alternate user/assistant" in error["message"]
    with pytest.raises(Exception, match="roles must alternate user/assistant"):
        hf.apply_chat_template(messages, tokenize=False)


def test_qwen3_enable_thinking_false_adds_an_empty_think_block(tok):
    family, ours, hf = tok
    messages = [{"role": "user", "content": "Hi"}]
    plain = proxy_ids(ours, messages)
    for thinking in (False, True):
        ids = proxy_ids(ours, messages, chat_template_kwargs={"enable_thinking": thinking})
        assert ids == hf_ids(hf, messages, add_generation_prompt=True, enable_thinking=thinking)
        if family in ("qwen3", "qwen3_moe") and not thinking:
            text = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
            assert ours.decode(ids, skip_special_tokens=False) == text
            think, end_think = special_token_ids(family)["<think>"], special_token_ids(family)["</think>"]
            assert ids[: len(plain)] == plain and ids[len(plain)] == think and end_think in ids[len(plain) :]
        else:
            assert ids == plain
    # without the generation prompt there is no think block either
    off = {"enable_thinking": False}
    assert proxy_ids(ours, messages, add_generation_prompt=False, chat_template_kwargs=off) == proxy_ids(
        ours, messages, add_generation_prompt=False
    )


def test_the_old_names_and_unknown_families():
    """make-model's older callers: the old names at the slots every family shares (0 bos, 1 eos, 2 pad, 4 end
    of turn)."""
    old = special_token_ids()
    assert old == {
        "<|begin_of_text|>": 0,
        "<|end_of_text|>": 1,
        "<|pad|>": 2,
        "<|im_start|>": 3,
        "<|im_end|>": 4,
    }
    assert (
        special_token_ids("llama")["<|eot_id|>"]
        == old["<|im_end|>"]
        == special_token_ids("qwen2")["<|im_end|>"]
    )
    with pytest.raises(ValueError, match="family must be one of"):
        family_token_ids("gpt2")
    with pytest.raises(ValueError, match="family must be one of"):
        write_tokenizer_files("unused", VOCAB, "gpt2", 256)
