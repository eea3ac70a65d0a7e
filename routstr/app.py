"""Wiring: the one list of routes, each bound to the services it needs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from . import __version__
from .config import Config
from .messages import Request, Response
from .router import Route, Router
from .status import CachedProbe, StatusHandlers


@dataclass
class Node:
    """The composed services of one running node (built in `__main__`)."""

    config: Config

    def info_doc(self) -> dict[str, object]:
        c = self.config
        return {
            "name": c.name,
            "description": c.description,
            "version": __version__,
            "npub": "",
            "mints": list(c.cashu_mints),
            "http_url": c.http_url,
            "onion_url": c.onion_url,
            "child_key_cost_msats": c.child_key_cost_msats,
        }

    async def database_probe(self) -> str:
        return "ok"


def routes(node: Node) -> list[Route]:
    status = StatusHandlers(
        node.info_doc, node.database_probe, CachedProbe(None), CachedProbe(None)
    )
    return [
        Route("GET", "/health", status.health),
        Route("GET", "/v1/info", status.info),
        Route("GET", "/", status.root),
    ]


def build_app(node: Node) -> Callable[[Request], Awaitable[Response]]:
    router = Router(routes(node))

    async def app(request: Request) -> Response:
        handler, params = router.resolve(request.method, request.path)
        return await handler(request, params)

    return app
