"""Incremental detokenization with stop strings, for streaming.

Torch-free: the proxy detokenizes the token ids the decode node streams; the engine uses the same class
offline. The tokenizer needs one method: `decode(ids, skip_special_tokens=...) -> str` (wire.tokenizer's
wrapper, a `tokenizers.Tokenizer` and a transformers tokenizer all have it).

How text is produced:
- Only a short window of tokens is decoded per step: `_ids[prefix_off:read_off]` is text already settled, and
  the new text is decode(window + new tokens) minus decode(window). Decoding with a few tokens of left context
  (the last prompt tokens at first) keeps tokenizers that drop a leading space at the start of a sequence
  (SentencePiece's Metaspace) right, and keeps the cost per token constant instead of re-decoding the whole
  output.
- Text ending in U+FFFD is held back: a multi-byte character split across tokens decodes to U+FFFD until its
  last byte arrives. `finish()` flushes whatever is still held (a genuinely invalid byte sequence then shows
  as U+FFFD).

Stop strings:
- The generated text (never the prompt) is searched after each token; the first occurrence ends the output:
  the text is cut at its start (or after it with include_stop_str_in_output), `stopped` names the stop string
  and later tokens are ignored. With several stop strings, the one completed first wins (ties: the earlier
  start), which is what a character-by-character stream would see, so the result does not depend on how tokens
  were batched.
- While streaming, the longest tail of the text that could still begin a stop string is held back, so no delta
  ever contains text that a later cut removes. Deltas concatenate to `text`.
- With stop strings, tokens passed together to `add()` are processed one at a time so that `num_tokens` says
  exactly which token completed the stop (the engine keeps that token and drops the ones after it, as vLLM
  does).
"""

from __future__ import annotations

from typing import Iterable, Protocol, Sequence

REPLACEMENT_CHAR = "\ufffd"
CONTEXT_TOKENS = 5  # prompt tokens decoded as left context of the first generated token


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Decoder,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        stop: Iterable[str] | str | None = None,
        include_stop_str_in_output: bool = False,
    ):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stops = [stop] if isinstance(stop, str) else [s for s in (stop or ()) if s]
        self._include_stop = include_stop_str_in_output
        context = self._context(list(prompt_token_ids)[-CONTEXT_TOKENS:])
        self._ids: list[int] = context  # context tokens, then generated tokens
        self._num_context = len(context)
        self._prefix_off = 0  # _ids[_prefix_off:_read_off] decodes to _prefix_text, already accounted for
        self._read_off = len(context)
        self._prefix_text = self._decode(context) if context else ""
        self._text = ""  # generated text so far (complete characters only, cut at a stop)
        self._searched = 0  # _text[:_searched] holds no stop string
        self._emitted = 0  # _text[:_emitted] was returned as deltas
        self.stopped: str | None = None  # the stop string that ended the output
        self.finished = False

    # ---- public -------------------------------------------------------------------------------------------
    @property
    def text(self) -> str:
        """All text decoded so far, held-back tail included; after finish() or a stop, the final output
        text."""
        return self._text

    @property
    def token_ids(self) -> list[int]:
        """Generated tokens accepted so far (up to and including the one that completed a stop string)."""
        return self._ids[self._num_context :]

    @property
    def num_tokens(self) -> int:
        return len(self._ids) - self._num_context

    def add(self, token_ids: Sequence[int] | int) -> str:
        """Append generated tokens; return the new text that is safe to show (possibly "")."""
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if self.finished or not token_ids:
            return ""
        chunks = [[t] for t in token_ids] if self._stops else [list(token_ids)]
        for chunk in chunks:
            self._ids.extend(chunk)
            self._append(self._decode_new(final=False))
            if self.stopped is not None:
                break
        return self._take_delta()

    def finish(self) -> str:
        """The output ended (EOS, length, abort): flush held text and return the last delta."""
        if self.finished:
            return ""
        if self.stopped is None:
            self._append(self._decode_new(final=True))
        self.finished = True
        return self._take_delta()

    # ---- steps --------------------------------------------------------------------------------------------
    def _context(self, context: list[int]) -> list[int]:
        """Prompt tail that starts and ends on character boundaries. A window opening inside a character
        decodes to U+FFFD (byte-fallback decoders then garble its whole byte run); a prompt cut inside a
        character leaves bytes that are not the output's to complete."""
        while context and self._decode(context).startswith(REPLACEMENT_CHAR):
            context = context[1:]
        while context and self._decode(context).endswith(REPLACEMENT_CHAR):
            context = context[:-1]
        return context

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def _decode_new(self, final: bool) -> str:
        """New complete text since the last settled token; "" while a character is still incomplete."""
        full = self._decode(self._ids[self._prefix_off :])
        if len(full) <= len(self._prefix_text) or (full.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        new = full[len(self._prefix_text) :]
        self._prefix_off, self._read_off = self._read_off, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_off : self._read_off])
        return new

    def _append(self, new: str) -> None:
        if not new:
            return
        self._text += new
        if self._stops:
            self._find_stop()

    def _find_stop(self) -> None:
        longest = max(len(s) for s in self._stops)
        start = max(0, self._searched - (longest - 1))
        best = None  # (end, start, stop)
        for stop in self._stops:
            pos = self._text.find(stop, start)
            if pos >= 0:
                cand = (pos + len(stop), pos, stop)
                best = cand if best is None or cand[:2] < best[:2] else best
        self._searched = len(self._text)
        if best is None:
            return
        end, pos, stop = best
        self._text = self._text[: end if self._include_stop else pos]
        self.stopped = stop
        self.finished = True

    def _take_delta(self) -> str:
        limit = len(self._text) if self.finished else len(self._text) - self._stop_prefix_len()
        if limit <= self._emitted:
            return ""
        delta = self._text[self._emitted : limit]
        self._emitted = limit
        return delta

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        hold = 0
        pending = len(self._text) - self._emitted
        for stop in self._stops:
            for n in range(min(len(stop) - 1, pending), hold, -1):
                if self._text.endswith(stop[:n]):
                    hold = n
                    break
        return hold


def decode_token(tokenizer: Decoder, token_id: int) -> str:
    """One token's text as logprobs show it (special tokens kept); may be U+FFFD for a partial character."""
    return tokenizer.decode([token_id], skip_special_tokens=False)
