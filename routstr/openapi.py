"""`GET /openapi.json` (OpenAPI 3.1), `GET /docs` and `GET /redoc`: the API described from the
router's own table.

The document is built from the live route list: every (method, pattern) the router serves
appears, each described by its entry in `OPERATIONS` (summary, tag, auth, request and response
schemas, parameters). Aliases — routstr-core's un-prefixed paths (``/chat/completions``),
``/v1/wallet/*`` for ``/v1/balance/*``, ``/lightning/*`` for ``/v1/balance/lightning/*`` — share
the entry of their canonical path and say so. A route without an entry is still listed (with
``x-undocumented: true``), and `tests/test_openapi.py` fails until it is described, so the
document cannot drift from the router.

What is data lives in package files, not here: routstr/openapi.json holds the document's fixed
parts (info, tags, the schemas, the security schemes), the operations table and the shared
header parameters; this module adds only what is derived — the title (``--name``), the
version and one path per route. The pages' HTML, CSS and JS are routstr/templates/docs.*.

`/docs` and `/redoc` are rendered here, server-side, from that same document: self-contained
HTML with inline CSS (and, on `/docs`, a few lines of inline JS for "try it"), no CDN and no
external fetch, so they work offline and over Tor. `/docs` is the interactive explorer;
`/redoc` the reading view with every schema expanded.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from string import Template
from typing import Any, Final

from . import __version__
from .messages import Request, Response, json_response
from .router import Route

_PACKAGE = resources.files(__package__)
SOURCE: Final[dict[str, Any]] = json.loads(_PACKAGE.joinpath("openapi.json").read_text("utf-8"))
SCHEMAS: Final[dict[str, Any]] = SOURCE["document"]["components"]["schemas"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


# ---- operations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    summary: str
    tag: str
    auth: str = "key"  # "key" (sk- key or Cashu token) | "pay" (key or X-Cashu) | "admin" | "none"
    body: str | None = None  # schema of a JSON body ("multipart:Name", "form:Name": form data)
    response: str | None = "UpstreamObject"  # schema of the success body; None: `content_type`
    status: int = 200
    description: str = ""
    query: tuple[tuple[str, str, str], ...] = ()  # (name, JSON type, description)
    listing: bool = False  # ?fields / limit / offset; answer carries has_more and total
    streams: bool = False
    content_type: str = "application/json"


def _op(entry: dict[str, Any]) -> Op:
    """An `operations` entry of routstr/openapi.json (an unknown field raises here)."""
    query = tuple((str(n), str(t), str(d)) for n, t, d in entry.get("query", ()))
    return Op(**{**entry, "query": query})


OPERATIONS: Final[dict[tuple[str, str], Op]] = {
    (key.split(" ", 1)[0], key.split(" ", 1)[1]): _op(entry)
    for key, entry in SOURCE["operations"].items()}
_LIST_Q: Final = tuple((str(n), str(t), str(d)) for n, t, d in SOURCE["list_query"])

# Alias prefixes: (alias, canonical). The un-prefixed forms are routstr-core's.
ALIASES = (("/v1/wallet", "/v1/balance"), ("/lightning", "/v1/balance/lightning"))


def canonical(method: str, pattern: str) -> tuple[str, str] | None:
    """The `OPERATIONS` key describing (method, pattern), or None when there is none."""
    if (method, pattern) in OPERATIONS:
        return method, pattern
    for alias, target in ALIASES:
        if pattern == alias or pattern.startswith(alias + "/"):
            key = (method, target + pattern[len(alias):])
            if key in OPERATIONS:
                return key
    if not pattern.startswith("/v1/") and (method, "/v1" + pattern) in OPERATIONS:
        return method, "/v1" + pattern
    return None


# ---- the document ---------------------------------------------------------------------------
_VERSION_PARAM: Final = SOURCE["parameters"]["version"]
_IDEMPOTENCY_PARAM: Final = SOURCE["parameters"]["idempotency"]
_MAX_COST_PARAM: Final = SOURCE["parameters"]["max_cost"]
_RATE_HEADERS: Final = SOURCE["rate_headers"]
_SECURITY: Final[dict[str, list[dict[str, list[str]]]]] = SOURCE["security"]


def _operation_id(method: str, pattern: str) -> str:
    words = [p.strip("{}") for p in pattern.replace("-", "_").replace(".", "_").split("/") if p]
    return method.lower() + "_" + ("_".join(words) or "root")


def _path_params(pattern: str) -> list[dict[str, Any]]:
    return [{"name": seg[1:-1], "in": "path", "required": True,
             "schema": {"type": "string", "pattern": "^[A-Za-z0-9_.-]+$"}}
            for seg in pattern.split("/") if seg.startswith("{")]


def _operation(method: str, pattern: str, op: Op | None, alias_of: str | None) -> dict[str, Any]:
    if op is None:
        return {"summary": f"{method} {pattern}", "tags": ["Undocumented"],
                "operationId": _operation_id(method, pattern), "x-undocumented": True,
                "parameters": _path_params(pattern),
                "responses": {"default": {"description": "see the source",
                                          "content": {"application/json": {
                                              "schema": _ref("Error")}}}}}
    params = _path_params(pattern)
    params += [{"name": name, "in": "query", "required": False, "description": text,
                "schema": {"type": kind, **({"minimum": 0} if kind == "integer" else {})}}
               for name, kind, text in (op.query + (_LIST_Q if op.listing else ()))]
    params.append(_VERSION_PARAM)
    if method == "POST":
        params.append(_IDEMPOTENCY_PARAM)
    if op.auth == "pay":
        params.append(_MAX_COST_PARAM)
    description = op.description
    if alias_of:
        description = (f"Alias of `{method} {alias_of}`. " + description).strip()
    doc: dict[str, Any] = {"summary": op.summary, "tags": [op.tag],
                           "operationId": _operation_id(method, pattern),
                           "security": _SECURITY[op.auth], "parameters": params}
    if description:
        doc["description"] = description
    if op.body is not None:
        if op.body.startswith("multipart:"):
            content = {"multipart/form-data": {"schema": _ref(op.body.split(":", 1)[1])}}
        elif op.body.startswith("form:"):
            content = {"application/x-www-form-urlencoded": {
                "schema": _ref(op.body.split(":", 1)[1])}}
        else:
            content = {"application/json": {"schema": _ref(op.body)}}
        doc["requestBody"] = {"required": True, "content": content}
    ok: dict[str, Any] = {"description": "success"}
    if op.status == 303:
        ok = {"description": "See Other: the dashboard page, showing the outcome",
              "headers": {"Location": {"schema": {"type": "string"}}}}
    elif op.status != 204:
        if op.response is not None:
            media: dict[str, Any] = {"application/json": {"schema": _ref(op.response)}}
            if op.streams:
                media["text/event-stream"] = {"schema": {"type": "string"}}
            ok["content"] = media
        else:
            ok["content"] = {op.content_type: {"schema": {} if op.content_type.endswith(
                "json") else {"type": "string"}}}
    if op.auth in ("key", "pay"):
        ok["headers"] = _RATE_HEADERS
    error = {"content": {"application/json": {"schema": _ref("Error")}}}
    responses: dict[str, Any] = {str(op.status): ok,
                                 "4XX": {"description": "client error", **error},
                                 "5XX": {"description": "server or upstream error", **error}}
    doc["responses"] = responses
    return doc


def build_document(routes: Iterable[Route], *, title: str = "Routstr node") -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        key = canonical(route.method, route.pattern)
        op = OPERATIONS.get(key) if key else None
        alias_of = key[1] if key and key[1] != route.pattern else None
        paths.setdefault(route.pattern, {})[route.method.lower()] = _operation(
            route.method, route.pattern, op, alias_of)
    document = SOURCE["document"]
    info = {"title": title, "version": __version__, **document["info"]}
    return {**document, "info": info, "paths": dict(sorted(paths.items()))}


# ---- HTML -----------------------------------------------------------------------------------
_TEMPLATES = _PACKAGE.joinpath("templates")
_PAGE: Final = Template(_TEMPLATES.joinpath("docs.html").read_text("utf-8"))
_CSS: Final = _TEMPLATES.joinpath("docs.css").read_text("utf-8")
_TRY_JS: Final = _TEMPLATES.joinpath("docs.js").read_text("utf-8")


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _resolve(doc: dict[str, Any], schema: Any) -> Any:
    if isinstance(schema, dict) and "$ref" in schema:
        name = str(schema["$ref"]).rsplit("/", 1)[-1]
        return doc["components"]["schemas"].get(name, {})
    return schema


def _example(doc: dict[str, Any], schema: Any, depth: int = 0) -> Any:
    """A small example value for a schema (for the "try it" body)."""
    schema = _resolve(doc, schema)
    if not isinstance(schema, dict) or depth > 4:
        return None
    if "examples" in schema:
        return schema["examples"][0]
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    if "oneOf" in schema:
        return _example(doc, schema["oneOf"][0], depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = kind[0]
    if kind == "object":
        props = schema.get("properties", {})
        keep = schema.get("required") or list(props)[:2]
        return {k: _example(doc, props[k], depth + 1) for k in keep if k in props}
    if kind == "array":
        return [_example(doc, schema.get("items", {}), depth + 1)]
    return {"string": "string", "integer": schema.get("minimum", 0), "number": 0,
            "boolean": False}.get(str(kind))


def _schema_html(doc: dict[str, Any], schema: Any) -> str:
    return f"<pre>{_e(json.dumps(_resolve(doc, schema), indent=2))}</pre>"


def render_html(doc: dict[str, Any], *, interactive: bool) -> str:
    """`/docs` (interactive) or `/redoc` (reading view with every schema), from `doc`."""
    by_tag: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            by_tag.setdefault(op["tags"][0], []).append((method.upper(), path, op))
    order = [t["name"] for t in doc.get("tags", [])]
    tags = sorted(by_tag, key=lambda t: order.index(t) if t in order else len(order))
    nav: list[str] = []
    body: list[str] = []
    for tag in tags:
        nav.append(f"<h3>{_e(tag)}</h3>")
        body.append(f'<h2 id="tag-{_e(tag)}">{_e(tag)}</h2>')
        # Canonical paths first, aliases (routstr-core's spellings) after them.
        entries = sorted(by_tag[tag], key=lambda e: (
            str(e[2].get("description", "")).startswith("Alias of"), e[1], e[0]))
        for method, path, op in entries:
            anchor = op["operationId"]
            nav.append(f'<a href="#{_e(anchor)}"><span class="m {method}">{method}</span>'
                       f"{_e(path)}</a>")
            body.append(_op_html(doc, method, path, op, anchor, interactive))
    if not interactive:
        nav.append('<h3>Schemas</h3>')
        body.append('<h2 id="schemas">Schemas</h2>')
        for name, schema in doc["components"]["schemas"].items():
            nav.append(f'<a href="#schema-{_e(name)}">{_e(name)}</a>')
            body.append(f'<section class="op" id="schema-{_e(name)}"><h3>{_e(name)}</h3>'
                        f"{_schema_html(doc, schema)}</section>")
    info = doc["info"]
    title = f"{info['title']} API {info['version']}"
    key_box = ('<p><label class="muted">API key for "try it" (sent as Bearer; stays in this '
               'page): <input id="key" autocomplete="off" placeholder="sk-…"></label></p>'
               if interactive else "")
    script = f"<script>\n{_TRY_JS}</script>" if interactive else ""
    other = ('<a style="color:#c8cede" href="/redoc">reference view</a>' if interactive
             else '<a style="color:#c8cede" href="/docs">interactive view</a>')
    return _PAGE.substitute(title=_e(title), css=_CSS, description=_e(info.get("description", "")),
                            other=other, nav="".join(nav), key_box=key_box, body="".join(body),
                            script=script)


def _op_html(doc: dict[str, Any], method: str, path: str, op: dict[str, Any], anchor: str,
             interactive: bool) -> str:
    parts = [f'<section class="op" id="{_e(anchor)}"><div><span class="m {method}">{method}'
             f'</span><span class="path">{_e(path)}</span></div>'
             f"<p><b>{_e(op['summary'])}</b></p>"]
    if op.get("description"):
        parts.append(f'<p class="muted">{_e(op["description"])}</p>')
    auth = [next(iter(s)) for s in op.get("security", [])]
    parts.append(f'<p class="muted">Auth: {_e(", ".join(auth) or "none")}</p>')
    params = op.get("parameters", [])
    if params:
        rows = "".join(
            f"<tr><td><code>{_e(p['name'])}</code></td><td>{_e(p['in'])}</td>"
            f"<td>{'required' if p.get('required') else ''}</td>"
            f"<td>{_e(p.get('description', ''))}</td></tr>" for p in params)
        parts.append(f"<table><tr><th>Parameter</th><th>In</th><th></th><th></th></tr>{rows}"
                     "</table>")
    request_schema = None
    if "requestBody" in op:
        media, spec = next(iter(op["requestBody"]["content"].items()))
        request_schema = spec["schema"]
        parts.append(f"<details{'' if interactive else ' open'}><summary>Request body "
                     f"<span class=\"badge\">{_e(media)}</span></summary>"
                     f"{_schema_html(doc, request_schema)}</details>")
    statuses = "".join(
        f"<tr><td><code>{_e(status)}</code></td><td>{_e(resp['description'])}</td>"
        f"<td>{_e(', '.join(resp.get('content', {})))}</td></tr>"
        for status, resp in op["responses"].items())
    parts.append(f"<table><tr><th>Status</th><th>Meaning</th><th>Type</th></tr>{statuses}"
                 "</table>")
    if not interactive:
        for status, resp in op["responses"].items():
            for spec in resp.get("content", {}).values():
                if spec.get("schema") and status.startswith("2"):
                    parts.append(f"<details><summary>Response {status}</summary>"
                                 f"{_schema_html(doc, spec['schema'])}</details>")
    if interactive:
        form_id = "try-" + anchor
        fields = "".join(
            f'<label class="muted">{_e(p["name"])} <input name="p_{_e(p["name"])}"></label>'
            for p in op.get("parameters", []) if p["in"] == "path")
        body_box = ""
        if request_schema is not None and "json" in next(iter(op["requestBody"]["content"])):
            example = json.dumps(_example(doc, request_schema), indent=2)
            body_box = f'<textarea name="body" rows="6">{_e(example)}</textarea>'
        parts.append(
            f'<details><summary>Try it</summary><form id="{_e(form_id)}" '
            f"onsubmit=\"return tryIt('{_e(form_id)}','{method}','{_e(path)}')\">{fields}"
            f'<label class="muted">query <input name="query" placeholder="limit=10"></label>'
            f'{body_box}<button type="submit">Send</button><pre class="out"></pre></form>'
            "</details>")
    parts.append("</section>")
    return "".join(parts)


# ---- handlers -------------------------------------------------------------------------------
_CSP = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; form-action 'none'; base-uri 'none'")


class ApiDocs:
    """Serves the document and the two pages; built once, on first request."""

    def __init__(self, routes: Callable[[], Iterable[Route]], title: str) -> None:
        self._routes = routes
        self._title = title
        self._doc: dict[str, Any] | None = None
        self._pages: dict[bool, bytes] = {}

    def document(self) -> dict[str, Any]:
        if self._doc is None:
            self._doc = build_document(self._routes(), title=self._title)
        return self._doc

    async def openapi(self, request: Request, params: dict[str, str]) -> Response:
        return json_response(self.document())

    def _page(self, interactive: bool) -> Response:
        page = self._pages.get(interactive)
        if page is None:
            page = self._pages[interactive] = render_html(
                self.document(), interactive=interactive).encode()
        return Response(200, [("content-type", "text/html; charset=utf-8"),
                              ("content-security-policy", _CSP),
                              ("x-content-type-options", "nosniff")], page)

    async def docs(self, request: Request, params: dict[str, str]) -> Response:
        return self._page(True)

    async def redoc(self, request: Request, params: dict[str, str]) -> Response:
        return self._page(False)
