"""`GET /`: the playground, a chat page served from the package's `web/` files.

Plain HTML, CSS and one JavaScript module: no build step, and nothing is loaded from
anywhere but this server (the Content-Security-Policy tells the browser so too). The
page and its assets need no credentials, because a browser cannot send a bearer token
with a page load; everything the page then asks for goes through the API and its auth.
"""

from __future__ import annotations

from pathlib import Path

import trio
from quart import Blueprint, Response

from ..core.errors import NotFound

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
PAGE = "index.html"
#: What `/playground/<asset>` serves (nothing else from the folder).
ASSETS = {
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
}
PAGE_PATH = "/"
ASSET_PREFIX = "/playground/"
#: Same-origin only: scripts, styles and requests go to this server, nothing else loads.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

blueprint = Blueprint("playground", __name__)


async def _file(name: str, content_type: str) -> Response:
    """Read per request (in a worker thread): an edited file shows on reload."""
    body = await trio.Path(WEB_DIR / name).read_bytes()
    return Response(
        body,
        content_type=content_type,
        headers={
            "Cache-Control": "no-cache",
            "Content-Security-Policy": CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


@blueprint.get(PAGE_PATH)
async def page() -> Response:
    return await _file(PAGE, "text/html; charset=utf-8")


@blueprint.get(ASSET_PREFIX + "<asset>")
async def asset(asset: str) -> Response:
    content_type = ASSETS.get(asset)
    if content_type is None:
        raise NotFound("no such route")
    return await _file(asset, content_type)
