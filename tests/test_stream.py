"""A rank's training stream (cfdist.stream): the epoch plan (balanced disjoint blocks, per-epoch file
and window shuffles), positioned reads by row group, exact resume at any batch boundary at a cost
that does not depend on the position, and the prefetch thread.

Real shards come from the ``shard_dir`` fixture (conftest.py; 4 train files of 14/13/11/10 rows,
row groups of 4 rows).
"""

from __future__ import annotations

import threading

import numpy as np
import pyarrow.parquet as pq
import pytest

from cfdist.data import BatchBudget, PackStats, iter_local_shards, training_columns
from cfdist.manifest import ShardSet
from cfdist.shards import ShardError
from cfdist.stream import (DataCursor, EpochPlan, Position, Prefetcher, RowGroupReader, epoch_batches,
                           stream_seed)

from conftest import TARGETS

BUDGET = BatchBudget(max_entries=10_000, max_atoms=50, max_structures=5)


def _files(shard_dir, split="train"):
    return [(e.path, e.rows) for e in ShardSet(shard_dir).files(split)]


def _reader(shard_dir, cache=10):
    first = ShardSet(shard_dir).files("train")[0].path
    return RowGroupReader(training_columns(pq.read_schema(first), TARGETS), cache=cache)


def _plan_rows(plan: EpochPlan) -> list[tuple[str, int]]:
    """(file, row) of every row of the plan, window by window, before the in-window permutation."""
    out = []
    for j in range(plan.n_windows):
        for lo, hi in plan.window_slices(j):
            for seg in plan.segments(lo, hi):
                out += [(seg.path, r) for r in range(seg.start, seg.stop)]
    return out


def _ids(batches) -> list[list[str]]:
    return [t["id"].to_pylist() for t, _ in batches]


# ----------------------------------------------------------------------------- plan
@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
@pytest.mark.parametrize("window,lanes", [(1, 1), (7, 3), (64, 8), (1000, 4)])
def test_plan_gives_every_row_to_exactly_one_rank_in_balanced_blocks(world_size, window, lanes):
    rng = np.random.default_rng(world_size * 100 + window)
    files = [(f"f{k}", int(n)) for k, n in enumerate(rng.integers(0, 40, size=9))]
    total = sum(n for _, n in files)
    plans = [EpochPlan(files, seed=3, epoch=1, rank=r, world_size=world_size, window=window, lanes=lanes)
             for r in range(world_size)]
    per_rank = [_plan_rows(p) for p in plans]
    everything = [row for rows in per_rank for row in rows]
    assert len(everything) == len(set(everything)) == total
    assert {(f, r) for f, n in files for r in range(n)} == set(everything)
    assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1
    for p in plans:  # window sizes add up; every window but the last lane's tails is full
        assert sum(p.window_size(j) for j in range(p.n_windows)) == p.rows
        assert all(p.window_size(j) <= p.per_lane * p.n_lanes for j in range(p.n_windows))


def test_file_order_is_shuffled_per_epoch_the_same_on_every_rank():
    files = [(f"f{k}", 10) for k in range(12)]
    order = {e: EpochPlan(files, seed=0, epoch=e, rank=0, world_size=1).paths for e in range(3)}
    assert len({tuple(o) for o in order.values()}) == 3 and sorted(order[0]) == sorted(p for p, _ in files)
    assert EpochPlan(files, seed=0, epoch=1, rank=1, world_size=2).paths == order[1]
    assert EpochPlan(files, seed=1, epoch=1).paths != order[1]
    fixed = EpochPlan(files, seed=0, epoch=2, window=1, shuffle_files=False, shuffle_rows=False)
    assert fixed.paths == [p for p, _ in files] and fixed.permutation(0) is None


