"""Constrained decoding: a request's `response_format` or `grammar` as one GBNF grammar.

JSON Schema is translated by llama-cpp-python's `json_schema_to_gbnf` (the converter
llama.cpp ships), any JSON object by its JSON grammar; the engine then runs llama.cpp's
grammar sampler per sequence. The grammar is checked against the model's vocabulary
before the request is admitted (`GrammarChecker`): a schema or grammar that cannot be
used is a 4xx naming the field, never a failed stream.
"""

from __future__ import annotations

import json

from ..core.engine import Engine, GrammarChecker
from ..core.errors import InvalidField
from ..core.requests import MAX_GRAMMAR_CHARS, GenerationRequest


def request_grammar(request: GenerationRequest, engine: Engine) -> str | None:
    """The GBNF grammar the reply must follow, or None; raises `InvalidField` naming
    `response_format` or `grammar`."""
    fmt = request.constrained_format
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
    if not isinstance(engine, GrammarChecker):
        raise InvalidField(param, "this model's engine does not support constrained decoding")
    error = engine.grammar_error(grammar)
    if error is not None:
        raise InvalidField(param, error)
    return grammar
