"""Byte spans of the elements of a top-level JSON list, found without decoding the elements.

A JARVIS or Materials Project dump is one JSON list of records, often hundreds of MB to GBs.
Decoding it whole on the driver (to count records) and again in every worker (to slice out a
chunk) costs time and memory proportional to the file per process. Instead, the planner scans
the bytes once for the list's top-level separators: a vectorised pass (numpy) over the
structural characters ``" \\ [ ] { } ,`` that tracks string state (with backslash escapes) and
bracket depth. Each worker then reads only its chunk's byte range and decodes that.

The scan validates structure only (balanced brackets outside strings, nothing after the list);
a record that is not valid JSON inside balanced brackets is found when its chunk is decoded and
becomes a per-record rejection instead of failing the whole file.
"""

from __future__ import annotations

import re
from typing import BinaryIO

import numpy as np

_QUOTE, _BACKSLASH, _COMMA = 34, 92, 44
_OPEN = (91, 123)  # [ {
_CLOSE = (93, 125)  # ] }
_WHITESPACE = b" \t\r\n"
_BOM = b"\xef\xbb\xbf"

# bytes.translate keeps the structural bytes and zeroes the rest (much faster than a numpy lookup).
_KEEP_STRUCTURAL = bytes(c if c in (_QUOTE, _BACKSLASH, _COMMA, *_OPEN, *_CLOSE) else 0 for c in range(256))
_DELTA = np.zeros(256, dtype=np.int16)  # nesting deeper than 32767 levels is not decodable anyway
_DELTA[list(_OPEN)] = 1
_DELTA[list(_CLOSE)] = -1


class JsonScanError(ValueError):
    """The bytes are not a well-formed JSON document (the message names the byte offset)."""


class NoSuchListError(JsonScanError):
    """A well-formed top-level object without a list under the requested key."""


class TruncatedJsonError(JsonScanError):
    """The input ends before the document is closed (a cut file), with what the scan found before.

    Attributes:
        seps: the list's separators before the cut, as :func:`list_separators` gives them: its ``[``
            and the commas between its elements (and its ``]`` when ``closed``); empty when the input
            ends before the list starts. Elements ``0 .. len(seps) - 2`` are complete; unless
            ``closed``, the bytes after ``seps[-1]`` are the cut element (blank when the data stops
            right after a separator).
        end: the number of bytes read.
        closed: whether the list itself was closed (only the enclosing object is cut).
    """

    def __init__(self, message: str, seps: np.ndarray, end: int, closed: bool):
        super().__init__(message)
        self.seps = seps
        self.end = end
        self.closed = closed


def first_char(head: bytes) -> bytes:
    """The first byte of a JSON document after a byte-order mark and whitespace (b"" if none)."""
    text = head[len(_BOM):] if head.startswith(_BOM) else head
    return text.lstrip(_WHITESPACE)[:1]


def list_separators(stream: BinaryIO, key: str | None = None, block_size: int = 1 << 24,
                    copy_to: BinaryIO | None = None) -> tuple[np.ndarray, int]:
    """Offsets of a JSON list's separators, and the stream's total length in bytes.

    The list is the whole document (``key=None``) or the value of the top-level object's member
    ``key`` (e.g. ``"entries"`` of an Alexandria dump). Returns ``(seps, end)``: ``seps[0]`` is the
    offset of the list's ``[``, ``seps[1:-1]`` those of the commas between its elements and
    ``seps[-1]`` that of its ``]``, so element ``k`` is ``bytes[seps[k] + 1 : seps[k + 1]]`` (with
    surrounding whitespace). ``[]`` gives two separators and one blank "element": use
    :func:`element_count`. Every byte read is also written to ``copy_to`` when given (to keep a
    decompressed copy without a second pass). Raises :class:`JsonScanError` when the document is
    not well formed (anything but whitespace around it, unbalanced brackets, an unterminated
    string) or has no such list; :class:`TruncatedJsonError` (a subclass) when the input ends
    before the document is closed.
    """
    opener = b"[" if key is None else b"{"
    target = 0 if key is None else 1  # depth outside the wanted list
    key_pattern = None if key is None else re.compile(
        rb'[{,\s]\s*"' + re.escape(key.encode()) + rb'"\s*:\s*$')
    scanner = StructuralScanner()  # string state, backslash runs and depth carried between blocks
    started = finished = in_list = list_done = False
    seps: list[np.ndarray] = []
    base = 0
    tail = b""  # the end of the previous block, to read a key that starts there
    while True:
        block = stream.read(block_size if base else max(block_size, len(_BOM)))
        if not block:
            break
        if copy_to is not None:
            copy_to.write(block)
        if not started:
            lead = block[len(_BOM):] if base == 0 and block.startswith(_BOM) else block
            lead = lead.lstrip(_WHITESPACE)
            if lead and lead[:1] != opener:
                what = "a JSON list" if key is None else "a JSON object"
                raise JsonScanError(f"not {what}: starts with {lead[:20]!r}")
            started = bool(lead)
        if finished:
            if block.strip(_WHITESPACE):
                raise JsonScanError(f"extra data after the document at byte {base}")
            base += len(block)
            continue
        offsets, kind, depth_before = scanner.feed(block)
        pos = offsets - base  # offsets within this block
        delta = _DELTA[kind]
        depth_after = depth_before + delta

        first = 0  # first token of this block that belongs to the wanted list
        if not in_list and not list_done:
            opens = np.flatnonzero((kind == ord("[")) & (depth_before == target))
            if key_pattern is not None:
                opens = [k for k in opens.tolist() if key_pattern.search(_before(tail, block, int(pos[k])))]
            if len(opens):
                first = int(opens[0])
                in_list = True
                seps.append(np.array([base + int(pos[first])], dtype=np.int64))
                first += 1
        if in_list:
            rest = slice(first, None)
            ends = np.flatnonzero((delta[rest] == -1) & (depth_after[rest] == target))
            stop = first + int(ends[0]) if len(ends) else len(kind)
            commas = np.flatnonzero((kind[first:stop] == _COMMA) & (depth_before[first:stop] == target + 1))
            seps.append(pos[first + commas].astype(np.int64) + base)
            if len(ends):
                seps.append(np.array([base + int(pos[stop])], dtype=np.int64))
                in_list, list_done = False, True
        closes = np.flatnonzero((depth_after == 0) & (delta == -1))
        if len(closes):
            close = int(pos[closes[0]])
            if block[close + 1:].strip(_WHITESPACE):
                raise JsonScanError(f"extra data after the document at byte {base + close + 1}")
            finished = True
        tail = block[-4096:] if len(block) >= 4096 else (tail + block)[-4096:]
        base += len(block)
    if not started:
        raise JsonScanError("empty input: no JSON document")
    if not finished:
        what = "inside a string" if scanner.in_string else "inside the document"
        found = np.concatenate(seps) if seps else np.zeros(0, dtype=np.int64)
        raise TruncatedJsonError(f"the document is not closed: the input ends {what} at byte {base} (truncated?)",
                                 found, base, list_done)
    if not list_done:
        raise NoSuchListError(f"the top-level object has no {key!r} list")
    return np.concatenate(seps), base


