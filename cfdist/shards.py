"""The shard schema: crystals and their image tables as Arrow/Parquet rows.

One row per crystal. Geometry is stored exactly (float64) and the image table as
integers (pair atoms + lattice translations); distances are recomputed on the device.
``docs/shards.md`` documents every column. Conversions are vectorised over the whole
Arrow table: :func:`collate_arrow` turns a record batch into a
:class:`~cfdist.batch.CrystalBatch` without a Python loop over rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cfdist import __version__
from cfdist.crystal import Crystal, SiteDisorder
from cfdist import storage
from cfdist.fileio import atomic_write
from cfdist.geometry import ImageTable

if TYPE_CHECKING:
    from cfdist.batch import CrystalBatch
    from cfdist.crystal import Crystal

SCHEMA_VERSION = 1
METADATA_KEY = b"cfdist"
# Image-table entries are packed into one int32 each (see encode_table): the key atom j and
# the translation n with |n_k| <= TRANSLATION_LIMIT, in base 2 * TRANSLATION_LIMIT + 1.
TRANSLATION_LIMIT = 31
_BASE = 2 * TRANSLATION_LIMIT + 1
_BASE3 = _BASE**3
MAX_ATOMS = (2**31 - 1) // _BASE3  # 8,588 atoms per cell


class ShardError(ValueError):
    """A shard is unreadable, inconsistent with its manifest, or unusable for this model."""


class TableRangeError(ValueError):
    """An image table does not fit the packed encoding (|n| > TRANSLATION_LIMIT or too many atoms)."""


def encode_table(table: ImageTable, n_atoms: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack a sorted image table into (counts (N,) int32, codes (T,) int32).

    counts[i] is the number of entries of query atom i (entries are sorted by i, so i is
    implicit); codes[t] = j * B^3 + ((n0 + R) * B + (n1 + R)) * B + (n2 + R) with R = 31,
    B = 63. One small-integer column encodes ~4x faster and smaller than separate columns.
    """
    if n_atoms > MAX_ATOMS:
        raise TableRangeError(f"{n_atoms} atoms exceed the packed table limit of {MAX_ATOMS}")
    if len(table) and np.abs(table.n).max() > TRANSLATION_LIMIT:
        raise TableRangeError(f"lattice translation {int(np.abs(table.n).max())} exceeds +-{TRANSLATION_LIMIT}")
    shifted = table.n + TRANSLATION_LIMIT
    codes = table.j * _BASE3 + (shifted[:, 0] * _BASE + shifted[:, 1]) * _BASE + shifted[:, 2]
    counts = np.bincount(table.i, minlength=n_atoms)
    return counts.astype(np.int32), codes.astype(np.int32)


