"""What every reader produces: the :class:`Chunk` a planner hands a worker, the :class:`RawRecord` a
reader yields per input record, and the helpers that turn one bad record into an error record
instead of an exception (so every input record is accounted for).

Readers never validate crystals; they only say which records could not be turned into one and why
(``error_reason`` ``"unparseable"`` or an :class:`~cfdist.crystal.InvalidCrystalError` reason).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import sqlite3
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from cfdist.crystal import InvalidCrystalError

# Keys that name a record rather than label it (never turned into labels).
ID_KEYS = ("id", "jid", "material_id", "mp_id", "entry_id", "name")


@dataclass(frozen=True)
class Chunk:
    """A contiguous run of records of one input, planned on the driver and read by one worker.

    Attributes:
        format: a registered format name (:data:`cfdist.io.registry.FORMATS`).
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
        part: where the chunk is when byte ranges do not address it, in the format's own words (a
            string, so plans stay JSON): e.g. a Parquet row-group index or the key of a keyed store's
            first record; "" for the formats that need none.
        options: the reader options of the build (``--energy-key``, ``--columns``) as a JSON object
            (sorted keys), stamped on every chunk by :func:`cfdist.io.registry.plan_chunks` so the
            worker reads the chunk as the driver planned it; "" when none are given.
    """

    format: str
    path: str
    start: int
    count: int
    byte_offset: int = -1
    byte_length: int = -1
    line: int = -1
    data_path: str = ""
    part: str = ""
    options: str = ""


@dataclass
class RawRecord:
    """One input record as read by :func:`cfdist.io.registry.read_chunk`.

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
            other than its id and structure); bounded by :func:`string_meta`. Used to group
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
def file_errors(path: str):
    """Re-raise a whole-file read failure (corrupt archive, not a database, ...) with the path in it."""
    try:
        yield
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise  # their message already names the path
    except (OSError, EOFError, zlib.error, sqlite3.Error) as exc:
        raise OSError(f"cannot read {path!r}: {type(exc).__name__}: {exc}") from exc



class UnknownFormatError(ValueError):
    """:func:`infer_format` cannot tell what an input holds (unknown extension, unrecognised records)."""


class RecordError(Exception):
    """A single record cannot be read (becomes an error record, never escapes read_chunk)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def exactly(chunk: Chunk, records: Iterator[RawRecord]) -> Iterator[RawRecord]:
    """Pass through at most chunk.count records; fill any shortfall (input changed?) with error records."""
    n = 0
    for rec in itertools.islice(records, chunk.count):
        yield rec
        n += 1
    for k in range(n, chunk.count):
        index = chunk.start + k
        yield error_record(f"{chunk.path}:{index}", index, None, "unparseable",
                            f"record {index} not found (the input has fewer records than planned; "
                            f"was it modified after planning?)")


def error_record(source: str, index: int, rid: str | None, reason: str, detail: str,
                  labels: dict[str, float] | None = None) -> RawRecord:
    """The record for one input record that gives no crystal; ``error`` reads ``<source>: <reason>: <detail>``."""
    return RawRecord(source=source, index=index, id=rid, crystal=None, labels=dict(labels or {}),
                     error_reason=reason, error=f"{source}: {reason}: {detail}")


def guarded(source: str, index: int, build: Callable[[dict], RawRecord]) -> RawRecord:
    """Run ``build(partial)``; any failure becomes an error record (with the id/labels found so far)."""
    partial: dict[str, Any] = {"id": None, "labels": {}}
    try:
        return build(partial)
    except InvalidCrystalError as exc:
        return error_record(source, index, partial["id"], exc.reason, str(exc), partial["labels"])
    except RecordError as exc:
        return error_record(source, index, partial["id"], exc.reason, exc.detail, partial["labels"])
    except Exception as exc:  # noqa: BLE001 - one bad record must never stop the chunk
        return error_record(source, index, partial["id"], "unparseable", f"{type(exc).__name__}: {exc}",
                             partial["labels"])


def numeric_labels(mapping: Mapping, exclude: Iterable[str] = ()) -> dict[str, float]:
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


def first_id(mapping: Mapping, keys: Iterable[str]) -> str | None:
    """The value of the first of ``keys`` that is set (not None or ""), as a string; else None."""
    key = id_key(mapping, keys)
    return None if key is None else str(mapping[key])


def id_key(mapping: Mapping, keys: Iterable[str]) -> str | None:
    """The first of ``keys`` that gives ``mapping`` an id (what :func:`first_id` reads)."""
    for key in keys:
        value = mapping.get(key)
        if value is not None and value != "":
            return key
    return None


MAX_META_FIELDS = 64  # RawRecord.meta keeps at most this many entries (the first, in the record's key order)
MAX_META_CHARS = 200  # ... and only string values shorter than this


def string_meta(mapping: Mapping, exclude: Iterable[str] = (), into: dict[str, str] | None = None
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


def stress_3x3(value, where: str) -> np.ndarray:
    """A stress as a (3, 3) float64 array (eV/A^3) from 9 entries or 6 in ASE Voigt order; ``where`` names
    the record in the ``bad_shape`` error otherwise."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape == (3, 3):
        return arr.copy()
    if arr.size == 9:
        return arr.reshape(3, 3).copy()
    if arr.size == 6:  # Voigt order xx, yy, zz, yz, xz, xy (ASE)
        xx, yy, zz, yz, xz, xy = arr.reshape(6)
        return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    raise InvalidCrystalError(where, "bad_shape", f"stress must have 6 (Voigt) or 9 entries, got shape {arr.shape}")


def forces_array(value, n_atoms: int, where: str) -> np.ndarray:
    """Forces as an (n_atoms, 3) float64 array (eV/A); a ``bad_shape`` error naming ``where`` otherwise."""
    arr = np.array(value, dtype=np.float64)
    if arr.shape != (n_atoms, 3):
        raise InvalidCrystalError(where, "bad_shape", f"forces must have shape ({n_atoms}, 3), got {arr.shape}")
    return arr

