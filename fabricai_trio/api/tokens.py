"""`POST /v1/tokenize` and `POST /v1/detokenize`: token counts before a call, on the
generation's own code path (same template, same session trimming, same bounded
tokenizer), and token ids back to text. Auth as on every other route."""

from __future__ import annotations

from quart import Blueprint, Response

from ..core.engine import Detokenizer
from ..core.errors import InvalidField, ModelLoading
from .routes import current_owner, read_json_body
from .schemas import DetokenizeRequest, DetokenizeResponse, TokenizeResponse, parse_body
from .state import state

blueprint = Blueprint("tokens", __name__)


def _json(body: TokenizeResponse | DetokenizeResponse) -> Response:
    return Response(body.model_dump_json(), content_type="application/json")


@blueprint.post("/v1/tokenize")
async def tokenize() -> Response:
    """The body of a generation request (`prompt`, or `messages` with an optional
    `session_id`; `model`, `max_tokens`); nothing is generated."""
    service = state().service
    request = service.parse(await read_json_body())
    model, prompt = await service.count_prompt(request, owner=current_owner())
    return _json(TokenizeResponse(
        model=model.name, tokens=prompt.tokens, count=len(prompt.tokens),
        max_model_len=model.settings.n_ctx, dropped_messages=prompt.dropped_messages,
    ))


@blueprint.post("/v1/detokenize")
async def detokenize() -> Response:
    body = parse_body(DetokenizeRequest, await read_json_body())
    if not state().service.ready:
        raise ModelLoading()
    models = state().models
    model = models.get(body.model) if body.model is not None else models.default
    engine = model.engine
    if not isinstance(engine, Detokenizer):
        raise InvalidField("model", "this model's engine cannot detokenize")
    n_vocab = engine.info().n_vocab
    if body.tokens and (min(body.tokens) < 0 or (n_vocab and max(body.tokens) >= n_vocab)):
        raise InvalidField("tokens", f"token ids must be in [0, {n_vocab})")
    return _json(DetokenizeResponse(model=model.name, prompt=engine.detokenize(body.tokens)))
