"""Constrained decoding: a request's `response_format`, `grammar` or forced tool calls
(`tool_choice` `required` or a named function) as one llguidance grammar.

llguidance (https://github.com/guidance-ai/llguidance) compiles every kind: a JSON
Schema directly (`json_schema`), any JSON object as the schema `{"type": "object"}`
(`json_object`), a GBNF `grammar` through its GBNF-to-Lark converter, and tool calls as
a Lark grammar whose calls are `%json` blocks. The engines then compute each
constrained sequence's token mask with it at every step (`ConstraintTokenizer`,
`Constraint`). A grammar is compiled once before the request is admitted
(`GrammarChecker`): a schema or grammar that cannot be used is a 4xx naming the field,
never a failed stream.

JSON whitespace is bounded as llama.cpp's converters bounded it (`JSON_OPTIONS`): a
small model left free to write whitespace may fill `max_tokens` with newlines.
"""

from __future__ import annotations

import json
from typing import Any

from ..core.engine import Engine, GrammarChecker
from ..core.errors import InvalidField
from ..core.requests import MAX_GRAMMAR_CHARS, GenerationRequest
from ..core.tools import CALL_CLOSE, CALL_OPEN, FunctionDefinition, ToolConfig

#: llguidance's JSON compiler options: no whitespace but one optional space after a `:`
#: or a `,` (what llama.cpp's `json_schema_to_gbnf` allowed), and a `,` `:` separators.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ?",
                                "key_separator": ": ?"}


def has_grammar(request: GenerationRequest) -> bool:
    """Whether `request_grammar` has a grammar to compile and check: a `grammar`, a JSON
    `response_format` or active tools (whose schemas are checked even for `auto`)."""
    return (request.grammar is not None or request.constrained_format is not None
            or (request.tools is not None and request.tools.active))


def request_grammar(request: GenerationRequest, engine: Engine) -> str | None:
    """The llguidance grammar the reply must follow, or None; raises `InvalidField`
    naming `response_format`, `grammar` or `tools`. Compiles the grammar to check it
    (milliseconds; more for a large schema): run it in a worker thread."""
    if not has_grammar(request):
        return None
    fmt = request.constrained_format
    if request.tools is not None and request.tools.active:
        grammar = tool_call_grammar(request.tools)  # checks every schema, even for `auto`
        if not request.tools.forced:
            return None
        return _checked(grammar, engine, "tools")
    import llguidance

    param = "grammar" if request.grammar is not None else "response_format"
    if request.grammar is not None:
        try:
            grammar = llguidance.grammar_from("gbnf", request.grammar)
        except ValueError as exc:
            raise InvalidField(param, f"the grammar does not parse: {exc}") from None
    elif fmt is not None and fmt.json_schema is not None:
        schema = fmt.json_schema.json_schema
        if len(json.dumps(schema)) > MAX_GRAMMAR_CHARS:
            raise InvalidField(param, f"the schema is over {MAX_GRAMMAR_CHARS} characters")
        grammar = json_schema_grammar(schema, param)
    else:
        grammar = json_schema_grammar({"type": "object"}, param)
    return _checked(grammar, engine, param)


def json_schema_grammar(schema: dict[str, Any], param: str) -> str:
    """`schema` as an llguidance grammar (`JSON_OPTIONS`); `InvalidField(param)` if it is
    not a JSON object. Whether it compiles is `grammar_error`'s to say."""
    from llguidance import LLMatcher

    try:
        return LLMatcher.grammar_from_json_schema(
            schema, overrides=JSON_OPTIONS)  # type: ignore[arg-type]
    except ValueError as exc:
        raise InvalidField(param, f"the JSON schema cannot be compiled: {exc}") from None


def grammar_error(grammar: str) -> str | None:
    """llguidance's compiler run on `grammar` (no tokenizer needed): None if it is usable."""
    from llguidance import LLMatcher

    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        return f"the grammar cannot be compiled: {messages[0] if messages else 'unknown error'}"
    return None


