"""Chat records: checked, rendered with the tokenizer's own chat template, and masked so that only the
assistant's tokens carry loss (the usual supervised fine-tuning recipe, e.g. X-EcoMLA's uptraining of an
Instruct model).

The mask comes from the rendered *text*: assistant turn ``i`` spans the characters between the render of
``messages[:i]`` with the generation prompt and the render of ``messages[:i + 1]`` (so it includes the
template's end-of-turn marker, which the model must learn to emit), and a token carries loss when it starts
overlapping such a span. That needs a template whose renders of a conversation's prefixes are prefixes of the
whole render, true of the Llama, Qwen, Mistral and DeepSeek templates; any other is a clear error.
"""

from __future__ import annotations

CHAT_ROLES = ("system", "user", "assistant", "tool")


def check_messages(messages: object, where: str) -> list[dict]:
    """The messages of one record, or a ``ValueError`` naming the record, the message and what is allowed."""
    if not isinstance(messages, list | tuple):
        raise ValueError(f"{where} holds {type(messages).__name__}, not a list of messages")
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}: message {number} is not a {{'role', 'content'}} mapping: {message!r}")
        if message["role"] not in CHAT_ROLES:
            raise ValueError(
                f"{where}: message {number} has unknown role {message['role']!r}; allowed are {list(CHAT_ROLES)}"
            )
        if not isinstance(message["content"], str):
            raise ValueError(
                f"{where}: message {number} content is {type(message['content']).__name__}, not text"
            )
    return list(messages)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """``(ids, loss_mask)`` of one conversation: 1 where a token belongs to an assistant turn."""
    text = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:index], generation_prompt=True) if index else ""
        through = _render(tokenizer, messages[: index + 1], generation_prompt=False)
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise ValueError(
                "data: the tokenizer's chat template renders a conversation's prefix differently from the "
                "start of the whole conversation, so assistant tokens cannot be located; use a template "
                "whose renders are prefix-stable (Llama, Qwen, Mistral, DeepSeek are)"
            )
        spans.append((len(before), len(through)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    # Overlap, not containment: a token that merges the prompt's last space with the answer's first letter
    # ("▁H" of " Her") must be predicted by the model, so it carries loss.
    mask = [
        int(any(first < hi and lo < last for lo, hi in spans)) for first, last in encoded["offset_mapping"]
    ]
    return encoded["input_ids"], mask


def _render(tokenizer, messages: list[dict], *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
