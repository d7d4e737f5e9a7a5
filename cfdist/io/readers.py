"""Readers of raw structure files (preprocessing and prediction): plan deterministic chunks on the driver, read them on workers.

Supported input formats (:data:`FORMATS`):

* ``cif``: a directory with an ALIGNN-style ``id_prop.csv`` (``<cif name or id>,<value>[,...]``), or a
  standalone ``*.cif`` file (one record per ``data_`` block).
* ``jarvis``: JSON list (``.json``, ``.json.gz``, ``.json.bz2``) or JSON lines (``.jsonl``,
  ``.jsonl.gz``, ``.jsonl.bz2``) of JARVIS records ``{"id", "atoms": {lattice_mat, coords, ...}, <labels>}``.
* ``pymatgen``: the same containers holding ``Structure.as_dict()``, ``ComputedStructureEntry.as_dict()``
  or ``{"structure": ..., "material_id": ..., <labels>}`` dicts; a top-level ``{"entries": [...]}`` dict
  (Alexandria dumps) is accepted too.
* ``extxyz``: extended XYZ (MPtrj style) with energy / forces / stress, read through ASE frame by frame
  (``.xyz``, ``.extxyz``, ``.xyz.gz``, ``.xyz.bz2``, ``.extxyz.gz``, ``.extxyz.bz2``).
* ``ase_db``: an ASE database (``.db``), rows in id order.

The driver calls :func:`expand_inputs`, :func:`infer_format` and :func:`plan_chunks`; workers call
:func:`read_chunk`, which yields exactly ``chunk.count`` :class:`RawRecord` objects and never raises for
a bad record: a record that cannot be turned into a crystal comes back with ``error_reason`` and
``error`` set, so every input record is accounted for. Crystals are **not** validated here.

Streaming: extxyz, JSON-lines and JSON-list chunks carry byte ranges; a worker seeks to
``byte_offset`` and reads ``byte_length`` bytes. A JSON list (or the ``entries`` list of an Alexandria
``{"entries": [...]}`` dump) is planned by scanning its bytes for the separators between elements
(:mod:`cfdist.io.json_scan`) instead of decoding it, so no process ever holds the whole list. For
``.gz``/``.bz2`` inputs (JSON and extxyz) the offsets are into the decompressed stream: given a
``spill_dir``, planning keeps the decompressed bytes (``Chunk.data_path``) so workers seek directly;
without one, each worker decompresses (but does not decode) everything before its chunk. Only a single
record or an ASE JSON database at top level is loaded whole (once per process).

Cut files: planning refuses a JSON list that is not closed or a compressed stream that breaks off
(preprocessing never builds shards from part of a file). Prediction instead reads such a file with
:func:`read_json_prefix`: the same scan finds where the data stops, the complete records before it are
read as ordinary chunks, then :class:`TruncatedInputError` says where the file was cut.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import dataclasses
import functools
import glob
import gzip
import hashlib
import io
import itertools
import json
import math
import os
import re
import sqlite3
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from cfdist.crystal import Crystal, InvalidCrystalError, from_ase, from_jarvis, from_pymatgen
from cfdist.fileio import atomic_write
from cfdist.io.json_scan import (JsonScanError, NoSuchListError, TruncatedJsonError, element_count, first_char,
                                 list_separators)

__all__ = [
    "FORMATS",
    "KNOWN_SUFFIXES",
    "Chunk",
    "RawRecord",
    "default_id",
    "infer_format",
    "expand_inputs",
    "plan_chunks",
    "read_chunk",
    "is_json_input",
    "UnknownFormatError",
    "TruncatedInputError",
    "json_lines_cut",
    "read_json_prefix",
]

FORMATS = ("cif", "jarvis", "pymatgen", "extxyz", "ase_db")

ID_PROP = "id_prop.csv"
_JSON_SUFFIXES = (".json", ".json.gz", ".json.bz2")
_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.bz2")
_XYZ_SUFFIXES = (".xyz", ".extxyz", ".xyz.gz", ".xyz.bz2", ".extxyz.gz", ".extxyz.bz2")
# the file name endings of inputs (expand_inputs picks up these, and directories with id_prop.csv)
KNOWN_SUFFIXES = (".cif", ".db") + _XYZ_SUFFIXES + _JSON_SUFFIXES + _JSONL_SUFFIXES
_PYMATGEN_CLASSES = frozenset({"Structure", "ComputedStructureEntry", "ComputedEntry"})
# Keys that name a record rather than label it (never turned into labels).
_ID_KEYS = ("id", "jid", "material_id", "mp_id", "entry_id", "name")
_MISSING_STRINGS = frozenset({"", "na", "nan", "none", "null", "n/a"})
_PEEK_RECORDS = 5
_CIF_BLOCK = re.compile(rb"^[ \t]*data_", re.IGNORECASE)


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Chunk:
    """A contiguous run of records of one input, planned on the driver and read by one worker.

    Attributes:
        format: one of :data:`FORMATS`.
        path: absolute path of the input (for ``cif`` with ``id_prop.csv``: the directory).
        start: index of the first record within the input (0-based, input order).
        count: number of records.
        byte_offset: extxyz: byte offset of the first frame; JSON lines: of the first line; JSON list:
            just after the ``[`` or comma before the first element; else -1.
        byte_length: extxyz / JSON lines: bytes spanned by the chunk (up to the next chunk); JSON list:
            up to (excluding) the separator after the last element; else -1.
        line: extxyz / JSON lines: 1-based line number of the chunk's first record (used to name
            records as ``<path>:line <n>``); -1 when unknown.
        data_path: where the bytes are read from when not ``path``: the decompressed copy of a
            ``.gz``/``.bz2`` JSON or extxyz input made while planning (see :func:`plan_chunks`); ""
            otherwise.
    """

    format: str
    path: str
    start: int
    count: int
    byte_offset: int = -1
    byte_length: int = -1
    line: int = -1
    data_path: str = ""


@dataclass
class RawRecord:
    """One input record as read by :func:`read_chunk`.

    Attributes:
        source: where the record is (``<path>:<index>`` or ``<path>:line <n>``).
        index: record index within the input (``chunk.start + k``).
        id: the record's own id if it has one, else None.
        crystal: the parsed crystal (not validated; its id is ``id`` or else ``source``), or None on error.
        labels: every scalar numeric label found (None/null -> NaN); also stored in ``crystal.labels``.
        forces: (N, 3) eV/A if present.
        stress: (3, 3) eV/A^3 if present (Voigt input is expanded).
        error_reason: None, ``"unparseable"`` or an :class:`InvalidCrystalError` reason.
        error: human-readable message naming the source and the problem.
        meta: string-valued metadata of the record (extxyz ``info`` strings such as
            ``mptrj_traj_id``, ASE db ``key_value_pairs`` strings, string fields of a JSON record
            other than its id and structure); bounded by :func:`_string_meta`. Used to group
            records (``cfdist preprocess --split-group meta:<name>``); not stored in shards.
    """

    source: str
    index: int
    id: str | None
    crystal: Crystal | None
    labels: dict[str, float]
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None
    error_reason: str | None = None
    error: str | None = None
    meta: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error_reason is None


def default_id(path: str, index: int) -> str:
    """Id of a record that has none: ``<input file name>:<record index>`` (shards, rejects, predictions)."""
    return f"{os.path.basename(path)}:{index}"


@contextlib.contextmanager
def _file_errors(path: str):
    """Re-raise a whole-file read failure (corrupt archive, not a database, ...) with the path in it."""
    try:
        yield
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise  # their message already names the path
    except (OSError, EOFError, zlib.error, sqlite3.Error) as exc:
        raise OSError(f"cannot read {path!r}: {type(exc).__name__}: {exc}") from exc


class UnknownFormatError(ValueError):
    """:func:`infer_format` cannot tell what an input holds (unknown extension, unrecognised records)."""


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


class _RecordError(Exception):
    """A single record cannot be read (becomes an error record, never escapes read_chunk)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# ----------------------------------------------------------------------------- inputs


