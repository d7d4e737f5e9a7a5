"""The JSON containers the JSON family of formats (``jarvis``, ``pymatgen``) comes in: a JSON list,
JSON lines, or an Alexandria-style ``{"entries": [...]}`` dump, plain or ``.gz``/``.bz2``.

This module knows the containers, not the records: planning (byte spans of list elements found by
:mod:`cfdist.io.json_scan`, line offsets of JSON lines; a single record or an ASE JSON database at top
level is small and loaded whole), reading a chunk's elements, and telling from the first records
which format a file holds (:func:`json_format`). Turning one decoded record into a
:class:`~cfdist.io.records.RawRecord` is the format module's ``convert`` (:mod:`cfdist.io.jarvis`,
:mod:`cfdist.io.pymatgen_dicts`).
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from cfdist.io.json_scan import JsonScanError, NoSuchListError, element_count, first_char, list_separators
from cfdist.io.records import Chunk, RawRecord, RecordError, UnknownFormatError, file_errors, guarded
from cfdist.io.spill import (byte_chunks, list_chunks, open_binary, open_text, plain_chunks, spill_source, spilling,
                             with_data_path)

JSON_SUFFIXES = (".json", ".json.gz", ".json.bz2")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.bz2")
_PYMATGEN_CLASSES = frozenset({"Structure", "ComputedStructureEntry", "ComputedEntry"})
_PEEK_RECORDS = 5

# convert(decoded record, source, index, partial) -> RawRecord; run under cfdist.io.records.guarded
Convert = Callable[[Any, str, int, dict], RawRecord]


def is_json_lines(path: str) -> bool:
    """Whether ``path`` names a JSON-lines input (plain, ``.gz`` or ``.bz2``) by its extension."""
    return path.lower().endswith(JSONL_SUFFIXES)


def is_json_input(path: str) -> bool:
    """Whether ``path`` names a JSON list or JSON-lines input (plain, ``.gz`` or ``.bz2``) by its extension."""
    return os.fspath(path).lower().endswith(JSON_SUFFIXES + JSONL_SUFFIXES)


# ----------------------------------------------------------------------------- which format


def json_format(path: str) -> str:
    """Which registered format a JSON input holds, told from its first records (the JSON family's sniff).

    An ``atoms`` dict with ``lattice_mat`` is ``jarvis``; pymatgen ``@class`` tags, a ``structure``
    key or ``lattice`` + ``sites`` is ``pymatgen``; a top-level object with ``ids`` and ``nextid`` is
    an ASE JSON database (``ase_db``). :class:`UnknownFormatError` naming the path when none fits,
    ``ValueError`` when the file cannot be decoded, ``FileNotFoundError`` when it does not exist.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"input {path!r} does not exist")
    top, records = peek_json(path)
    if isinstance(top, Mapping) and "ids" in top and "nextid" in top:
        return "ase_db"
    for rec in records:
        fmt = classify_record(rec)
        if fmt is not None:
            return fmt
    what = "no records" if not records else f"first record keys {sorted(map(str, records[0]))[:12]}" \
        if isinstance(records[0], Mapping) else f"first record is a {type(records[0]).__name__}"
    raise UnknownFormatError(f"cannot infer the format of {path!r}: neither JARVIS ('atoms' with "
                             f"'lattice_mat') nor pymatgen ('@class', 'structure', or 'lattice' + 'sites') "
                             f"records ({what})")


def classify_record(rec: Any) -> str | None:
    """``jarvis`` or ``pymatgen`` by the shape of one decoded record, else None."""
    if not isinstance(rec, Mapping):
        return None
    atoms = rec.get("atoms")
    if isinstance(atoms, Mapping) and "lattice_mat" in atoms:
        return "jarvis"
    if rec.get("@class") in _PYMATGEN_CLASSES or "structure" in rec or ("lattice" in rec and "sites" in rec):
        return "pymatgen"
    return None


# ----------------------------------------------------------------------------- planning


