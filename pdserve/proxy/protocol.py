"""OpenAI request bodies -> validated, tokenized requests (torch-free). Every problem is a 400 naming its
param.

Decisions:
- Bodies are plain JSON maps checked by hand (not pydantic models): error messages name the exact parameter,
  and unknown keys are ignored as OpenAI's API does.
- Sampling limits are SamplingParams' (wire/sampling_params.py), checked again by the nodes. OpenAI's own
  ranges apply on top where they are narrower: temperature <= 2, n <= 128, at most 16 stop strings.
- Sizes a client controls are bounded before anything is sent (the node frames have a size limit too, and a
  frame over it would be a 500 at the wire): stop strings (16, 4 KiB in all), stop_token_ids (256).
- Every token id a client sends (prompt ids, stop_token_ids) must index the vocabulary: an id past it would
  raise inside the node's engine step. The nodes check again at their door (a proxy is not trusted to have
  checked).
- Completions accept a string, a list of strings (a batch), a list of token ids, or a list of such lists;
  choice i*n + j is the j-th sample of prompt i. Chat renders the checkpoint's chat template.
- max_tokens: completions default to 16 (OpenAI); chat defaults to what is left of --max-model-len.
  A prompt plus max_tokens over --max-model-len is a 400 with code "context_length_exceeded".
- n > 1 fans out n node requests; with a seed, sample j uses seed + j, so seeded results are reproducible
  and still differ between samples.
- logprobs: completions take an int k (top k alternatives); chat takes logprobs=true and top_logprobs=k.
- Extensions (vLLM's names): top_k, min_p, min_tokens, ignore_eos, stop_token_ids, skip_special_tokens,
  include_stop_str_in_output, return_token_ids (choices then carry `token_ids`, and `prompt_token_ids`).
- Every other field vLLM accepts is honoured or refused with a 400 naming it (proxy/request_fields.py holds
  the audit and the fields added there: penalties, logit_bias, bad_words, allowed_token_ids, cache_salt,
  structured output, truncate_prompt_tokens); tools, suffix and best_of > n are refused here.
- Chat: chat_template_kwargs (and documents, reasoning_effort) reach the template as variables;
  continue_final_message leaves the last (assistant) message open; add_special_tokens (default false for chat,
  true for completions) adds the tokenizer's own special tokens; a per-request chat_template is refused (vLLM
  refuses it too unless told to trust it); the server's --chat-template replaces the checkpoint's.
- echo (completions) puts the prompt text before each choice's text; stream_options.continuous_usage_stats
  puts the usage so far on every chunk.
- prompt_logprobs k (vLLM's extension, both endpoints; request_fields.prompt_logprobs checks it): the node
  that prefills computes each prompt token's logprob; echo with logprobs asks for them too (k = logprobs), as
  vLLM does, and the choice's logprobs then start with the prompt's tokens. Only sample 0 of each prompt asks
  the nodes: the other samples share its prompt and its records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from pdserve.proxy import request_fields
from pdserve.proxy.body_fields import get_field, is_int
from pdserve.proxy.chat_messages import check_messages, content_text, render_chat
from pdserve.proxy.errors import bad_request
from pdserve.wire.sampling_params import MAX_LOGPROBS, SamplingParams

MAX_N = 128
MAX_STOP = 16
MAX_STOP_BYTES = 4096  # all stop strings together, UTF-8
MAX_STOP_TOKEN_IDS = 256
MAX_TEMPERATURE = 2.0


@dataclass
class GenerationRequest:
    kind: str  # "completion" | "chat"
    model: str
    prompts: list[list[int]]  # token ids per prompt
    params: SamplingParams  # params.n is the number of samples per prompt
    stream: bool = False
    include_usage: bool = False
    logprobs: Optional[int] = None  # top-k alternatives; None = no logprobs
    user: Optional[str] = None
    return_token_ids: bool = False  # vLLM's extension: choices carry token_ids (and prompt_token_ids)
    prompt_texts: list[Optional[str]] = field(default_factory=list)
    echo: bool = False  # completions: each choice's text starts with its prompt's text
    chat_echo: str = ""  # chat echo: the last message's content when it is the assistant's (vLLM's meaning)
    continuous_usage: bool = False  # stream_options.continuous_usage_stats
    response_id: Optional[str] = None  # the client's request_id (vLLM's extension), else a fresh one
    truncate_prompt_tokens: Optional[int] = None
    truncation_side: str = "left"
    prompt_logprobs: Optional[int] = None  # k; the prompt's records are computed by sample 0 only

    def choice_params(self, j: int) -> dict:
        """SamplingParams.to_dict() for sample j (n=1 on the node; seed + j when seeded; prompt logprobs for
        sample 0 only)."""
        changes: dict[str, Any] = {"n": 1}
        if self.params.seed is not None:
            changes["seed"] = self.params.seed + j
        if j > 0:
            changes["prompt_logprobs"] = None
        return self.params.clone(**changes).to_dict()


# ----------------------------------------------------------------------------------------------- field checks
def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad_request("'stop' must be a string or a list of strings", param="stop")
    if len(stop) > MAX_STOP:
        raise bad_request(f"'stop' may hold at most {MAX_STOP} strings, got {len(stop)}", param="stop")
    if any(not s for s in stop):
        raise bad_request("'stop' strings must not be empty", param="stop")
    try:
        size = sum(len(s.encode("utf-8")) for s in stop)
    except UnicodeEncodeError:
        raise bad_request("'stop' holds a lone surrogate (not valid Unicode text)", param="stop") from None
    if size > MAX_STOP_BYTES:
        raise bad_request(
            f"'stop' strings may hold at most {MAX_STOP_BYTES} bytes in all, got {size}", param="stop"
        )
    return stop


def _stop_token_ids(body: dict, vocab: int) -> list[int]:
    ids = body.get("stop_token_ids") or []
    if not isinstance(ids, list) or not all(is_int(t) for t in ids):
        raise bad_request("'stop_token_ids' must be a list of integers", param="stop_token_ids")
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise bad_request(
            f"'stop_token_ids' may hold at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}",
            param="stop_token_ids",
        )
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_request(
            f"'stop_token_ids' holds {bad}, outside the vocabulary (size {vocab})", param="stop_token_ids"
        )
    return ids


def _refuse_unsupported(body: dict, kind: str) -> None:
    request_fields.audit(body, kind)
    if body.get("suffix"):
        raise bad_request("'suffix' is not supported", param="suffix")
    if body.get("tools") or body.get("functions"):
        raise bad_request("tools and function calling are not supported", param="tools")
    if body.get("tool_choice") not in (None, "none", "auto"):
        raise bad_request("'tool_choice' needs tools, which are not supported", param="tool_choice")
    if body.get("chat_template") is not None:
        raise bad_request(
            "a per-request 'chat_template' is not accepted (start the proxy with --chat-template)",
            param="chat_template",
        )


def _sampling(
    body: dict, max_tokens: Optional[int], logprobs: Optional[int], tokenizer, prompt_logprobs: Optional[int]
) -> SamplingParams:
    vocab = len(tokenizer)
    n = get_field(body, "n", "int", 1)
    if not 1 <= n <= MAX_N:
        raise bad_request(f"'n' must be between 1 and {MAX_N}, got {n}", param="n")
    best_of = get_field(body, "best_of", "int", None)
    if best_of is not None and best_of != n:
        raise bad_request("'best_of' other than n is not supported", param="best_of")
    temperature = get_field(body, "temperature", "num", 1.0)
    if not 0 <= temperature <= MAX_TEMPERATURE:
        raise bad_request(
            f"'temperature' must be between 0 and {MAX_TEMPERATURE:g}, got {temperature}", param="temperature"
        )
    stop_token_ids = _stop_token_ids(body, vocab)
    kwargs = dict(
        n=n,
        temperature=temperature,
        top_p=get_field(body, "top_p", "num", 1.0),
        top_k=get_field(body, "top_k", "int", 0),
        min_p=get_field(body, "min_p", "num", 0.0),
        seed=get_field(body, "seed", "int", None),
        stop=_stop(body),
        stop_token_ids=stop_token_ids,
        max_tokens=max_tokens,
        min_tokens=get_field(body, "min_tokens", "int", 0),
        ignore_eos=get_field(body, "ignore_eos", "bool", False),
        logprobs=logprobs,
        skip_special_tokens=get_field(body, "skip_special_tokens", "bool", True),
        include_stop_str_in_output=get_field(body, "include_stop_str_in_output", "bool", False),
        prompt_logprobs=prompt_logprobs,
    )
    kwargs.update(request_fields.extra_sampling(body, tokenizer))
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        text = str(exc)
        param = text.split()[0] if text.split() and text.split()[0] in kwargs else None
        raise bad_request(text, param=param) from None


def _stream_options(body: dict, stream: bool) -> tuple[bool, bool]:
    """(include_usage, continuous_usage_stats)."""
    opts = get_field(body, "stream_options", "dict", None)
    if opts is None:
        return False, False
    if not stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    return bool(get_field(opts, "include_usage", "bool", False)), bool(
        get_field(opts, "continuous_usage_stats", "bool", False)
    )


def _finish(req: "GenerationRequest", body: dict) -> "GenerationRequest":
    """The request-level extensions every endpoint shares."""
    req.response_id = get_field(body, "request_id", "str", None)
    k = get_field(body, "truncate_prompt_tokens", "int", None)
    if k is not None and (k < -1 or k == 0):
        raise bad_request(
            "'truncate_prompt_tokens' must be -1 or an integer >= 1", param="truncate_prompt_tokens"
        )
    req.truncate_prompt_tokens = k
    side = get_field(body, "truncation_side", "str", None) or "left"
    if side not in ("left", "right"):
        raise bad_request("'truncation_side' must be 'left' or 'right'", param="truncation_side")
    req.truncation_side = side
    return req


def _max_tokens(body: dict, names: tuple[str, ...]) -> Optional[int]:
    for name in names:
        value = get_field(body, name, "int", None)
        if value is not None:
            if value < 1:
                raise bad_request(f"'{name}' must be at least 1, got {value}", param=name)
            return value
    return None


# --------------------------------------------------------------------------------------------------- requests


def _too_long(chars: int, max_prompt_chars: Optional[int], param: str) -> None:
    """A text with more characters than max_model_len tokens could ever cover is refused before tokenizing it
    (tokenizing megabytes takes seconds, and its answer is known)."""
    if max_prompt_chars is not None and chars > max_prompt_chars:
        raise bad_request(
            f"This model's maximum context length cannot hold a prompt of {chars} characters "
            f"(at most {max_prompt_chars}).",
            param=param,
            code="context_length_exceeded",
        )


def parse_completion(
    body: dict, tokenizer, max_prompt_chars: Optional[int] = None, defaults: Optional[dict] = None
) -> GenerationRequest:
    _refuse_unsupported(body, "completion")
    body = _with_defaults(body, defaults)
    stream = get_field(body, "stream", "bool", False)
    logprobs = get_field(body, "logprobs", "int", None)
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise bad_request(
            f"'logprobs' must be between 0 and {MAX_LOGPROBS}, got {logprobs}", param="logprobs"
        )
    echo = get_field(body, "echo", "bool", False)
    prompt_logprobs = request_fields.prompt_logprobs(body, stream)
    if prompt_logprobs is None and echo and logprobs is not None:
        prompt_logprobs = logprobs  # vLLM's: the echoed prompt's tokens carry logprobs too
    max_tokens = _max_tokens(body, ("max_tokens",))
    if max_tokens is None:
        max_tokens = (defaults or {}).get("max_tokens", 16)
    params = _sampling(body, max_tokens, logprobs, tokenizer, prompt_logprobs)
    if body.get("truncate_prompt_tokens") is not None:
        max_prompt_chars = None  # a long prompt is cut, not refused
    add_special = get_field(body, "add_special_tokens", "bool", True)
    prompts, texts = _completion_prompts(body.get("prompt"), tokenizer, max_prompt_chars, add_special)
    include_usage, continuous = _stream_options(body, stream)
    req = GenerationRequest(
        "completion",
        body.get("model"),
        prompts,
        params,
        stream,
        include_usage,
        logprobs,
        get_field(body, "user", "str"),
        get_field(body, "return_token_ids", "bool", False),
        texts,
        echo=echo,
        continuous_usage=continuous,
        prompt_logprobs=prompt_logprobs,
    )
    return _finish(req, body)


def _with_defaults(body: dict, defaults: Optional[dict]) -> dict:
    """The checkpoint's generation_config.json defaults (--generation-config) under what the client sent."""
    if not defaults:
        return body
    merged = {k: v for k, v in defaults.items() if k != "max_tokens"}
    merged.update({k: v for k, v in body.items() if v is not None})
    return merged


