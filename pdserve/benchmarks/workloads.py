"""Benchmark workloads, generated locally from a seed (nothing is downloaded): what `pdserve bench` sends.

- random: prompts of exactly --input-len token ids and --output-len tokens out (sent with ignore_eos), so
  every request does the same work and figures compare across servers and rates.
- prefix: G groups, each a shared prefix of P token ids; a request draws a group and appends U unique ids. The
  working set (G * P tokens) against a node's KV cache is what separates prefix-aware routing from blind
  routing.
- conversation: S sessions of T turns; turn k resends the whole history (every earlier turn's user ids plus a
  stand-in for the assistant's reply) and adds new user ids, so the reusable prefix grows over a session. A
  turn is sent only after the previous turn of its session finished (the client enforces that), as a chat user
  would.
- jsonl: one JSON object per line, {"prompt": "text" | [ids...], "output_len": N} (`max_tokens` is accepted
  for output_len); a bad line is an error naming the file and line.

Token ids are drawn from the tokenizer's vocabulary minus its special tokens when --tokenizer is given, else
from [100, 1000), which every real vocabulary and the tiny test model's 1024-entry one contain.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Optional

DEFAULT_ID_RANGE = (100, 1000)


class WorkloadError(ValueError):
    """A workload that cannot be built (bad flags, a bad JSONL line): a user error, reported in one line."""


@dataclass
class BenchRequest:
    prompt_ids: Optional[list[int]]  # token ids, or None for a text prompt
    prompt_text: Optional[str]
    output_len: int
    session: Optional[int] = None  # conversation: turns of one session go in order
    turn: int = 0
    group: Optional[int] = None  # prefix: which shared prefix

    @property
    def prompt_len(self) -> Optional[int]:
        return len(self.prompt_ids) if self.prompt_ids is not None else None


class TokenSource:
    """Draws token ids that are ordinary text tokens (never special ones), reproducibly from a seed."""

    def __init__(self, seed: int, tokenizer=None):
        self.rng = random.Random(seed)
        self.tokenizer = tokenizer
        if tokenizer is None:
            self.low, self.high, self.special = DEFAULT_ID_RANGE[0], DEFAULT_ID_RANGE[1], frozenset()
        else:
            self.low, self.high = 0, tokenizer.get_vocab_size(with_added_tokens=True)
            self.special = frozenset(tokenizer.get_added_tokens_decoder().keys())

    def ids(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            t = self.rng.randrange(self.low, self.high)
            if t not in self.special:
                out.append(t)
        return out


def random_workload(num: int, input_len: int, output_len: int, tokens: TokenSource) -> list[BenchRequest]:
    _positive(input_len=input_len, output_len=output_len)
    return [BenchRequest(tokens.ids(input_len), None, output_len) for _ in range(num)]


def prefix_workload(
    num: int, groups: int, prefix_len: int, unique_len: int, output_len: int, tokens: TokenSource
) -> list[BenchRequest]:
    _positive(prefix_groups=groups, prefix_len=prefix_len, output_len=output_len)
    prefixes = [tokens.ids(prefix_len) for _ in range(groups)]
    out = []
    for _ in range(num):
        g = tokens.rng.randrange(groups)
        out.append(BenchRequest(prefixes[g] + tokens.ids(unique_len), None, output_len, group=g))
    return out


def conversation_workload(
    num: int, turns: int, turn_len: int, output_len: int, tokens: TokenSource
) -> list[BenchRequest]:
    """`num` requests in sessions of `turns` turns (the last session may be shorter), session-major order."""
    _positive(conversation_turns=turns, input_len=turn_len, output_len=output_len)
    out: list[BenchRequest] = []
    session = 0
    while len(out) < num:
        history: list[int] = []
        for turn in range(min(turns, num - len(out))):
            history = history + tokens.ids(turn_len)
            out.append(BenchRequest(list(history), None, output_len, session=session, turn=turn))
            # The reply the client resends next turn. The server's own reply would differ token for token, but
            # only its length matters to the work: the next prompt's reusable prefix is this whole history.
            history = history + tokens.ids(output_len)
        session += 1
    return out


def jsonl_workload(
    path: str, num: Optional[int], default_output_len: int, tokens: TokenSource
) -> list[BenchRequest]:
    """The file's prompts in order (cycled to `num` requests when num is larger; all of them when num is
    None)."""
    if not os.path.isfile(path):
        raise WorkloadError(f"--dataset-path {path!r} is not a file")
    rows: list[BenchRequest] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                rows.append(_jsonl_row(line, f"{path}:{lineno}", default_output_len))
    if not rows:
        raise WorkloadError(f"{path}: no prompts in the file")
    if num is None:
        return rows
    tokens.rng.shuffle(rows)
    return [rows[i % len(rows)] for i in range(num)]


def _jsonl_row(line: str, where: str, default_output_len: int) -> BenchRequest:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise WorkloadError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(obj, dict) or "prompt" not in obj:
        raise WorkloadError(f"{where}: expected an object with a 'prompt' key")
    prompt = obj["prompt"]
    out_len = obj.get("output_len", obj.get("max_tokens", default_output_len))
    if not isinstance(out_len, int) or isinstance(out_len, bool) or out_len < 1:
        raise WorkloadError(f"{where}: 'output_len' must be a positive integer, got {out_len!r}")
    if isinstance(prompt, str) and prompt:
        return BenchRequest(None, prompt, out_len)
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)
    ):
        return BenchRequest(list(prompt), None, out_len)
    raise WorkloadError(f"{where}: 'prompt' must be a non-empty string or a list of token ids")


def _positive(**values: int) -> None:
    for name, v in values.items():
        if v < 1:
            raise WorkloadError(f"--{name.replace('_', '-')} must be at least 1, got {v}")


def load_tokenizer(path: Optional[str]):
    """tokenizers.Tokenizer from a model folder (or a tokenizer.json, or a Hugging Face hub id in the local
    cache), or None without a path."""
    if not path:
        return None
    from tokenizers import Tokenizer

    from pdserve.wire.model_source import resolve_model

    if not os.path.exists(path):  # an existing file or folder wins over a hub id of the same spelling
        path = resolve_model(path, "--tokenizer")

    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise WorkloadError(f"--tokenizer {path!r}: no tokenizer.json there")
    return Tokenizer.from_file(file)


def build_workload(args, num: int, tokenizer=None, seed_offset: int = 0) -> list[BenchRequest]:
    """The workload the CLI flags name, `num` requests, drawn from --seed (plus seed_offset, one per rate)."""
    tokens = TokenSource(args.seed + seed_offset, tokenizer)
    name = args.dataset_name
    if name == "random":
        return random_workload(num, args.input_len, args.output_len, tokens)
    if name == "prefix":
        return prefix_workload(
            num, args.prefix_groups, args.prefix_len, args.input_len, args.output_len, tokens
        )
    if name == "conversation":
        return conversation_workload(num, args.conversation_turns, args.input_len, args.output_len, tokens)
    if name == "jsonl":
        if not args.dataset_path:
            raise WorkloadError("--dataset-name jsonl needs --dataset-path FILE")
        return jsonl_workload(args.dataset_path, num, args.output_len, tokens)
    raise WorkloadError(f"unknown --dataset-name {name!r}")