def plan_json(path: str, fmt: str, chunk_size: int, spill_dir: str | None = None) -> list[Chunk]:
    """Chunks of a JSON-family input (see :func:`cfdist.io.registry.plan_chunks`): JSON lines by line
    offsets, a JSON list or an ``entries`` dump by the byte spans of its elements, a single record or
    an ASE JSON database at top level as index ranges over the whole (small) document."""
    source, copy, spill = spill_source(path, spill_dir)
    if is_json_lines(path):
        with open_binary(source) as f, spilling(copy) as sink:
            records, end, _, _ = json_lines_offsets(f, sink)
        return with_data_path(byte_chunks(fmt, path, records, end, chunk_size), spill)
    with open_binary(source) as f:
        opener = first_char(f.read(1 << 16))
    if opener not in (b"[", b"{"):
        return plain_chunks(fmt, path, len(json_records(path)), chunk_size)  # raises the error
    try:
        chunks = _json_list_chunks(fmt, path, source, chunk_size, None if opener == b"[" else "entries", copy)
    except NoSuchListError:
        # A single record or an ASE JSON database at top level: small, loaded whole.
        return plain_chunks(fmt, path, len(json_records(path)), chunk_size)
    return with_data_path(chunks, spill)



def _json_list_chunks(fmt: str, path: str, source: str, chunk_size: int, key: str | None,
                      copy: str | None) -> list[Chunk]:
    """Chunks of a JSON list (the document, or its ``key`` member) as byte spans of its elements."""
    with open_binary(source) as f, spilling(copy) as sink:
        try:
            seps, _ = list_separators(f, key=key, copy_to=sink)
        except NoSuchListError:
            raise  # not an Alexandria dump: plan_json loads the object whole instead
        except JsonScanError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from None
    with open_binary(copy or source) as f:
        n = element_count(f, seps)
    return list_chunks(fmt, path, seps, n, chunk_size)


def json_lines_offsets(f, sink=None) -> tuple[list[tuple[int, int]], int, int, bytes]:
    """(byte offset, line number) of every non-blank line of a JSON-lines stream, the stream's length,
    its number of lines and its last line; every line is also written to ``sink`` when given."""
    records, end, lineno, raw = [], 0, 0, b""
    for lineno, raw in enumerate(f, 1):
        if sink is not None:
            sink.write(raw)
        if raw.strip():
            records.append((end, lineno))
        end += len(raw)
    return records, end, lineno, raw


# ----------------------------------------------------------------------------- peeking and loading


_ENTRIES_KEY = re.compile(r'[{,]\s*"entries"\s*:\s*\[')
_PEEK_OBJECT_LIMIT = 1 << 26  # characters read looking for "entries" before loading an object whole


def peek_json(path: str) -> tuple[Any, list]:
    """(top-level object or None, first few records) without loading a whole JSON list."""
    if is_json_lines(path):
        records = []
        with open_binary(path) as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    records.append(json.loads(raw))
                except ValueError as exc:
                    if records:
                        break
                    raise ValueError(f"{path}:line {lineno}: not valid JSON ({exc})") from None
                if len(records) >= _PEEK_RECORDS:
                    break
        return None, records
    with open_text(path) as f:
        buf, eof = "", False
        size = 1 << 16
        while True:
            more = f.read(size)
            eof = len(more) < size
            buf += more
            size *= 2
            text = buf.lstrip()
            if not text:
                if eof:
                    raise ValueError(f"{path}: empty JSON file")
                continue
            if text[0] == "{":
                # An Alexandria dump {"entries": [...]}: peek at its first entries; anything else
                # (an ASE JSON database, a single record) is loaded whole below.
                found = _ENTRIES_KEY.search(text)
                if found:
                    records, complete = _decode_list_prefix(text[found.end() - 1:], _PEEK_RECORDS)
                    if records or complete:
                        return None, records
                if eof or len(buf) > _PEEK_OBJECT_LIMIT:
                    break
                continue
            if text[0] != "[":
                raise ValueError(f"{path}: expected a JSON list or object, starts with {text[:20]!r}")
            records, complete = _decode_list_prefix(text, _PEEK_RECORDS)
            if records or complete:
                return None, records
            if eof:
                raise ValueError(f"{path}: not valid JSON (cannot decode the first record)")
    obj = _load_json(path)
    try:
        return obj, _records_of(obj, path)
    except ValueError:
        return obj, []  # e.g. an ASE JSON database; the caller decides


