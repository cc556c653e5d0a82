"""Chat messages -> one prompt string, with the model's chat template (Jinja, as transformers renders it).

A model's template is its tokenizer's `chat_template`, or the model config's `chat_template`: a name from
CHAT_TEMPLATES or a Jinja string. Rendering ends with the generation prompt (the assistant's turn). A template that
writes the BOS token itself would get a second one when the prompt is encoded with special tokens, so a leading BOS
is taken off here: the encoder adds it back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from prunefusion.errors import InvalidRequestError

ROLES = ("system", "user", "assistant", "developer", "tool")
MAX_MESSAGES = 256

# for base models, which were never trained on a chat format: each turn on its own "role: content" line
PLAIN = ("{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
         "{% if add_generation_prompt %}assistant:{% endif %}")
CHAT_TEMPLATES = {"plain": PLAIN}


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


def check_messages(messages: Sequence[ChatMessage]) -> None:
    if not messages:
        raise InvalidRequestError("messages", "must hold at least one message")
    if len(messages) > MAX_MESSAGES:
        raise InvalidRequestError("messages", f"at most {MAX_MESSAGES} messages, got {len(messages)}")
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise InvalidRequestError(f"messages[{i}].role", f"must be one of {list(ROLES)}, got {message.role[:32]!r}")


def template_of(tokenizer, configured: str | None) -> str | None:
    """The Jinja template a model renders chats with (None: it has none)."""
    if configured is not None:
        return CHAT_TEMPLATES.get(configured, configured)
    return getattr(tokenizer, "chat_template", None) or None


def render_chat(tokenizer, template: str | None, messages: Sequence[ChatMessage], model: str,
                adds_bos: bool = True) -> str:
    """The prompt for `messages`, ending where the assistant's reply starts. `adds_bos`: encoding the prompt adds
    the BOS token (then a BOS the template wrote is taken off)."""
    check_messages(messages)
    if template is None:
        raise InvalidRequestError("messages", f"model {model!r} has no chat template (its tokenizer has none and its "
                                              "config sets no chat_template); send a prompt instead")
    try:
        text = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                             chat_template=template, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # noqa: BLE001 - a template may raise anything (raise_exception(...) included)
        raise InvalidRequestError("messages", f"the chat template refused them: {str(err)[:200]}") from None
    bos = getattr(tokenizer, "bos_token", None)
    if adds_bos and bos and text.startswith(bos):
        text = text[len(bos):]
    return text
