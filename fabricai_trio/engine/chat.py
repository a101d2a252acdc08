"""Chat templates: turning messages into a prompt whose control tokens come only from
the template.

Which template (`select_template`): `CHAT_FORMAT` names one of llama-cpp-python's
formats; otherwise the model's own Jinja template (`tokenizer.chat_template` in the
GGUF metadata) is rendered in jinja2's `ImmutableSandboxedEnvironment` (a template is
data from a file: it must not reach Python internals or mutate what it is given);
a model without one gets a fallback format (docs/models.md).

Why parts, not one string: a user who types `<|im_start|>system` or `<start_of_turn>`
must not open a turn of their own. `render()` renders the messages twice, once as
they are and once with each content replaced by a unique placeholder; the placeholder
rendering says which characters the template wrote and which came from a message.
Only the template's parts may be tokenized with control tokens (`PromptPart.template`);
see `ModelText.tokenize_chat`. Templates that transform a content (`| trim`) are
recognised by comparing the two renderings; one that does something else with it
(e.g. branches on it) gets the content as written, and a warning in the log.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from llama_cpp import llama_chat_format as formats

from ..core.engine import ModelLoadError, PromptPart
from ..core.errors import InvalidMessages
from ..core.messages import ChatMessage
from ..core.tools import CALL_OPEN

Items = list[dict[str, Any]]
Renderer = Callable[..., str]
"""Messages (`role`, `content`; `tools=` for a template with a tool format) -> the
prompt text, ending with the assistant's cue."""

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
GGUF_TEMPLATE = "gguf"
"""`EngineInfo.chat_format` when the model's own Jinja template is in use."""

log = logging.getLogger(__name__)


class ChatTemplate:
    """Renders messages for one model; build it with `select_template()`."""

    def __init__(
        self, name: str, renderer: Renderer, *, add_bos: bool, stop: tuple[str, ...] = (),
        tool_format: bool = False,
    ) -> None:
        self.name = name
        self._renderer = renderer
        self.add_bos = add_bos
        """Whether tokenizing should add the model's BOS (Jinja templates write it)."""
        self.stop = stop
        self.tool_format = tool_format
        """Whether the template writes tools, calls and results itself, in the tool
        format of core/tools.py (`<tool_call>`): Qwen 2.5 and 3, Hermes, SmolLM3."""

    def render(self, messages: Sequence[ChatMessage]) -> tuple[PromptPart, ...]:
        """The prompt, split into template parts and message contents.

        Raises `InvalidMessages` if the template refuses the messages.
        """
        items = [{"role": m.role, "content": m.content} for m in messages]
        return self.render_items(items)

    def render_items(
        self, items: Items, tools: list[dict[str, Any]] | None = None
    ) -> tuple[PromptPart, ...]:
        """`items` (with `tools`, for a template with a tool format) as parts. An empty
        content gets no placeholder: a template may branch on whether it is empty."""
        marker = f"\ue000{secrets.token_hex(6)}:"
        placeholders = [f"{marker}{i}\ue001" if item["content"] else ""
                        for i, item in enumerate(items)]
        real = self._call(items, tools)
        marked = self._call(
            [{**item, "content": ph} for item, ph in zip(items, placeholders, strict=True)],
            tools,
        )
        # [template, index, template, index, ..., template]
        pieces = re.split(re.escape(marker) + r"(\d+)\ue001", marked)
        templates = pieces[0::2]
        contents = [items[int(i)]["content"] for i in pieces[1::2]]
        matched = _match_contents(real, templates, contents)
        if matched is None:
            log.warning(
                "chat template %s uses message contents in a way this server cannot "
                "follow; contents are passed as written", self.name
            )
            matched = contents
        parts: list[PromptPart] = []
        for template, content in zip(templates, [*matched, ""], strict=True):
            if template:
                parts.append(PromptPart(template, template=True))
            if content:
                parts.append(PromptPart(content, template=False))
        return tuple(parts)

    def end_of_turn(self) -> str:
        """What the template writes right after an assistant message (its end-of-turn
        marker, e.g. `<|im_end|>\\n`), found by rendering a probe conversation."""
        parts = self.render_items(
            [{"role": "user", "content": "\ue002u"}, {"role": "assistant", "content": "\ue002a"}]
        )
        after = False
        for part in parts:
            if after:
                return part.text if part.template else ""
            after = not part.template and part.text == "\ue002a"
        return ""

    def _call(self, items: Items, tools: list[dict[str, Any]] | None = None) -> str:
        try:
            if tools is not None:
                return self._renderer(items, tools=tools)
            return self._renderer(items)
        except (TemplateError, ValueError, TypeError, KeyError, IndexError) as exc:
            raise InvalidMessages(f"chat template {self.name}: {exc}") from None


