"""Train the real byte-level BPE tokenizer that `pdserve make-model` ships with every random checkpoint.

Trained offline with the `tokenizers` library on `tools/tokenizer_corpus.py`, so encode/decode, special tokens
and the chat template behave like a hub checkpoint's. Decisions:

- Special tokens take ids 0..4: `<|begin_of_text|>` (bos), `<|end_of_text|>` (eos), `<|pad|>`, and the ChatML
  markers `<|im_start|>` / `<|im_end|>`. The 256 byte symbols follow, then the learned merges.
- The tokenizer's size always equals config.json's `vocab_size`, so every id the model can emit decodes. The
  corpus yields far fewer merges than a 128k/152k vocabulary, so the rest is filled with `<|reserved_N|>`
  entries in the BPE vocabulary itself (no merge reaches them; they decode to their literal text). Added
  tokens would work too, but 150k of them make `AutoTokenizer.from_pretrained` take ~6 s instead of ~0.2 s.
- Llama and Mistral add bos at the start (a TemplateProcessing post-processor, like Llama 3); Qwen2 adds
  nothing and has no bos token. The chat template is ChatML; for families with bos it starts with `{{
  bos_token }}`, so rendered chat text must be encoded with add_special_tokens=False (as HF's
  apply_chat_template(tokenize=True) does).
- Generation stops at `<|end_of_text|>` or `<|im_end|>`: both are in generation_config.json's eos_token_id.
"""

from __future__ import annotations

import json
import os

BOS, EOS, PAD, IM_START, IM_END = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|pad|>",
    "<|im_start|>",
    "<|im_end|>",
)
SPECIAL_TOKENS = (BOS, EOS, PAD, IM_START, IM_END)  # ids 0..4, in this order
TRAIN_VOCAB_CAP = 4096  # more than the corpus can fill; the trainer stops when no pair repeats

_CONTENT = (
    "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
    "{%- elif message['content'] is none -%}{%- set content = '' -%}"
    "{%- else -%}{%- set content = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') -%}{%- endif -%}"
)


def chat_template(with_bos: bool) -> str:
    """ChatML. Content may be a string or OpenAI-style content parts (their text parts are joined)."""
    head = "{{- bos_token -}}" if with_bos else ""
    return (
        head
        + "{%- for message in messages -%}"
        + _CONTENT
        + "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}"
        + "{%- endfor -%}"
        + "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )


# Qwen2's pre-tokenization pattern. transformers 5 rebuilds every qwen2 tokenizer's pipeline with it (whatever
# tokenizer.json says), so our qwen2 tokenizers use it too, and both sides split text the same way.
QWEN2_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _empty_tokenizer(family: str):
    """An untrained BPE with the family's text pipeline: GPT-2 style byte-level splitting for Llama and
    Mistral; NFC, Qwen2's split pattern, then byte-level for Qwen2."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.BPE())
    if family == "qwen2":
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
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    return tok


def adds_bos(family: str) -> bool:
    return family != "qwen2"


def build_tokenizer(vocab_size: int, family: str):
    """A `tokenizers.Tokenizer` of exactly `vocab_size` ids (trained merges, then reserved fillers)."""
    from tokenizers import Tokenizer, processors

    floor = len(SPECIAL_TOKENS) + 256
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
    if adds_bos(family):
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS}:0 $A:0",
            pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
            special_tokens=[(BOS, tok.token_to_id(BOS))],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    return tok


def special_token_ids() -> dict[str, int]:
    return {token: i for i, token in enumerate(SPECIAL_TOKENS)}


def write_tokenizer_files(path: str, vocab_size: int, family: str, model_max_length: int) -> None:
    """tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json."""
    add_bos = adds_bos(family)
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
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer" if family == "qwen2" else "PreTrainedTokenizerFast",
        "bos_token": BOS if add_bos else None,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "additional_special_tokens": [IM_START, IM_END],
        "added_tokens_decoder": added,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": chat_template(with_bos=add_bos),
    }
    special_map = {
        "bos_token": BOS if add_bos else None,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": [IM_START, IM_END],
    }
    special_map = {k: v for k, v in special_map.items() if v is not None}
    _write_json(os.path.join(path, "tokenizer_config.json"), config)
    _write_json(os.path.join(path, "special_tokens_map.json"), special_map)


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
