"""``parquet``: a Parquet table with one structure per row (LeMat-Bulk, Hugging Face dataset exports).

Which column holds what is a column mapping, ``--columns ROLE=COLUMN,...`` (or a preset name), with
the roles of :data:`ROLES`: ``lattice`` (3x3 rows = lattice vectors, A), ``species`` (N element
symbols or atomic numbers), ``positions`` (Nx3 Cartesian, A) are required; ``energy`` (eV),
``forces`` (Nx3, eV/A), ``stress`` (3x3 or Voigt 6, eV/A^3, ASE's sign) and ``id`` are optional.
Every other numeric scalar column becomes a label, every other short string column metadata (so
``--split-group meta:<column>`` works).

Presets (:data:`PRESETS`): ``cfdist`` (columns named after the roles; the default when the table has
them) and ``lemat`` for LeMat-Bulk's schema (the dataset card of LeMaterial/LeMat-Bulk on Hugging
Face, configs ``compatible_pbe`` / ``compatible_pbesol`` / ``compatible_scan``: ``lattice_vectors``,
``species_at_sites``, ``cartesian_site_positions``, ``energy``, ``forces``, ``stress_tensor``,
``immutable_id``; the default when the table has those). LeMat-Bulk's card does not state the unit of
``stress_tensor``: it is taken as eV/A^3 with ASE's sign, like every stress cfdist reads.

Planning reads only the file's footer: a chunk is a run of rows inside one row group (``Chunk.part``:
the row-group index; ``start`` counts rows in the file), so a worker decodes one row group's columns.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Iterator, Mapping

import numpy as np

from cfdist.crystal import Crystal
from cfdist.io.records import (Chunk, RawRecord, RecordError, file_errors, forces_array, guarded, numeric_labels,
                               string_meta, stress_3x3)

SUFFIXES = (".parquet", ".pq")
REQUIRED = ("lattice", "species", "positions")
ROLES = REQUIRED + ("energy", "forces", "stress", "id")
PRESETS: dict[str, dict[str, str]] = {
    "cfdist": {role: role for role in ROLES},
    "lemat": {"lattice": "lattice_vectors", "species": "species_at_sites", "positions": "cartesian_site_positions",
              "energy": "energy", "forces": "forces", "stress": "stress_tensor", "id": "immutable_id"},
}


def parse_columns(spec: str) -> dict[str, str]:
    """A column mapping from ``--columns``: a preset name (:data:`PRESETS`) or ``ROLE=COLUMN,...``
    (``ValueError`` for an unknown role, a missing required role or a malformed entry)."""
    if spec in PRESETS:
        return dict(PRESETS[spec])
    mapping: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        role, sep, column = item.partition("=")
        role, column = role.strip(), column.strip()
        if not sep or not role or not column:
            raise ValueError(f"--columns: expected ROLE=COLUMN, got {item!r}")
        if role not in ROLES:
            raise ValueError(f"--columns: unknown role {role!r}; roles are {list(ROLES)} "
                             f"(or a preset: {sorted(PRESETS)})")
        mapping[role] = column
    missing = [r for r in REQUIRED if r not in mapping]
    if missing:
        raise ValueError(f"--columns: {missing} not mapped (required: {list(REQUIRED)})")
    return mapping


def column_mapping(path: str, options: Mapping[str, str], names: list[str]) -> dict[str, str]:
    """The mapping a table is read with: ``options["columns"]`` when given, else the first preset
    whose required columns the table has; optional roles whose column is absent are dropped.
    ``ValueError`` naming the path and the missing columns otherwise."""
    if "columns" in options:
        mapping = parse_columns(options["columns"])
    else:
        mapping = next((dict(p) for p in PRESETS.values() if all(p[r] in names for r in REQUIRED)), None)
        if mapping is None:
            raise ValueError(f"{path}: no --columns given and the table matches no preset {sorted(PRESETS)}; "
                             f"its columns: {names[:20]}")
    missing = [f"{role}={mapping[role]}" for role in REQUIRED if mapping[role] not in names]
    named = [f"{role}={column}" for role, column in mapping.items()
             if role not in REQUIRED and "columns" in options and column not in names]
    if missing or named:
        raise ValueError(f"{path}: the table has no column(s) {missing + named}; its columns: {names[:20]}")
    return {role: column for role, column in mapping.items() if column in names}


def check_options(path: str, options: Mapping[str, str]) -> None:
    """Reader options of ``parquet``: ``columns`` (see :func:`column_mapping`), checked against the
    file's schema."""
    import pyarrow.parquet as pq

    unknown = sorted(set(options) - {"columns"})
    if unknown:
        raise ValueError(f"{path}: format parquet takes the option columns only, got {unknown}")
    column_mapping(path, options, pq.ParquetFile(path).schema_arrow.names)


