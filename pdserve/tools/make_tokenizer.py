"""Train the real byte-level BPE tokenizer that `pdserve make-model` ships with every random checkpoint.

Trained offline with the `tokenizers` library on `tools/tokenizer_corpus.py`, so encode/decode, special tokens
and the chat template behave like a hub checkpoint's. Decisions:

- Each family has its own special tokens, spelled as its hub checkpoints spell them, at ids 0..n-1 in one
  fixed order (`FAMILY_SPECIAL_TOKENS`): bos, eos, pad, the turn-start and turn-end markers, then any other
  marker its chat format needs. Qwen has no bos: its slot 0 holds an unused special token, so every family has
  eos at id 1, pad at 2 and its turn markers at 3 and 4. The 256 byte symbols follow, then the learned merges.
  `family_special_tokens` / `family_token_ids` name bos, eos, pad and the end-of-turn token (for
  config.json's and generation_config.json's ids).
- The tokenizer's size always equals config.json's `vocab_size`, so every id the model can emit decodes. The
  corpus yields far fewer merges than a 128k/152k vocabulary, so the rest is filled with `<|reserved_N|>`
  entries in the BPE vocabulary itself (no merge reaches them; they decode to their literal text). Added
  tokens would work too, but 150k of them make `AutoTokenizer.from_pretrained` take ~6 s instead of ~0.2 s.
- Llama, Mistral, Mixtral and Gemma add bos at the start (a TemplateProcessing post-processor, as their hub
  tokenizers do); the Qwen families add nothing. The Qwen families split text with Qwen2's pattern (below).
- The chat template is the family's own format (`chat_template`): Llama 3 headers, ChatML for Qwen (Qwen3's
  with `enable_thinking`), `[INST]` for Mistral and Mixtral, `<start_of_turn>` for Gemma. For families with
  bos it starts with `{{ bos_token }}`, so rendered chat text must be encoded with add_special_tokens=False
  (as HF's apply_chat_template(tokenize=True) and the proxy do).
- Generation stops at eos or the end-of-turn token: make-model puts both in generation_config.json.
"""

from __future__ import annotations

import json
import os

# The names this module exported before each family had its own format: Llama 3's bos/eos, a pad, and
# ChatML's markers. `special_token_ids()` without a family maps them to the slots every family shares.
BOS, EOS, PAD, IM_START, IM_END = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|pad|>",
    "<|im_start|>",
    "<|im_end|>",
)
NO_BOS = "<|reserved_special_0|>"  # slot 0 of the families without bos: a special token nothing emits
_QWEN = (NO_BOS, "<|endoftext|>", PAD, IM_START, IM_END)
_MISTRAL = ("<s>", "</s>", "<pad>", "[INST]", "[/INST]")
_GEMMA = ("<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>")
# ids 0..n-1, in this order: bos (or NO_BOS), eos, pad, turn start, turn end, then the family's other markers
FAMILY_SPECIAL_TOKENS: dict[str, tuple[str, ...]] = {
    "llama": (BOS, EOS, PAD, "<|start_header_id|>", "<|eot_id|>", "<|end_header_id|>"),
    "qwen2": _QWEN,
    "mistral": _MISTRAL,
    "qwen3": _QWEN + ("<think>", "</think>"),
    "gemma2": _GEMMA,
    "gemma3": _GEMMA,
    "mixtral": _MISTRAL,
    "qwen3_moe": _QWEN + ("<think>", "</think>"),
}
QWEN_FAMILIES = ("qwen2", "qwen3", "qwen3_moe")
TRAIN_VOCAB_CAP = 4096  # more than the corpus can fill; the trainer stops when no pair repeats


def _specials(family: str) -> tuple[str, ...]:
    if family not in FAMILY_SPECIAL_TOKENS:
        raise ValueError(f"family must be one of {', '.join(FAMILY_SPECIAL_TOKENS)}, got {family!r}")
    return FAMILY_SPECIAL_TOKENS[family]