def _suffix_of(path: str) -> str | None:
    low = path.lower()
    for suffix in sorted(KNOWN_SUFFIXES, key=len, reverse=True):
        if low.endswith(suffix):
            return suffix
    return None


def _is_json_lines(path: str) -> bool:
    return path.lower().endswith(_JSONL_SUFFIXES)


def is_json_input(path: str) -> bool:
    """Whether ``path`` names a JSON list or JSON-lines input (plain, ``.gz`` or ``.bz2``) by its extension."""
    return os.fspath(path).lower().endswith(_JSON_SUFFIXES + _JSONL_SUFFIXES)


def _open_binary(path: str):
    low = path.lower()
    if low.endswith(".gz"):
        return gzip.open(path, "rb")
    if low.endswith(".bz2"):
        return bz2.open(path, "rb")
    return open(path, "rb")


def _open_text(path: str):
    return io.TextIOWrapper(_open_binary(path), encoding="utf-8-sig")


def infer_format(path: str) -> str:
    """Format of one input (see :data:`FORMATS`); :class:`UnknownFormatError` (a ``ValueError``) naming
    the path if unknown, ``ValueError`` if a JSON input cannot be decoded.

    Directories with ``id_prop.csv``, ``id_prop.csv`` itself and ``*.cif`` are ``cif``; ``.xyz`` /
    ``.extxyz`` (plain, ``.gz`` or ``.bz2``) are ``extxyz``; ``.db`` is ``ase_db``. JSON containers are
    told apart by their first records: an ``atoms`` dict with ``lattice_mat`` is ``jarvis``; pymatgen
    ``@class`` tags, a ``structure`` key or ``lattice`` + ``sites`` is ``pymatgen`` (an ASE JSON database
    is ``ase_db``).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, ID_PROP)):
            return "cif"
        raise UnknownFormatError(f"cannot infer the format of directory {path!r}: it has no {ID_PROP}")
    if os.path.basename(path) == ID_PROP:
        return "cif"
    suffix = _suffix_of(path)
    if suffix == ".cif":
        return "cif"
    if suffix in _XYZ_SUFFIXES:
        return "extxyz"
    if suffix == ".db":
        return "ase_db"
    if suffix in _JSON_SUFFIXES or suffix in _JSONL_SUFFIXES:
        if not os.path.exists(path):
            raise FileNotFoundError(f"input {path!r} does not exist")
        top, records = _peek_json(path)
        if isinstance(top, Mapping) and "ids" in top and "nextid" in top:
            return "ase_db"
        for rec in records:
            fmt = _classify_record(rec)
            if fmt is not None:
                return fmt
        what = "no records" if not records else f"first record keys {sorted(map(str, records[0]))[:12]}" \
            if isinstance(records[0], Mapping) else f"first record is a {type(records[0]).__name__}"
        raise UnknownFormatError(f"cannot infer the format of {path!r}: neither JARVIS ('atoms' with "
                                 f"'lattice_mat') nor pymatgen ('@class', 'structure', or 'lattice' + 'sites') "
                                 f"records ({what})")
    raise UnknownFormatError(f"cannot infer the format of {path!r}: unknown extension (known: cif directory with "
                             f"{ID_PROP}, {', '.join(KNOWN_SUFFIXES)})")


def _classify_record(rec: Any) -> str | None:
    if not isinstance(rec, Mapping):
        return None
    atoms = rec.get("atoms")
    if isinstance(atoms, Mapping) and "lattice_mat" in atoms:
        return "jarvis"
    if rec.get("@class") in _PYMATGEN_CLASSES or "structure" in rec or ("lattice" in rec and "sites" in rec):
        return "pymatgen"
    return None


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files, directories or globs -> sorted, de-duplicated absolute input paths.

    A directory with ``id_prop.csv`` is one ``cif`` input (the directory); an ``id_prop.csv`` file
    stands for its directory. Other directories are searched recursively for files with known
    extensions (sub-directories with ``id_prop.csv`` are single inputs). Files named explicitly are
    kept whatever their extension; files matched by a glob only with a known extension. A pattern
    that yields no input raises ``FileNotFoundError`` naming it.
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    out: set[str] = set()
    for pattern in patterns:
        pat = os.path.expanduser(os.fspath(pattern))
        magic = glob.has_magic(pat)
        matches = sorted(glob.glob(pat, recursive=True)) if magic else ([pat] if os.path.exists(pat) else [])
        found: set[str] = set()
        for match in matches:
            match = os.path.abspath(match)
            if os.path.isdir(match):
                found.update(_walk_inputs(match))
            elif os.path.basename(match) == ID_PROP:
                found.add(os.path.dirname(match))
            elif not magic or _suffix_of(match) is not None:
                found.add(match)
        if not found:
            raise FileNotFoundError(f"input pattern {os.fspath(pattern)!r} matches no input "
                                    + ("file or directory" if not matches else
                                       f"of a known format ({len(matches)} path(s) matched, none usable)"))
        out |= found
    return sorted(out)


def _walk_inputs(root: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if ID_PROP in filenames:
            found.append(os.path.abspath(dirpath))
            dirnames[:] = []  # the CIFs below belong to this input
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and _suffix_of(name) is not None:
                found.append(os.path.abspath(os.path.join(dirpath, name)))
    return found


# ----------------------------------------------------------------------------- planning


def plan_chunks(path: str, fmt: str, chunk_size: int, spill_dir: str | None = None) -> list[Chunk]:
    """Deterministic chunks of ``chunk_size`` records (the last may be shorter) in input order.

    Counts records without parsing structures: extxyz scans lines for frame boundaries (a malformed
    atom-count line raises ``ValueError`` naming the line: the file cannot be split into frames);
    JSON lines records line offsets; a JSON list (or the ``entries`` list of a top-level object, as
    in Alexandria dumps) is scanned for its element boundaries; ``ase_db`` counts rows; ``cif``
    counts ``id_prop.csv`` rows (or ``data_`` blocks of a standalone CIF file).

    ``spill_dir``: for a compressed (``.gz``/``.bz2``) JSON, JSON-lines or extxyz input, keep the
    decompressed bytes there while planning (one pass) and point the chunks' ``data_path`` at
    them, so a worker seeks straight to its chunk instead of decompressing everything before it.
    An existing complete copy is reused.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} for {path!r}; expected one of {FORMATS}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    chunk_size = int(chunk_size)
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"input {path!r} does not exist")
    with _file_errors(path):
        return _plan(path, fmt, chunk_size, spill_dir)