def _checked(grammar: str, engine: Engine, param: str) -> str:
    if not isinstance(engine, GrammarChecker):
        raise InvalidField(param, "this model's engine does not support constrained decoding")
    error = engine.grammar_error(grammar)
    if error is not None:
        raise InvalidField(param, error)
    return grammar


def tool_call_grammar(tools: ToolConfig) -> str:
    """The reply as calls in the tool format (core/tools.py), one (`parallel_tool_calls`
    false) or more, each naming a function it may call (`name` first) with arguments
    that follow that function's `parameters` schema. A schema that cannot be compiled:
    `InvalidField` naming `tools.N.function.parameters`."""
    from llguidance import LLMatcher

    callable_names = {f.name for f in tools.callable}
    alternatives = []
    for index, tool in enumerate(tools.tools):
        function = tool.function
        arguments, defs = _arguments_schema(function, index)
        if function.name in callable_names:
            call: dict[str, Any] = {
                "type": "object",
                "properties": {"name": {"const": function.name}, "arguments": arguments},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            if defs:
                call["$defs"] = defs
            alternatives.append(call)
    rules = [f"call{i}: %json {json.dumps(_with_options(a))}" for i, a in enumerate(alternatives)]
    one = " | ".join(f"call{i}" for i in range(len(alternatives)))
    open_, close = json.dumps(f"{CALL_OPEN}\n"), json.dumps(f"\n{CALL_CLOSE}")
    start = 'one ("\\n" one)*' if tools.parallel_tool_calls else "one"
    lark = "\n".join([
        f"start: {start}",
        f"one: {open_} call {close}",
        f"call: {one}",
        *rules,
    ])
    if len(lark) > 8 * MAX_GRAMMAR_CHARS:
        raise InvalidField("tools", "the tools' schemas make too large a grammar")
    return LLMatcher.grammar_from_lark(lark)


def _with_options(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with `JSON_OPTIONS` as its `x-guidance` (how a `%json` block takes them)."""
    return {**schema, "x-guidance": JSON_OPTIONS}


def _arguments_schema(function: FunctionDefinition, index: int
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the function's `parameters`, its `$defs`) with its `$ref`s pointing into those
    `$defs` under names of this tool's own (`_own_refs`), so that they resolve once the
    schema is put in a call's; compiled once on its own, so that an error names it."""
    param = f"tools.{index}.function.parameters"
    original = function.arguments_schema()
    if len(json.dumps(original)) > MAX_GRAMMAR_CHARS:
        raise InvalidField(param, f"the schema is over {MAX_GRAMMAR_CHARS} characters")
    try:
        schema = _own_refs(original, f"tool{index}")
    except ValueError as exc:
        raise InvalidField(param, f"the JSON schema cannot be compiled: {exc}") from None
    error = grammar_error(json_schema_grammar(schema, param))
    if error is not None:
        raise InvalidField(param, error)
    defs = schema.pop("$defs", None) or {}
    return schema, defs


def _own_refs(schema: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A copy of `schema` whose local `$ref`s all point into `$defs` under names that
    start with `prefix`: the tools' schemas are put in one grammar whose `$ref`s resolve
    against each call's schema, so two tools that both define `$defs/Item` must not
    share one name."""
    names: dict[str, str] = {}

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/") and ref not in names:
                names[ref] = f"{prefix}-{len(names)}"
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: rewrite(v) for k, v in node.items()}
            ref = node.get("$ref")
            if isinstance(ref, str) and ref in names:
                out["$ref"] = f"#/$defs/{names[ref]}"
            return out
        if isinstance(node, list):
            return [rewrite(value) for value in node]
        return node

    def target(ref: str) -> Any:
        node: Any = schema
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            node = node[int(part)] if isinstance(node, list) else node[part]
        return node

    collect(schema)
    out: dict[str, Any] = rewrite(schema)
    out.pop("$defs", None)  # every ref now points at a copy under its own name
    out.pop("definitions", None)
    if not names:
        return out
    defs = {}
    for ref, name in names.items():
        try:
            defs[name] = rewrite(target(ref))
        except (KeyError, IndexError, ValueError, TypeError):
            raise ValueError(f"cannot resolve the ref {ref}") from None
    out["$defs"] = defs
    return out