def _decode_list_prefix(text: str, limit: int) -> tuple[list, bool]:
    """Decode up to ``limit`` elements of the JSON list starting at text[0] == '['.

    Returns (records, complete): complete when the list's end was reached. Stops quietly at the first
    element that does not decode (truncated buffer or bad JSON)."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"[ \t\n\r]*")
    records: list = []
    pos = ws.match(text, 1).end()
    if text[pos:pos + 1] == "]":
        return records, True
    while len(records) < limit:
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except ValueError:
            return records, False
        records.append(obj)
        pos = ws.match(text, pos).end()
        sep = text[pos:pos + 1]
        if sep == "]":
            return records, True
        if sep != ",":
            return records, False
        pos = ws.match(text, pos + 1).end()
    return records, False


def _load_json(path: str) -> Any:
    st = os.stat(path)
    return _load_json_cached(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=2)
def _load_json_cached(path: str, mtime_ns: int, size: int) -> Any:
    with open_text(path) as f:
        try:
            return json.load(f)
        except ValueError as exc:
            hint = " (JSON lines? name the file .jsonl)" if "Extra data" in str(exc) else ""
            raise ValueError(f"{path}: not valid JSON: {exc}{hint}") from None


def _records_of(obj: Any, path: str) -> list:
    if isinstance(obj, list):
        return obj
    if isinstance(obj, Mapping):
        if isinstance(obj.get("entries"), list):
            return obj["entries"]
        if classify_record(obj) is not None:
            return [obj]  # a single record at top level
        raise ValueError(f"{path}: a top-level JSON object must have an 'entries' list (Alexandria) or be "
                         f"a single record; got keys {sorted(map(str, obj))[:12]}")
    raise ValueError(f"{path}: expected a JSON list of records, got a {type(obj).__name__}")


def json_records(path: str) -> list:
    """Every record of a JSON document loaded whole (a list, an ``entries`` dump or a single record)."""
    return _records_of(_load_json(path), path)


# ----------------------------------------------------------------------------- reading


def read_json(chunk: Chunk, convert: Convert) -> Iterator[RawRecord]:
    """The records of one chunk of a JSON-family input, each decoded record turned into a
    :class:`RawRecord` by ``convert`` (a bad element or line becomes an ``unparseable`` record)."""
    if is_json_lines(chunk.path):
        return _read_json_lines(chunk, convert)
    if chunk.byte_offset >= 0:
        return _read_json_list_span(chunk, convert)
    return _read_json_list(chunk, convert)


def _read_json_list(chunk: Chunk, convert: Convert) -> Iterator[RawRecord]:
    with file_errors(chunk.path):
        records = json_records(chunk.path)
    for index in range(chunk.start, min(chunk.start + chunk.count, len(records))):
        source = f"{chunk.path}:{index}"
        yield guarded(source, index, functools.partial(convert, records[index], source, index))


def _read_json_list_span(chunk: Chunk, convert: Convert) -> Iterator[RawRecord]:
    """Decode only this chunk's elements of a JSON list (byte span planned by the scanner)."""
    with file_errors(chunk.path), open_binary(chunk.data_path or chunk.path) as f:
        f.seek(chunk.byte_offset)
        body = b"[" + f.read(chunk.byte_length) + b"]"
    try:
        records = json.loads(body)
        if not isinstance(records, list) or len(records) != chunk.count:
            raise ValueError(f"expected {chunk.count} records")
        decode = None
    except ValueError:
        # Some element is not valid JSON: decode them one by one so only the bad ones are rejected.
        try:
            seps, _ = list_separators(io.BytesIO(body))
        except JsonScanError:
            seps = np.zeros(0, dtype=np.int64)  # the file changed since planning: exactly reports it
        records = [body[seps[k] + 1:seps[k + 1]] for k in range(len(seps) - 1)]
        decode = json.loads
    for k, rec in enumerate(records):
        index = chunk.start + k
        source = f"{chunk.path}:{index}"

        def build(partial, rec=rec, source=source, index=index):
            if decode is not None:
                try:
                    rec = decode(rec)
                except ValueError as exc:
                    raise RecordError("unparseable", f"not valid JSON ({exc})") from None
            return convert(rec, source, index, partial)

        yield guarded(source, index, build)


def _read_json_lines(chunk: Chunk, convert: Convert) -> Iterator[RawRecord]:
    with file_errors(chunk.path), open_binary(chunk.data_path or chunk.path) as f:
        f.seek(chunk.byte_offset)
        buf = f.read(chunk.byte_length)
    index = chunk.start
    for k, raw in enumerate(io.BytesIO(buf)):
        if not raw.strip():
            continue
        source = f"{chunk.path}:line {chunk.line + k}" if chunk.line > 0 else f"{chunk.path}:{index}"

        def build(partial, raw=raw, source=source, index=index):
            try:
                rec = json.loads(raw)
            except ValueError as exc:
                raise RecordError("unparseable", f"not valid JSON ({exc})") from None
            return convert(rec, source, index, partial)

        yield guarded(source, index, build)
        index += 1
