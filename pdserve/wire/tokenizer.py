"""A checkpoint's tokenizer over the `tokenizers` library and jinja2, without torch or transformers.

The proxy imports this module, so it must stay torch-free (a test checks). It reads the files a hub checkpoint
ships: tokenizer.json (encoding, decoding, special tokens), tokenizer_config.json (bos/eos names, chat
template), chat_template.jinja if present, and config.json / generation_config.json for the end-of-sequence
ids.

- `encode(text)` gives the ids HF's AutoTokenizer gives (the post-processor in tokenizer.json adds bos or
  not).
- `apply_chat_template` renders with a sandboxed jinja2 environment set up like transformers'
  (trim_blocks, lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a plain-JSON `tojson`), so
  templates render the same text. Templates using transformers' `{% generation %}` tag are not supported.
  A template that starts with `{{ bos_token }}` puts bos in the text: encode it with add_special_tokens=False,
  as `encode_chat` does (HF's apply_chat_template(tokenize=True) does the same).
- `eos_token_ids` is the union of config.json's and generation_config.json's `eos_token_id` (int or list) and
  tokenizer_config's `eos_token`: generation stops on any of them.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from functools import cached_property

from pdserve.wire.errors import CheckpointError

LONG_TEXT_CHARS = 4096


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    return value if isinstance(value, dict) else {}


def _token_content(value) -> str | None:
    """tokenizer_config stores special tokens as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _as_ids(value) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}


class Tokenizer:
    def __init__(self, model_dir: str):
        from tokenizers import Tokenizer as Backend

        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise CheckpointError(f"{model_dir}: no tokenizer.json (only fast tokenizers are supported)")
        try:
            self._backend = Backend.from_file(path)
        except Exception as exc:  # the Rust side raises plain Exception on a malformed file
            raise CheckpointError(f"{path}: cannot be read as a tokenizer ({exc})") from None
        self.model_dir = model_dir
        self._config = _read_json(os.path.join(model_dir, "tokenizer_config.json"))
        self.chat_template = self._find_chat_template()
        self.bos_token = _token_content(self._config.get("bos_token"))
        self.eos_token = _token_content(self._config.get("eos_token"))
        self.pad_token = _token_content(self._config.get("pad_token"))
        self.unk_token = _token_content(self._config.get("unk_token"))
        self.bos_token_id = self._id_of(self.bos_token)
        self.pad_token_id = self._id_of(self.pad_token)
        self.eos_token_ids = frozenset(self._eos_ids())
        self.vocab_size = self._backend.get_vocab_size(with_added_tokens=True)
        self.all_special_ids = frozenset(
            i for i, tok in self._backend.get_added_tokens_decoder().items() if tok.special
        )

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    def _eos_ids(self) -> set[int]:
        ids = set()
        for name in ("config.json", "generation_config.json"):
            ids |= _as_ids(_read_json(os.path.join(self.model_dir, name)).get("eos_token_id"))
        eos = self._id_of(self.eos_token)
        if eos is not None:
            ids.add(eos)
        return ids

    def _find_chat_template(self) -> str | None:
        template = self._config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}], as some checkpoints store several
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        jinja_file = os.path.join(self.model_dir, "chat_template.jinja")
        if template is None and os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()
        return template

    # ---- ids <-> text

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > LONG_TEXT_CHARS:
            # The backend's single encode holds the GIL throughout; its batch encode releases it (same ids),
            # so a long text tokenized in a worker thread does not stall the thread running the event loop.
            return self.encode_batch([text], add_special_tokens=add_special_tokens)[0]
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    @cached_property
    def max_token_chars(self) -> int:
        """The most characters one token decodes to: a text of c characters has at least c / this many tokens,
        so a text too long for the context can be refused without tokenizing it."""
        vocab = self._backend.get_vocab(with_added_tokens=True)
        return (
            max(
                (len(self._backend.decode([i], skip_special_tokens=False)) for i in vocab.values()), default=1
            )
            or 1
        )

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return [self._backend.id_to_token(int(i)) for i in ids]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Join token strings into text through the tokenizer's decoder (byte-level aware)."""
        decoder = self._backend.decoder
        return decoder.decode(tokens) if decoder is not None else "".join(tokens)

    def __len__(self) -> int:
        return self.vocab_size

    # ---- chat

    @cached_property
    def _compiled_template(self):
        if not self.chat_template:
            raise CheckpointError(f"{self.model_dir}: the tokenizer has no chat template")
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            # jinja's own tojson escapes <, > and & for HTML; chat templates expect plain JSON
            return json.dumps(
                value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
            )

        def strftime_now(fmt):
            return datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
        try:
            return env.from_string(self.chat_template)
        except TemplateError as exc:
            raise CheckpointError(f"{self.model_dir}: the chat template does not compile ({exc})") from None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """Render messages ([{"role", "content"}]) to the prompt text; `extra` reaches the template as
        variables."""
        variables = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "pad_token": self.pad_token or "",
            "unk_token": self.unk_token or "",
        }
        variables.update(extra)
        return self._compiled_template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> list[int]:
        """The prompt ids for a chat: the rendered text already holds any bos, so none is added again."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **extra)
        return self.encode(text, add_special_tokens=False)


def load_tokenizer(model_dir: str) -> Tokenizer:
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"model folder {model_dir!r} does not exist")
    return Tokenizer(model_dir)
