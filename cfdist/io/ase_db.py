"""``ase_db``: an ASE database (SQLite ``.db``, or ASE's JSON database), rows in id order.

Energies, forces and stress come from the row's stored calculator results; string key-value pairs
become metadata, numeric ones labels.
"""

from __future__ import annotations

import functools
import os
from typing import Iterator

from cfdist.crystal import from_ase
from cfdist.io.records import (ID_KEYS, Chunk, RawRecord, file_errors, first_id, forces_array, guarded, id_key,
                               numeric_labels, string_meta, stress_3x3)
from cfdist.io.spill import plain_chunks

SUFFIXES = (".db", ".json")  # SQLite; ASE's JSON database (ase.db.connect reads no .json.gz)


def plan(path: str, fmt: str, chunk_size: int, spill_dir: str | None = None) -> list[Chunk]:
    """Index-range chunks over the database's rows (``spill_dir`` unused: nothing to decompress)."""
    with connect_db(path) as db:
        n = db.count()
    return plain_chunks(fmt, path, n, chunk_size)


class connect_db:
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


def read(chunk: Chunk) -> Iterator[RawRecord]:
    """The rows ``chunk.start .. chunk.start + count - 1`` in id order, one record each."""
    with file_errors(chunk.path), connect_db(chunk.path) as db:
        # sort="id": without it ASE issues no ORDER BY and SQLite's row order is unspecified.
        rows = list(db.select(sort="id", offset=chunk.start, limit=chunk.count, include_data=False))
    for k, row in enumerate(rows):
        index = chunk.start + k
        source = f"{chunk.path}:{index}"
        yield guarded(source, index, functools.partial(_ase_row_record, row, source, index))


def _ase_row_record(row, source: str, index: int, partial: dict) -> RawRecord:
    kvp = row.key_value_pairs or {}
    rid = partial["id"] = first_id(kvp, ("id", "material_id")) or str(row.unique_id)
    meta = string_meta(kvp, exclude=(id_key(kvp, ("id", "material_id")),))
    labels: dict[str, float] = {}
    for key in ("energy", "free_energy"):
        value = row.get(key)
        if value is not None:
            labels[key] = float(value)
    for key, value in numeric_labels(kvp, exclude=ID_KEYS).items():
        labels.setdefault(key, value)
    partial["labels"] = labels
    atoms = row.toatoms()
    forces = row.get("forces")
    forces = None if forces is None else forces_array(forces, len(atoms), rid)
    stress = row.get("stress")
    stress = None if stress is None else stress_3x3(stress, rid)
    crystal = from_ase(atoms, id=rid, labels=labels)
    return RawRecord(source, index, rid, crystal, labels, forces=forces, stress=stress, meta=meta)
