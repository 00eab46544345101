"""The SSE reader: events survive any split of the byte stream; comments, fields and line endings."""

from __future__ import annotations

import json

import pytest
from remote_helpers import fixture

from internvl_chat.chat.sse import SSEDecoder, SSEEvent
from internvl_chat.errors import RemoteError


def events_of(pieces: list[bytes]) -> tuple[list[SSEEvent], SSEDecoder]:
    """The events of a body read in these pieces, as remote_stream reads one: feed each, then finish."""
    decoder = SSEDecoder()
    events = [event for piece in pieces for event in decoder.feed(piece)]
    return events + decoder.finish(), decoder


@pytest.mark.parametrize("name", ["vllm/stream.sse", "lmdeploy/stream.sse", "llamacpp/stream.sse"])
def test_recorded_streams_parse_the_same_however_the_bytes_are_split(name):
    body = fixture(name)
    whole, decoder = events_of([body])
    assert whole[-1].data == "[DONE]"
    assert all(json.loads(e.data) for e in whole[:-1])  # every other event is one JSON object
    for size in (1, 2, 3, 5, 7, 64):
        split, _ = events_of([body[i : i + size] for i in range(0, len(body), size)])
        assert split == whole, size
    if name.startswith("llamacpp"):
        assert decoder.comments == 2  # the ":" keep-alive pings are seen, never returned


def test_a_utf8_character_split_between_reads_is_kept_whole():
    body = 'data: {"text": "书生·万象 ✓"}\n\n'.encode()
    for cut in range(1, len(body)):
        events, _ = events_of([body[:cut], body[cut:]])
        assert json.loads(events[0].data) == {"text": "书生·万象 ✓"}


def test_multi_line_data_named_events_ids_and_comments():
    body = (
        b": a comment\n"
        b"event: error\n"
        b"id: 7\n"
        b"data: first line\n"
        b"data:second line\n"
        b"data\n"
        b"retry: 100\n"
        b"\n"
        b"data: next\n\n"
    )
    events, decoder = events_of([body])
    assert events == [SSEEvent("first line\nsecond line\n", "error", "7"), SSEEvent("next", "message", "7")]
    assert decoder.comments == 1


def test_llama_cpp_s_error_line_is_an_error_event():
    """llama.cpp sends an error in the stream as `error: {json}`, a field the format ignores: the
    stream then read as closed early, without the server's message."""
    events, decoder = events_of([b'data: {"a": 1}\n\nerror: {"message": "no"}\n\ndata: {"b": 2}\n\n'])
    assert events == [SSEEvent('{"a": 1}'), SSEEvent('{"message": "no"}', "error"), SSEEvent('{"b": 2}')]
    assert decoder.foreign is None


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_every_line_ending_of_the_format(newline):
    body = b"\xef\xbb\xbfdata: a" + newline + b"data: b" + newline + newline + b"data: [DONE]" + newline + newline
    for size in (1, 2, 100):
        events, _ = events_of([body[i : i + size] for i in range(0, len(body), size)])
        assert [e.data for e in events] == ["a\nb", "[DONE]"], (newline, size)


@pytest.mark.parametrize("newline", [b"\r\n", b"\r"])
def test_an_event_is_returned_by_the_read_that_completes_it(newline):
    """A read that ended in its event's CRLF blank line (sse-starlette's line ending) or in a CR
    returned nothing: the event came with the next read, a token late, and was lost with a
    connection broken meanwhile (the kept answer lacked text the server had sent)."""
    decoder = SSEDecoder()
    assert [e.data for e in decoder.feed(b"data: a" + newline + newline)] == ["a"]
    assert decoder.feed(b"data: b" + newline) == []
    assert [e.data for e in decoder.feed(newline)] == ["b"]


def test_a_crlf_split_between_reads_is_one_line_ending():
    # a CR is taken as the end of its line at once: the LF of the same CRLF, read next, is no empty line
    for cut in (b"data: a\r", b"data: a\r\ndata: b\r"):
        body = b"data: a\r\ndata: b\r\n\r\n"
        events, _ = events_of([cut, body[len(cut) :]])
        assert [e.data for e in events] == ["a\nb"], cut
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == [] and decoder.feed(b"") == [] and decoder.feed(b"\n") == []
    assert [e.data for e in decoder.feed(b"\n")] == ["a"]


def test_an_event_without_its_blank_line_at_the_end_is_dropped():
    events, _ = events_of([b"data: whole\n\ndata: cut off"])
    assert [e.data for e in events] == ["whole"]


def test_blank_lines_without_data_dispatch_nothing():
    events, _ = events_of([b"\n\n\r\n: ping\n\n"])
    assert events == []


def test_a_runaway_event_is_refused_with_one_line(monkeypatch):
    monkeypatch.setattr("internvl_chat.chat.sse.MAX_EVENT_CHARS", 1000)
    decoder = SSEDecoder()
    with pytest.raises(RemoteError, match="one stream event of over") as err:
        for _ in range(20):
            decoder.feed(b"data: " + b"x" * 100 + b"\n")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("line", [b"data:\n", b"data\n", b"data: \r\n"], ids=["empty", "no-colon", "space-crlf"])
def test_empty_data_lines_count_toward_the_event_limit(monkeypatch, line):
    """An empty `data:` line adds a line break to the event: counted as nothing, a flood of them
    (no blank line ever) grew a list without bound for as long as the server kept sending."""
    monkeypatch.setattr("internvl_chat.chat.sse.MAX_EVENT_CHARS", 1000)
    decoder = SSEDecoder()
    with pytest.raises(RemoteError, match="one stream event of over"):
        for _ in range(100):
            decoder.feed(line * 100)


def test_one_long_line_trickled_in_small_pieces_is_scanned_once(monkeypatch):
    """A server sending one huge line a kilobyte at a time must cost the size of the line, not its
    square: the text handed to the line-break search adds up to about the line, not the line × reads."""
    import internvl_chat.chat.sse as sse

    scanned = []

    def counting(text, start):
        scanned.append(len(text) - start)
        return _next_break(text, start)

    _next_break = sse._next_break
    monkeypatch.setattr(sse, "_next_break", counting)
    decoder = SSEDecoder()
    piece = b"x" * 1000
    events = decoder.feed(b"data: ")
    for _ in range(2000):
        events += decoder.feed(piece)
    events += decoder.feed(b"\n\n")
    assert [len(e.data) for e in events] == [2_000_000]
    assert sum(scanned) < 3 * 2_000_000


@pytest.mark.parametrize("ending", [b"\n", b"\r", b":\n"], ids=["lf", "cr", "comments"])
def test_a_read_of_many_short_lines_is_scanned_once(monkeypatch, ending):
    """A read of many lines (a gzip-compressed flood inflates to 64 MiB of them) must cost its size,
    not its size × its lines: looking for the line ending that never comes scanned to the end each time."""
    import internvl_chat.chat.sse as sse

    scanned = []

    class Counting:
        def search(self, text, start):
            found = pattern.search(text, start)
            scanned.append((found.end() if found else len(text)) - start)
            return found

    pattern = sse._LINE_BREAK
    monkeypatch.setattr(sse, "_LINE_BREAK", Counting())
    body = ending * 20_000 + b"data: x\n\n"
    events, decoder = events_of([body])
    assert [e.data for e in events] == ["x"] and decoder.comments == (20_000 if ending == b":\n" else 0)
    assert sum(scanned) <= 2 * len(body)