def decode_table(counts: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`encode_table`: (i (T,), j (T,), n (T, 3)) as int64 (vectorised)."""
    codes = codes.astype(np.int64)
    i = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    j, rest = np.divmod(codes, _BASE3)
    n01, n2 = np.divmod(rest, _BASE)
    n0, n1 = np.divmod(n01, _BASE)
    n = np.stack([n0, n1, n2], axis=1) - TRANSLATION_LIMIT
    return i, j, n


def arrow_schema(targets: Sequence[str], with_forces: bool = False, with_stress: bool = False) -> pa.Schema:
    """Arrow schema of a shard holding the scalar ``targets`` (float64 columns)."""
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("n_atoms", pa.int32(), nullable=False),
        pa.field("numbers", pa.list_(pa.int16()), nullable=False),
        pa.field("lattice", pa.list_(pa.float64(), 9), nullable=False),
        pa.field("positions", pa.list_(pa.float64()), nullable=False),
        pa.field("disorder_site", pa.list_(pa.int32()), nullable=False),
        pa.field("disorder_z", pa.list_(pa.int16()), nullable=False),
        pa.field("disorder_occupancy", pa.list_(pa.float64()), nullable=False),
        pa.field("n_entries", pa.int32(), nullable=False),
        pa.field("table_counts", pa.list_(pa.int32()), nullable=False),
        pa.field("table_code", pa.list_(pa.int32()), nullable=False),
    ]
    fields += [pa.field(f"y.{name}", pa.float64(), nullable=False) for name in targets]
    if with_forces:
        fields.append(pa.field("forces", pa.list_(pa.float32()), nullable=True))
    if with_stress:
        fields.append(pa.field("stress", pa.list_(pa.float64(), 9), nullable=True))
    return pa.schema(fields)


def target_columns(schema: pa.Schema) -> list[str]:
    """Names of the scalar targets stored in a shard schema."""
    return [name[2:] for name in schema.names if name.startswith("y.")]


def _list_array(values: list[np.ndarray], dtype: pa.DataType) -> pa.ListArray:
    lengths = np.fromiter((len(v) for v in values), dtype=np.int64, count=len(values))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.concatenate(values) if values else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, type=dtype))


def crystals_to_arrow(crystals: Sequence["Crystal"], tables: Sequence[ImageTable], sources: Sequence[str],
                      targets: Sequence[str], forces: Sequence[np.ndarray | None] | None = None,
                      stress: Sequence[np.ndarray | None] | None = None) -> pa.Table:
    """Rows for ``crystals`` with their image ``tables``; labels taken from ``crystal.labels``."""
    n = len(crystals)
    if not (len(tables) == len(sources) == n):
        raise ValueError("crystals, tables and sources must have the same length")
    packed = []
    for crystal, table in zip(crystals, tables):
        try:
            packed.append(encode_table(table, crystal.n_atoms))
        except TableRangeError as exc:
            raise TableRangeError(f"crystal {crystal.id!r}: {exc}") from None
    empty_i = np.zeros(0, np.int32)
    columns = {
        "id": pa.array([c.id for c in crystals], pa.string()),
        "source": pa.array(list(sources), pa.string()),
        "n_atoms": pa.array(np.array([c.n_atoms for c in crystals], np.int32)),
        "numbers": _list_array([c.numbers.astype(np.int16) for c in crystals], pa.int16()),
        "lattice": pa.FixedSizeListArray.from_arrays(
            pa.array(np.concatenate([c.lattice.reshape(-1) for c in crystals]) if n else np.zeros(0)), 9),
        "positions": _list_array([c.positions.reshape(-1) for c in crystals], pa.float64()),
        "disorder_site": _list_array([c.disorder.site.astype(np.int32) if c.disorder is not None else empty_i
                                      for c in crystals], pa.int32()),
        "disorder_z": _list_array([c.disorder.z.astype(np.int16) if c.disorder is not None else empty_i
                                   for c in crystals], pa.int16()),
        "disorder_occupancy": _list_array([c.disorder.occupancy if c.disorder is not None else np.zeros(0)
                                           for c in crystals], pa.float64()),
        "n_entries": pa.array(np.array([len(t) for t in tables], np.int32)),
        "table_counts": _list_array([p[0] for p in packed], pa.int32()),
        "table_code": _list_array([p[1] for p in packed], pa.int32()),
    }
    for name in targets:
        columns[f"y.{name}"] = pa.array(np.array([float(c.labels[name]) for c in crystals], np.float64))
    if forces is not None:
        columns["forces"] = pa.array([None if f is None else np.asarray(f, np.float32).reshape(-1) for f in forces],
                                     pa.list_(pa.float32()))
    if stress is not None:
        columns["stress"] = pa.array([None if s is None else np.asarray(s, np.float64).reshape(-1) for s in stress],
                                     pa.list_(pa.float64(), 9))
    schema = arrow_schema(targets, forces is not None, stress is not None)
    return pa.table(columns, schema=schema)


def _flat(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a list column, honouring slices."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = arr.offsets.to_numpy()
    values = arr.flatten().to_numpy(zero_copy_only=False)  # flatten() honours slices, .values does not
    return values, offsets - offsets[0]


def _rows(column) -> np.ndarray:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return arr.to_numpy(zero_copy_only=False)


def arrow_to_crystals(table: pa.Table) -> tuple[list["Crystal"], list[ImageTable]]:
    """Rebuild crystals and image tables from shard rows (the inverse of :func:`crystals_to_arrow`)."""

    cutoff = float(read_metadata_from_schema(table.schema).get("cutoff", np.nan))
    targets = target_columns(table.schema)
    labels = {name: _rows(table[f"y.{name}"]) for name in targets}
    numbers, num_off = _flat(table["numbers"])
    positions, pos_off = _flat(table["positions"])
    lattice = _flat_fixed(table["lattice"]).reshape(-1, 3, 3)
    d_site, d_off = _flat(table["disorder_site"])
    d_z, _ = _flat(table["disorder_z"])
    d_occ, _ = _flat(table["disorder_occupancy"])
    counts, c_off = _flat(table["table_counts"])
    codes, t_off = _flat(table["table_code"])
    ti, tj, tn = decode_table(counts, codes)
    ids = table["id"].to_pylist()
    crystals, tables = [], []
    for r in range(table.num_rows):
        disorder = None
        if d_off[r + 1] > d_off[r]:
            sl = slice(d_off[r], d_off[r + 1])
            disorder = SiteDisorder(site=d_site[sl], z=d_z[sl], occupancy=d_occ[sl])
        crystals.append(Crystal(id=ids[r], numbers=numbers[num_off[r]:num_off[r + 1]].astype(np.int64),
                                lattice=lattice[r], positions=positions[pos_off[r]:pos_off[r + 1]].reshape(-1, 3),
                                labels={name: float(labels[name][r]) for name in targets}, disorder=disorder))
        sl = slice(t_off[r], t_off[r + 1])
        tables.append(ImageTable(ti[sl] - num_off[r], tj[sl], tn[sl], cutoff))
    return crystals, tables


def _flat_fixed(column) -> np.ndarray:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return arr.flatten().to_numpy(zero_copy_only=False)


def _optional_rows(column, width: int, lengths: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(valid (B,) bool, float64 values of the valid rows, flat) of a nullable list column whose
    row r holds ``lengths[r] * width`` values; a row of the wrong length is a :class:`ShardError`."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    valid = arr.is_valid().to_numpy(zero_copy_only=False).astype(bool)
    values = arr.filter(pa.array(valid)).flatten().to_numpy(zero_copy_only=False).astype(np.float64)
    if len(values) != int(lengths[valid].sum()) * width:
        raise ShardError(f"column {name!r}: {len(values)} values for {int(lengths[valid].sum())} rows of "
                         f"{width} (a row has the wrong length)")
    return valid, values


def collate_arrow(table: pa.Table | pa.RecordBatch, target_names: Sequence[str] | None = None,
                  cutoff: float | None = None, *, forces: bool = False, stress: bool = False,
                  block_width: int | None = None) -> "CrystalBatch":
    """Vectorised shard rows -> :class:`CrystalBatch` (no Python loop over rows or atoms).

    Args:
        table: shard rows (any slice of a shard, or rows concatenated from several).
        target_names: targets to put in ``labels`` (columns ``y.<name>``).
        cutoff: cutoff the tables were built with (defaults to the schema metadata).
        forces / stress: fill ``batch.forces`` (N, 3) / ``batch.stress`` (B, 3, 3) (float64, NaN
            for crystals whose row is null) from the ``forces`` / ``stress`` columns; left None
            when not asked or when the table has no such column.
        block_width: entries per block of the attention op's basis layout (``compute.entry_chunk``;
            the pair and block indices are computed here, :func:`cfdist.batch.pair_blocks`); None: 32.
    """
    import torch

    from cfdist.batch import DEFAULT_BLOCK_WIDTH, CrystalBatch, index_tensors

    block_width = DEFAULT_BLOCK_WIDTH if block_width is None else block_width

    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    if cutoff is None:
        cutoff = float(read_metadata_from_schema(table.schema)["cutoff"])
    n_atoms = _rows(table["n_atoms"]).astype(np.int64)
    n_entries = _rows(table["n_entries"]).astype(np.int64)
    n_rows = len(n_atoms)
    atom_offset = np.concatenate([[0], np.cumsum(n_atoms)[:-1]]).astype(np.int64)
    numbers, _ = _flat(table["numbers"])
    positions, _ = _flat(table["positions"])
    lattice = _flat_fixed(table["lattice"]).reshape(n_rows, 3, 3)
    # counts of all rows concatenate to one per-atom array, so decode's i is already global
    counts, _ = _flat(table["table_counts"])
    codes, _ = _flat(table["table_code"])
    ti, tj, tn = decode_table(counts, codes)
    entry_offset = np.repeat(atom_offset, n_entries)

    # Species: ordered sites from `numbers`, disordered sites replaced by their entries.
    d_site, d_off = _flat(table["disorder_site"])
    d_z, _ = _flat(table["disorder_z"])
    d_occ, _ = _flat(table["disorder_occupancy"])
    n_total = int(n_atoms.sum())
    site = np.arange(n_total, dtype=np.int64)
    z = numbers.astype(np.int64)
    occ = np.ones(n_total, dtype=np.float64)
    if len(d_site):
        d_global = d_site.astype(np.int64) + np.repeat(atom_offset, np.diff(d_off))
        ordered = np.ones(n_total, dtype=bool)
        ordered[d_global] = False
        site = np.concatenate([site[ordered], d_global])
        z = np.concatenate([z[ordered], d_z.astype(np.int64)])
        occ = np.concatenate([occ[ordered], d_occ])
        order = np.argsort(site, kind="stable")
        site, z, occ = site[order], z[order], occ[order]

    labels = None
    if target_names is not None:
        available = set(target_columns(table.schema))
        missing = [name for name in target_names if name not in available]
        if missing:
            raise ShardError(f"shard has no target column(s) {missing}; it holds {sorted(available)}")
        labels = torch.from_numpy(np.stack([_rows(table[f"y.{name}"]).astype(np.float64) for name in target_names],
                                           axis=1).reshape(n_rows, len(target_names)))
    force_labels = stress_labels = None
    if forces and "forces" in table.column_names:
        valid, values = _optional_rows(table["forces"], 3, n_atoms, "forces")
        full = np.full((n_total, 3), np.nan)
        full[np.repeat(valid, n_atoms)] = values.reshape(-1, 3)
        force_labels = torch.from_numpy(full)
    if stress and "stress" in table.column_names:
        valid, values = _optional_rows(table["stress"], 9, np.ones(n_rows, dtype=np.int64), "stress")
        full = np.full((n_rows, 3, 3), np.nan)
        full[valid] = values.reshape(-1, 3, 3)
        stress_labels = torch.from_numpy(full)
    return CrystalBatch(
        positions=torch.from_numpy(positions.astype(np.float64).reshape(-1, 3)),
        lattice=torch.from_numpy(lattice.astype(np.float64)),
        atom_crystal=torch.from_numpy(np.repeat(np.arange(n_rows, dtype=np.int64), n_atoms)),
        n_atoms=torch.from_numpy(n_atoms),
        species_site=torch.from_numpy(site),
        species_z=torch.from_numpy(z),
        species_occupancy=torch.from_numpy(occ),
        entry_i=torch.from_numpy(ti),
        entry_j=torch.from_numpy(tj + entry_offset),
        entry_n=torch.from_numpy(tn.astype(np.float64)),
        **index_tensors(ti, tj + entry_offset, n_total, block_width),
        labels=labels,
        ids=table["id"].to_pylist(),
        cutoff=float(cutoff),
        forces=force_labels,
        stress=stress_labels,
    )


def shard_metadata(cutoff: float, targets: Sequence[str], **extra) -> dict:
    return {"schema_version": SCHEMA_VERSION, "cutoff": float(cutoff), "targets": list(targets),
            "cfdist_version": __version__, **extra}


def read_metadata_from_schema(schema: pa.Schema) -> dict:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def write_shard(path: str | Path, table: pa.Table, metadata: dict, row_group_size: int = 1024) -> None:
    """Write ``table`` as zstd Parquet atomically: a reader never sees a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           METADATA_KEY: json.dumps(metadata).encode()})
    # No dictionary encoding: ids are unique and geometry/table values rarely repeat, so the
    # dictionary attempt only costs time and ~12% more bytes (measured on the MEGNet slice).
    with atomic_write(path, fsync=True) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_size, use_dictionary=False)


