"""Reference logits processors for the oracle tests: transformers' own where it has one (repetition penalty,
sequence bias, bad words), small ones of the same shape where it has none (presence / frequency penalties as
OpenAI defines them, allowed token ids), and greedy decoding with transformers' model under them."""

from __future__ import annotations

import torch


class PresenceFrequency:
    """OpenAI's penalties over the generated tokens only (input_ids[:, prompt_len:])."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        counts = torch.zeros_like(scores)
        generated = input_ids[:, self.prompt_len :]
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class AllowedTokens:
    def __init__(self, allowed: list[int]):
        self.allowed = allowed

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        mask = torch.full_like(scores, float("-inf"))
        mask[:, self.allowed] = 0
        return scores + mask


def reference_processors(prompt_len: int, eos: list[int], **fields) -> list:
    """The transformers-side processors for the request fields given (vLLM's order: allowed, bad words,
    logit_bias, penalties)."""
    from transformers import (
        NoBadWordsLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        SequenceBiasLogitsProcessor,
    )

    procs = []
    if fields.get("allowed_token_ids"):
        procs.append(AllowedTokens(fields["allowed_token_ids"]))
    if fields.get("bad_words_token_ids"):
        procs.append(NoBadWordsLogitsProcessor(fields["bad_words_token_ids"], eos_token_id=eos))
    if fields.get("logit_bias"):
        procs.append(
            SequenceBiasLogitsProcessor({(int(k),): float(v) for k, v in fields["logit_bias"].items()})
        )
    if fields.get("repetition_penalty", 1.0) != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(fields["repetition_penalty"]))
    if fields.get("presence_penalty") or fields.get("frequency_penalty"):
        procs.append(
            PresenceFrequency(
                prompt_len, fields.get("presence_penalty", 0.0), fields.get("frequency_penalty", 0.0)
            )
        )
    return procs


@torch.no_grad()
def hf_greedy_processed(model, prompt_ids: list[int], max_tokens: int, processors: list) -> list[int]:
    """Greedy decoding with transformers' model and KV cache, each step's logits through `processors`."""
    ids = torch.tensor([prompt_ids])
    out = model(input_ids=ids, use_cache=True)
    generated: list[int] = []
    for _ in range(max_tokens):
        scores = out.logits[:, -1].float()
        for proc in processors:
            scores = proc(ids, scores)
        token = int(scores[0].argmax())
        generated.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return generated


# Every value bounded, so a random model's output ends well inside max_tokens (the mask does all the work).
SMALL_SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"enum": [1, 2, 3]},
        "tag": {"type": "string", "maxLength": 6},
    },
    "required": ["ok", "n", "tag"],
    "additionalProperties": False,
}