def _plan(path: str, fmt: str, chunk_size: int, spill_dir: str | None = None) -> list[Chunk]:
    if fmt == "cif":
        cif_dir = _cif_dir(path)
        if cif_dir is not None:
            n = len(_id_prop(cif_dir)[1])
            return _plain_chunks(fmt, cif_dir, n, chunk_size)
        if os.path.isdir(path):
            raise ValueError(f"cif input {path!r} is a directory without {ID_PROP}")
        return _plain_chunks(fmt, path, len(_cif_blocks(path)), chunk_size)
    compressed = path.lower().endswith((".gz", ".bz2"))
    spill = _spill_path(spill_dir, path) if spill_dir and compressed and fmt != "ase_db" else None
    source = spill if spill and os.path.exists(spill) else path  # a finished copy is reused
    copy = spill if spill and source == path else None
    if fmt == "extxyz":
        # offsets into the decompressed stream of a .gz/.bz2 input, which is copied to `copy` on the way
        with _open_binary(source) as f, _spilling(copy) as sink:
            frames = [(start, line) for start, _, line in _iter_xyz_frames(f, path, copy_to=sink)]
            end = f.tell()  # the (decompressed) length
        chunks = _byte_chunks(fmt, path, frames, end, chunk_size)
        return [dataclasses.replace(c, data_path=spill) for c in chunks] if spill else chunks
    if fmt in ("jarvis", "pymatgen"):
        if _is_json_lines(path):
            with _open_binary(source) as f, _spilling(copy) as sink:
                records, end, _, _ = _json_lines_offsets(f, sink)
            chunks = _byte_chunks(fmt, path, records, end, chunk_size)
        else:
            with _open_binary(source) as f:
                opener = first_char(f.read(1 << 16))
            if opener not in (b"[", b"{"):
                return _plain_chunks(fmt, path, len(_json_records(path)), chunk_size)  # raises the error
            try:
                chunks = _json_list_chunks(fmt, path, source, chunk_size, None if opener == b"[" else "entries", copy)
            except NoSuchListError:
                # A single record or an ASE JSON database at top level: small, loaded whole.
                return _plain_chunks(fmt, path, len(_json_records(path)), chunk_size)
        return [dataclasses.replace(c, data_path=spill) for c in chunks] if spill else chunks
    # ase_db
    with _connect_db(path) as db:
        n = db.count()
    return _plain_chunks(fmt, path, n, chunk_size)


def _json_list_chunks(fmt: str, path: str, source: str, chunk_size: int, key: str | None,
                      copy: str | None) -> list[Chunk]:
    """Chunks of a JSON list (the document, or its ``key`` member) as byte spans of its elements."""
    with _open_binary(source) as f, _spilling(copy) as sink:
        try:
            seps, _ = list_separators(f, key=key, copy_to=sink)
        except NoSuchListError:
            raise  # not an Alexandria dump: _plan loads the object whole instead
        except JsonScanError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from None
    with _open_binary(copy or source) as f:
        n = element_count(f, seps)
    return _list_chunks(fmt, path, seps, n, chunk_size)


def _list_chunks(fmt: str, path: str, seps: np.ndarray, n: int, chunk_size: int) -> list[Chunk]:
    """Chunks of the first ``n`` elements of a JSON list, element ``k`` spanning ``seps[k] + 1 : seps[k + 1]``."""
    chunks = []
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        offset = int(seps[start]) + 1  # just after '[' or the comma before element `start`
        chunks.append(Chunk(fmt, path, start, stop - start, offset, int(seps[stop]) - offset))
    return chunks


def _json_lines_offsets(f, sink=None) -> tuple[list[tuple[int, int]], int, int, bytes]:
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


def _spill_path(spill_dir: str, path: str) -> str:
    """Where the decompressed copy of ``path`` lives: named after the file, unique per path."""
    name = os.path.basename(path)
    stem = name[: -len(".bz2")] if name.lower().endswith(".bz2") else name[: -len(".gz")]
    tag = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
    return os.path.join(spill_dir, f"{tag}-{stem}")