def test_windows_mix_lanes_from_distant_parts_of_the_block():
    files = [(f"f{k}", 100) for k in range(8)]
    plan = EpochPlan(files, seed=0, epoch=0, window=64, lanes=8, shuffle_files=False)
    sources = {seg.path for lo, hi in plan.window_slices(0) for seg in plan.segments(lo, hi)}
    assert sources == {p for p, _ in files}  # window 0 draws 8 rows from each of the 8 files
    assert plan.per_lane == 8 and plan.n_windows == 13


def test_stream_seeds_differ_per_key():
    seeds = {stream_seed(0, e, r, j) for e in range(3) for r in range(3) for j in range(3)}
    assert len(seeds) == 27 and stream_seed(1, 2) == stream_seed(1, 2)


def test_rank_out_of_range_is_refused():
    with pytest.raises(ValueError, match="rank 2 outside world size 2"):
        EpochPlan([("f", 3)], seed=0, epoch=0, rank=2, world_size=2)


# ----------------------------------------------------------------------------- reading
def test_reader_reads_the_rows_the_plan_names(shard_dir):
    """Without shuffles the plan's rows, read through row groups, are the files' rows in order."""
    files = _files(shard_dir)
    plan = EpochPlan(files, seed=0, epoch=0, window=1, lanes=1, shuffle_files=False, shuffle_rows=False)
    reader = _reader(shard_dir)
    got = [i for j in range(plan.n_windows) for i in reader.window(plan, j)["id"].to_pylist()]
    want = [i for t in iter_local_shards([p for p, _ in files], columns=["id"]) for i in t["id"].to_pylist()]
    assert got == want and len(got) == 48
    assert reader.decoded == sum(-(-n // 4) for _, n in files)  # each 4-row group decoded once


def test_shuffled_epoch_is_a_permutation_and_differs_between_epochs(shard_dir):
    ids = {}
    for epoch in (0, 1):
        plan = EpochPlan(_files(shard_dir), seed=5, epoch=epoch, window=16, lanes=3)
        ids[epoch] = [i for j in range(plan.n_windows) for i in _reader(shard_dir).window(plan, j)["id"].to_pylist()]
    assert sorted(ids[0]) == sorted(ids[1]) and len(set(ids[0])) == 48 and ids[0] != ids[1]


def test_a_shard_shorter_than_the_manifest_says_is_named(shard_dir):
    path, rows = _files(shard_dir)[0]
    plan = EpochPlan([(path, rows + 5)], seed=0, epoch=0, window=1, lanes=1, shuffle_files=False)
    with pytest.raises(ShardError, match=f"has {rows} rows, the manifest says at least {rows + 5}"):
        _reader(shard_dir).window(plan, plan.n_windows - 1)


# ----------------------------------------------------------------------------- resume
@pytest.mark.parametrize("world_size,rank", [(1, 0), (2, 1), (3, 2)])
@pytest.mark.parametrize("window,lanes", [(1, 1), (6, 2), (16, 3)])
def test_resume_at_every_batch_boundary_yields_the_rest_of_the_epoch(shard_dir, world_size, rank, window, lanes):
    plan = EpochPlan(_files(shard_dir), seed=11, epoch=2, rank=rank, world_size=world_size, window=window, lanes=lanes)
    full = list(epoch_batches(plan, _reader(shard_dir), BUDGET))
    assert sum(t.num_rows for t, _ in full) == plan.rows and len(full) > 2
    assert full[-1][1] == Position(plan.n_windows, 0) and [p for _, p in full] == sorted(p for _, p in full)
    for k in range(len(full)):
        resumed = list(epoch_batches(plan, _reader(shard_dir), BUDGET, start=full[k][1]))
        assert _ids(resumed) == _ids(full[k + 1:]), k


def test_resume_reads_only_the_windows_from_its_position(shard_dir):
    """Late in the epoch, a resume decodes about one window's row groups before its first batch,
    not the ones before its position (the cost does not grow with the position)."""
    plan = EpochPlan(_files(shard_dir), seed=1, epoch=0, window=8, lanes=2)
    full = list(epoch_batches(plan, _reader(shard_dir), BUDGET))
    late = full[-3][1]
    reader = _reader(shard_dir)
    stream = epoch_batches(plan, reader, BUDGET, start=late)
    next(stream)
    assert late.window >= plan.n_windows - 2 and reader.decoded <= 2 * plan.n_lanes
    full_reader = _reader(shard_dir)
    list(epoch_batches(plan, full_reader, BUDGET))
    assert full_reader.decoded > 3 * reader.decoded


def test_data_cursor_round_trips_and_refuses_a_resume_it_cannot_make_exact():
    cursor = DataCursor(epoch=2, batches=9, positions=[[3, 1], [2, 7]], world_size=2)
    assert DataCursor.from_dict(cursor.to_dict()) == cursor
    assert cursor.start_for(1, 2) == Position(2, 7)
    with pytest.raises(ValueError, match="taken with 2 workers, this run has 3"):
        cursor.start_for(0, 3)
    with pytest.raises(ValueError, match="epoch 3, batch 7: no stream positions"):
        DataCursor(epoch=3, batches=7).start_for(0, 4)
    assert DataCursor.from_dict(None) == DataCursor() and DataCursor().start_for(0, 1) == Position()
    assert DataCursor(epoch=5).start_for(3, 4) == Position()  # the start of an epoch needs no positions


# ----------------------------------------------------------------------------- prefetch
def _make_epoch(shard_dir, **plan_kwargs):
    reader = _reader(shard_dir)

    def make(epoch, start):
        plan = EpochPlan(_files(shard_dir), seed=4, epoch=epoch, **plan_kwargs)
        return epoch_batches(plan, reader, BUDGET, start)
    return make


def test_prefetcher_runs_epochs_back_to_back_with_end_markers(shard_dir):
    make = _make_epoch(shard_dir, window=8, lanes=2)
    want = {e: _ids(make(e, Position())) for e in (3, 4)}
    fetch = Prefetcher(make, lambda t: t["id"].to_pylist(), first_epoch=3, depth=2)
    try:
        for e in (3, 4):
            got = []
            while (item := fetch.next()).batch is not None:
                assert item.epoch == e
                got.append(item.batch)
            assert item.epoch == e and got == want[e]
        assert fetch.next().epoch == 5  # already preparing the next epoch
    finally:
        fetch.close()
    assert not fetch.thread.is_alive()


def test_prefetcher_resumes_at_a_position(shard_dir):
    make = _make_epoch(shard_dir, window=8, lanes=2)
    full = list(make(0, Position()))
    fetch = Prefetcher(make, lambda t: t["id"].to_pylist(), first_epoch=0, start=full[2][1])
    try:
        assert fetch.next().batch == full[3][0]["id"].to_pylist()
        assert fetch.skip_epoch(0) == sum(t.num_rows for t, _ in full[4:])
        assert fetch.next().epoch == 1
    finally:
        fetch.close()


def test_prefetcher_hands_errors_to_the_consumer_and_close_never_hangs(shard_dir):
    def broken(epoch, start):
        yield from _make_epoch(shard_dir, window=4)(epoch, start)
        raise ShardError("part-9: cannot read shard")

    fetch = Prefetcher(broken, lambda t: t, first_epoch=0, depth=1)
    with pytest.raises(ShardError, match="part-9"):
        while True:
            fetch.next()
    fetch.close()
    blocked = Prefetcher(_make_epoch(shard_dir, window=4), lambda t: t, first_epoch=0, depth=1)
    blocked.next()  # the thread now waits on a full queue
    closer = threading.Thread(target=blocked.close)
    closer.start()
    closer.join(timeout=10)
    assert not closer.is_alive() and not blocked.thread.is_alive()


def test_pack_stats_count_what_the_epoch_packed(shard_dir):
    stats = PackStats()
    plan = EpochPlan(_files(shard_dir), seed=0, epoch=0, window=8, lanes=2)
    batches = list(epoch_batches(plan, _reader(shard_dir), BUDGET, stats=stats))
    assert stats.batches == len(batches) and stats.structures == 48