def _match_contents(
    real: str, templates: Sequence[str], contents: Sequence[str]
) -> list[str] | None:
    """The contents as they appear in `real` = templates[0] + f(contents[0]) +
    templates[1] + ..., where each f is one of the transforms templates apply (none,
    strip); None if `real` is not of that shape."""
    if not real.startswith(templates[0]):
        return None
    pos = len(templates[0])
    out: list[str] = []
    for content, template in zip(contents, templates[1:], strict=True):
        for candidate in dict.fromkeys(
            (content, content.strip(), content.rstrip(), content.lstrip())
        ):
            end = pos + len(candidate)
            if real.startswith(candidate, pos) and real.startswith(template, end):
                out.append(candidate)
                pos = end + len(template)
                break
        else:
            return None
    return out if pos == len(real) else None


def select_template(
    chat_format: str | None,
    metadata: Mapping[str, str],
    *,
    bos: str,
    eos: str,
    fallback: str,
) -> ChatTemplate:
    """`chat_format` if set, else the GGUF's Jinja template, else `fallback`."""
    if chat_format is not None:
        return named_template(chat_format)
    source = metadata.get("tokenizer.chat_template")
    if source:
        return ChatTemplate(
            GGUF_TEMPLATE, jinja_renderer(source, bos=bos, eos=eos), add_bos=False,
            stop=(eos,) if eos else (), tool_format=has_tool_format(source),
        )
    return named_template(fallback)


def named_template(name: str) -> ChatTemplate:
    """One of llama-cpp-python's formats (`CHAT_FORMAT`)."""
    formatter = _NAMED.get(name)
    if formatter is None:
        raise ModelLoadError(
            f"CHAT_FORMAT: unknown format {name!r}; known: {', '.join(NAMED_FORMATS)}"
        )
    stop = formatter(messages=[{"role": "user", "content": "x"}]).stop
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    fold = name in _FOLD_SYSTEM

    def render(items: Items) -> str:
        if fold:
            items = _fold_system_into_first_user(items)
        prompt: str = formatter(messages=items).prompt
        return prompt

    return ChatTemplate(name, render, add_bos=True, stop=stops)


def has_tool_format(source: str) -> bool:
    """Whether a Jinja chat template renders `tools` and writes calls as `<tool_call>`
    (the one tool format this server parses)."""
    return "tools" in source and CALL_OPEN in source and "tool_calls" in source


def jinja_renderer(source: str, *, bos: str, eos: str) -> Renderer:
    """A sandboxed Jinja template with the variables Hugging Face templates expect."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = _tojson
    try:
        template = env.from_string(source)
    except TemplateError as exc:
        raise ModelLoadError(f"the model's chat template does not parse: {exc}") from None

    def raise_exception(message: str) -> None:
        raise InvalidMessages(message)

    def render(items: Items, tools: list[dict[str, Any]] | None = None) -> str:
        now = datetime.now()
        return template.render(
            messages=items,
            tools=tools,
            add_generation_prompt=True,
            bos_token=bos,
            eos_token=eos,
            raise_exception=raise_exception,
            strftime_now=now.strftime,
        )

    return render


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    """Like Hugging Face's: no HTML escaping, non-ASCII kept."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _fold_system_into_first_user(items: Items) -> Items:
    """Gemma has no system role: its own template puts the system text at the start of
    the first user turn, so do the same instead of dropping it."""
    system = "\n\n".join(i["content"] for i in items if i["role"] == "system")
    rest = [i for i in items if i["role"] != "system"]
    if not system:
        return rest
    for i, item in enumerate(rest):
        if item["role"] == "user":
            rest[i] = {"role": "user", "content": f"{system}\n\n{item['content']}"}
            return rest
    return [{"role": "user", "content": system}, *rest]
