"""`/tokenize` and `/detokenize`, shaped as vLLM serves them.

POST /tokenize   {"model"?, "prompt": str, "add_special_tokens": true, "return_token_strs": false}
              or {"model"?, "messages": [...], "add_generation_prompt": true, "add_special_tokens": false}
              -> {"count": n, "max_model_len": m, "tokens": [ids], "token_strs": [str] | null}
POST /detokenize {"model"?, "tokens": [ids]} -> {"prompt": str}
Bad input is a 400 in OpenAI's error shape (a token id outside the vocabulary included).
"""

from __future__ import annotations

from typing import Optional

from pdserve.proxy.body_fields import get_field, is_int
from pdserve.proxy.chat_messages import check_messages, render_chat
from pdserve.proxy.errors import bad_request


def tokenize(body: dict, tokenizer, max_model_len: int, max_prompt_chars: Optional[int] = None) -> dict:
    has_prompt, has_messages = "prompt" in body, "messages" in body
    if has_prompt == has_messages:
        raise bad_request("give exactly one of 'prompt' (a string) or 'messages' (a chat)")
    if has_prompt:
        prompt = body["prompt"]
        if not isinstance(prompt, str):
            raise bad_request("'prompt' must be a string", param="prompt")
        if max_prompt_chars is not None and len(prompt) > max_prompt_chars:
            raise bad_request(f"'prompt' is longer than {max_prompt_chars} characters", param="prompt")
        ids = tokenizer.encode(prompt, add_special_tokens=get_field(body, "add_special_tokens", "bool", True))
    else:
        messages = check_messages(body["messages"])
        ids = render_chat(body, messages, tokenizer)  # the same template options as /v1/chat/completions
    strs = None
    if get_field(body, "return_token_strs", "bool", False):
        strs = [s if s is not None else "" for s in tokenizer.convert_ids_to_tokens(ids)]
    return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids, "token_strs": strs}


def detokenize(body: dict, tokenizer) -> dict:
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(is_int(t) for t in tokens):
        raise bad_request("'tokens' must be a list of token ids", param="tokens")
    vocab = len(tokenizer)
    bad = next((t for t in tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is outside the vocabulary (size {vocab})", param="tokens")
    return {"prompt": tokenizer.decode(tokens, skip_special_tokens=False)}
