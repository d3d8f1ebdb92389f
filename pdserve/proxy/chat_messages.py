"""Chat messages (torch-free): their checks, and their rendering through the chat template into prompt ids."""

from __future__ import annotations

from pdserve.proxy.body_fields import get_field
from pdserve.proxy.errors import bad_request

CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")


def render_chat(body: dict, messages: list[dict], tokenizer) -> list[int]:
    """The prompt ids: the template (chat_template_kwargs, documents, reasoning_effort as its variables),
    continue_final_message leaving the last message open, add_special_tokens on top of the template's own."""
    add_generation_prompt = get_field(body, "add_generation_prompt", "bool", True)
    continue_final = get_field(body, "continue_final_message", "bool", False)
    if continue_final and add_generation_prompt and "add_generation_prompt" in body:
        raise bad_request(
            "'continue_final_message' and 'add_generation_prompt' cannot both be true",
            param="continue_final_message",
        )
    if continue_final:
        add_generation_prompt = False
        if messages[-1].get("role") != "assistant":
            raise bad_request(
                "'continue_final_message' needs the last message to be the assistant's",
                param="continue_final_message",
            )
    extra = dict(get_field(body, "chat_template_kwargs", "dict", None) or {})
    reserved = {"messages", "add_generation_prompt"} & set(extra)
    if reserved:
        raise bad_request(
            f"'chat_template_kwargs' may not set {', '.join(sorted(reserved))}", param="chat_template_kwargs"
        )
    for name in ("documents", "reasoning_effort"):
        if body.get(name) is not None:
            extra.setdefault(name, body[name])
    add_special = get_field(body, "add_special_tokens", "bool", False)
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **extra)
    except Exception as exc:  # noqa: BLE001 - a template may raise anything for odd messages
        raise bad_request(
            f"the chat template could not render these messages: {exc}", param="messages"
        ) from None
    if continue_final:
        final = content_text(messages[-1].get("content")).strip()
        cut = text.rfind(final) if final else -1
        if cut >= 0:
            text = text[: cut + len(final)]
    prompt = tokenizer.encode(text, add_special_tokens=add_special)
    if not prompt:
        raise bad_request("the rendered chat prompt is empty", param="messages")
    return prompt


def content_text(content) -> str:
    if isinstance(content, list):
        return "".join(part["text"] for part in content)
    return content or ""


def check_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}] must be an object", param="messages")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise bad_request(
                f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}", param="messages"
            )
        content = m.get("content")
        if isinstance(content, list):
            for part in content:
                if (
                    not isinstance(part, dict)
                    or part.get("type") != "text"
                    or not isinstance(part.get("text"), str)
                ):
                    raise bad_request(
                        f"messages[{i}].content parts must be {{'type': 'text', 'text': str}} "
                        "(only text is supported)",
                        param="messages",
                    )
        elif content is not None and not isinstance(content, str):
            raise bad_request(
                f"messages[{i}].content must be a string or a list of text parts", param="messages"
            )
        out.append(dict(m))
    return out
