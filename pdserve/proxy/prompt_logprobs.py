"""Prompt logprobs in the proxy's answers, shaped as vLLM's (dispatch.PromptRecords collects them from the
node's `PromptLogprobs` pieces).

- `prompt_logprobs` (both endpoints; on the completion choice, at the top of a chat response, as vLLM puts
  them): one item per prompt token, None for the first, else {token id as a string: {logprob, rank,
  decoded_token}} holding the prompt's own token plus the top k. -inf is sent as -9999.0 (JSON has no -inf).
- echo with logprobs (completions): the choice's logprobs start with the prompt's tokens, the first with null
  token_logprob and top_logprobs, then the generated tokens'; text offsets run on over both.
"""

from __future__ import annotations

from typing import Optional

from pdserve.proxy.choice import completion_logprobs, finite
from pdserve.wire.detokenizer import decode_token
from pdserve.wire.node_messages import LogprobEntry


def vllm_prompt_logprobs(tokenizer, prompt: list[int], entries: list[Optional[LogprobEntry]], k: int) -> list:
    """vLLM's `prompt_logprobs` list for a prompt and its records."""
    out: list = [None]
    for token, entry in zip(prompt[1:], entries[1:], strict=True):
        items = {token: (entry.logprob, entry.rank)}
        tops = zip(entry.top_ids[:k], entry.top_logprobs[:k], strict=True)
        for rank, (tid, lp) in enumerate(tops, start=1):
            items.setdefault(tid, (lp, rank))  # the prompt's token keeps its own rank
        out.append(
            {
                str(t): {
                    "logprob": finite(lp),
                    "rank": rank,
                    "decoded_token": decode_token(tokenizer, t),
                }
                for t, (lp, rank) in items.items()
            }
        )
    return out


def echo_logprobs(
    tokenizer,
    prompt: list[int],
    entries: list[Optional[LogprobEntry]],
    ids: list[int],
    generated: list[LogprobEntry],
) -> dict:
    """Completions' logprobs object for echo: the prompt's tokens (the first without logprobs), then `ids`
    with their `generated` entries (none for the echo chunk of a stream)."""
    first = decode_token(tokenizer, prompt[0])
    rest = completion_logprobs(tokenizer, prompt[1:] + list(ids), entries[1:] + list(generated), len(first))
    return {
        "tokens": [first] + rest["tokens"],
        "token_logprobs": [None] + rest["token_logprobs"],
        "top_logprobs": [None] + rest["top_logprobs"],
        "text_offset": [0] + rest["text_offset"],
    }


def echo_text_length(tokenizer, prompt: list[int]) -> int:
    """Where a stream's generated text offsets start after an echo with logprobs: past the prompt's tokens."""
    return sum(len(decode_token(tokenizer, t)) for t in prompt)