@contextlib.contextmanager
def _spilling(target: str | None):
    """A file to copy decompressed bytes into, renamed to ``target`` only if planning succeeds."""
    if target is None:
        yield None
        return
    with atomic_write(target) as tmp, open(tmp, "wb") as f:
        yield f


def _plain_chunks(fmt: str, path: str, n: int, chunk_size: int) -> list[Chunk]:
    return [Chunk(fmt, path, start, min(chunk_size, n - start)) for start in range(0, n, chunk_size)]


def _byte_chunks(fmt: str, path: str, records: list[tuple[int, int]], end: int, chunk_size: int) -> list[Chunk]:
    """Chunks over records given as (byte offset, line number); chunk k spans up to chunk k+1."""
    chunks = []
    n = len(records)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        offset, line = records[start]
        next_offset = records[stop][0] if stop < n else end
        chunks.append(Chunk(fmt, path, start, stop - start, offset, next_offset - offset, line))
    return chunks


# ----------------------------------------------------------------------------- reading


def read_chunk(chunk: Chunk) -> Iterator[RawRecord]:
    """Yield exactly ``chunk.count`` records of ``chunk`` in order.

    A record that cannot be parsed is yielded with ``crystal=None`` and ``error_reason`` / ``error``
    set. Raises only when the input itself cannot be opened (``FileNotFoundError`` /
    ``PermissionError`` / ``OSError`` naming the path) or for an unknown format.
    """
    if chunk.format not in FORMATS:
        raise ValueError(f"unknown format {chunk.format!r} in chunk of {chunk.path!r}; expected one of {FORMATS}")
    if not os.path.exists(chunk.path):
        raise FileNotFoundError(f"input {chunk.path!r} does not exist")
    if chunk.format == "cif":
        if _cif_dir(chunk.path) is not None:
            gen = _read_cif_dir(chunk)
        else:
            gen = _read_cif_file(chunk)
    elif chunk.format == "extxyz":
        gen = _read_extxyz(chunk)
    elif chunk.format in ("jarvis", "pymatgen"):
        if _is_json_lines(chunk.path):
            gen = _read_json_lines(chunk)
        elif chunk.byte_offset >= 0:
            gen = _read_json_list_span(chunk)
        else:
            gen = _read_json_list(chunk)
    else:
        gen = _read_ase_db(chunk)
    return _exactly(chunk, gen)


def _exactly(chunk: Chunk, records: Iterator[RawRecord]) -> Iterator[RawRecord]:
    """Pass through at most chunk.count records; fill any shortfall (input changed?) with error records."""
    n = 0
    for rec in itertools.islice(records, chunk.count):
        yield rec
        n += 1
    for k in range(n, chunk.count):
        index = chunk.start + k
        yield _error_record(f"{chunk.path}:{index}", index, None, "unparseable",
                            f"record {index} not found (the input has fewer records than planned; "
                            f"was it modified after planning?)")


def _error_record(source: str, index: int, rid: str | None, reason: str, detail: str,
                  labels: dict[str, float] | None = None) -> RawRecord:
    return RawRecord(source=source, index=index, id=rid, crystal=None, labels=dict(labels or {}),
                     error_reason=reason, error=f"{source}: {reason}: {detail}")


def _guarded(source: str, index: int, build: Callable[[dict], RawRecord]) -> RawRecord:
    """Run ``build(partial)``; any failure becomes an error record (with the id/labels found so far)."""
    partial: dict[str, Any] = {"id": None, "labels": {}}
    try:
        return build(partial)
    except InvalidCrystalError as exc:
        return _error_record(source, index, partial["id"], exc.reason, str(exc), partial["labels"])
    except _RecordError as exc:
        return _error_record(source, index, partial["id"], exc.reason, exc.detail, partial["labels"])
    except Exception as exc:  # noqa: BLE001 - one bad record must never stop the chunk
        return _error_record(source, index, partial["id"], "unparseable", f"{type(exc).__name__}: {exc}",
                             partial["labels"])


def _numeric_labels(mapping: Mapping, exclude: Iterable[str] = ()) -> dict[str, float]:
    """Every scalar int/float (not bool) value of ``mapping`` as float; None -> NaN."""
    skip = set(exclude)
    out: dict[str, float] = {}
    for key, value in mapping.items():
        if key in skip:
            continue
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value.item()
        if value is None:
            out[str(key)] = math.nan
        elif isinstance(value, (bool, np.bool_)):
            continue
        elif isinstance(value, (int, float, np.integer, np.floating)):
            out[str(key)] = float(value)
    return out


def _first_id(mapping: Mapping, keys: Iterable[str]) -> str | None:
    key = _id_key(mapping, keys)
    return None if key is None else str(mapping[key])


def _id_key(mapping: Mapping, keys: Iterable[str]) -> str | None:
    """The first of ``keys`` that gives ``mapping`` an id (what :func:`_first_id` reads)."""
    for key in keys:
        value = mapping.get(key)
        if value is not None and value != "":
            return key
    return None


MAX_META_FIELDS = 64  # RawRecord.meta keeps at most this many entries (the first, in the record's key order)
MAX_META_CHARS = 200  # ... and only string values shorter than this


def _string_meta(mapping: Mapping, exclude: Iterable[str] = (), into: dict[str, str] | None = None
                 ) -> dict[str, str]:
    """The short string values of ``mapping`` (``RawRecord.meta``): str keys and values, values
    shorter than :data:`MAX_META_CHARS`, at most :data:`MAX_META_FIELDS` entries, keys in
    ``exclude`` and ``@``-prefixed keys (pymatgen's ``@module``/``@class``) left out. With
    ``into``, entries are added to it without replacing existing keys."""
    skip = set(exclude)
    out: dict[str, str] = {} if into is None else into
    for key, value in mapping.items():
        if len(out) >= MAX_META_FIELDS:
            break
        if (isinstance(key, str) and isinstance(value, str) and len(value) < MAX_META_CHARS
                and key not in skip and not key.startswith("@") and key not in out):
            out[key] = str(value)
    return out