def _completion_prompts(
    prompt, tokenizer, max_prompt_chars: Optional[int] = None, add_special_tokens: bool = True
) -> tuple[list[list[int]], list[Optional[str]]]:
    def ids_ok(x) -> bool:
        return isinstance(x, list) and all(is_int(t) and t >= 0 for t in x)

    if prompt is None:
        raise bad_request("'prompt' is required", param="prompt")
    if isinstance(prompt, str):
        items = [prompt]
    elif ids_ok(prompt) and prompt and is_int(prompt[0]):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or (ids_ok(p) and p) for p in prompt):
        items = prompt
    else:
        raise bad_request(
            "'prompt' must be a string, a list of strings, a list of token ids or a list of such "
            "lists (non-empty)",
            param="prompt",
        )
    ids, texts = [], []
    vocab = len(tokenizer)
    for item in items:
        if isinstance(item, str):
            _too_long(len(item), max_prompt_chars, "prompt")
            try:
                ids.append(tokenizer.encode(item, add_special_tokens=add_special_tokens))
            except (TypeError, ValueError) as exc:  # a lone surrogate, when the body check was bypassed
                raise bad_request(f"'prompt' cannot be tokenized: {exc}", param="prompt") from None
            texts.append(item)
        else:
            if max(item) >= vocab:
                raise bad_request(
                    f"prompt token id {max(item)} is outside the vocabulary (size {vocab})", param="prompt"
                )
            ids.append(list(item))
            texts.append(None)
    for p in ids:
        if not p:
            raise bad_request("the prompt is empty after tokenization", param="prompt")
    return ids, texts


