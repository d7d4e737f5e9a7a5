"""One rank's training stream: which rows it reads in an epoch, in which order, where it resumes,
and a background thread that keeps batches ready across epoch boundaries.

Epoch plan (:class:`EpochPlan`, a pure function of the split's file list, seed, epoch, rank and
world size; nothing is read to make it):

1. the split's shard files in an order permuted per epoch, seeded by (seed, epoch), the same on
   every rank;
2. their rows, concatenated in that order, are the epoch's stream of N rows; rank r of W owns
   the contiguous block [r N / W, (r + 1) N / W), so ranks differ by at most one row and read
   disjoint files (mostly);
3. the block is cut into ``lanes`` contiguous lanes; window j is the next ``ceil(window / lanes)``
   rows of every lane, permuted with a seed of (seed, epoch, rank, j).

So every window mixes rows from ``lanes`` distant places of the block (different files, as a
rule), and a rank's place in its epoch is a :class:`Position` (window j, offset k into the
permuted window). Resuming there reads window j (one positioned Parquet read per lane) and drops
k rows: the cost does not depend on how far into the epoch the checkpoint was taken. Packing
(:class:`cfdist.data.Packer`) is greedy and a batch boundary leaves no open group, so the batches
after a resume are exactly those of the uninterrupted run.

Reads go by Parquet row group (:class:`RowGroupReader`, a small LRU of decoded row groups: every
lane reads its rows in order, so each row group is decoded about once per epoch); memory is
bounded by ``lanes + 2`` decoded row groups plus the window, whatever the corpus size.

:class:`Prefetcher` runs the whole stream, read -> permute -> pack -> collate, in one thread,
``depth`` batches ahead, and goes on into the next epoch while the trainer still works on the
current one, so an epoch boundary costs no more data wait than any other step.
"""

from __future__ import annotations

import math
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cfdist.data import BatchBudget, Packer, PackStats
from cfdist.shards import ShardError, parquet_file


def stream_seed(*key: int) -> int:
    """Independent, reproducible seed per key, e.g. (run seed, epoch) or (seed, epoch, rank, window)."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0])


@dataclass(frozen=True, order=True)
class Position:
    """A rank's place in its epoch: ``offset`` rows into (permuted) ``window``."""

    window: int = 0
    offset: int = 0


@dataclass(frozen=True)
class Segment:
    """Rows ``start:stop`` of one shard file."""

    path: str
    start: int
    stop: int


