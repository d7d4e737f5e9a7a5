"""``aselmdb``: fairchem's LMDB-backed ASE database (``.aselmdb``: OMat24, sAlex, OMol-style sets),
read with the ``lmdb`` package alone (fairchem is not a dependency).

The on-disk layout, as fairchem's writer makes it (``LMDBDatabase``: in fairchem-core < 2 its
``fairchem/core/datasets/lmdb_database.py``, since then the ``ase-db-backends`` package fairchem-core
depends on, ``ase_db_backends/aselmdb.py``): one LMDB environment in a single file
(``subdir=False``); every row under the key ``str(id)`` (ASCII decimal), its value a zlib-compressed
JSON object of the ``ase.db`` row in ASE's JSON encoding (``ase.io.jsonio``: arrays as
``{"__ndarray__": [shape, dtype, values]}``; older fairchem wrote plain lists with orjson, which the
same decoder reads):
``numbers``, ``positions`` (A), ``cell`` (3x3, A), ``pbc``, the calculator's results ``energy`` (eV),
``free_energy``, ``forces`` (eV/A), ``stress`` (Voigt, eV/A^3, ASE's sign), ``unique_id``,
``key_value_pairs``, ``data``, ...; besides the rows, the bookkeeping keys ``nextid``, ``metadata``
and ``deleted_ids`` (not rows). Those are ASE's units already: nothing is converted.

Records are the rows in LMDB key order (byte order of the keys: ``1, 10, 100, 2, ...``), the one
order a reader can walk without holding every id. Planning walks the keys once without reading the
values and keeps the first key of every chunk (``Chunk.part``); a worker positions a cursor there
and reads ``count`` rows. Ids: the row's ``key_value_pairs`` ``id`` / ``sid`` / ``material_id``,
else its ``unique_id``; numeric key-value pairs are labels, string ones metadata.
"""

from __future__ import annotations

import functools
import math
import zlib
from typing import Iterator, Mapping

import numpy as np

from cfdist.crystal import Crystal, InvalidCrystalError
from cfdist.io.records import (ID_KEYS, Chunk, RawRecord, RecordError, file_errors, first_id, forces_array, guarded,
                               id_key, numeric_labels, string_meta, stress_3x3)

SUFFIXES = (".aselmdb",)
_ID_KEYS = ("id", "sid", "material_id")  # key_value_pairs that name a row (OMat24 rows carry "sid")


def _open(path: str):
    """The LMDB environment of ``path`` opened read-only without a lock file (inputs may be read-only)."""
    import lmdb

    return lmdb.open(path, subdir=False, readonly=True, lock=False, readahead=False, meminit=False)


def _is_row_key(key: bytes) -> bool:
    """Rows are stored under decimal ids; ``nextid`` / ``metadata`` / ``deleted_ids`` are bookkeeping."""
    return key.isdigit()


def plan(path: str, fmt: str, chunk_size: int, spill_dir: str | None = None) -> list[Chunk]:
    """Chunks of ``chunk_size`` rows in key order, each starting at the key in ``Chunk.part`` (one pass
    over the keys, values untouched; the driver keeps one key per chunk)."""
    import lmdb

    try:
        env = _open(path)
    except lmdb.Error as exc:
        raise OSError(f"cannot read {path!r} as an LMDB database: {exc}") from exc
    firsts, n = [], 0  # the first key of every chunk
    with env, env.begin(buffers=False) as txn:
        for key in txn.cursor().iternext(keys=True, values=False):
            if _is_row_key(key):
                if n % chunk_size == 0:
                    firsts.append(key.decode("ascii"))
                n += 1
    chunks = [Chunk(fmt, path, k * chunk_size, min(chunk_size, n - k * chunk_size), part=key)
              for k, key in enumerate(firsts)]
    return chunks


def read(chunk: Chunk) -> Iterator[RawRecord]:
    """The ``chunk.count`` rows from key ``chunk.part`` on, one record each (source ``<path>:<index>``)."""
    import lmdb

    rows: list[tuple[str, bytes]] = []
    with file_errors(chunk.path):
        try:
            env = _open(chunk.path)
        except lmdb.Error as exc:
            raise OSError(f"cannot read {chunk.path!r} as an LMDB database: {exc}") from exc
        with env, env.begin(buffers=False) as txn:
            cursor = txn.cursor()
            if cursor.set_key(chunk.part.encode("ascii")):
                for key, value in cursor:
                    if not _is_row_key(key):
                        continue
                    rows.append((key.decode("ascii"), value))
                    if len(rows) == chunk.count:
                        break
    for k, (key, value) in enumerate(rows):
        index = chunk.start + k
        source = f"{chunk.path}:{index}"
        yield guarded(source, index, functools.partial(_row_record, value, key, source, index))


def _row_record(value: bytes, key: str, source: str, index: int, partial: dict) -> RawRecord:

    from ase.io.jsonio import decode

    try:
        row = decode(zlib.decompress(value).decode("utf-8"))
    except (zlib.error, ValueError) as exc:
        raise RecordError("unparseable", f"row {key}: not a zlib-compressed JSON row ({exc})") from None
    if not isinstance(row, Mapping):
        raise RecordError("unparseable", f"row {key}: expected a JSON object, got {type(row).__name__}")
    kvp = row.get("key_value_pairs") or {}
    rid = partial["id"] = first_id(kvp, _ID_KEYS) or (str(row["unique_id"]) if row.get("unique_id") else None)
    labels: dict[str, float] = {}
    for name in ("energy", "free_energy"):
        if name in row:
            labels[name] = math.nan if row[name] is None else float(row[name])
    for name, number in numeric_labels(kvp, exclude=ID_KEYS + _ID_KEYS).items():
        labels.setdefault(name, number)
    partial["labels"] = labels
    meta = string_meta(kvp, exclude=(id_key(kvp, _ID_KEYS),))
    where = rid or source
    for name in ("numbers", "positions", "cell"):
        if name not in row:
            raise RecordError("unparseable", f"row {key} has no {name!r}")
    pbc = np.asarray(row.get("pbc", [True, True, True]), dtype=bool)
    if not pbc.all():
        raise InvalidCrystalError(where, "not_periodic", f"row {key} is not periodic along all axes "
                                                         f"(pbc={tuple(pbc.tolist())})")
    cell = row["cell"]
    if isinstance(cell, Mapping):  # ASE's own JSON encoding of a Cell: {"array": ..., "pbc": ...}
        cell = cell.get("array")
    crystal = Crystal(where, np.asarray(row["numbers"]), np.asarray(cell, dtype=np.float64),
                      np.asarray(row["positions"], dtype=np.float64), labels)
    forces = row.get("forces")
    forces = None if forces is None else forces_array(forces, crystal.n_atoms, where)
    stress = row.get("stress")
    stress = None if stress is None else stress_3x3(stress, where)
    return RawRecord(source, index, rid, crystal, labels, forces=forces, stress=stress, meta=meta)