def adds_bos(family: str) -> bool:
    _specials(family)
    return family not in QWEN_FAMILIES


def family_special_tokens(family: str) -> dict:
    """{"bos", "eos", "pad", "end_of_turn"}: the family's tokens for them (bos None where it has none)."""
    tokens = _specials(family)
    end_of_turn = tokens[1] if family in ("mistral", "mixtral") else tokens[4]  # [INST] turns end with eos
    return {
        "bos": tokens[0] if adds_bos(family) else None,
        "eos": tokens[1],
        "pad": tokens[2],
        "end_of_turn": end_of_turn,
    }


def family_token_ids(family: str) -> dict:
    """`family_special_tokens` as ids in the family's tokenizer (None for a missing bos)."""
    ids = special_token_ids(family)
    return {k: None if t is None else ids[t] for k, t in family_special_tokens(family).items()}


def special_token_ids(family: str | None = None) -> dict[str, int]:
    """{token: id} of the family's special tokens. Without a family: the old names (BOS, EOS, PAD, IM_START,
    IM_END) at the slots every family shares (0..4); prefer `family_token_ids`."""
    if family is None:
        return {token: i for i, token in enumerate((BOS, EOS, PAD, IM_START, IM_END))}
    return {token: i for i, token in enumerate(_specials(family))}


# ---- chat templates (jinja, rendered by transformers and by pdserve/wire/tokenizer.py alike)


def _text_of(source: str, name: str) -> str:
    """Sets `name` to the text of `source`: a string, none (''), or OpenAI-style content parts (their text
    parts joined)."""
    text = (
        "{%- if SRC is string -%}{%- set NAME = SRC -%}"
        "{%- elif SRC is none -%}{%- set NAME = '' -%}"
        "{%- else -%}{%- set NAME = SRC | selectattr('type', 'equalto', 'text')"
        " | map(attribute='text') | join('') -%}{%- endif -%}"
    )
    return text.replace("SRC", source).replace("NAME", name)


_CONTENT = _text_of("message['content']", "content")

# Mistral's and Gemma's formats have no system turn: a leading system message is set aside (its text in
# `system`, `offset` 1) and the rest, `turns`, must alternate user/assistant.
_SPLIT_SYSTEM = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    + _text_of("messages[0]['content']", "system")
    + "{%- set turns = messages[1:] -%}{%- set offset = 1 -%}"
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- set offset = 0 -%}{%- endif -%}"
)
_ALTERNATE = (
    "{%- if message['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}"
    "{{- raise_exception('conversation roles must alternate user/assistant/user/assistant/... after an "
    "optional first system message, but message ' ~ (loop.index0 + offset) ~ ' is ' ~ message['role']) -}}"
    "{%- endif -%}"
)
# The system text set aside, then each turn in order, user and assistant alternating, as `content`.
_USER_TURNS = _SPLIT_SYSTEM + "{%- for message in turns -%}" + _ALTERNATE + _CONTENT


def _llama3() -> str:
    return (
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        + _CONTENT
        + "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (content | trim)"
        " + '<|eot_id|>' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
        "{%- endif -%}"
    )


def _chatml(thinking_switch: bool) -> str:
    """Qwen's ChatML; Qwen3's (`thinking_switch`) follows the generation prompt with an empty think block when
    the caller passes enable_thinking=False."""
    no_think = (
        "{%- if enable_thinking is defined and enable_thinking is false -%}"
        "{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
        if thinking_switch
        else ""
    )
    return (
        "{%- for message in messages -%}"
        + _CONTENT
        + "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}" + no_think + "{%- endif -%}"
    )


def _mistral() -> str:
    """[INST] turns; the system text opens the first user turn; the prompt ends with [/INST] (no generation
    prompt of its own)."""
    return (
        "{{- bos_token -}}" + _USER_TURNS + "{%- if message['role'] == 'user' -%}"
        "{%- if loop.first and system -%}{%- set content = system + '\\n\\n' + content -%}{%- endif -%}"
        "{{- '[INST] ' + content + ' [/INST]' -}}"
        "{%- else -%}{{- ' ' + content + eos_token -}}{%- endif -%}"
        "{%- endfor -%}"
    )


