"""The cut-file prefix reader ``cfdist predict`` uses: every complete record of a JSON list or JSON-lines
input that stops early (a partial download), then :class:`TruncatedInputError` saying where it stops.

Prediction reads what it can of a JSON input that planning refuses; the preprocessing job keeps
refusing such a file (:func:`cfdist.io.registry.plan_chunks` raises), so shards never hold half a
file. The cut is found by the planning scan itself (a ``TruncatedJsonError`` from
:mod:`cfdist.io.json_scan`, or the last line of JSON lines); the complete records before it are
planned as ordinary chunks and read by the format's own reader.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import tempfile
import zlib
from typing import Callable, Iterator

import numpy as np

from cfdist.io.json_container import is_json_lines, json_lines_offsets
from cfdist.io.json_scan import JsonScanError, TruncatedJsonError, element_count, first_char, list_separators
from cfdist.io.records import Chunk, RawRecord, file_errors
from cfdist.io.spill import byte_chunks, list_chunks, open_binary, spill_path, spilling, with_data_path


class TruncatedInputError(ValueError):
    """:func:`read_json_prefix` reached the end of the data inside the list or a record, or a compressed
    stream that breaks off (a cut file).

    Attributes:
        path: the input.
        n_read: records yielded before the cut (complete ones, good or rejected).
        detail: where the data stops, in words.
    """

    def __init__(self, path: str, n_read: int, detail: str):
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.n_read = n_read
        self.detail = detail


_CUT_HINT = "the rest of the file is missing (cut short, e.g. an interrupted download)"


def json_lines_cut(path: str) -> bool:
    """Whether an uncompressed JSON-lines input ends inside a record: its last line has no newline and
    is not valid JSON. (planning accepts such a file and the chunk reader rejects its last
    line as ``unparseable``; a cut ``.gz``/``.bz2`` stream already fails planning.) False otherwise."""
    path = os.fspath(path)
    if not is_json_lines(path) or path.lower().endswith((".gz", ".bz2")) or not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        pos = f.seek(0, os.SEEK_END)
        tail = b""
        while pos > 0:
            step = min(1 << 16, pos)
            pos -= step
            f.seek(pos)
            tail = f.read(step) + tail
            if tail.endswith(b"\n"):
                return False
            cut = tail.rfind(b"\n")
            if cut >= 0:
                tail = tail[cut + 1:]
                break
    return bool(tail.strip()) and not _decodes(tail)


def _decodes(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except ValueError:
        return False
    return True


class _EndsAtBreak(io.RawIOBase):
    """A (possibly compressed) binary stream that just ends where a compressed stream breaks off (a cut
    ``.gz`` / ``.bz2``: ``EOFError``; a corrupt block after some data: ``OSError`` / ``zlib.error``),
    with the error kept in ``broken``."""

    def __init__(self, f):
        self.f, self.broken, self.n_bytes = f, None, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.broken:
            return 0
        try:
            data = self.f.read1(len(buffer))  # one raw read: what came out before a break is kept
        except (EOFError, zlib.error, OSError) as exc:
            if isinstance(exc, (FileNotFoundError, PermissionError)) or not (self.n_bytes or
                                                                             isinstance(exc, EOFError)):
                raise
            self.broken, data = f"{type(exc).__name__}: {exc}", b""
        buffer[:len(data)] = data
        self.n_bytes += len(data)
        return len(data)

    def close(self):
        self.f.close()
        super().close()


def read_json_prefix(path: str, fmt: str | None, chunk_size: int, infer: Callable[[str], str],
                     read: Callable[[Chunk], Iterator[RawRecord]]) -> Iterator[RawRecord]:
    """Every record of a JSON-list or JSON-lines input up to where its data stops, for prediction.

    For inputs planning refuses because they are cut short (a JSON list that is not closed, a
    ``.gz``/``.bz2`` stream that breaks off) and JSON-lines files whose last line is cut
    (:func:`json_lines_cut`). The file is scanned as planning scans it (a compressed one is
    decompressed once, into a temporary copy); its complete records are planned as chunks and yielded
    by ``read`` (the registry's ``read_chunk``; a bad element or line is an ``unparseable`` record).
    ``fmt`` None: ``infer`` (the registry's ``infer_format``) names it from the first complete records.
    Called through :func:`cfdist.io.registry.read_prefix`, which checks that ``fmt`` reads this way.

    Raises :class:`TruncatedInputError` after the last complete record when the data stops inside the
    list or a record (or the compressed stream breaks off after it); :class:`UnknownFormatError` when
    the first records are neither JARVIS nor pymatgen; ``ValueError`` / ``OSError`` when the file is
    not a JSON list (or ``entries`` dump) or JSON lines at all, or has other damage. Returns normally
    when the data turns out to be complete.
    """
    path = os.path.abspath(os.fspath(path))
    compressed = path.lower().endswith((".gz", ".bz2"))
    with tempfile.TemporaryDirectory(prefix="cfdist-cut-") if compressed else contextlib.nullcontext() as tmp:
        with file_errors(path):
            chunks, cut = _plan_prefix(path, fmt, chunk_size, spill_path(tmp, path) if tmp else None, infer)
        for chunk in chunks:
            yield from read(chunk)
    if cut is not None:
        raise cut


def _plan_prefix(path: str, fmt: str | None, chunk_size: int, spill: str | None,
                 infer: Callable[[str], str]) -> tuple[list[Chunk], TruncatedInputError | None]:
    """Chunks of the complete records of a JSON input up to where its data stops, and the cut (None
    when the data is complete). ``spill``: where to keep the decompressed bytes of a compressed input."""
    whole = False  # the JSON document is complete
    with io.BufferedReader(_EndsAtBreak(open_binary(path)), 1 << 20) as f, spilling(spill) as sink:
        if is_json_lines(path):
            lines, end, lineno, last = json_lines_offsets(f, sink)
        else:
            key = "entries" if first_char(f.peek(1 << 16)) == b"{" else None
            try:
                seps, end = list_separators(f, key=key, copy_to=sink)
                closed = whole = True
            except TruncatedJsonError as exc:
                seps, end, closed = exc.seps, exc.end, exc.closed
            except JsonScanError as exc:
                if not f.raw.broken or f.raw.n_bytes:
                    raise ValueError(f"{path}: not valid JSON: {exc}") from None
                seps, end, closed = np.zeros(0, dtype=np.int64), 0, False  # broken before any data
        broken = f.raw.broken
    source = spill or path
    if is_json_lines(path):
        if last.strip() and not last.endswith(b"\n") and not _decodes(last):
            lines.pop()
            end -= len(last)
            where = f"inside line {lineno} (record {len(lines)})"
        else:
            where = f"after line {lineno}" if broken else None
        n, plan = len(lines), functools.partial(byte_chunks, path=path, records=lines, end=end,
                                                chunk_size=chunk_size)
    else:
        n, tail = max(len(seps) - 1, 0), b""
        if closed:
            with open(source, "rb") as g:
                n = element_count(g, seps)
        elif len(seps):
            with open(source, "rb") as g:
                g.seek(int(seps[-1]) + 1)
                tail = g.read(end - int(seps[-1]) - 1).strip()
            if tail[-1:] in (b"}", b"]") and _decodes(tail):  # only the list's end is missing
                seps, n, tail = np.append(seps, end), n + 1, b""
        if whole:
            where = "after the end of the JSON document" if broken else None
        elif closed:
            where = f"after the {key!r} list, before the document is closed"
        elif not len(seps):  # the data stops before the list starts
            where = "before the first record" if key is None else \
                f"inside the top-level object, before any {key!r} list"
        elif tail:
            where = f"inside record {n}"
        else:
            where = f"after record {n - 1}, before the list is closed" if n else "inside the list"
        plan = functools.partial(list_chunks, path=path, seps=seps, n=n, chunk_size=chunk_size)
    cut = None if where is None else TruncatedInputError(
        path, n, f"the file ends {where}" + (f" (the compressed stream breaks off: {broken})" if broken else "")
        + f"; {n} complete record(s) before the cut, {_CUT_HINT}")
    chunks = plan(fmt or _prefix_format(path, source, infer)) if n else []
    return with_data_path(chunks, spill), cut


def _prefix_format(path: str, source: str, infer: Callable[[str], str]) -> str:
    """``infer`` (the registry's format inference) of ``path`` read from ``source`` (its decompressed
    copy); an error names ``path``, not the copy."""
    try:
        return infer(source)
    except ValueError as exc:
        if source == path:
            raise
        raise type(exc)(str(exc).replace(source, path)) from None
