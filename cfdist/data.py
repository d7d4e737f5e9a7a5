"""Shards -> training batches: streaming reads, deterministic shuffling, entry-budget packing.

(Which files a shard directory holds, and the checks before training: :mod:`cfdist.manifest`.)

The trainer never holds a dataset: every rank streams Arrow record batches (from Ray Data's
``get_dataset_shard`` or, without Ray, straight from the Parquet files), and this module turns
that stream into batches whose cost is bounded:

    stream of Arrow tables --ShuffleBuffer--> rows in a seeded order
                           --pack_rows------> row groups within (entries, atoms, structures) budgets
                           --collate_arrow--> CrystalBatch

A batch is closed before it would exceed ``max_entries`` image-table entries or ``max_atoms``
atoms (the attention op's work and memory scale with entries), so a step's memory is bounded
whatever the mix of cell sizes, and ranks with the same budgets do about the same work.

Everything here is deterministic given the input order and the seed, which is what makes
mid-epoch resume exact: replaying the epoch and discarding the first ``cursor.batches``
batches reproduces the remaining ones (see :class:`DataCursor`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cfdist.shards import ShardError, target_columns


# ----------------------------------------------------------------------------- streaming
TRAINING_COLUMNS = ("id", "n_atoms", "numbers", "lattice", "positions", "disorder_site", "disorder_z",
                    "disorder_occupancy", "n_entries", "table_counts", "table_code")


def training_columns(schema: pa.Schema, targets: Sequence[str], *, forces: bool = False,
                     stress: bool = False) -> list[str]:
    """Columns a training batch needs (skips ``source``, unused targets, and the ``forces`` /
    ``stress`` columns unless the run trains on them and the shards hold them)."""
    have = set(target_columns(schema))
    extra = [name for name, wanted in (("forces", forces), ("stress", stress)) if wanted and name in schema.names]
    return list(TRAINING_COLUMNS) + [f"y.{t}" for t in targets if t in have] + extra


def iter_local_shards(paths: Sequence[str | Path], *, rank: int = 0, world_size: int = 1,
                      columns: Sequence[str] | None = None, rows_per_read: int = 1024) -> Iterator[pa.Table]:
    """Stream shard files without Ray: rank r reads files r, r + world, ... (in the given order).

    Used by pretraining without Ray (one process or torchrun ranks), by ``cfdist evaluate`` /
    ``predict`` on shards, and by tests; Ray Train runs use ``get_dataset_shard`` instead, and
    fine-tuning reads whole splits into memory (``cfdist.finetune.loop.SplitData``). Files are
    read one record batch at a time.
    """
    for path in list(paths)[rank::world_size]:
        try:
            reader = pq.ParquetFile(path)
            for record_batch in reader.iter_batches(batch_size=rows_per_read, columns=list(columns) if columns else None):
                yield pa.Table.from_batches([record_batch])
        except (pa.ArrowInvalid, OSError) as exc:
            raise ShardError(f"{path}: cannot read shard ({exc})") from exc


class ShuffleBuffer:
    """Seeded streaming shuffle over a window of ``size`` rows (``size`` <= 1: pass-through).

    Rows enter in stream order; once ``size`` rows are buffered, a seeded permutation of the
    buffer is emitted in chunks of ``size // 2`` rows and the rest wait for the next input, so
    a row can move up to about ``size`` places. The output depends only on the input order and
    the seed.
    """

    def __init__(self, size: int, seed: int):
        self.size = int(size)
        self.rng = np.random.default_rng(seed)
        self.pending: list[pa.Table] = []
        self.n_pending = 0

    def __call__(self, tables: Iterable[pa.Table]) -> Iterator[pa.Table]:
        for table in tables:
            if self.size <= 1:
                yield table
                continue
            self.pending.append(table)
            self.n_pending += table.num_rows
            while self.n_pending >= self.size:
                yield self._emit(self.size // 2)
        if self.n_pending:
            yield self._emit(self.n_pending)

    def _emit(self, n: int) -> pa.Table:
        buffer = pa.concat_tables(self.pending) if len(self.pending) > 1 else self.pending[0]
        order = self.rng.permutation(buffer.num_rows)
        out = buffer.take(pa.array(order[:n]))
        rest = buffer.take(pa.array(order[n:]))
        self.pending, self.n_pending = ([rest] if rest.num_rows else []), rest.num_rows
        return out


@dataclass(frozen=True)
class BatchBudget:
    """Limits of one micro-batch; a batch closes before the next structure would exceed one.

    A single structure above ``max_entries`` or ``max_atoms`` still forms a batch on its own
    (it passed preprocessing's own budget); it is counted in ``PackStats.oversize``.
    """

    max_entries: int = 400_000
    max_atoms: int = 4_096
    max_structures: int = 256

    def __post_init__(self):
        for name in ("max_entries", "max_atoms", "max_structures"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"BatchBudget.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class PackStats:
    batches: int = 0
    structures: int = 0
    oversize: int = 0


def pack_boundaries(n_entries: np.ndarray, n_atoms: np.ndarray, budget: BatchBudget,
                    start_entries: int = 0, start_atoms: int = 0, start_count: int = 0) -> list[int]:
    """Greedy split points of a row sequence into budgeted groups.

    Returns the row indices where a new group starts (excluding 0). ``start_*`` describe the
    group already open before row 0 (carried over from the previous table).
    """
    cuts = []
    entries, atoms, count = start_entries, start_atoms, start_count
    for k, (e, a) in enumerate(zip(n_entries.tolist(), n_atoms.tolist())):
        if count and (entries + e > budget.max_entries or atoms + a > budget.max_atoms
                      or count + 1 > budget.max_structures):
            cuts.append(k)
            entries, atoms, count = 0, 0, 0
        entries, atoms, count = entries + e, atoms + a, count + 1
    return cuts


def pack_rows(tables: Iterable[pa.Table], budget: BatchBudget, stats: PackStats | None = None) -> Iterator[pa.Table]:
    """Re-cut a stream of shard rows into tables that fit ``budget`` (order preserved).

    The last, partial group of the stream is yielded too.
    """
    stats = stats if stats is not None else PackStats()
    open_parts: list[pa.Table] = []
    open_entries = open_atoms = open_count = 0
    for table in tables:
        if table.num_rows == 0:
            continue
        n_entries = np.asarray(table["n_entries"].to_numpy(), dtype=np.int64)
        n_atoms = np.asarray(table["n_atoms"].to_numpy(), dtype=np.int64)
        cuts = pack_boundaries(n_entries, n_atoms, budget, open_entries, open_atoms, open_count)
        start = 0
        for cut in cuts:
            open_parts.append(table.slice(start, cut - start))
            yield _close(open_parts, budget, stats)
            open_parts, start = [], cut
        rest = table.slice(start)
        open_parts.append(rest)
        if cuts:
            open_entries, open_atoms, open_count = int(n_entries[start:].sum()), int(n_atoms[start:].sum()), rest.num_rows
        else:
            open_entries += int(n_entries.sum())
            open_atoms += int(n_atoms.sum())
            open_count += table.num_rows
    if open_count:
        yield _close(open_parts, budget, stats)


def _close(parts: list[pa.Table], budget: BatchBudget, stats: PackStats) -> pa.Table:
    parts = [p for p in parts if p.num_rows]
    table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
    stats.batches += 1
    stats.structures += table.num_rows
    if table.num_rows == 1 and (int(table["n_entries"][0].as_py()) > budget.max_entries
                                or int(table["n_atoms"][0].as_py()) > budget.max_atoms):
        stats.oversize += 1
    return table


# ----------------------------------------------------------------------------- resume
@dataclass
class DataCursor:
    """Where a rank is in its data stream; saved in every checkpoint.

    ``batches`` counts the micro-batches this rank has consumed in the current ``epoch``.
    Resuming replays the epoch's stream (same order: Ray Data runs with ``preserve_order``
    and the shuffle is seeded by (seed, epoch, rank)) and discards that many batches, so the
    resumed run sees exactly the batches the uninterrupted run would have.
    """

    epoch: int = 0
    batches: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "DataCursor":
        # checkpoints of cfdist <= 0.1.0 also carry an unused "structures" count
        return cls(epoch=int(data.get("epoch", 0)), batches=int(data.get("batches", 0))) if data else cls()


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Independent, reproducible shuffle seed per (run seed, epoch, rank)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def budgeted_batches(tables: Iterable[pa.Table], budget: BatchBudget, *, shuffle_rows: int, seed: int,
                     epoch: int, rank: int, skip_batches: int = 0,
                     stats: PackStats | None = None) -> Iterator[pa.Table]:
    """The full per-rank pipeline: shuffle -> pack -> skip the first ``skip_batches`` (resume)."""
    shuffled = ShuffleBuffer(shuffle_rows, epoch_seed(seed, epoch, rank))(tables)
    for k, table in enumerate(pack_rows(shuffled, budget, stats)):
        if k >= skip_batches:
            yield table
