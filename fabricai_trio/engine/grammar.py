"""Constrained decoding: a request's `response_format`, `grammar` or forced tool calls
(`tool_choice` `required` or a named function) as one GBNF grammar.

JSON Schema is translated by llama-cpp-python's `json_schema_to_gbnf` (the converter
llama.cpp ships), any JSON object by its JSON grammar; the engine then runs llama.cpp's
grammar sampler per sequence. The grammar is checked against the model's vocabulary
before the request is admitted (`GrammarChecker`): a schema or grammar that cannot be
used is a 4xx naming the field, never a failed stream.
"""

from __future__ import annotations

import json
from typing import Any

from ..core.engine import Engine, GrammarChecker
from ..core.errors import InvalidField
from ..core.requests import MAX_GRAMMAR_CHARS, GenerationRequest
from ..core.tools import CALL_CLOSE, CALL_OPEN, FunctionDefinition, ToolConfig


def request_grammar(request: GenerationRequest, engine: Engine) -> str | None:
    """The GBNF grammar the reply must follow, or None; raises `InvalidField` naming
    `response_format`, `grammar` or `tools`."""
    fmt = request.constrained_format
    if request.tools is not None and request.tools.active:
        grammar = tool_call_grammar(request.tools)  # checks every schema, even for `auto`
        if not request.tools.forced:
            return None
        return _checked(grammar, engine, "tools")
    if fmt is None and request.grammar is None:
        return None
    # llama-cpp-python is imported on first use: a plug-in engine may run without it.
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    param = "grammar" if request.grammar is not None else "response_format"
    if request.grammar is not None:
        grammar = request.grammar
    elif fmt is not None and fmt.json_schema is not None:
        schema = json.dumps(fmt.json_schema.json_schema)
        if len(schema) > MAX_GRAMMAR_CHARS:
            raise InvalidField(param, f"the schema is over {MAX_GRAMMAR_CHARS} characters")
        try:
            grammar = json_schema_to_gbnf(schema)
        except Exception as exc:  # the converter raises whatever it meets: all are 4xx
            raise InvalidField(param, f"the JSON schema cannot be compiled: {exc}") from None
    else:
        grammar = JSON_GBNF
    return _checked(grammar, engine, param)


def _checked(grammar: str, engine: Engine, param: str) -> str:
    if not isinstance(engine, GrammarChecker):
        raise InvalidField(param, "this model's engine does not support constrained decoding")
    error = engine.grammar_error(grammar)
    if error is not None:
        raise InvalidField(param, error)
    return grammar


def tool_call_grammar(tools: ToolConfig) -> str:
    """The reply as calls in the tool format (core/tools.py), one (`parallel_tool_calls`
    false) or more, each naming a function it may call with arguments that follow that
    function's `parameters` schema. A schema the converter cannot compile: `InvalidField`
    naming `tools.N.function.parameters`."""
    from llama_cpp import llama_grammar

    schema_converter: Any = llama_grammar.SchemaConverter  # untyped
    converter: Any = schema_converter(prop_order={"name": 0, "arguments": 1}, allow_fetch=False,
                                dotall=False, raw_pattern=False)
    callable_names = {f.name for f in tools.callable}
    alternatives = []
    for index, tool in enumerate(tools.tools):
        function = tool.function
        schema = _arguments_schema(converter, function, index)
        if function.name in callable_names:
            alternatives.append({
                "type": "object",
                "properties": {"name": {"const": function.name}, "arguments": schema},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            })
    try:
        call: str = converter.visit({"anyOf": alternatives} if len(alternatives) > 1
                               else alternatives[0], "tool-call")
    except Exception as exc:  # the converter raises whatever it meets: all are 4xx
        raise InvalidField("tools", f"the tools cannot be compiled: {exc}") from None
    one = f'"{CALL_OPEN}\\n" {call} "\\n{CALL_CLOSE}"'
    root = f'root ::= {one} ("\\n" {one})*' if tools.parallel_tool_calls else f"root ::= {one}"
    rules: str = converter.format_grammar()
    grammar = f"{rules}\n{root}\n"
    if len(grammar) > 8 * MAX_GRAMMAR_CHARS:
        raise InvalidField("tools", "the tools' schemas make too large a grammar")
    return grammar


def _arguments_schema(converter: Any, function: FunctionDefinition, index: int
                      ) -> dict[str, object]:
    """The function's `parameters`, its `$ref`s resolved against itself (not against the
    call schema it is put in) and renamed for this tool (`_own_refs`); compiled once on
    its own, so that an error names it."""
    from llama_cpp import llama_grammar

    param = f"tools.{index}.function.parameters"
    original = function.arguments_schema()
    if len(json.dumps(original)) > MAX_GRAMMAR_CHARS:
        raise InvalidField(param, f"the schema is over {MAX_GRAMMAR_CHARS} characters")
    try:
        schema = _own_refs(original, f"tool{index}")
        schema_converter: Any = llama_grammar.SchemaConverter  # untyped
        probe: Any = schema_converter(prop_order={}, allow_fetch=False, dotall=False,
                                      raw_pattern=False)
        probe.visit(probe.resolve_refs(json.loads(json.dumps(schema)), f"tool{index}"), "")
        resolved: dict[str, object] = converter.resolve_refs(schema, f"tool{index}")
    except Exception as exc:  # the converter raises whatever it meets: all are 4xx
        raise InvalidField(param, f"the JSON schema cannot be compiled: {exc}") from None
    return resolved


def _own_refs(schema: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A copy of `schema` whose local `$ref`s all point into `$defs` under names that
    start with `prefix`. The converter names a referenced rule after the ref's last
    segment, so two tools that both define `$defs/Item` would otherwise share one rule
    (the first tool's)."""
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
    out: dict[str, Any] = rewrite(schema)  # a copy: the converter rewrites refs in place
    if not names:
        return out
    defs = dict(out.get("$defs") or {})
    for ref, name in names.items():
        try:
            defs[name] = rewrite(target(ref))
        except (KeyError, IndexError, ValueError, TypeError):
            raise ValueError(f"cannot resolve the ref {ref}") from None
    out["$defs"] = defs
    return out
