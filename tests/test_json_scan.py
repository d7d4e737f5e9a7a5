"""The JSON-list scanner that plans JSON-list chunks without decoding: element spans agree with the
json module on random nested data (escapes, brackets inside strings, BOM, tiny read blocks) and
malformed lists are refused with the byte offset."""

from __future__ import annotations

import io
import json
import random

import pytest

from cfdist.io.json_scan import (JsonScanError, NoSuchListError, TruncatedJsonError, element_count, first_char,
                                 list_separators)


def _random_value(rng: random.Random, depth: int = 0):
    def text():
        return "".join(rng.choice(['a', '"', '\\', '[', ']', '{', '}', ',', ' ', 'é', '\n', '\\"'])
                       for _ in range(rng.randint(0, 8)))
    r = rng.random()
    if depth > 3 or r < 0.3:
        return rng.choice([1, 2.5, None, True, -1e-3, text()])
    if r < 0.6:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {text(): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def _elements(raw: bytes, block_size: int, key: str | None = None) -> list:
    copy = io.BytesIO()
    seps, end = list_separators(io.BytesIO(raw), key=key, block_size=block_size, copy_to=copy)
    assert end == len(raw) and copy.getvalue() == raw
    n = element_count(io.BytesIO(raw), seps)
    return [json.loads(raw[seps[k] + 1:seps[k + 1]]) for k in range(n)]


def test_spans_match_json_module_on_random_lists():
    rng = random.Random(0)
    for _ in range(800):  # ~1/6 of them scanned byte by byte (block 1): most of the test's time
        values = [_random_value(rng) for _ in range(rng.randint(0, 6))]
        text = json.dumps(values, indent=rng.choice([None, 1]), ensure_ascii=rng.random() < 0.5)
        raw = (" \n" if rng.random() < 0.3 else "").encode() + text.encode() + (b"\n " if rng.random() < 0.3 else b"")
        if rng.random() < 0.2:
            raw = b"\xef\xbb\xbf" + raw  # UTF-8 byte-order mark
        block = rng.choice([1, 2, 3, 7, 64, 1 << 20])  # state carried across block boundaries
        assert _elements(raw, block) == values, (raw, block)


def test_escaped_quotes_and_backslash_runs_across_blocks():
    values = [{"a\\": "x\\\\\"]", "b": ["\\\\", "\"[{"]}, "\\\\\\\"", []]
    raw = json.dumps(values).encode()
    for block in range(1, 12):
        assert _elements(raw, block) == values


def test_entries_list_of_a_top_level_object():
    """Alexandria dumps: {"@class": ..., "entries": [...]}; other members (lists too) are skipped,
    including look-alike keys inside strings and nested objects."""
    rng = random.Random(1)
    for _ in range(300):
        entries = [_random_value(rng) for _ in range(rng.randint(0, 5))]
        doc = {"@module": "x", "decoy": ['"entries": [1]', {"entries": [9, 9]}], "note": "\\\"entries\":[",
               "entries": entries, "after": [1, {"entries": 2}]}
        raw = json.dumps(doc, indent=rng.choice([None, 1])).encode()
        block = rng.choice([1, 3, 7, 64, 1 << 20])
        assert _elements(raw, block, key="entries") == entries, (raw, block)
    with pytest.raises(NoSuchListError):
        list_separators(io.BytesIO(b'{"entries": 5, "x": {"entries": [1]}}'), key="entries")
    with pytest.raises(JsonScanError, match="not a JSON object"):
        list_separators(io.BytesIO(b'[{"entries": [1]}]'), key="entries")


@pytest.mark.parametrize("raw, message", [
    (b"", "empty input"), (b"  \n", "empty input"), (b'{"entries": []}', "not a JSON list"),
    (b"x[1]", "not a JSON list"), (b"[1, 2", "not closed"), (b'["abc]', "inside a string"),
    (b"[1]]", "extra data"), (b"]", "not a JSON list"), (b"[1] x", "extra data"), (b"[1]\n[2]", "extra data"),
    (b"[[1]", "not closed"),
])
def test_malformed_lists_are_refused(raw, message):
    for block in (1, 2, 100):
        with pytest.raises(JsonScanError, match=message):
            list_separators(io.BytesIO(raw), block_size=block)


def test_empty_list_and_first_char():
    for raw in (b"[]", b" [ \n ] \n"):
        seps, _ = list_separators(io.BytesIO(raw))
        assert element_count(io.BytesIO(raw), seps) == 0
    assert first_char(b"\xef\xbb\xbf \n[1") == b"["
    assert first_char(b'  {"a": 1}') == b"{"
    assert first_char(b"  \n") == b""


def _cut_report(raw: bytes, cut: int, key: str | None = None) -> TruncatedJsonError:
    with pytest.raises(TruncatedJsonError, match="not closed") as info:
        list_separators(io.BytesIO(raw[:cut]), key=key, block_size=random.Random(cut).choice([2, 7, 64, 1 << 20]))
    return info.value


def test_a_cut_list_reports_its_complete_elements():
    """Cutting a well-formed list anywhere before its end (inside strings, escapes, nested values, between
    elements) raises TruncatedJsonError whose separators are exactly the full document's before the cut:
    every element followed by a comma is complete and decodes to the original value."""
    rng = random.Random(2)
    n_cuts = 0
    for _ in range(200):
        values = [_random_value(rng) for _ in range(rng.randint(1, 6))]
        raw = json.dumps(values, indent=rng.choice([None, 1]), ensure_ascii=rng.random() < 0.5).encode()
        full, _ = list_separators(io.BytesIO(raw))
        for cut in sorted(rng.sample(range(1, len(raw)), min(8, len(raw) - 1))):
            exc = _cut_report(raw, cut)
            assert exc.end == cut and not exc.closed
            assert exc.seps.tolist() == full[full < cut].tolist(), (raw, cut)
            complete = [json.loads(raw[exc.seps[k] + 1:exc.seps[k + 1]]) for k in range(len(exc.seps) - 1)]
            assert complete == values[:len(complete)], (raw, cut)
            n_cuts += 1
    assert n_cuts > 1000


def test_a_cut_entries_list_reports_its_complete_elements():
    """The Alexandria form {"entries": [...]}: cut before the list (no separators), inside it (its complete
    elements) or after it (closed, every element)."""
    rng = random.Random(3)
    for _ in range(120):
        entries = [_random_value(rng) for _ in range(rng.randint(1, 5))]
        doc = {"@module": "x", "decoy": ['"entries": [1]', {"entries": [9, 9]}], "entries": entries, "after": [1]}
        raw = json.dumps(doc, indent=rng.choice([None, 1])).encode()
        full, _ = list_separators(io.BytesIO(raw), key="entries")
        for cut in rng.sample(range(1, len(raw)), 6):
            exc = _cut_report(raw, cut, key="entries")
            assert exc.seps.tolist() == full[full < cut].tolist(), (raw, cut)
            assert exc.closed == (full[-1] < cut) and exc.end == cut
            complete = [json.loads(raw[exc.seps[k] + 1:exc.seps[k + 1]]) for k in range(len(exc.seps) - 1)]
            assert complete == entries[:len(complete)], (raw, cut)


def test_escapes_at_the_cut():
    """A cut right after a backslash (inside a string) or between escaped quotes keeps the state."""
    raw = json.dumps(["a\\", "b\"c,", {"d": "e\\\","}, 3]).encode()
    full, _ = list_separators(io.BytesIO(raw))
    for cut in range(1, len(raw)):
        assert _cut_report(raw, cut).seps.tolist() == full[full < cut].tolist(), cut