def _before(tail: bytes, block: bytes, at: int, width: int = 4096) -> bytes:
    """Up to ``width`` bytes before offset ``at`` of ``block``, continuing into the previous block."""
    window = block[max(0, at - width):at]
    return window if len(window) == width else (tail + window)[-width:]


def element_count(stream: BinaryIO, seps: np.ndarray) -> int:
    """Number of list elements given :func:`list_separators`' offsets (0 for ``[]``)."""
    if len(seps) == 2:
        stream.seek(int(seps[0]) + 1)
        if not stream.read(int(seps[1] - seps[0]) - 1).strip(_WHITESPACE):
            return 0
    return len(seps) - 1


def _prev_is_backslash(data: np.ndarray, quote_pos: np.ndarray, carried: int) -> np.ndarray:
    prev = quote_pos - 1
    out = np.zeros(len(quote_pos), dtype=bool)
    inside = prev >= 0
    out[inside] = data[prev[inside]] == _BACKSLASH
    if carried and len(quote_pos) and quote_pos[0] == 0:
        out[0] = True
    return out


def _backslash_run(data: np.ndarray, quote_at: int, carried: int) -> int:
    """Number of consecutive backslashes right before ``quote_at`` (continuing into the carry)."""
    run = 0
    k = quote_at - 1
    while k >= 0 and data[k] == _BACKSLASH:
        run += 1
        k -= 1
    return run + (carried if k < 0 else 0)


def _trailing_backslashes(data: np.ndarray, carried: int) -> int:
    run = 0
    k = len(data) - 1
    while k >= 0 and data[k] == _BACKSLASH:
        run += 1
        k -= 1
    return run + (carried if k < 0 else 0)


class StructuralScanner:
    """The structural bytes of a JSON document outside strings, block by block, with their depth.

    For layouts :func:`list_separators` does not cover (MPtrj's object of objects,
    :mod:`cfdist.io.mptrj`): feed consecutive blocks of the document; each call returns the absolute
    offsets of its ``[ ] { } ,`` bytes that are outside strings, the bytes themselves and the nesting
    depth before each. String state and backslash runs carry across blocks, so the result does not
    depend on the block size. Nothing is decoded; a malformed document shows up as depths that never
    return to zero (the caller checks).
    """

    def __init__(self, depth: int = 0, base: int = 0):
        """``depth``: nesting depth at the first byte fed (to scan a span inside a document);
        ``base``: its absolute offset."""
        self.depth = depth
        self.base = base
        self.in_string = False
        self._trailing_backslashes = 0

    def feed(self, block: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(offsets int64 (K,), bytes uint8 (K,), depth before int16 (K,))`` of the block's structural
        bytes outside strings; the block's bytes are consumed (the next call continues after them)."""
        data = np.frombuffer(block, dtype=np.uint8)
        structural = np.frombuffer(block.translate(_KEEP_STRUCTURAL), dtype=np.uint8)
        pos = np.flatnonzero(structural)
        kind = structural[pos]
        is_quote = kind == _QUOTE
        carried = self._trailing_backslashes
        if b"\\" in block or carried:
            quote_pos = pos[is_quote]
            maybe_escaped = quote_pos[_prev_is_backslash(data, quote_pos, carried)]
            escaped = [p for p in maybe_escaped.tolist() if _backslash_run(data, p, carried) % 2]
            if escaped:
                is_quote &= ~np.isin(pos, escaped)
            self._trailing_backslashes = _trailing_backslashes(data, carried)
        parity = (np.cumsum(is_quote.view(np.int8), dtype=np.int8) + np.int8(self.in_string)) & 1
        outside = (parity == 0) & ~is_quote & (kind != _BACKSLASH)
        if len(parity):
            self.in_string = bool(parity[-1])
        kind, pos = kind[outside], pos[outside]
        delta = _DELTA[kind]
        depth_after = np.cumsum(delta, dtype=np.int16) + np.int16(self.depth)
        if len(depth_after):
            self.depth = int(depth_after[-1])
        offsets = pos.astype(np.int64) + self.base
        self.base += len(block)
        return offsets, kind, depth_after - delta
