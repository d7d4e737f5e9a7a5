"""Small inputs of the corpus formats (``mptrj``, ``aselmdb``, ``parquet``) from the JARVIS-style test
records (``tests/data/megnet_64.json``), for the registry and reader tests.

The ``.aselmdb`` written here follows fairchem's on-disk layout (documented in
:mod:`cfdist.io.aselmdb`) with the ``lmdb`` package; the reader is also tested on a file written by
fairchem's own writer (``tests/data/aselmdb/``, see its README).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

from raw_formats import atoms_of, structure_of, write_all_formats


def write_mptrj(path: Path, recs: list[dict], per_material: int = 2) -> Path:
    """``recs`` in the MPtrj layout: ``per_material`` consecutive records under one made-up mp_id,
    each keyed by its own id, ``e_form`` stored as both energies."""
    layout: dict[str, dict] = {}
    for k, rec in enumerate(recs):
        frame = {"structure": structure_of(rec).as_dict(), "corrected_total_energy": rec["e_form"],
                 "uncorrected_total_energy": rec["e_form"], "mp_id": f"mp-{k // per_material}"}
        layout.setdefault(f"mp-{k // per_material}", {})[rec["id"]] = frame
    path.write_text(json.dumps(layout))
    return path


def write_aselmdb(path: Path, rows: list[dict]) -> Path:
    """An ``.aselmdb`` of ``rows`` (ASE row dicts: numbers, positions, cell, pbc, optional energy,
    forces, stress, key_value_pairs), stored under ids 1..N as fairchem stores them, plus ``nextid``."""
    import lmdb

    env = lmdb.open(str(path), subdir=False, map_size=1 << 30, meminit=False)
    with env.begin(write=True) as txn:
        for k, row in enumerate(rows, 1):
            txn.put(str(k).encode("ascii"), zlib.compress(json.dumps(row).encode()))
        txn.put(b"nextid", zlib.compress(json.dumps(len(rows) + 1).encode()))
    env.close()
    return path


def ase_rows(recs: list[dict]) -> list[dict]:
    """The ASE row dict of each record (its id as the ``key_value_pairs`` ``id``)."""
    rows = []
    for rec in recs:
        atoms = atoms_of(rec)
        rows.append({"numbers": atoms.numbers.tolist(), "positions": atoms.positions.tolist(),
                     "cell": atoms.cell.array.tolist(), "pbc": [True, True, True], "unique_id": f"u{rec['id']}",
                     "key_value_pairs": {"id": rec["id"], "e_form": rec["e_form"]}})
    return rows


def parquet_columns(recs: list[dict]) -> dict[str, list]:
    """Columns named after cfdist's roles (``lattice``, ``species``, ``positions``, ``id``) plus ``e_form``."""
    cols: dict[str, list] = {"id": [], "lattice": [], "species": [], "positions": [], "e_form": []}
    for rec in recs:
        atoms = atoms_of(rec)
        cols["id"].append(rec["id"])
        cols["lattice"].append(atoms.cell.array.tolist())
        cols["species"].append(atoms.get_chemical_symbols())
        cols["positions"].append(atoms.positions.tolist())
        cols["e_form"].append(rec["e_form"])
    return cols


def write_parquet(path: Path, columns: dict[str, list], row_group_size: int | None = None) -> Path:
    """``columns`` as a Parquet file written by pyarrow."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), str(path), row_group_size=row_group_size)
    return path


def as_float_array(value) -> np.ndarray:
    return np.asarray(value, dtype=np.float64)


def write_every_format(root: Path, recs: list[dict]) -> dict[str, str]:
    """{format variant: path} of one well-formed input per variant under ``root``, all holding ``recs``
    (the raw formats of :func:`raw_formats.write_all_formats` plus mptrj, aselmdb and parquet)."""
    files = write_all_formats(root, recs)
    files["mptrj"] = str(write_mptrj(root / "mptrj.json", recs))
    files["aselmdb"] = str(write_aselmdb(root / "rows.aselmdb", ase_rows(recs)))
    files["parquet"] = str(write_parquet(root / "table.parquet", parquet_columns(recs)))
    return files