def _gemma() -> str:
    """<start_of_turn> turns, the assistant's written 'model'; the system text opens the first user turn."""
    return (
        "{{- bos_token -}}"
        + _USER_TURNS
        + "{%- set prefix = system + '\\n\\n' if loop.first and system else '' -%}"
        "{{- '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\\n' + prefix"
        " + (content | trim) + '<end_of_turn>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
    )


def chat_template(family: str) -> str:
    """The family's chat template. Content may be a string or OpenAI-style content parts."""
    _specials(family)
    if family == "llama":
        return _llama3()
    if family in QWEN_FAMILIES:
        return _chatml(thinking_switch=family != "qwen2")
    if family in ("mistral", "mixtral"):
        return _mistral()
    return _gemma()


# Qwen2's pre-tokenization pattern. transformers 5 rebuilds every Qwen2Tokenizer's pipeline with it (whatever
# tokenizer.json says; Qwen3 ships that class too), so our Qwen tokenizers use it, and both sides split text
# the same way.
QWEN2_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _empty_tokenizer(family: str):
    """An untrained BPE with the family's text pipeline: GPT-2 style byte-level splitting for Llama, Mistral,
    Mixtral and Gemma; NFC, Qwen2's split pattern, then byte-level for the Qwen families."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.BPE())
    if family in QWEN_FAMILIES:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def _train_bpe(family: str, train_vocab: int):
    from tokenizers import pre_tokenizers, trainers

    from pdserve.tools.tokenizer_corpus import CORPUS

    tok = _empty_tokenizer(family)
    trainer = trainers.BpeTrainer(
        vocab_size=train_vocab,
        min_frequency=2,
        special_tokens=list(_specials(family)),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    return tok


def build_tokenizer(vocab_size: int, family: str):
    """A `tokenizers.Tokenizer` of exactly `vocab_size` ids (trained merges, then reserved fillers)."""
    from tokenizers import Tokenizer, processors

    specials = _specials(family)
    floor = len(specials) + 256
    if vocab_size < floor:
        raise ValueError(
            f"vocab_size must be at least {floor} (special tokens + 256 bytes), got {vocab_size}"
        )
    trained = _train_bpe(family, min(vocab_size, TRAIN_VOCAB_CAP))
    spec = json.loads(trained.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    for i in range(vocab_size - len(vocab)):
        vocab[f"<|reserved_{i}|>"] = len(vocab)
    tok = Tokenizer.from_str(json.dumps(spec))
    assert [tok.token_to_id(t) for t in specials] == list(range(len(specials)))
    if adds_bos(family):
        bos = specials[0]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, 0)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    return tok


def write_tokenizer_files(path: str, vocab_size: int, family: str, model_max_length: int) -> None:
    """tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json."""
    add_bos = adds_bos(family)
    named = family_special_tokens(family)
    specials = _specials(family)
    markers = [t for t in specials if t not in (named["bos"], named["eos"], named["pad"])]
    tok = build_tokenizer(vocab_size, family)
    tok.save(os.path.join(path, "tokenizer.json"))
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in enumerate(specials)
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer" if family in QWEN_FAMILIES else "PreTrainedTokenizerFast",
        "bos_token": named["bos"],
        "eos_token": named["eos"],
        "pad_token": named["pad"],
        "unk_token": None,
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "additional_special_tokens": markers,
        "added_tokens_decoder": added,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": chat_template(family),
    }
    special_map = {
        "bos_token": named["bos"],
        "eos_token": named["eos"],
        "pad_token": named["pad"],
        "additional_special_tokens": markers,
    }
    special_map = {k: v for k, v in special_map.items() if v is not None}
    _write_json(os.path.join(path, "tokenizer_config.json"), config)
    _write_json(os.path.join(path, "special_tokens_map.json"), special_map)


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
