"""Chat templates: turning messages into one prompt string for llama.cpp.

Uses llama-cpp-python's formatters: a named one (`CHAT_FORMAT`) or the Jinja template in
the GGUF metadata. Gemma has no system role, so a system message is folded into the
first user turn (as Gemma's own template does) instead of being dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from llama_cpp import llama_chat_format as formats

from ..core.engine import ChatPrompt, ModelLoadError
from ..core.messages import ChatMessage

_NAMED: dict[str, Callable[..., Any]] = {
    "gemma": formats.format_gemma,
    "chatml": formats.format_chatml,
    "llama-2": formats.format_llama2,
    "llama-3": formats.format_llama3,
    "mistral-instruct": formats.format_mistral_instruct,
    "zephyr": formats.format_zephyr,
    "alpaca": formats.format_alpaca,
    "qwen": formats.format_qwen,
    "openchat": formats.format_openchat,
}
_FOLD_SYSTEM = {"gemma"}

NAMED_FORMATS = tuple(sorted(_NAMED))


class ChatTemplate:
    """Renders messages for one model; pick with `ChatTemplate.select()`."""

    def __init__(self, name: str, formatter: Callable[..., Any], *, add_bos: bool) -> None:
        self.name = name
        self._formatter = formatter
        self._add_bos = add_bos

    @classmethod
    def select(
        cls, chat_format: str | None, metadata: Mapping[str, str], *, bos: str, eos: str
    ) -> ChatTemplate:
        if chat_format is not None:
            if chat_format not in _NAMED:
                raise ModelLoadError(
                    f"CHAT_FORMAT: unknown format {chat_format!r}; "
                    f"known: {', '.join(NAMED_FORMATS)}"
                )
            return cls(chat_format, _NAMED[chat_format], add_bos=True)
        template = metadata.get("tokenizer.chat_template")
        if template:
            jinja = formats.Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
            # Jinja templates write the BOS text themselves.
            return cls("gguf", jinja, add_bos=False)
        return cls("chatml", _NAMED["chatml"], add_bos=True)

    def render(self, messages: Sequence[ChatMessage]) -> ChatPrompt:
        items = [{"role": m.role, "content": m.content} for m in messages]
        if self.name in _FOLD_SYSTEM:
            items = _fold_system_into_first_user(items)
        result = self._formatter(messages=items)
        stop = result.stop
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        return ChatPrompt(text=result.prompt, stop=stops, add_bos=self._add_bos)


def _fold_system_into_first_user(items: list[dict[str, str]]) -> list[dict[str, str]]:
    system = "\n\n".join(i["content"] for i in items if i["role"] == "system")
    rest = [i for i in items if i["role"] != "system"]
    if not system:
        return rest
    for i, item in enumerate(rest):
        if item["role"] == "user":
            rest[i] = {"role": "user", "content": f"{system}\n\n{item['content']}"}
            return rest
    return [{"role": "user", "content": system}, *rest]
