"""routstr.sse: the incremental SSE codec (pure; no I/O)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routstr.sse import MAX_SSE_LINE_BYTES, SSEDecoder, SSEError, SSEEvent, encode_event

OPENAI_STREAM = (
    b": OPENROUTER PROCESSING\n\n"
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,'
    b'"delta":{"role":"assistant","content":""}}]}\n\n'
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"Hi \xc3\xa9"}}]}\n\n'
    b"event: response.output_text.delta\n"
    b"id: 7\n"
    b'data: {"type":"response.output_text.delta","delta":"x"}\n\n'
    b"data: line one\n"
    b"data: line two\n"
    b": a comment inside an event\n"
    b"retry: 1000\n"
    b"unknown: field\n\n"
    b'data: {"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":5}}\n\n'
    b"data: [DONE]\n\n"
)


def decode_all(stream: bytes, chunks: list[bytes] | None = None) -> list[SSEEvent]:
    dec = SSEDecoder()
    out: list[SSEEvent] = []
    for chunk in chunks if chunks is not None else [stream]:
        out.extend(dec.feed(chunk))
    out.extend(dec.close())
    return out


def test_openai_stream_parses() -> None:
    events = decode_all(OPENAI_STREAM)
    assert [e.has_data for e in events] == [False, True, True, True, True, True, True]
    keepalive, role, content, delta, multi, usage, done = events
    assert keepalive.data == "" and keepalive.raw == b": OPENROUTER PROCESSING\n\n"
    assert keepalive.json() is None and not keepalive.is_done
    assert role.json() == {
        "id": "c1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
    }
    content_doc = content.json()
    assert isinstance(content_doc, dict)
    assert content_doc["choices"][0]["delta"]["content"] == "Hi é"
    assert delta.event == "response.output_text.delta" and delta.id == "7"
    assert role.event is None and role.id is None
    assert multi.data == "line one\nline two" and multi.json() is None
    assert multi.raw.endswith(b"unknown: field\n\n")
    assert usage.json() == {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 5}}
    assert done.is_done and done.json() is None and done.raw == b"data: [DONE]\n\n"
    assert b"".join(e.raw for e in events) == OPENAI_STREAM


def _all_line_ending_variants(stream: bytes) -> dict[str, bytes]:
    return {
        "lf": stream,
        "crlf": stream.replace(b"\n", b"\r\n"),
        "cr": stream.replace(b"\n", b"\r"),
    }


@pytest.mark.parametrize("ending", ["lf", "crlf", "cr"])
def test_split_at_every_byte_position_gives_identical_events(ending: str) -> None:
    stream = _all_line_ending_variants(OPENAI_STREAM)[ending]
    whole = decode_all(stream)
    assert len(whole) == 7
    assert b"".join(e.raw for e in whole) == stream
    for i in range(len(stream) + 1):
        assert decode_all(stream, [stream[:i], stream[i:]]) == whole, i
    assert decode_all(stream, [stream[i : i + 1] for i in range(len(stream))]) == whole


@pytest.mark.parametrize("ending", ["lf", "crlf", "cr"])
def test_line_ending_variants_give_the_same_fields(ending: str) -> None:
    reference = [(e.data, e.event, e.id, e.has_data) for e in decode_all(OPENAI_STREAM)]
    stream = _all_line_ending_variants(OPENAI_STREAM)[ending]
    assert [(e.data, e.event, e.id, e.has_data) for e in decode_all(stream)] == reference


def test_mixed_line_endings_and_crlf_split_across_chunks() -> None:
    stream = b"data: a\r\ndata: b\rdata: c\n\r\ndata: d\r\r"
    events = decode_all(stream)
    assert [e.data for e in events] == ["a\nb\nc", "d"]
    assert events[0].raw == b"data: a\r\ndata: b\rdata: c\n\r\n"
    # a CR at the end of a chunk waits for the next byte (it may be half of a CRLF)
    dec = SSEDecoder()
    assert dec.feed(b"data: x\r\n\r") == []
    [ev] = dec.feed(b"\n")
    assert ev.raw == b"data: x\r\n\r\n"
    assert dec.feed(b"data: y\n\r") == []
    ev, z = dec.feed(b"data: z\n\n")
    assert ev.raw == b"data: y\n\r" and ev.data == "y"
    assert z.raw == b"data: z\n\n"


def test_field_parsing_details() -> None:
    stream = (
        b"\xef\xbb\xbfdata:no-space\n"  # BOM at stream start ignored; no space after colon
        b"data:  two spaces\n"  # only one leading space is removed
        b"data\n"  # a field name alone: empty value
        b"event\n"
        b"id: a\x00b\n\n"  # an id with NUL is ignored
        b"data: \xff\xfe\n\n"  # invalid UTF-8 -> U+FFFD
    )
    first, second = decode_all(stream)
    assert first.data == "no-space\n two spaces\n"
    assert first.event == "" and first.id is None
    assert first.raw.startswith(b"\xef\xbb\xbf")
    assert second.data == "\ufffd\ufffd"


def test_blocks_without_data_are_yielded_with_has_data_false() -> None:
    events = decode_all(b"\n\nevent: ping\n\n: keep-alive\n\ndata:\n\n")
    assert [(e.data, e.event, e.has_data) for e in events] == [
        ("", None, False),
        ("", None, False),
        ("", "ping", False),
        ("", None, False),
        ("", None, True),  # "data:" alone is a real (empty) event
    ]


def test_close_flushes_a_final_event_without_blank_line() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: one\n\ndata: two") == [SSEEvent("one", None, None, b"data: one\n\n")]
    [last] = dec.close()
    assert last == SSEEvent("two", None, None, b"data: two")
    assert dec.close() == []  # idempotent, and the decoder is reset
    assert dec.feed(b"data: again\n\n")[0].data == "again"
    dec2 = SSEDecoder()
    dec2.feed(b"data: [DONE]\n")
    [done] = dec2.close()
    assert done.is_done and done.raw == b"data: [DONE]\n"


def test_oversize_line_raises_whether_it_arrives_whole_or_in_pieces() -> None:
    big = b"data: " + b"x" * MAX_SSE_LINE_BYTES + b"\n\n"
    with pytest.raises(SSEError):
        SSEDecoder().feed(big)
    dec = SSEDecoder()
    with pytest.raises(SSEError):
        for i in range(0, len(big), 64 * 1024):
            dec.feed(big[i : i + 64 * 1024])
    # exactly at the bound is fine, including a terminator CR parked at a chunk end
    ok = b"d" * MAX_SSE_LINE_BYTES
    dec = SSEDecoder()
    assert dec.feed(ok + b"\r") == []
    assert len(dec.feed(b"\n\n")) == 1


def test_configurable_bounds() -> None:
    dec = SSEDecoder(max_line_bytes=10)
    assert dec.feed(b"data: 1234\n") == []
    with pytest.raises(SSEError):
        dec.feed(b"data: 12345\n")
    dec = SSEDecoder(max_event_bytes=30)
    with pytest.raises(SSEError):
        dec.feed(b"data: 1\n" * 5)


def test_long_line_in_many_small_chunks_is_not_quadratic() -> None:
    line = b"data: " + b"y" * (MAX_SSE_LINE_BYTES - 100) + b"\n\n"
    dec = SSEDecoder()
    events: list[SSEEvent] = []
    for i in range(0, len(line), 512):
        events.extend(dec.feed(line[i : i + 512]))
    assert len(events) == 1 and len(events[0].data) == MAX_SSE_LINE_BYTES - 100


def test_encode_event() -> None:
    assert encode_event("hello") == b"data: hello\n\n"
    assert encode_event("a\nb", "update") == b"event: update\ndata: a\ndata: b\n\n"
    assert encode_event("a\r\nb\rc") == b"data: a\ndata: b\ndata: c\n\n"
    assert encode_event("", id="5") == b"id: 5\ndata: \n\n"
    assert encode_event(json.dumps({"x": "é"}, ensure_ascii=False)) == (
        '{"x": "é"}'.join(["data: ", "\n\n"]).encode()
    )
    with pytest.raises(SSEError):
        encode_event("x", "bad\nname")


# data may hold LF (several data: lines) but not CR: the decoder hands CR/CRLF back as LF
_text = st.text(st.characters(codec="utf-8", exclude_characters="\r"), max_size=40)
_name = st.one_of(
    st.none(), st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=12)
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_text, _name), max_size=6), st.data())
def test_roundtrip_encode_decode(items: list[tuple[str, str | None]], data: st.DataObject) -> None:
    stream = b"".join(encode_event(d, e) for d, e in items)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=5)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    events = decode_all(stream, chunks)
    assert [(e.data, e.event) for e in events] == items
    assert all(e.has_data and e.id is None for e in events)
    assert b"".join(e.raw for e in events) == stream


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.data())
def test_arbitrary_bytes_split_anywhere_decode_identically(
    stream: bytes, data: st.DataObject
) -> None:
    whole = decode_all(stream)
    cut = data.draw(st.integers(0, len(stream)))
    assert decode_all(stream, [stream[:cut], stream[cut:]]) == whole
    assert b"".join(e.raw for e in whole) == stream
