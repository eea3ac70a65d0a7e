"""`Idempotency-Key`: a POST repeated with the same key is executed — and charged — once.

Scope and matching
    A key belongs to the credential that sent it (a hash of the ``Authorization`` and
    ``X-Cashu`` values: another client cannot read or collide with your keys). The first POST
    with a key stores a hash of its method, target and body; a later POST with the same key
    and the same request gets the stored answer, one with a different request gets 422
    ``idempotency_key_reused``. A duplicate that arrives while the first is still running gets
    409 ``idempotency_request_in_progress`` with ``Retry-After: 1`` (it is not executed).
    Requests without a credential, and methods other than POST, ignore the header.

What is stored and replayed
    Only successful answers (status < 400): the status, the handler's headers (content type,
    ``X-Routstr-Cost*`` / ``X-Routstr-Balance*`` as they were — the balance *at the first
    answer* —, an ``X-Cashu`` change token) and the body, replayed with
    ``Idempotent-Replayed: true``. An error charges nothing (the reservation is released), so
    it is not stored: the key is freed and a retry executes again.
    A streamed answer is recorded while it is relayed and replayed as one (non-live)
    ``text/event-stream`` body holding the same events — the content, the usage chunk with its
    cost, ``[DONE]`` and the ``routstr-cost`` event. If the first client went away mid-stream,
    the request was charged for what was relayed and the replay holds exactly that part.
    An answer above `MAX_STORED_BYTES` is not kept; its key then answers 409
    ``idempotency_response_not_stored`` (it was executed and charged once).

Durability and retention
    Keys live in sqlite (table ``idempotency``), so a replay works across restarts; rows older
    than the retention period (24 h by default) are treated as absent and swept periodically.
    A row left 'pending' by a previous process (a crash mid-request) is taken over by the next
    request with that key: the crash may have lost the answer of a request that was charged,
    which is the one case where a retry can be charged again.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .db import Connection, Database
from .errors import Conflict, InvalidRequest, UnprocessableEntity
from .messages import BodyStream, Request, Response

App = Callable[[Request], Awaitable[Response]]

MAX_STORED_BYTES = 8 * 1024 * 1024
MAX_KEY_CHARS = 255
_KEY_RE = re.compile(rf"^[\x21-\x7e]{{1,{MAX_KEY_CHARS}}}$")
# Headers set by layers outside this one (server, rate limiter) or meaningless on a replay.
_NOT_STORED = frozenset({"connection", "content-length", "transfer-encoding", "date",
                         "x-routstr-request-id", "x-routstr-version"})


def owner_of(request: Request) -> str | None:
    """A hash of the request's credential headers (None: no credential, header ignored)."""
    auth = (request.authorization() or "").strip()
    xcashu = (request.header("x-cashu") or "").strip()
    if not auth and not xcashu:
        return None
    return hashlib.sha256(f"{auth}\x00{xcashu}".encode()).hexdigest()


def request_hash(request: Request) -> str:
    h = hashlib.sha256(f"{request.method} {request.target}\n".encode())
    h.update(request.body)
    return h.hexdigest()


@dataclass(frozen=True)
class Stored:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    complete: bool


