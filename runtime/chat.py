"""Chat prompts: messages rendered through the chat template a bundle carries (from the source's
tokenizer_config.json, chat_template.jinja or GGUF metadata), as transformers' apply_chat_template does.

Templates are Jinja; the optional `jinja2` package renders them in its immutable sandbox, since a
template comes with the bundle and is as untrusted as the bundle itself (no attribute access to
Python internals, no mutation of the messages).
"""
from __future__ import annotations

from .errors import InputError

__all__ = ["check_messages", "render"]


def check_messages(messages) -> list[dict]:
    """A list of {"role": str, "content": str} objects, or one clear error."""
    if isinstance(messages, (str, bytes)) or not hasattr(messages, "__iter__"):
        raise InputError("messages must be a list of {'role': ..., 'content': ...} objects")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InputError("each message must be an object with string 'role' and 'content'")
        out.append(dict(m))
    if not out:
        raise InputError("messages is empty: nothing to answer")
    return out


def render(template: str | None, messages, *, bos_token: str = "", eos_token: str = "",
           add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages`, ending in the template's cue for the model's turn."""
    if template is None:
        raise InputError("this bundle carries no chat template (its source had none): use a plain prompt")
    messages = check_messages(messages)
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise InputError("chat prompts need the jinja2 package: pip install jinja2") from None

    def raise_exception(message):  # what templates call to reject a conversation
        raise InputError(f"the chat template rejects these messages: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                                add_generation_prompt=add_generation_prompt)
    except InputError:
        raise
    except TemplateError as e:
        raise InputError(f"the bundle's chat template failed: {' '.join(str(e).split())[:200]}") from None