def plan(path: str, fmt: str, chunk_size: int, spill_dir: str | None = None) -> list[Chunk]:
    """Chunks of at most ``chunk_size`` rows, never across a row group (read from the footer only)."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    chunks, start = [], 0
    for group in range(meta.num_row_groups):
        rows = meta.row_group(group).num_rows
        for offset in range(0, rows, chunk_size):
            count = min(chunk_size, rows - offset)
            chunks.append(Chunk(fmt, path, start + offset, count, part=json.dumps([group, offset])))
        start += rows
    return chunks


def read(chunk: Chunk) -> Iterator[RawRecord]:
    """The rows of one planned chunk, one record each (source ``<path>:<row>``)."""
    import pyarrow.parquet as pq

    group, offset = json.loads(chunk.part)
    options = json.loads(chunk.options) if chunk.options else {}
    with file_errors(chunk.path):
        table_file = pq.ParquetFile(chunk.path)
        mapping = column_mapping(chunk.path, options, table_file.schema_arrow.names)
        table = table_file.read_row_group(group).slice(offset, chunk.count)
    roles = {column: role for role, column in mapping.items()}
    rows = table.to_pylist()
    for k, row in enumerate(rows):
        index = chunk.start + k
        source = f"{chunk.path}:{index}"
        yield guarded(source, index, functools.partial(_row_record, row, mapping, roles, source, index))


def _row_record(row: dict, mapping: dict[str, str], roles: dict[str, str], source: str, index: int,
                partial: dict) -> RawRecord:
    from ase.data import atomic_numbers


    rid = None
    if "id" in mapping and row.get(mapping["id"]) not in (None, ""):
        rid = str(row[mapping["id"]])
    partial["id"] = rid
    others = {k: v for k, v in row.items() if k not in roles}
    labels = numeric_labels(others)
    if "energy" in mapping:
        energy = row.get(mapping["energy"])
        labels["energy"] = math.nan if energy is None else float(energy)
    partial["labels"] = labels
    meta = string_meta(others)
    where = rid or source
    species = row.get(mapping["species"])
    if species is None or isinstance(species, str):
        raise RecordError("unparseable", f"column {mapping['species']!r} must be a list of elements, got {species!r}")
    numbers = []
    for k, s in enumerate(species):
        z = atomic_numbers.get(s.strip()) if isinstance(s, str) else (int(s) if isinstance(s, (int, np.integer))
                                                                       else None)
        if not z or z < 1:  # None, or ASE's dummy X = 0
            raise RecordError("bad_element", f"unknown element {s!r} at site {k} (column {mapping['species']!r})")
        numbers.append(z)
    try:
        lattice = np.array(row.get(mapping["lattice"]), dtype=np.float64)
        positions = np.array(row.get(mapping["positions"]), dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise RecordError("unparseable", f"non-numeric lattice or positions ({exc})") from None
    crystal = Crystal(where, np.array(numbers, dtype=np.int64), lattice, positions, labels)
    forces = row.get(mapping["forces"]) if "forces" in mapping else None
    forces = None if forces is None else forces_array(forces, crystal.n_atoms, where)
    stress = row.get(mapping["stress"]) if "stress" in mapping else None
    stress = None if stress is None else stress_3x3(stress, where)
    return RawRecord(source, index, rid, crystal, labels, forces=forces, stress=stress, meta=meta)
