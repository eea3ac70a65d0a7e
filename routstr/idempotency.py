"""`Idempotency-Key`: a POST repeated with the same key is executed — and charged — once.

Scope and matching
    A key belongs to the credential that sent it (a hash of the ``Authorization`` and
    ``X-Cashu`` values: another client cannot read or collide with your keys). The first POST
    with a key stores a hash of its method, target and body; a later POST with the same key
    and the same request gets the stored answer, one with a different request gets 422
    ``idempotency_key_reused``. A duplicate that arrives while the first is still running gets
    409 ``idempotency_request_in_progress`` with ``Retry-After: 1`` (it is not executed).
    Requests without a credential, and methods other than POST, ignore the header.

Only known owners are stored (no unauthenticated disk growth)
    A credential is *known* when the ledger has its account: a Bearer key that exists, or an
    ``X-Cashu`` payment (or a Cashu token used as key) that was accepted — the check is
    `known`, supplied by the node. A known owner's key is claimed in the database before the
    request runs (as above). Any other credential's key is claimed in this process's memory
    only (a duplicate in flight still gets 409); when its request succeeded *and* the owner
    is known afterwards (the payment was accepted, the token redeemed) the answer is stored,
    else nothing is written — garbage credentials with fresh keys cost no disk.
    What is kept is bounded (`StoreLimits`): per owner at most `MAX_KEYS_PER_OWNER` answers
    and `MAX_BYTES_PER_OWNER` bytes, over all owners `MAX_TOTAL_BYTES`; storing evicts the
    oldest finished answers beyond those (an evicted key runs again when retried, like an
    expired one).

What is stored and replayed
    Only successful answers (status < 400): the status, the handler's headers (content type,
    ``X-Routstr-Cost*`` / ``X-Routstr-Balance*`` as they were — the balance *at the first
    answer* —, an ``X-Cashu`` change token) and the body, replayed with
    ``Idempotent-Replayed: true``. An error charges nothing (the reservation is released), so
    it is not stored: the key is freed and a retry executes again.
    A streamed answer is recorded while it is relayed and replayed as one (non-live)
    ``text/event-stream`` body holding the same events — the content, the usage chunk with its
    cost and ``[DONE]``. If the first client went away mid-stream,
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

MAX_STORED_BYTES = 8 * 1024 * 1024  # one answer; a larger one is not kept
MAX_KEYS_PER_OWNER = 1000
MAX_BYTES_PER_OWNER = 32 * 1024 * 1024
MAX_TOTAL_BYTES = 256 * 1024 * 1024
TOTAL_RESYNC_STORES = 100
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
class StoreLimits:
    answer_bytes: int = MAX_STORED_BYTES
    owner_keys: int = MAX_KEYS_PER_OWNER
    owner_bytes: int = MAX_BYTES_PER_OWNER
    total_bytes: int = MAX_TOTAL_BYTES


async def _everyone(request: Request) -> bool:
    return True


@dataclass(frozen=True)
class Stored:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    complete: bool


class IdempotencyStore:
    def __init__(self, db: Database, *, ttl_s: float, boot_id: str,
                 known: Callable[[Request], Awaitable[bool]] = _everyone,
                 limits: StoreLimits = StoreLimits(),  # noqa: B008 - frozen
                 clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.ttl_s = ttl_s
        self.boot_id = boot_id
        self.known = known
        self.limits = limits
        self._clock = clock
        self.replays = 0
        self._in_memory: set[tuple[str, str]] = set()  # claims of owners not (yet) known
        self._total: int | None = None  # bytes of stored answers (see `_evict`)
        self._stores = 0

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
        kept, fits = self._storable(headers, body, complete)

        def op(conn: Connection) -> None:
            n = conn.execute(
                "UPDATE idempotency SET state = 'done', status = ?, headers = ?, body = ?,"
                " stored = ? WHERE owner_hash = ? AND idem_key = ? AND boot_id = ?",
                (status, json.dumps(kept), body if fits else None, int(fits), owner, key,
                 self.boot_id)).rowcount
            self._evict(conn, owner, len(body) if n and fits else 0)

        self.db.transaction(op)

    def store_new(self, owner: str, key: str, req_hash: str, status: int,
                  headers: list[tuple[str, str]], body: bytes, *, complete: bool = True) -> None:
        """Store the answer of a request that ran unclaimed (its owner became known only by
        running it: an accepted payment); a row another process stored meanwhile wins."""
        kept, fits = self._storable(headers, body, complete)

        def op(conn: Connection) -> None:
            n = conn.execute(
                "INSERT INTO idempotency (owner_hash, idem_key, request_hash, state, boot_id,"
                " status, headers, body, stored, created_at)"
                " VALUES (?, ?, ?, 'done', ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (owner, key, req_hash, self.boot_id, status, json.dumps(kept),
                 body if fits else None, int(fits), self._clock())).rowcount
            self._evict(conn, owner, len(body) if n and fits else 0)

        self.db.transaction(op)

    def _storable(self, headers: list[tuple[str, str]], body: bytes,
                  complete: bool) -> tuple[list[tuple[str, str]], bool]:
        kept = [(k, v) for k, v in headers if k.lower() not in _NOT_STORED]
        return kept, complete and len(body) <= self.limits.answer_bytes

    def _evict(self, conn: Connection, owner: str, added: int) -> None:
        """Delete the oldest finished answers beyond the owner's and the node's bounds.

        The owner's rows are few (≤ `owner_keys` + 1); the node-wide byte count is a running
        figure, re-read from the table (a scan) every `TOTAL_RESYNC_STORES` stores — other
        workers and the expiry sweep change it too — and whenever it says the bound is
        passed, so eviction always acts on the exact total."""
        lim = self.limits
        n, total = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(length(body)), 0) FROM idempotency"
            " WHERE owner_hash = ? AND state = 'done'", (owner,)).fetchone()
        rows = [] if n <= lim.owner_keys and total <= lim.owner_bytes else conn.execute(
            "SELECT idem_key, COALESCE(length(body), 0) FROM idempotency"
            " WHERE owner_hash = ? AND state = 'done' ORDER BY created_at DESC, idem_key DESC",
            (owner,)).fetchall()  # the walk only when the owner is over a bound
        count = size = removed = 0
        for idem_key, length in rows:
            count, size = count + 1, size + int(length)
            if count > lim.owner_keys or size > lim.owner_bytes:
                conn.execute("DELETE FROM idempotency WHERE owner_hash = ? AND idem_key = ?",
                             (owner, idem_key))
                removed += int(length)
        self._stores += 1
        if self._total is None or self._stores % TOTAL_RESYNC_STORES == 0:
            self._total = _total_bytes(conn)
        else:
            self._total += added - removed
        if self._total > lim.total_bytes:
            self._total = _total_bytes(conn)
        while self._total > lim.total_bytes:
            oldest = conn.execute(
                "SELECT owner_hash, idem_key, COALESCE(length(body), 0) FROM idempotency"
                " WHERE state = 'done' AND body IS NOT NULL ORDER BY created_at LIMIT 1"
            ).fetchone()
            if oldest is None:
                break
            conn.execute("DELETE FROM idempotency WHERE owner_hash = ? AND idem_key = ?",
                         (oldest[0], oldest[1]))
            self._total -= int(oldest[2])

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
            if (owner, key) in self._in_memory or not await self.known(request):
                return await self._run_unclaimed(app, request, owner, key)
            stored = self.begin(owner, key, request_hash(request))
            if stored is not None:
                self.replays += 1
                return Response(stored.status,
                                [*stored.headers, ("idempotent-replayed", "true")], stored.body)
            return await self._run_claimed(app, request, owner, key)

        return idempotent

    async def _run_claimed(self, app: App, request: Request, owner: str, key: str) -> Response:
        settled = False
        try:
            response = await app(request)
            if response.stream is None:
                self.finish(owner, key, response.status, response.headers, response.body)
            elif response.status >= 400:
                self.abandon(owner, key)
            else:
                response.stream = _RecordingStream(
                    response.stream, self, response.status, list(response.headers),
                    lambda status, headers, body, complete: self.finish(
                        owner, key, status, headers, body, complete=complete))
            settled = True
            return response
        finally:
            if not settled:  # cancelled or failed: free the key (a plain def, no await)
                self.abandon(owner, key)

    async def _run_unclaimed(self, app: App, request: Request, owner: str,
                             key: str) -> Response:
        """An owner the ledger does not know (yet): claim in memory, store only when the
        request succeeded and made the owner known (an accepted payment)."""
        claim = (owner, key)
        if claim in self._in_memory:
            raise Conflict("A request with this Idempotency-Key is still in progress",
                           code="idempotency_request_in_progress",
                           details={"idempotency_key": key}, headers=[("retry-after", "1")])
        self._in_memory.add(claim)
        handed_over = False
        try:
            response = await app(request)
            if response.status >= 400 or not await self.known(request):
                return response
            req_hash = request_hash(request)
            if response.stream is None:
                self.store_new(owner, key, req_hash, response.status, response.headers,
                               response.body)
                return response

            def store(status: int, headers: list[tuple[str, str]], body: bytes,
                      complete: bool) -> None:
                self._in_memory.discard(claim)
                self.store_new(owner, key, req_hash, status, headers, body, complete=complete)

            response.stream = _RecordingStream(response.stream, self, response.status,
                                               list(response.headers), store)
            handed_over = True
            return response
        finally:
            if not handed_over:
                self._in_memory.discard(claim)


def _total_bytes(conn: Connection) -> int:
    return int(conn.execute(
        "SELECT COALESCE(SUM(length(body)), 0) FROM idempotency").fetchone()[0])


class _RecordingStream:
    """Relays a stream unchanged, keeping a copy; `store`s the copy when the stream is closed."""

    def __init__(self, inner: BodyStream, store: IdempotencyStore, status: int,
                 headers: list[tuple[str, str]],
                 save: Callable[[int, list[tuple[str, str]], bytes, bool], None]) -> None:
        self._inner = inner
        self._limit = store.limits.answer_bytes
        self._status = status
        self._headers = headers
        self._save = save
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
        if self._size <= self._limit:
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
            self._save(self._status, self._headers, b"".join(self._chunks),
                       self._size <= self._limit)
