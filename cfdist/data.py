"""Shards -> training batches: columns, plain streaming reads, entry-budget packing.

(Which files a shard directory holds, and the checks before training: :mod:`cfdist.manifest`;
the order in which a training rank reads its rows, resume positions and prefetching:
:mod:`cfdist.stream`.)

    shard rows in a seeded order (cfdist.stream) --Packer--> row groups within (entries, atoms,
    structures) budgets --collate_arrow--> CrystalBatch

A batch is closed before it would exceed ``max_entries`` image-table entries or ``max_atoms``
atoms (the attention op's work and memory scale with entries), so a step's memory is bounded
whatever the mix of cell sizes, and ranks with the same budgets do about the same work. Packing
is greedy and deterministic: a batch depends only on the rows from where the previous one ended,
which is what makes a resume at a saved position exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from cfdist.shards import ShardError, parquet_file, target_columns


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
    """Stream shard files in order: rank r reads files r, r + world, ... one record batch at a time.

    Used by benchmarks and tests. Training (pretraining and fine-tuning) reads through
    :mod:`cfdist.stream` (shuffled, balanced, resumable by position), evaluation through
    :func:`cfdist.run.evaluation.split_batches`.
    """
    for path in list(paths)[rank::world_size]:
        try:
            reader = parquet_file(path)
            for record_batch in reader.iter_batches(batch_size=rows_per_read, columns=list(columns) if columns else None):
                yield pa.Table.from_batches([record_batch])
        except (pa.ArrowInvalid, OSError) as exc:
            raise ShardError(f"{path}: cannot read shard ({exc})") from exc


# The one default entry budget of a micro-batch; why this value: cfdist.run.config.DataSection.
DEFAULT_MAX_ENTRIES = 400_000


@dataclass(frozen=True)
class BatchBudget:
    """Limits of one micro-batch; a batch closes before the next structure would exceed one.

    A single structure above ``max_entries`` or ``max_atoms`` still forms a batch on its own
    (it passed preprocessing's own budget); it is counted in ``PackStats.oversize``.
    """

    max_entries: int = DEFAULT_MAX_ENTRIES
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


class Packer:
    """Greedy packing of a row stream into budgeted groups, fed one table at a time.

    :meth:`add` yields each group it closes with the row index of the fed table where the next
    group starts; the open group carries over to the next :meth:`add`; :meth:`finish` returns it.
    """

    def __init__(self, budget: BatchBudget, stats: PackStats | None = None):
        self.budget = budget
        self.stats = stats if stats is not None else PackStats()
        self.parts: list[pa.Table] = []
        self.entries = self.atoms = self.count = 0

    def add(self, table: pa.Table) -> Iterator[tuple[pa.Table, int]]:
        if table.num_rows == 0:
            return
        n_entries = np.asarray(table["n_entries"].to_numpy(), dtype=np.int64)
        n_atoms = np.asarray(table["n_atoms"].to_numpy(), dtype=np.int64)
        cuts = pack_boundaries(n_entries, n_atoms, self.budget, self.entries, self.atoms, self.count)
        start = 0
        for cut in cuts:
            self.parts.append(table.slice(start, cut - start))
            yield self._close(), cut
            start = cut
        rest = table.slice(start)
        self.parts.append(rest)
        if cuts:
            self.entries, self.atoms, self.count = int(n_entries[start:].sum()), int(n_atoms[start:].sum()), rest.num_rows
        else:
            self.entries += int(n_entries.sum())
            self.atoms += int(n_atoms.sum())
            self.count += table.num_rows

    def finish(self) -> pa.Table | None:
        return self._close() if self.count else None

    def _close(self) -> pa.Table:
        parts = [p for p in self.parts if p.num_rows]
        table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        self.parts, self.entries, self.atoms, self.count = [], 0, 0, 0
        self.stats.batches += 1
        self.stats.structures += table.num_rows
        if table.num_rows == 1 and (int(table["n_entries"][0].as_py()) > self.budget.max_entries
                                    or int(table["n_atoms"][0].as_py()) > self.budget.max_atoms):
            self.stats.oversize += 1
        return table


def pack_rows(tables: Iterable[pa.Table], budget: BatchBudget, stats: PackStats | None = None) -> Iterator[pa.Table]:
    """Re-cut a stream of shard rows into tables that fit ``budget`` (order preserved).

    The last, partial group of the stream is yielded too.
    """
    packer = Packer(budget, stats)
    for table in tables:
        for group, _ in packer.add(table):
            yield group
    last = packer.finish()
    if last is not None:
        yield last