def parquet_file(path: str | Path) -> pq.ParquetFile:
    """A shard's ``ParquetFile``, local or on object storage (``s3://``, ``gs://``: the footer and
    each row group are then range requests, :mod:`cfdist.storage`)."""
    if storage.is_uri(path):
        fs, key = storage.filesystem(path)
        return pq.ParquetFile(key, filesystem=fs)
    return pq.ParquetFile(path)


def read_schema(path: str | Path) -> pa.Schema:
    """A shard's Arrow schema (one footer read), local or on object storage."""
    if storage.is_uri(path):
        return parquet_file(path).schema_arrow
    return pq.read_schema(path)


def read_shard(path: str | Path, columns: Sequence[str] | None = None) -> pa.Table:
    """Read a shard (local or on object storage), with a clear :class:`ShardError` for a truncated
    or foreign file."""
    try:
        if storage.is_uri(path):
            fs, key = storage.filesystem(path)
            table = pq.read_table(key, filesystem=fs, columns=list(columns) if columns else None)
        else:
            table = pq.read_table(path, columns=list(columns) if columns else None)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ShardError(f"{path}: not a readable Parquet shard ({exc})") from exc
    meta = read_metadata_from_schema(table.schema)
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(f"{path}: shard schema version {meta.get('schema_version')!r}, this cfdist reads "
                         f"{SCHEMA_VERSION}; rebuild the shards")
    return table
