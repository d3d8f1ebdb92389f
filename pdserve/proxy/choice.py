"""One choice's output as the proxy builds it: detokenized text, stop strings, logprobs, finish reason, usage.

The nodes stream token ids; `ChoiceState.absorb` turns each `Tokens` message into the text delta to send,
cutting at stop strings (then the node is told to abort: the proxy owns stop strings) and dropping tokens
after the one that completed the stop, so completion_tokens and logprobs match the text. Logprob records are
shaped for the two OpenAI endpoints by `completion_logprobs` / `chat_logprobs`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from pdserve.proxy.dispatch import ChoiceRun
from pdserve.wire.detokenizer import IncrementalDetokenizer, decode_token
from pdserve.wire.node_messages import LogprobEntry, Tokens, logprob_entry


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    logprobs: list[LogprobEntry]
    finish_reason: Optional[str]


@dataclass
class ChoiceState:
    index: int
    run: ChoiceRun
    detok: IncrementalDetokenizer
    want_logprobs: bool
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[LogprobEntry] = field(default_factory=list)
    finish_reason: Optional[str] = None
    num_cached_tokens: int = 0
    timings: Optional[dict] = None
    text_len: int = 0  # characters emitted so far (completions' text_offset)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def absorb(self, msg: Tokens) -> Delta:
        entries = [logprob_entry(x) for x in msg.logprobs] if (self.want_logprobs and msg.logprobs) else []
        self.num_cached_tokens = max(self.num_cached_tokens, msg.num_cached_tokens)
        if msg.timings:
            self.timings = dict(msg.timings)
        before = self.detok.num_tokens
        text = self.detok.add(msg.token_ids)
        accepted = self.detok.num_tokens - before  # < len(token_ids) when a stop string ended the output
        new_ids = list(msg.token_ids[:accepted])
        new_lps = entries[:accepted]
        finish = None
        if self.detok.stopped is not None:
            finish = "stop"
            if not msg.finished:
                self.run.abort("stop_string")
        elif msg.finished:
            text += self.detok.finish()
            finish = msg.finish_reason or "stop"
        self.token_ids.extend(new_ids)
        self.logprobs.extend(new_lps)
        self.finish_reason = finish
        self.text_len += len(text)
        return Delta(text, new_ids, new_lps, finish)

    @property
    def text(self) -> str:
        return self.detok.text


def finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0  # JSON has no -inf; OpenAI clients expect a number


def completion_logprobs(tokenizer, ids: list[int], entries: list[LogprobEntry], text_offset: int) -> dict:
    """Completions' shape: tokens, token_logprobs, top_logprobs (dicts, sampled token included),
    text_offset."""
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = text_offset
    for tid, e in zip(ids, entries, strict=False):
        tok = decode_token(tokenizer, tid)
        tokens.append(tok)
        token_lps.append(finite(e.logprob))
        top = {
            decode_token(tokenizer, i): finite(lp) for i, lp in zip(e.top_ids, e.top_logprobs, strict=False)
        }
        top.setdefault(tok, finite(e.logprob))
        tops.append(top)
        offsets.append(offset)
        offset += len(tok)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer, ids: list[int], entries: list[LogprobEntry]) -> dict:
    """Chat's shape: content = [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]."""

    def item(tid: int, lp: float) -> dict:
        tok = decode_token(tokenizer, tid)
        return {"token": tok, "logprob": finite(lp), "bytes": list(tok.encode("utf-8"))}

    content = []
    for tid, e in zip(ids, entries, strict=False):
        entry = item(tid, e.logprob)
        entry["top_logprobs"] = [item(i, lp) for i, lp in zip(e.top_ids, e.top_logprobs, strict=False)]
        content.append(entry)
    return {"content": content}
