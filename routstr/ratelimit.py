"""Per-key rate limits: requests per minute, tokens per hour, requests in flight.

Who is limited
    The credential of the request (`identity`): the key hash of an ``Authorization: Bearer``
    ``sk-…`` key or Cashu token (a token and its ``sk-`` form share one account and one
    limit), else a hash of the raw ``Authorization`` value (admin tokens), else — for an
    ``X-Cashu`` payment, a one-off token — the client's address. A request without any
    credential is not limited here and carries no ``X-RateLimit-*`` headers.

Algorithms (all O(1) per key, in this process's memory)
    * requests/minute: a token bucket of capacity N refilled at N per 60 s. A burst of N is
      admitted, the (N+1)th is refused, and the sustained rate is N per minute — with none of
      a fixed window's double burst at the window edge.
      ``X-RateLimit-Limit`` = N, ``X-RateLimit-Remaining`` = whole requests left in the bucket
      after this one, ``X-RateLimit-Reset`` = the epoch second at which the bucket is full.
    * tokens/hour: a bucket of capacity T refilled at T per hour, debited *after* settlement
      by the tokens the upstream reported (or the estimate that was charged). A request is
      admitted while the bucket is above zero, so one large request can overdraw it; the next
      request then waits until it has refilled above zero. (``X-RateLimit-*-Tokens`` headers.)
    * concurrency: requests in flight; the slot is released when the response ends — for a
      stream that is the server's shielded ``aclose()``, after the relay has settled. A request
      over this limit first waits up to ``--rate-limit-queue-wait`` seconds for a slot (at most
      `WAITERS_PER_SLOT` × `concurrent` requests per key wait — the seed's own example fires
      12 at once), then 429; so 429 for concurrency means the key's slots stayed busy.
    A refusal is 429 ``rate_limit_exceeded`` with ``Retry-After``; it happens before the
    handler runs, so nothing is reserved, redeemed or charged.

Memory
    A key's state is dropped once it carries no information (both buckets full again, nothing
    in flight); at most `MAX_TRACKED_KEYS` states are kept, least recently used evicted first
    (evicting only ever forgets usage, i.e. errs in the client's favour). Limits are per node
    process: with several workers each enforces its own.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import anyio

from .errors import ApiError, AuthenticationFailed, RateLimited
from .keys import parse_bearer
from .messages import BodyStream, Request, Response

App = Callable[[Request], Awaitable[Response]]

MAX_TRACKED_KEYS = 50_000
EVICT_SCAN = 8  # idle states checked per admission (amortised cleanup)
WAITERS_PER_SLOT = 10  # requests of one key that may queue for a concurrency slot, per slot
MINUTE_S = 60.0
HOUR_S = 3600.0


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int = 1000  # 0 = unlimited
    tokens_per_hour: int = 1_000_000
    concurrent: int = 10


@dataclass
class _Bucket:
    capacity: float
    per_s: float
    level: float
    at: float

    def refill(self, now: float) -> None:
        if now > self.at:
            self.level = min(self.capacity, self.level + (now - self.at) * self.per_s)
            self.at = now

    def seconds_to(self, level: float) -> float:
        return max(0.0, (level - self.level) / self.per_s) if self.per_s else 0.0

    @property
    def full(self) -> bool:
        return self.level >= self.capacity


@dataclass
class _State:
    requests: _Bucket
    tokens: _Bucket
    in_flight: int = 0
    waiting: int = 0
    freed: anyio.Event | None = None  # set when a slot is released (waiters re-check)


@dataclass(frozen=True)
class Ticket:
    """An admitted request: its identity, whether it holds a concurrency slot, its headers."""

    identity: str
    holds_slot: bool
    headers: tuple[tuple[str, str], ...]


class RateLimiter:
    def __init__(self, limits: Limits, *, queue_wait_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time,
                 max_keys: int = MAX_TRACKED_KEYS) -> None:
        self.limits = limits
        self.queue_wait_s = queue_wait_s
        self._clock = clock
        self._wall = wall
        self._max_keys = max_keys
        self._states: OrderedDict[str, _State] = OrderedDict()
        self.rejected: dict[str, int] = {"requests": 0, "tokens": 0, "concurrent": 0}

    def __len__(self) -> int:
        return len(self._states)

    @property
    def enabled(self) -> bool:
        lim = self.limits
        return bool(lim.requests_per_minute or lim.tokens_per_hour or lim.concurrent)

    # -- identity -----------------------------------------------------------------------------
    @staticmethod
    def identity(request: Request) -> str | None:
        auth = request.authorization()
        if auth is not None and auth.strip():
            try:
                cred = parse_bearer(auth)
            except AuthenticationFailed:
                cred = None
            if cred is not None:
                return cred.key_hash
            return "raw:" + hashlib.sha256(auth.strip().encode()).hexdigest()
        xcashu = request.header("x-cashu")
        if xcashu is not None and xcashu.strip():
            return "xcashu:" + request.client.rpartition(":")[0]
        return None

    # -- state --------------------------------------------------------------------------------
    def _new_state(self, now: float) -> _State:
        rpm = float(self.limits.requests_per_minute)
        tph = float(self.limits.tokens_per_hour)
        return _State(_Bucket(rpm, rpm / MINUTE_S, rpm, now),
                      _Bucket(tph, tph / HOUR_S, tph, now))

    def _idle(self, state: _State, now: float) -> bool:
        state.requests.refill(now)
        state.tokens.refill(now)
        return (state.in_flight == 0 and state.waiting == 0 and state.requests.full
                and state.tokens.full)

    def _state(self, identity: str, now: float) -> _State:
        state = self._states.get(identity)
        if state is None:
            self._forget_idle(now)
            state = self._states[identity] = self._new_state(now)
        else:
            self._states.move_to_end(identity)
        return state

    def _forget_idle(self, now: float) -> None:
        """Drop a few least recently used states that hold nothing; evict beyond the cap."""
        for identity in list(self._states)[:EVICT_SCAN]:
            if self._idle(self._states[identity], now):
                del self._states[identity]
        while len(self._states) >= self._max_keys:
            self._states.popitem(last=False)

    # -- admission ----------------------------------------------------------------------------
    def _headers(self, state: _State, now: float) -> tuple[tuple[str, str], ...]:
        wall = self._wall()
        out: list[tuple[str, str]] = []
        if self.limits.requests_per_minute:
            b = state.requests
            out += [("x-ratelimit-limit", str(self.limits.requests_per_minute)),
                    ("x-ratelimit-remaining", str(max(0, math.floor(b.level + 1e-9)))),
                    ("x-ratelimit-reset", str(math.ceil(wall + b.seconds_to(b.capacity))))]
        if self.limits.tokens_per_hour:
            t = state.tokens
            out += [("x-ratelimit-limit-tokens", str(self.limits.tokens_per_hour)),
                    ("x-ratelimit-remaining-tokens", str(max(0, math.floor(t.level)))),
                    ("x-ratelimit-reset-tokens", str(math.ceil(wall + t.seconds_to(t.capacity))))]
        return tuple(out)

    def _over(self, state: _State, hold_slot: bool) -> tuple[str, float] | None:
        """The limit this request would exceed and the seconds until it would not, or None."""
        lim = self.limits
        if lim.requests_per_minute and state.requests.level < 1.0 - 1e-9:
            return "requests", state.requests.seconds_to(1.0)
        if lim.tokens_per_hour and state.tokens.level <= 0.0:
            return "tokens", state.tokens.seconds_to(1.0)
        if hold_slot and lim.concurrent and state.in_flight >= lim.concurrent:
            return "concurrent", 1.0
        return None

    def _refusal(self, which: str, state: _State, now: float, retry_s: float) -> RateLimited:
        self.rejected[which] += 1
        lim = self.limits
        message, detail = {
            "requests": (f"{lim.requests_per_minute} requests per minute",
                         {"requests_per_minute": lim.requests_per_minute}),
            "tokens": (f"{lim.tokens_per_hour} tokens per hour",
                       {"tokens_per_hour": lim.tokens_per_hour}),
            "concurrent": (f"{lim.concurrent} concurrent requests",
                           {"concurrent": lim.concurrent}),
        }[which]
        retry = max(1, math.ceil(retry_s))
        return RateLimited(f"Rate limit exceeded: {message}", code="rate_limit_exceeded",
                           details={"limit": which, "retry_after": retry, **detail},
                           headers=[("retry-after", str(retry)), *self._headers(state, now)])

    def _take(self, identity: str, state: _State, now: float, hold_slot: bool) -> Ticket:
        if self.limits.requests_per_minute:
            state.requests.level -= 1.0
        holds = hold_slot and bool(self.limits.concurrent)
        if holds:
            state.in_flight += 1
        return Ticket(identity, holds, self._headers(state, now))

    def admit(self, identity: str, *, hold_slot: bool = True) -> Ticket:
        """Count one request for `identity`, or raise 429 (`RateLimited`) counting nothing."""
        now = self._clock()
        state = self._state(identity, now)
        state.requests.refill(now)
        state.tokens.refill(now)
        over = self._over(state, hold_slot)
        if over is not None:
            raise self._refusal(over[0], state, now, over[1])
        return self._take(identity, state, now, hold_slot)

    async def admit_waiting(self, identity: str) -> Ticket:
        """`admit`, except that a request over the concurrency limit (only) waits up to
        `queue_wait_s` for a slot (at most `WAITERS_PER_SLOT` × `concurrent` per key wait)."""
        deadline = self._clock() + self.queue_wait_s
        while True:
            now = self._clock()
            state = self._state(identity, now)
            state.requests.refill(now)
            state.tokens.refill(now)
            over = self._over(state, True)
            if over is None:
                return self._take(identity, state, now, True)
            if (over[0] != "concurrent" or now >= deadline
                    or state.waiting >= WAITERS_PER_SLOT * max(1, self.limits.concurrent)):
                raise self._refusal(over[0], state, now, over[1])
            if state.freed is None:
                state.freed = anyio.Event()
            freed = state.freed
            state.waiting += 1
            try:
                with anyio.move_on_after(deadline - now):
                    await freed.wait()
            finally:
                state.waiting -= 1

    def release(self, ticket: Ticket) -> None:
        if not ticket.holds_slot:
            return
        state = self._states.get(ticket.identity)
        if state is not None and state.in_flight > 0:
            state.in_flight -= 1
            if state.freed is not None:  # wake the waiters; one of them takes the slot
                state.freed.set()
                state.freed = None

    def record_tokens(self, request: Request, tokens: int) -> None:
        """Debit settled usage from the requesting key's tokens/hour bucket (when that limit is
        on: the key is not even identified otherwise)."""
        if tokens <= 0 or not self.limits.tokens_per_hour:
            return
        identity = self.identity(request)
        if identity is None:
            return
        now = self._clock()
        state = self._state(identity, now)
        state.tokens.refill(now)
        state.tokens.level -= tokens

    # -- middleware ---------------------------------------------------------------------------
    def wrap(self, app: App) -> App:
        if not self.enabled:
            return app

        async def guarded(request: Request) -> Response:
            identity = self.identity(request)
            if identity is None:
                return await app(request)
            ticket = await self.admit_waiting(identity)
            released = True
            try:
                try:
                    response = await app(request)
                except ApiError as exc:
                    exc.headers.extend(ticket.headers)
                    raise
                response.headers.extend(ticket.headers)
                if response.stream is not None and ticket.holds_slot:
                    response.stream = _SlotStream(response.stream, self, ticket)
                    released = False  # the stream's aclose() releases the slot
                return response
            finally:
                if released:
                    self.release(ticket)

        return guarded


class _SlotStream:
    """Passes a response stream through and frees the concurrency slot when it is closed."""

    def __init__(self, inner: BodyStream, limiter: RateLimiter, ticket: Ticket) -> None:
        self._inner = inner
        self._limiter = limiter
        self._ticket: Ticket | None = ticket

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._inner.__aiter__()

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            ticket, self._ticket = self._ticket, None
            if ticket is not None:
                self._limiter.release(ticket)