def parse_chat(
    body: dict, tokenizer, max_prompt_chars: Optional[int] = None, defaults: Optional[dict] = None
) -> GenerationRequest:
    _refuse_unsupported(body, "chat")
    body = _with_defaults(body, defaults)
    stream = get_field(body, "stream", "bool", False)
    want_logprobs = get_field(body, "logprobs", "bool", False)
    top = get_field(body, "top_logprobs", "int", None)
    if top is not None and not want_logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs' set to true", param="top_logprobs")
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise bad_request(
            f"'top_logprobs' must be between 0 and {MAX_LOGPROBS}, got {top}", param="top_logprobs"
        )
    logprobs = (top or 0) if want_logprobs else None
    messages = check_messages(body.get("messages"))
    if body.get("truncate_prompt_tokens") is None:
        _too_long(sum(len(content_text(m.get("content"))) for m in messages), max_prompt_chars, "messages")
    prompt = render_chat(body, messages, tokenizer)
    max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"))
    if max_tokens is None:
        max_tokens = (defaults or {}).get("max_tokens")
    prompt_logprobs = request_fields.prompt_logprobs(body, stream)
    params = _sampling(body, max_tokens, logprobs, tokenizer, prompt_logprobs)
    include_usage, continuous = _stream_options(body, stream)
    req = GenerationRequest(
        "chat",
        body.get("model"),
        [prompt],
        params,
        stream,
        include_usage,
        logprobs,
        get_field(body, "user", "str"),
        get_field(body, "return_token_ids", "bool", False),
        [None],
        continuous_usage=continuous,
        prompt_logprobs=prompt_logprobs,
    )
    if get_field(body, "echo", "bool", False) and messages[-1].get("role") == "assistant":
        req.chat_echo = content_text(messages[-1].get("content"))
    return _finish(req, body)


def check_length(req: GenerationRequest, max_model_len: int) -> None:
    """400 when a prompt (plus max_tokens) does not fit; fill in chat's default max_tokens. Prompts are cut to
    truncate_prompt_tokens first (-1: the context length)."""
    if req.truncate_prompt_tokens is not None:
        k = max_model_len if req.truncate_prompt_tokens == -1 else req.truncate_prompt_tokens
        left = req.truncation_side == "left"
        req.prompts = [p[-k:] if left else p[:k] for p in req.prompts]
        req.prompt_texts = [None] * len(req.prompts)  # the text no longer matches the ids
    longest = max(len(p) for p in req.prompts)
    if longest >= max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
            f"has {longest} tokens, which leaves no room for a completion.",
            param="messages" if req.kind == "chat" else "prompt",
            code="context_length_exceeded",
        )
    if req.params.max_tokens is None:
        req.params.max_tokens = max_model_len - longest
        return
    if longest + req.params.max_tokens > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{longest + req.params.max_tokens} tokens ({longest} in the prompt, "
            f"{req.params.max_tokens} for the completion). Please reduce the prompt or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