class IdempotencyStore:
    def __init__(self, db: Database, *, ttl_s: float, boot_id: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.ttl_s = ttl_s
        self.boot_id = boot_id
        self._clock = clock
        self.replays = 0

    # -- storage (plain defs: each one short transaction) -------------------------------------
    def begin(self, owner: str, key: str, req_hash: str) -> Stored | None:
        """Claim `key` for this request (None), or return the stored answer to replay.

        Raises 422 when the key was used for another request, 409 while it is in flight.
        """
        now = self._clock()

        def op(conn: Connection) -> tuple[Any, ...] | None:
            row = conn.execute(
                "SELECT request_hash, state, boot_id, status, headers, body, stored, created_at"
                " FROM idempotency WHERE owner_hash = ? AND idem_key = ?", (owner, key)
            ).fetchone()
            if row is not None:
                expired = row[7] < now - self.ttl_s
                abandoned = row[1] == "pending" and row[2] != self.boot_id
                if not expired and not abandoned:
                    return tuple(row)
                conn.execute("DELETE FROM idempotency WHERE owner_hash = ? AND idem_key = ?",
                             (owner, key))
            conn.execute(
                "INSERT INTO idempotency (owner_hash, idem_key, request_hash, state, boot_id,"
                " created_at) VALUES (?, ?, ?, 'pending', ?, ?)",
                (owner, key, req_hash, self.boot_id, now))
            return None

        row = self.db.transaction(op)
        if row is None:
            return None
        if row[0] != req_hash:
            raise UnprocessableEntity(
                "This Idempotency-Key was already used with a different request (method, path"
                " or body); use a new key for a new request",
                code="idempotency_key_reused", details={"idempotency_key": key})
        if row[1] == "pending":
            raise Conflict("A request with this Idempotency-Key is still in progress",
                           code="idempotency_request_in_progress",
                           details={"idempotency_key": key}, headers=[("retry-after", "1")])
        if not row[6]:
            raise Conflict("The first response to this Idempotency-Key was too large to keep;"
                           " the request was executed and charged once",
                           code="idempotency_response_not_stored",
                           details={"idempotency_key": key})
        headers = [(str(k), str(v)) for k, v in json.loads(row[4] or "[]")]
        return Stored(int(row[3]), headers, bytes(row[5] or b""), True)

    def finish(self, owner: str, key: str, status: int, headers: list[tuple[str, str]],
               body: bytes, *, complete: bool = True) -> None:
        """Store a successful answer; forget the key after an error (a retry runs again)."""
        if status >= 400:
            self.abandon(owner, key)
            return
        kept = [(k, v) for k, v in headers if k.lower() not in _NOT_STORED]
        fits = len(body) <= MAX_STORED_BYTES and complete
        self.db.transaction(lambda c: c.execute(
            "UPDATE idempotency SET state = 'done', status = ?, headers = ?, body = ?, stored = ?"
            " WHERE owner_hash = ? AND idem_key = ? AND boot_id = ?",
            (status, json.dumps(kept), body if fits else None, int(fits), owner, key,
             self.boot_id)))

    def abandon(self, owner: str, key: str) -> None:
        self.db.transaction(lambda c: c.execute(
            "DELETE FROM idempotency WHERE owner_hash = ? AND idem_key = ? AND state = 'pending'"
            " AND boot_id = ?", (owner, key, self.boot_id)))

    def sweep(self) -> int:
        """Delete keys older than the retention period. Returns how many."""
        cutoff = self._clock() - self.ttl_s
        return int(self.db.transaction(lambda c: c.execute(
            "DELETE FROM idempotency WHERE created_at < ?", (cutoff,)).rowcount))

    # -- middleware ---------------------------------------------------------------------------
    def wrap(self, app: App) -> App:
        async def idempotent(request: Request) -> Response:
            key = request.header("idempotency-key")
            if request.method != "POST" or key is None:
                return await app(request)
            owner = owner_of(request)
            if owner is None:
                return await app(request)
            key = key.strip()
            if not _KEY_RE.match(key):
                raise InvalidRequest(
                    f"Idempotency-Key must be 1 to {MAX_KEY_CHARS} visible ASCII characters",
                    code="invalid_idempotency_key")
            stored = self.begin(owner, key, request_hash(request))
            if stored is not None:
                self.replays += 1
                return Response(stored.status,
                                [*stored.headers, ("idempotent-replayed", "true")], stored.body)
            settled = False
            try:
                response = await app(request)
                if response.stream is None:
                    self.finish(owner, key, response.status, response.headers, response.body)
                elif response.status >= 400:
                    self.abandon(owner, key)
                else:
                    response.stream = _RecordingStream(response.stream, self, owner, key,
                                                       response.status, list(response.headers))
                settled = True
                return response
            finally:
                if not settled:  # cancelled or failed: free the key (a plain def, no await)
                    self.abandon(owner, key)

        return idempotent


class _RecordingStream:
    """Relays a stream unchanged, keeping a copy; stores the copy when the stream is closed."""

    def __init__(self, inner: BodyStream, store: IdempotencyStore, owner: str, key: str,
                 status: int, headers: list[tuple[str, str]]) -> None:
        self._inner = inner
        self._store = store
        self._owner = owner
        self._key = key
        self._status = status
        self._headers = headers
        self._chunks: list[bytes] = []
        self._size = 0
        self._closed = False
        self._iter: AsyncIterator[bytes] | None = None

    def __aiter__(self) -> _RecordingStream:
        self._iter = self._inner.__aiter__()
        return self

    async def __anext__(self) -> bytes:
        if self._iter is None:
            self._iter = self._inner.__aiter__()
        chunk = await self._iter.__anext__()
        if self._size <= MAX_STORED_BYTES:
            self._chunks.append(chunk)
        self._size += len(chunk)
        return chunk

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._inner.aclose()  # settles the request (the relay's shielded path)
        finally:
            body = b"".join(self._chunks)
            self._store.finish(self._owner, self._key, self._status, self._headers, body,
                               complete=self._size <= MAX_STORED_BYTES)
