"""Incremental Server-Sent Events codec (WHATWG HTML, "server-sent events"), pure: no I/O.

`SSEDecoder.feed()` takes bytes exactly as they come off the wire, in chunks split anywhere, and
returns the events those bytes completed. Every event remembers its exact wire bytes (`raw`), so a
relay can pass an event through untouched and rewrite only the few it cares about (the `usage`
chunk, `response.completed`, `[DONE]`).

Choices this module makes (the standard leaves them to the user agent):

* **Every block is yielded.** A block is everything up to and including a blank line. A browser
  drops blocks that carry no ``data:`` field (comment-only keep-alives such as
  ``": OPENROUTER PROCESSING\\n\\n"``, a lone ``"event: ping\\n\\n"``, stray blank lines); we yield
  them too, with ``data == ""`` and ``has_data == False``, so a relay can forward keep-alives
  byte-exactly and promptly, or drop them by testing ``has_data``. Comment lines inside a block
  that also has data are simply part of that event's `raw`. Consequently the `raw` of all events
  from one stream, concatenated, is exactly the stream (`close()` included).
* **`id` is per event.** `SSEEvent.id` is the ``id:`` field of that block (``None`` if the block
  has none), not the standard's sticky "last event ID".
* **A lone CR at the end of a chunk waits for the next byte**: it may be the first half of CRLF,
  and deciding early would make the events depend on where the stream was split. Streams that end
  lines with bare CR therefore see each event one chunk late (or at `close()`); LF and CRLF streams
  are unaffected.
* ``retry:`` and unknown fields are ignored (kept in `raw`). A leading UTF-8 BOM is ignored for
  parsing (kept in `raw`). Bytes that are not UTF-8 decode with U+FFFD replacement.
* **Bounded.** A line longer than `max_line_bytes` (default `MAX_SSE_LINE_BYTES`, 1 MiB) or a block
  larger than `max_event_bytes` raises `SSEError`, whether it arrived in one chunk or many.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .wire import loads

MAX_SSE_LINE_BYTES = 1 << 20
MAX_SSE_EVENT_BYTES = 8 << 20

_LINE_END = re.compile(rb"\r\n?|\n")
_NEWLINES = re.compile(r"\r\n?|\n")
_BOM = b"\xef\xbb\xbf"


class SSEError(ValueError):
    """The byte stream is not a well-formed (or acceptably small) event stream."""


@dataclass(frozen=True)
class SSEEvent:
    """One block of an event stream.

    `data` is the block's ``data:`` lines joined with ``"\\n"`` (``""`` when there are none);
    `event` and `id` are the block's last ``event:`` / ``id:`` values or ``None``; `raw` is the
    exact bytes of the block including its blank-line terminator (no terminator for a final
    block flushed by `SSEDecoder.close()`); `has_data` says whether the block had at least one
    ``data`` field, i.e. whether a browser would dispatch it.
    """

    data: str
    event: str | None
    id: str | None
    raw: bytes
    has_data: bool = True

    def json(self) -> object | None:
        """The parsed `data`, or ``None`` when it is empty, ``[DONE]`` or not JSON (as the
        node's bounded reader, `wire.loads`, sees it: too deep, NaN, ... are "not JSON").

        Parses on every call; keep the result if you need it twice.
        """
        if not self.data or self.is_done:
            return None
        try:
            doc: object = loads(self.data)
        except ValueError:  # wire.JsonError
            return None
        return doc

    @property
    def is_done(self) -> bool:
        """OpenAI's end-of-stream sentinel: ``data: [DONE]``."""
        return self.data.strip() == "[DONE]"


class SSEDecoder:
    """Feed it bytes, get complete events. One decoder per stream; see the module docstring."""

    __slots__ = (
        "_buf",
        "_scan",
        "_raw",
        "_data",
        "_has_data",
        "_event",
        "_id",
        "_first_line",
        "_max_line",
        "_max_event",
    )

    def __init__(
        self,
        *,
        max_line_bytes: int = MAX_SSE_LINE_BYTES,
        max_event_bytes: int = MAX_SSE_EVENT_BYTES,
    ) -> None:
        self._max_line = max_line_bytes
        self._max_event = max_event_bytes
        self._buf = bytearray()  # bytes not yet assigned to a complete line
        self._reset_stream()

    def _reset_stream(self) -> None:
        self._buf.clear()
        self._scan = 0  # where to resume looking for a line end in _buf
        self._first_line = True
        self._reset_block()

    def _reset_block(self) -> None:
        self._raw = bytearray()
        self._data: list[str] = []
        self._has_data = False
        self._event: str | None = None
        self._id: str | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Consume `chunk`; return the events it completed (possibly none)."""
        if not chunk:
            return []
        buf = self._buf
        buf += chunk
        events: list[SSEEvent] = []
        pos = 0
        search = _LINE_END.search
        scan = self._scan
        n = len(buf)
        while True:
            m = search(buf, scan)
            if m is None:
                break
            end = m.end()
            if end == n and buf[end - 1] == 0x0D:  # a CR last in the buffer may be half of CRLF
                scan = m.start()
                break
            self._line(buf, pos, m.start(), end, events)
            pos = scan = end
        if pos:
            del buf[:pos]
            scan -= pos
        self._scan = scan if m is not None else len(buf)
        if len(buf) - (1 if buf[-1:] == b"\r" else 0) > self._max_line:
            raise SSEError(f"SSE line longer than {self._max_line} bytes")
        return events

    def close(self) -> list[SSEEvent]:
        """End of stream: flush a last line and a last block that lacked its blank line.

        The decoder is then ready for a new stream.
        """
        events: list[SSEEvent] = []
        buf = self._buf
        if buf:
            self._line(buf, 0, len(buf) - (1 if buf[-1] == 0x0D else 0), len(buf), events)
        if self._raw:
            events.append(self._dispatch())
        self._reset_stream()
        return events

    def _line(self, buf: bytearray, start: int, stop: int, end: int, out: list[SSEEvent]) -> None:
        """Handle the line buf[start:stop] whose terminator ends at `end`."""
        if stop - start > self._max_line:
            raise SSEError(f"SSE line longer than {self._max_line} bytes")
        self._raw += buf[start:end]
        if len(self._raw) > self._max_event:
            raise SSEError(f"SSE event larger than {self._max_event} bytes")
        line = bytes(buf[start:stop])
        if self._first_line:
            self._first_line = False
            if line.startswith(_BOM):
                line = line[len(_BOM) :]
        if not line:
            out.append(self._dispatch())
            return
        colon = line.find(b":")
        if colon == 0:
            return  # comment
        if colon < 0:
            name, value = line, b""
        else:
            name = line[:colon]
            value = line[colon + 2 :] if line[colon + 1 : colon + 2] == b" " else line[colon + 1 :]
        if name == b"data":
            self._data.append(value.decode("utf-8", "replace"))
            self._has_data = True
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id":
            if b"\x00" not in value:
                self._id = value.decode("utf-8", "replace")
        # "retry" and unknown fields: ignored

    def _dispatch(self) -> SSEEvent:
        ev = SSEEvent(
            data="\n".join(self._data),
            event=self._event,
            id=self._id,
            raw=bytes(self._raw),
            has_data=self._has_data,
        )
        self._reset_block()
        return ev


def encode_event(data: str, event: str | None = None, *, id: str | None = None) -> bytes:
    """One event on the wire: optional ``event:``/``id:`` lines, one ``data:`` line per line of
    `data` (CR, LF and CRLF all split lines, as the decoder will), then the blank line.

    `SSEDecoder` gives back `data` with line ends normalised to ``"\\n"``.
    """
    parts: list[str] = []
    if event is not None:
        if _NEWLINES.search(event):
            raise SSEError("SSE event name must not contain a line break")
        parts.append(f"event: {event}\n")
    if id is not None:
        if _NEWLINES.search(id) or "\x00" in id:
            raise SSEError("SSE id must not contain a line break or NUL")
        parts.append(f"id: {id}\n")
    if "\r" in data or "\n" in data:
        parts.extend(f"data: {line}\n" for line in _NEWLINES.split(data))
    else:
        parts.append(f"data: {data}\n")
    parts.append("\n")
    return "".join(parts).encode("utf-8")
