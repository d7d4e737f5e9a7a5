"""``cif``: a directory with an ALIGNN-style ``id_prop.csv`` (``<cif name or id>,<value>[,...]``, an
optional header row naming the values), or a standalone ``*.cif`` file (one record per ``data_`` block).

A directory is one input (:data:`ID_PROP` marks it); records are the csv's rows in order, each naming
its structure file (``name`` or ``name.cif``), parsed by pymatgen with the cell as given.
"""

from __future__ import annotations

import csv
import functools
import math
import os
import re
import warnings
from typing import Iterator

from cfdist.crystal import from_pymatgen
from cfdist.io.records import Chunk, RawRecord, RecordError, file_errors, guarded
from cfdist.io.spill import plain_chunks

ID_PROP = "id_prop.csv"
SUFFIXES = (".cif",)
_MISSING_STRINGS = frozenset({"", "na", "nan", "none", "null", "n/a"})
_CIF_BLOCK = re.compile(rb"^[ \t]*data_", re.IGNORECASE)


def plan(path: str, fmt: str, chunk_size: int, spill_dir: str | None = None) -> list[Chunk]:
    """Index-range chunks over the ``id_prop.csv`` rows of a directory (``path`` the directory or its
    csv), or over the ``data_`` blocks of a CIF file (``spill_dir`` unused)."""
    cif_dir = _cif_dir(path)
    if cif_dir is not None:
        n = len(_id_prop(cif_dir)[1])
        return plain_chunks(fmt, cif_dir, n, chunk_size)
    if os.path.isdir(path):
        raise ValueError(f"cif input {path!r} is a directory without {ID_PROP}")
    return plain_chunks(fmt, path, len(_cif_blocks(path)), chunk_size)


def read(chunk: Chunk) -> Iterator[RawRecord]:
    """The records of one planned chunk: ``id_prop.csv`` rows, or ``data_`` blocks of a CIF file."""
    if _cif_dir(chunk.path) is not None:
        return _read_cif_dir(chunk)
    return _read_cif_file(chunk)


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
    with file_errors(chunk.path):
        names, rows = _id_prop(directory)
    csv_path = os.path.join(directory, ID_PROP)
    for index in range(chunk.start, min(chunk.start + chunk.count, len(rows))):
        lineno, fields = rows[index]
        source = f"{csv_path}:line {lineno}"
        yield guarded(source, index, functools.partial(_cif_row_record, directory, names, fields, source, index))


def _cif_row_record(directory: str, names: list[str], fields: list[str], source: str, index: int,
                    partial: dict) -> RawRecord:
    name = fields[0]
    if not name:
        raise RecordError("unparseable", "empty structure name in the first column")
    rid = partial["id"] = name[:-4] if name.lower().endswith(".cif") else name
    values = fields[1:]
    if len(values) != len(names):
        raise RecordError("unparseable", f"expected {len(names)} value column(s) ({', '.join(names)}), "
                                          f"got {len(values)}")
    labels = {}
    for label, text in zip(names, values):
        try:
            labels[label] = _parse_value(text)
        except ValueError:
            raise RecordError("unparseable", f"value {text!r} of {label!r} is not a number") from None
    partial["labels"] = labels
    candidates = [os.path.join(directory, name)]
    if not name.lower().endswith(".cif"):
        candidates.append(candidates[0] + ".cif")
    file = next((c for c in candidates if os.path.isfile(c)), None)
    if file is None:
        raise RecordError("unparseable", f"structure file not found (tried {', '.join(candidates)})")
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
            raise RecordError("unparseable", f"cannot parse {file}: {type(exc).__name__}: {exc}"
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
    with file_errors(chunk.path):
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
        yield guarded(source, index, functools.partial(_cif_block_record, text, rid, source, index))


def _cif_block_record(text: bytes, rid: str, source: str, index: int, partial: dict) -> RawRecord:
    from pymatgen.io.cif import CifParser

    partial["id"] = rid
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            structure = CifParser.from_str(text.decode("utf-8", "replace")).parse_structures(primitive=False)[0]
        except Exception as exc:  # noqa: BLE001
            notes = "; ".join(dict.fromkeys(str(w.message).replace("\n", " ") for w in caught))
            raise RecordError("unparseable", f"CIF block does not parse: {type(exc).__name__}: {exc}"
                                              + (f" (pymatgen: {notes})" if notes else "")) from None
    crystal = from_pymatgen(structure, id=rid, labels={})
    return RawRecord(source, index, rid, crystal, {})