def _stress_3x3(value, where: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape == (3, 3):
        return arr.copy()
    if arr.size == 9:
        return arr.reshape(3, 3).copy()
    if arr.size == 6:  # Voigt order xx, yy, zz, yz, xz, xy (ASE)
        xx, yy, zz, yz, xz, xy = arr.reshape(6)
        return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    raise InvalidCrystalError(where, "bad_shape", f"stress must have 6 (Voigt) or 9 entries, got shape {arr.shape}")


def _forces_array(value, n_atoms: int, where: str) -> np.ndarray:
    arr = np.array(value, dtype=np.float64)
    if arr.shape != (n_atoms, 3):
        raise InvalidCrystalError(where, "bad_shape", f"forces must have shape ({n_atoms}, 3), got {arr.shape}")
    return arr


# ----------------------------------------------------------------------------- JSON (jarvis, pymatgen)


_ENTRIES_KEY = re.compile(r'[{,]\s*"entries"\s*:\s*\[')
_PEEK_OBJECT_LIMIT = 1 << 26  # characters read looking for "entries" before loading an object whole


def _peek_json(path: str) -> tuple[Any, list]:
    """(top-level object or None, first few records) without loading a whole JSON list."""
    if _is_json_lines(path):
        records = []
        with _open_binary(path) as f:
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
    with _open_text(path) as f:
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
    with _open_text(path) as f:
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
        if _classify_record(obj) is not None:
            return [obj]  # a single record at top level
        raise ValueError(f"{path}: a top-level JSON object must have an 'entries' list (Alexandria) or be "
                         f"a single record; got keys {sorted(map(str, obj))[:12]}")
    raise ValueError(f"{path}: expected a JSON list of records, got a {type(obj).__name__}")


def _json_records(path: str) -> list:
    return _records_of(_load_json(path), path)


def _read_json_list(chunk: Chunk) -> Iterator[RawRecord]:
    with _file_errors(chunk.path):
        records = _json_records(chunk.path)
    convert = _jarvis_record if chunk.format == "jarvis" else _pymatgen_record
    for index in range(chunk.start, min(chunk.start + chunk.count, len(records))):
        source = f"{chunk.path}:{index}"
        yield _guarded(source, index, functools.partial(convert, records[index], source, index))


def _read_json_list_span(chunk: Chunk) -> Iterator[RawRecord]:
    """Decode only this chunk's elements of a JSON list (byte span planned by the scanner)."""
    convert = _jarvis_record if chunk.format == "jarvis" else _pymatgen_record
    with _file_errors(chunk.path), _open_binary(chunk.data_path or chunk.path) as f:
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
            seps = np.zeros(0, dtype=np.int64)  # the file changed since planning: _exactly reports it
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
                    raise _RecordError("unparseable", f"not valid JSON ({exc})") from None
            return convert(rec, source, index, partial)

        yield _guarded(source, index, build)


def _read_json_lines(chunk: Chunk) -> Iterator[RawRecord]:
    convert = _jarvis_record if chunk.format == "jarvis" else _pymatgen_record
    with _file_errors(chunk.path), _open_binary(chunk.data_path or chunk.path) as f:
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
                raise _RecordError("unparseable", f"not valid JSON ({exc})") from None
            return convert(rec, source, index, partial)

        yield _guarded(source, index, build)
        index += 1


def _jarvis_record(rec: Any, source: str, index: int, partial: dict) -> RawRecord:
    if not isinstance(rec, Mapping):
        raise _RecordError("unparseable", f"expected a JSON object, got {type(rec).__name__}")
    rid = partial["id"] = _first_id(rec, ("id", "jid", "material_id"))
    labels = partial["labels"] = _numeric_labels(rec, exclude=("atoms",) + _ID_KEYS)
    if "atoms" not in rec:
        raise _RecordError("unparseable", f"record {rid or index!r} has no 'atoms' field")
    crystal = from_jarvis(rec["atoms"], id=rid or source, labels=labels)
    meta = _string_meta(rec, exclude=("atoms", _id_key(rec, ("id", "jid", "material_id"))))
    return RawRecord(source, index, rid, crystal, labels, meta=meta)


def _pymatgen_record(rec: Any, source: str, index: int, partial: dict) -> RawRecord:
    if not isinstance(rec, Mapping):
        raise _RecordError("unparseable", f"expected a JSON object, got {type(rec).__name__}")
    from pymatgen.core import Structure

    cls = rec.get("@class")
    if cls == "ComputedEntry":
        partial["id"] = _first_id(rec, ("entry_id",))
        raise _RecordError("unparseable", "a ComputedEntry has no structure")
    if cls == "ComputedStructureEntry":
        from pymatgen.entries.computed_entries import ComputedStructureEntry

        rid = partial["id"] = _first_id(rec, ("entry_id",))
        data = rec.get("data") if isinstance(rec.get("data"), Mapping) else {}
        meta = _string_meta(data, into=_string_meta(rec, exclude=("entry_id", "structure", "data")))
        entry = ComputedStructureEntry.from_dict(rec)
        structure = entry.structure
        labels = {
            "energy": float(entry.energy),  # corrected total energy (pymatgen's ComputedEntry.energy), eV
            "energy_per_atom": float(entry.energy) / max(len(structure), 1),
            "uncorrected_energy": float(entry.uncorrected_energy),
            "correction": float(entry.correction),
        }
        for key, value in _numeric_labels(data, exclude=_ID_KEYS).items():
            labels.setdefault(key, value)
        partial["labels"] = labels
    elif "structure" in rec:
        rid = partial["id"] = _first_id(rec, ("material_id", "id", "mp_id", "entry_id"))
        labels = partial["labels"] = _numeric_labels(rec, exclude=("structure",) + _ID_KEYS)
        meta = _string_meta(rec, exclude=("structure", _id_key(rec, ("material_id", "id", "mp_id", "entry_id"))))
        sdict = rec["structure"]
        if not isinstance(sdict, Mapping):
            raise _RecordError("unparseable", f"'structure' must be a Structure dict, got {type(sdict).__name__}")
        structure = Structure.from_dict(sdict)
    elif "lattice" in rec and "sites" in rec:
        props = rec.get("properties") if isinstance(rec.get("properties"), Mapping) else {}
        rid = partial["id"] = _first_id(props, ("id", "material_id", "mp_id", "entry_id"))
        labels = partial["labels"] = _numeric_labels(props, exclude=_ID_KEYS)
        meta = _string_meta(props, exclude=(_id_key(props, ("id", "material_id", "mp_id", "entry_id")),))
        structure = Structure.from_dict(rec)
    else:
        raise _RecordError("unparseable", "not a pymatgen Structure / ComputedStructureEntry dict and no "
                                          f"'structure' key (keys: {sorted(map(str, rec))[:12]})")
    crystal = from_pymatgen(structure, id=rid or source, labels=labels)
    return RawRecord(source, index, rid, crystal, labels, meta=meta)


# ----------------------------------------------------------------------------- cut JSON inputs (prediction)

# Prediction reads what it can of a JSON input that planning refuses (a partial download); the
# preprocessing job keeps refusing such a file (plan_chunks raises), so shards never hold half a file.
# The cut is found by the planning scan itself (a TruncatedJsonError from json_scan, or the last line
# of JSON lines); the complete records before it are planned as ordinary chunks and read by read_chunk.

_CUT_HINT = "the rest of the file is missing (cut short, e.g. an interrupted download)"


def json_lines_cut(path: str) -> bool:
    """Whether an uncompressed JSON-lines input ends inside a record: its last line has no newline and
    is not valid JSON. (:func:`plan_chunks` accepts such a file and :func:`read_chunk` rejects its last
    line as ``unparseable``; a cut ``.gz``/``.bz2`` stream already fails planning.) False otherwise."""
    path = os.fspath(path)
    if not _is_json_lines(path) or path.lower().endswith((".gz", ".bz2")) or not os.path.isfile(path):
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


def read_json_prefix(path: str, fmt: str | None = None, chunk_size: int = 1024) -> Iterator[RawRecord]:
    """Every record of a JSON-list or JSON-lines input up to where its data stops, for prediction.

    For inputs :func:`plan_chunks` refuses because they are cut short (a JSON list that is not closed,
    a ``.gz``/``.bz2`` stream that breaks off) and JSON-lines files whose last line is cut
    (:func:`json_lines_cut`). The file is scanned as planning scans it (a compressed one is
    decompressed once, into a temporary copy); its complete records are planned as chunks and yielded
    by :func:`read_chunk` (a bad element or line is an ``unparseable`` record). ``fmt`` None: inferred
    from the first complete records as :func:`infer_format` does.

    Raises :class:`TruncatedInputError` after the last complete record when the data stops inside the
    list or a record (or the compressed stream breaks off after it); :class:`UnknownFormatError` when
    the first records are neither JARVIS nor pymatgen; ``ValueError`` / ``OSError`` when the file is
    not a JSON list (or ``entries`` dump) or JSON lines at all, or has other damage. Returns normally
    when the data turns out to be complete.
    """
    path = os.path.abspath(os.fspath(path))
    if fmt is not None and fmt not in ("jarvis", "pymatgen"):
        raise ValueError(f"read_json_prefix reads jarvis or pymatgen JSON, not {fmt!r} ({path!r})")
    compressed = path.lower().endswith((".gz", ".bz2"))
    with tempfile.TemporaryDirectory(prefix="cfdist-cut-") if compressed else contextlib.nullcontext() as tmp:
        with _file_errors(path):
            chunks, cut = _plan_prefix(path, fmt, chunk_size, _spill_path(tmp, path) if tmp else None)
        for chunk in chunks:
            yield from read_chunk(chunk)
    if cut is not None:
        raise cut


def _plan_prefix(path: str, fmt: str | None, chunk_size: int,
                 spill: str | None) -> tuple[list[Chunk], TruncatedInputError | None]:
    """Chunks of the complete records of a JSON input up to where its data stops, and the cut (None
    when the data is complete). ``spill``: where to keep the decompressed bytes of a compressed input."""
    whole = False  # the JSON document is complete
    with io.BufferedReader(_EndsAtBreak(_open_binary(path)), 1 << 20) as f, _spilling(spill) as sink:
        if _is_json_lines(path):
            lines, end, lineno, last = _json_lines_offsets(f, sink)
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
    if _is_json_lines(path):
        if last.strip() and not last.endswith(b"\n") and not _decodes(last):
            lines.pop()
            end -= len(last)
            where = f"inside line {lineno} (record {len(lines)})"
        else:
            where = f"after line {lineno}" if broken else None
        n, plan = len(lines), functools.partial(_byte_chunks, path=path, records=lines, end=end,
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
        plan = functools.partial(_list_chunks, path=path, seps=seps, n=n, chunk_size=chunk_size)
    cut = None if where is None else TruncatedInputError(
        path, n, f"the file ends {where}" + (f" (the compressed stream breaks off: {broken})" if broken else "")
        + f"; {n} complete record(s) before the cut, {_CUT_HINT}")
    chunks = plan(fmt or _prefix_format(path, source)) if n else []
    return [dataclasses.replace(c, data_path=spill) for c in chunks] if spill else chunks, cut


def _prefix_format(path: str, source: str) -> str:
    """:func:`infer_format` of ``path`` read from ``source`` (its decompressed copy), naming ``path``."""
    try:
        return infer_format(source)
    except ValueError as exc:
        if source == path:
            raise
        raise type(exc)(str(exc).replace(source, path)) from None


# ----------------------------------------------------------------------------- extxyz


def _iter_xyz_frames(lines: Iterable[bytes], path: str, offset0: int = 0,
                     line0: int = 1, copy_to=None) -> Iterator[tuple[int, int, int]]:
    """Yield (start byte, end byte, first line number) per frame of an (ext)xyz byte-line stream.

    Frames are an atom-count line, a comment line and ``count`` atom lines (plus optional
    ``VEC1..3`` lines). Blank lines between frames are skipped. A last frame with fewer lines than
    announced is still yielded (it will fail to parse). A count line that is not an integer raises
    ``ValueError`` with the line number. ``copy_to``: a binary file every line read is also written
    to (the spill copy of a compressed input; complete once the generator is exhausted).
    """
    it = iter(lines)
    pos, lineno = offset0, line0 - 1
    pending: list[int] | None = None
    for line in it:
        if copy_to is not None:
            copy_to.write(line)
        lineno += 1
        start = pos
        pos += len(line)
        stripped = line.strip()
        if not stripped:
            continue
        if pending is not None and stripped[:3] == b"VEC":
            pending[1] = pos
            continue
        try:
            natoms = int(stripped)
        except ValueError:
            natoms = -1
        if natoms < 0:
            raise ValueError(f"{path}:line {lineno}: expected the atom count line of an extxyz frame, got "
                             f"{line[:80].decode('utf-8', 'replace')!r}; cannot split the file into frames")
        if pending is not None:
            yield tuple(pending)
        body = list(itertools.islice(it, natoms + 1))
        if copy_to is not None:
            copy_to.writelines(body)
        pos += sum(map(len, body))
        pending = [start, pos, lineno]
        lineno += len(body)
    if pending is not None:
        yield tuple(pending)


def _read_extxyz(chunk: Chunk) -> Iterator[RawRecord]:
    # a .gz/.bz2 input without a spill copy: seeking decompresses (but does not parse) what comes before
    with _file_errors(chunk.path), _open_binary(chunk.data_path or chunk.path) as f:
        f.seek(chunk.byte_offset)
        buf = f.read(chunk.byte_length)
    line0 = chunk.line if chunk.line > 0 else 1
    index = chunk.start
    try:
        for start, end, line in _iter_xyz_frames(io.BytesIO(buf), chunk.path, chunk.byte_offset, line0):
            source = f"{chunk.path}:line {line}" if chunk.line > 0 else f"{chunk.path}:{index}"
            text = buf[start - chunk.byte_offset:end - chunk.byte_offset]
            yield _guarded(source, index, functools.partial(_extxyz_record, text, source, index))
            index += 1
    except ValueError as exc:  # the planned byte range no longer splits into frames (file modified?)
        for k in range(index, chunk.start + chunk.count):
            yield _error_record(f"{chunk.path}:{k}", k, None, "unparseable", f"frame {k} unreadable: {exc}")


def _extxyz_record(data: bytes, source: str, index: int, partial: dict) -> RawRecord:
    import ase.io

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _RecordError("unparseable", f"frame is not valid UTF-8 ({exc})") from None
    try:
        atoms = ase.io.read(io.StringIO(text), format="extxyz", index=0)
    except Exception as exc:  # noqa: BLE001 - ASE raises many types for a malformed frame
        raise _RecordError("unparseable", f"extxyz frame does not parse ({type(exc).__name__}: {exc})") from None
    info = atoms.info
    rid = partial["id"] = _first_id(info, ("id", "mp_id", "material_id", "name"))
    meta = _string_meta(info, exclude=(_id_key(info, ("id", "mp_id", "material_id", "name")),))
    # ASE >= 3.23 moves energy/forces/stress into a SinglePointCalculator; older versions keep them
    # in info/arrays. Take both (calculator first).
    results = dict(getattr(atoms.calc, "results", None) or {}) if atoms.calc is not None else {}
    labels: dict[str, float] = {}
    if "energy" in results:
        labels["energy"] = float(atoms.get_potential_energy())
    for key, value in _numeric_labels(results).items():
        labels.setdefault(key, value)
    for key, value in _numeric_labels(info, exclude=_ID_KEYS).items():
        labels.setdefault(key, value)
    partial["labels"] = labels
    where = rid or source
    forces = results.get("forces", atoms.arrays.get("forces"))
    forces = None if forces is None else _forces_array(forces, len(atoms), where)
    stress = results.get("stress", info.get("stress"))
    stress = None if stress is None else _stress_3x3(stress, where)
    crystal = from_ase(atoms, id=where, labels=labels)
    return RawRecord(source, index, rid, crystal, labels, forces=forces, stress=stress, meta=meta)


# ----------------------------------------------------------------------------- ASE db


class _connect_db:
    """Context manager around ``ase.db.connect`` that refuses to create a missing database."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ASE database {path!r} does not exist")
        import ase.db

        self.db = ase.db.connect(path, create_indices=False) if path.lower().endswith(".db") \
            else ase.db.connect(path)

    def __enter__(self):
        return self.db

    def __exit__(self, *exc):
        close = getattr(self.db, "close", None)  # recent ASE: SQLite3Database.close
        if callable(close):
            close()
        return False


def _read_ase_db(chunk: Chunk) -> Iterator[RawRecord]:
    with _file_errors(chunk.path), _connect_db(chunk.path) as db:
        # sort="id": without it ASE issues no ORDER BY and SQLite's row order is unspecified.
        rows = list(db.select(sort="id", offset=chunk.start, limit=chunk.count, include_data=False))
    for k, row in enumerate(rows):
        index = chunk.start + k
        source = f"{chunk.path}:{index}"
        yield _guarded(source, index, functools.partial(_ase_row_record, row, source, index))


def _ase_row_record(row, source: str, index: int, partial: dict) -> RawRecord:
    kvp = row.key_value_pairs or {}
    rid = partial["id"] = _first_id(kvp, ("id", "material_id")) or str(row.unique_id)
    meta = _string_meta(kvp, exclude=(_id_key(kvp, ("id", "material_id")),))
    labels: dict[str, float] = {}
    for key in ("energy", "free_energy"):
        value = row.get(key)
        if value is not None:
            labels[key] = float(value)
    for key, value in _numeric_labels(kvp, exclude=_ID_KEYS).items():
        labels.setdefault(key, value)
    partial["labels"] = labels
    atoms = row.toatoms()
    forces = row.get("forces")
    forces = None if forces is None else _forces_array(forces, len(atoms), rid)
    stress = row.get("stress")
    stress = None if stress is None else _stress_3x3(stress, rid)
    crystal = from_ase(atoms, id=rid, labels=labels)
    return RawRecord(source, index, rid, crystal, labels, forces=forces, stress=stress, meta=meta)


# ----------------------------------------------------------------------------- CIF


def _cif_dir(path: str) -> str | None:
    """The id_prop directory ``path`` stands for (itself or the id_prop.csv's parent), else None."""
    if os.path.isdir(path):
        return path if os.path.isfile(os.path.join(path, ID_PROP)) else None
    if os.path.basename(path) == ID_PROP:
        return os.path.dirname(path)
    return None


def _id_prop(directory: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    csv_path = os.path.join(directory, ID_PROP)
    st = os.stat(csv_path)
    return _id_prop_cached(csv_path, st.st_mtime_ns, st.st_size)


def _parse_value(text: str) -> float:
    text = text.strip()
    if text.lower() in _MISSING_STRINGS:
        return math.nan
    return float(text)


def _is_number(text: str) -> bool:
    try:
        _parse_value(text)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=4)
def _id_prop_cached(csv_path: str, mtime_ns: int, size: int) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(label names, [(line number, fields)]) of an id_prop.csv; blank lines skipped, header detected."""
    rows: list[tuple[int, list[str]]] = []
    with open(csv_path, encoding="utf-8-sig", newline="") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = [x.strip() for x in next(csv.reader([line]))]
            rows.append((lineno, fields))
    names: list[str] | None = None
    if rows and len(rows[0][1]) >= 2 and not _is_number(rows[0][1][1]):
        names = [x or f"target_{k}" for k, x in enumerate(rows[0][1][1:])]
        rows = rows[1:]
    if names is None:
        width = len(rows[0][1]) - 1 if rows else 1
        names = ["target"] if width == 1 else [f"target_{k}" for k in range(width)]
    return names, rows


def _read_cif_dir(chunk: Chunk) -> Iterator[RawRecord]:
    directory = _cif_dir(chunk.path)
    with _file_errors(chunk.path):
        names, rows = _id_prop(directory)
    csv_path = os.path.join(directory, ID_PROP)
    for index in range(chunk.start, min(chunk.start + chunk.count, len(rows))):
        lineno, fields = rows[index]
        source = f"{csv_path}:line {lineno}"
        yield _guarded(source, index, functools.partial(_cif_row_record, directory, names, fields, source, index))


def _cif_row_record(directory: str, names: list[str], fields: list[str], source: str, index: int,
                    partial: dict) -> RawRecord:
    name = fields[0]
    if not name:
        raise _RecordError("unparseable", "empty structure name in the first column")
    rid = partial["id"] = name[:-4] if name.lower().endswith(".cif") else name
    values = fields[1:]
    if len(values) != len(names):
        raise _RecordError("unparseable", f"expected {len(names)} value column(s) ({', '.join(names)}), "
                                          f"got {len(values)}")
    labels = {}
    for label, text in zip(names, values):
        try:
            labels[label] = _parse_value(text)
        except ValueError:
            raise _RecordError("unparseable", f"value {text!r} of {label!r} is not a number") from None
    partial["labels"] = labels
    candidates = [os.path.join(directory, name)]
    if not name.lower().endswith(".cif"):
        candidates.append(candidates[0] + ".cif")
    file = next((c for c in candidates if os.path.isfile(c)), None)
    if file is None:
        raise _RecordError("unparseable", f"structure file not found (tried {', '.join(candidates)})")
    structure = _parse_structure_file(file)
    crystal = from_pymatgen(structure, id=rid, labels=labels)
    return RawRecord(source, index, rid, crystal, labels)


def _parse_structure_file(file: str):
    """pymatgen Structure of a CIF (cell as given, not primitive) or any file pymatgen recognises."""
    from pymatgen.core import Structure
    from pymatgen.io.cif import CifParser

    low = os.path.basename(file).lower()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if low.endswith(".cif") or "." not in low:
                return CifParser(file).parse_structures(primitive=False)[0]
            return Structure.from_file(file, primitive=False)
        except Exception as exc:  # noqa: BLE001
            notes = "; ".join(dict.fromkeys(str(w.message).replace("\n", " ") for w in caught))
            raise _RecordError("unparseable", f"cannot parse {file}: {type(exc).__name__}: {exc}"
                                              + (f" (pymatgen: {notes})" if notes else "")) from None


def _cif_blocks(path: str) -> list[tuple[int, bytes]]:
    """(line number, text) of every ``data_`` block of a CIF file; the whole file if it has none."""
    with open(path, "rb") as f:
        lines = f.readlines()
    starts = [k for k, line in enumerate(lines) if _CIF_BLOCK.match(line)]
    if not starts:
        return [(1, b"".join(lines))]
    bounds = starts + [len(lines)]
    return [(bounds[i] + 1, b"".join(lines[bounds[i]:bounds[i + 1]])) for i in range(len(starts))]


def _read_cif_file(chunk: Chunk) -> Iterator[RawRecord]:
    with _file_errors(chunk.path):
        blocks = _cif_blocks(chunk.path)
    stem = os.path.basename(chunk.path)
    stem = stem[:-4] if stem.lower().endswith(".cif") else stem
    for index in range(chunk.start, min(chunk.start + chunk.count, len(blocks))):
        lineno, text = blocks[index]
        source = f"{chunk.path}:line {lineno}"
        if len(blocks) == 1:
            rid = stem
        else:
            header = text.split(b"\n", 1)[0].strip()
            rid = f"{stem}/{header[5:].decode('utf-8', 'replace')}"
        yield _guarded(source, index, functools.partial(_cif_block_record, text, rid, source, index))


def _cif_block_record(text: bytes, rid: str, source: str, index: int, partial: dict) -> RawRecord:
    from pymatgen.io.cif import CifParser

    partial["id"] = rid
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            structure = CifParser.from_str(text.decode("utf-8", "replace")).parse_structures(primitive=False)[0]
        except Exception as exc:  # noqa: BLE001
            notes = "; ".join(dict.fromkeys(str(w.message).replace("\n", " ") for w in caught))
            raise _RecordError("unparseable", f"CIF block does not parse: {type(exc).__name__}: {exc}"
                                              + (f" (pymatgen: {notes})" if notes else "")) from None
    crystal = from_pymatgen(structure, id=rid, labels={})
    return RawRecord(source, index, rid, crystal, {})