class EpochPlan:
    """The order in which rank ``rank`` of ``world_size`` reads ``files`` in ``epoch`` (module doc).

    Args:
        files: (path, rows) of the split's shard files, in manifest order.
        window: rows per shuffle window (<= 1: one row per lane and no permutation).
        lanes: places of the rank's block a window draws from (clipped to the block's rows).
        shuffle_files: permute the file order per epoch; ``shuffle_rows``: permute each window.
    """

    def __init__(self, files: Sequence[tuple[str | Path, int]], *, seed: int, epoch: int, rank: int = 0,
                 world_size: int = 1, window: int = 2048, lanes: int = 8, shuffle_files: bool = True,
                 shuffle_rows: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.seed, self.epoch, self.rank = int(seed), int(epoch), int(rank)
        self.shuffle_rows = bool(shuffle_rows) and window > 1
        order = np.arange(len(files))
        if shuffle_files and len(files) > 1:
            order = np.random.default_rng(stream_seed(seed, epoch)).permutation(len(files))
        self.paths = [str(files[i][0]) for i in order]
        rows = np.array([int(files[i][1]) for i in order], dtype=np.int64)
        self.file_start = np.concatenate([[0], np.cumsum(rows)])  # stream row where each file begins
        n = int(self.file_start[-1])
        begin, end = rank * n // world_size, (rank + 1) * n // world_size
        self.rows = end - begin
        n_lanes = max(1, min(int(lanes), self.rows))
        self.lane_start = np.array([begin + i * self.rows // n_lanes for i in range(n_lanes + 1)], dtype=np.int64)
        self.lane_rows = np.diff(self.lane_start)
        self.per_lane = max(1, math.ceil(max(int(window), 1) / n_lanes))
        self.n_windows = math.ceil(int(self.lane_rows.max()) / self.per_lane) if self.rows else 0

    @property
    def n_lanes(self) -> int:
        return len(self.lane_rows)

    def window_slices(self, j: int) -> list[tuple[int, int]]:
        """Per lane, the stream rows [lo, hi) of window ``j`` (empty lanes omitted)."""
        out = []
        for start, n in zip(self.lane_start[:-1].tolist(), self.lane_rows.tolist()):
            lo, hi = min(j * self.per_lane, n), min((j + 1) * self.per_lane, n)
            if hi > lo:
                out.append((start + lo, start + hi))
        return out

    def window_size(self, j: int) -> int:
        return sum(hi - lo for lo, hi in self.window_slices(j))

    def segments(self, lo: int, hi: int) -> list[Segment]:
        """Stream rows [lo, hi) as per-file row ranges, in stream order."""
        out = []
        k = int(np.searchsorted(self.file_start, lo, side="right")) - 1
        while lo < hi:
            stop = min(hi, int(self.file_start[k + 1]))
            if stop > lo:
                base = int(self.file_start[k])
                out.append(Segment(self.paths[k], lo - base, stop - base))
            lo, k = stop, k + 1
        return out

    def permutation(self, j: int) -> np.ndarray | None:
        """The order of window ``j``'s rows (None: as read)."""
        if not self.shuffle_rows:
            return None
        return np.random.default_rng(stream_seed(self.seed, self.epoch, self.rank, j)).permutation(self.window_size(j))


class RowGroupReader:
    """Reads row ranges of shard files through an LRU of decoded row groups.

    ``cache`` row groups (and as many open file footers) are kept; lanes read forward, so with
    ``cache >= lanes + 1`` every row group is decoded about once per pass.
    """

    def __init__(self, columns: Sequence[str] | None = None, cache: int = 10):
        self.columns = list(columns) if columns else None
        self.cache_size = max(2, int(cache))
        self.groups: OrderedDict[tuple[str, int], pa.Table] = OrderedDict()
        self.footers: OrderedDict[str, tuple[pq.ParquetFile, np.ndarray]] = OrderedDict()
        self.decoded = 0  # row groups decoded (for benchmarks)
        # bytes the reads fetch: footers + the column chunks of the row groups decoded (on object
        # storage each is a range request of that size; bench/storage.py reports it per step)
        self.bytes_read = 0

    def _file(self, path: str) -> tuple[pq.ParquetFile, np.ndarray]:
        if path in self.footers:
            self.footers.move_to_end(path)
            return self.footers[path]
        try:
            file = parquet_file(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise ShardError(f"{path}: cannot read shard ({exc})") from exc
        meta = file.metadata
        self.bytes_read += meta.serialized_size + 8  # footer + its length and magic
        starts = np.concatenate([[0], np.cumsum([meta.row_group(g).num_rows for g in range(meta.num_row_groups)])])
        self.footers[path] = (file, starts.astype(np.int64))
        while len(self.footers) > self.cache_size:
            self.footers.popitem(last=False)
        return self.footers[path]

    def _group(self, path: str, g: int) -> pa.Table:
        key = (path, g)
        if key in self.groups:
            self.groups.move_to_end(key)
            return self.groups[key]
        file, _ = self._file(path)
        try:
            table = file.read_row_group(g, columns=self.columns)
        except (pa.ArrowInvalid, OSError) as exc:
            raise ShardError(f"{path}: cannot read row group {g} ({exc})") from exc
        self.decoded += 1
        group = file.metadata.row_group(g)
        chunks = (group.column(c) for c in range(group.num_columns))
        self.bytes_read += sum(ch.total_compressed_size for ch in chunks  # nested: "numbers.list.element"
                               if any(ch.path_in_schema == n or ch.path_in_schema.startswith(n + ".")
                                      for n in table.column_names))
        self.groups[key] = table
        while len(self.groups) > self.cache_size:
            self.groups.popitem(last=False)
        return table

    def read(self, segment: Segment) -> list[pa.Table]:
        """The segment's rows, as slices of row groups."""
        _, starts = self._file(segment.path)
        if segment.stop > int(starts[-1]):
            raise ShardError(f"{segment.path}: has {int(starts[-1])} rows, the manifest says at least "
                             f"{segment.stop} (replaced file?)")
        out = []
        g = int(np.searchsorted(starts, segment.start, side="right")) - 1
        lo = segment.start
        while lo < segment.stop:
            g_start, g_stop = int(starts[g]), int(starts[g + 1])
            hi = min(segment.stop, g_stop)
            out.append(self._group(segment.path, g).slice(lo - g_start, hi - lo))
            lo, g = hi, g + 1
        return out

    def window(self, plan: EpochPlan, j: int) -> pa.Table:
        """Window ``j`` of ``plan``: its rows from every lane, permuted."""
        parts = [t for lo, hi in plan.window_slices(j) for seg in plan.segments(lo, hi) for t in self.read(seg)]
        table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        order = plan.permutation(j)
        if order is None:
            return table
        # one contiguous chunk first: Arrow's take over a many-chunk list column is ~6x slower
        # than the copy plus a take over one chunk (measured, 2,048 rows of image tables)
        return table.combine_chunks().take(pa.array(order))


def epoch_batches(plan: EpochPlan, reader: RowGroupReader, budget: BatchBudget, start: Position = Position(),
                  stats: PackStats | None = None) -> Iterator[tuple[pa.Table, Position]]:
    """Packed batches of one rank's epoch from ``start``; each with the position right after it.

    A window boundary does not close a batch (the packer carries its open group over), so the
    batches are the same whether the epoch is read from the start or resumed at any position a
    previous batch ended at.
    """
    packer = Packer(budget, stats)
    for j in range(start.window, plan.n_windows):
        window = reader.window(plan, j)
        first = start.offset if j == start.window else 0
        if first:
            window = window.slice(first)
        for table, next_row in packer.add(window):
            yield table, Position(j, first + next_row)
    last = packer.finish()
    if last is not None:
        yield last, Position(plan.n_windows, 0)


# ----------------------------------------------------------------------------- resume
@dataclass
class DataCursor:
    """Where every rank is in its training stream; saved in every checkpoint.

    ``batches``: micro-batches each rank has consumed in ``epoch`` (ranks run in lockstep).
    ``positions``: per rank, the [window, offset] its next batch starts at, valid for
    ``world_size`` ranks; empty at the start of an epoch.
    ``mixture``: a dataset mixture's stream (:func:`cfdist.mixture.mixture_batches`; no epochs of
    its own, so ``epoch`` stays 0 and ``batches`` counts every draw): per rank, the flat
    (epoch, window, offset) of each dataset's own stream.
    """

    epoch: int = 0
    batches: int = 0
    positions: list[list[int]] = field(default_factory=list)
    world_size: int = 0
    mixture: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = {"epoch": self.epoch, "batches": self.batches, "positions": [list(p) for p in self.positions],
               "world_size": self.world_size}
        if self.mixture:
            out["mixture"] = [list(p) for p in self.mixture]
        return out

    @classmethod
    def from_dict(cls, data: dict | None) -> "DataCursor":
        if not data:
            return cls()
        return cls(epoch=int(data.get("epoch", 0)), batches=int(data.get("batches", 0)),
                   positions=[[int(w), int(o)] for w, o in data.get("positions", [])],
                   world_size=int(data.get("world_size", 0)),
                   mixture=[[int(v) for v in p] for p in data.get("mixture", [])])

    def start_for(self, rank: int, world_size: int) -> Position:
        """The position ``rank`` of ``world_size`` reads on from when resuming this cursor."""
        if self.batches == 0:
            return Position()
        if not self.positions:
            raise ValueError(f"data cursor at epoch {self.epoch}, batch {self.batches}: no stream positions, so "
                             f"no exact mid-epoch resume (every checkpoint cfdist writes carries them)")
        if self.world_size != world_size:
            raise ValueError(f"the checkpoint was taken with {self.world_size} workers, this run has {world_size}: "
                             f"an exact mid-epoch resume needs the same number (or start the next epoch afresh)")
        return Position(*self.positions[rank])


# ----------------------------------------------------------------------------- prefetch
@dataclass
class StreamItem:
    """A prepared batch (``batch`` is None at the end of ``epoch``'s stream for this rank)."""

    epoch: int
    batch: Any
    position: Position
    rows: int = 0


class Prefetcher:
    """Runs ``make_epoch(epoch, start)`` for ``first_epoch`` (from ``start``), then
    ``first_epoch + 1``, ... (from their beginning) in a daemon thread and
    hands out :class:`StreamItem` s, ``depth`` ahead; ``prepare`` (e.g. collation) runs in the
    thread too. Each epoch ends with an item whose ``batch`` is None.

    Exceptions in the thread re-raise in :meth:`next`. ``close()`` stops the thread.
    """

    _STOP = object()

    def __init__(self, make_epoch: Callable[[int, Position], Iterator[tuple[pa.Table, Position]]],
                 prepare: Callable[[pa.Table], Any], *, first_epoch: int, start: Position = Position(),
                 depth: int = 4):
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(make_epoch, prepare, first_epoch, start),
                                       name="cfdist-prefetch", daemon=True)
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, make_epoch, prepare, epoch, start) -> None:
        try:
            while not self.stopped.is_set():
                position = start
                for table, position in make_epoch(epoch, start):
                    if not self._put(StreamItem(epoch, prepare(table), position, table.num_rows)):
                        return
                if not self._put(StreamItem(epoch, None, position)):
                    return
                epoch, start = epoch + 1, Position()
        except BaseException as exc:  # handed to the consumer
            self._put(exc)

    def next(self) -> StreamItem:
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def skip_epoch(self, epoch: int) -> int:
        """Drop the rest of ``epoch``'s items (through its end marker); returns the rows dropped."""
        rows = 0
        while True:
            item = self.next()
            if item.epoch != epoch:
                raise RuntimeError(f"stream out of order: expected the end of epoch {epoch}, got epoch {item.epoch}")
            if item.batch is None:
                return rows
            rows += item.rows

    def close(self) -> None:
        self.stopped.set()
        while self.thread.is_alive():
            try:
                self.queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self.thread.join()
