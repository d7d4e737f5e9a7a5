"""The preprocessing driver's per-record checks in bounded memory (:mod:`cfdist.preprocess.dedupe`):
hash-partitioned spills give the same answers as the in-memory reference, and the driver's memory
for the duplicate check does not grow with the number of records."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from cfdist.preprocess import dedupe
from cfdist.preprocess.dedupe import PartitionedPairs, SplitConflict, distinct_per_split, key_hashes, repeated_values
from cfdist.preprocess.job import DEDUPE_DIR, PROGRESS_DIR, find_duplicates


def _reference_repeated(keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    uniq, counts = np.unique(keys, return_counts=True)
    return np.sort(values[np.isin(keys, uniq[counts > 1])])


@pytest.mark.parametrize("buffer_rows", [10**6, 37])  # all in memory / spilled in many flushes
def test_repeated_values_match_the_in_memory_reference(tmp_path, buffer_rows):
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 2**64, size=5000, dtype=np.uint64)
    keys[rng.choice(5000, 300)] = keys[rng.choice(5000, 300)]  # duplicates, some of them triples
    values = np.arange(5000, dtype=np.int64)
    with PartitionedPairs(tmp_path / "pairs", buffer_rows=buffer_rows, bits=4) as pairs:
        for start in range(0, 5000, 123):
            pairs.add(keys[start:start + 123], values[start:start + 123])
        spilled = (tmp_path / "pairs").exists()
        got = repeated_values(pairs)
    assert spilled == (buffer_rows < 5000)
    assert len(got) > 300 and np.array_equal(got, _reference_repeated(keys, values))
    assert not (tmp_path / "pairs").exists()  # the spill is removed


def test_partitions_hold_equal_keys_together_in_order_of_addition(tmp_path):
    keys = np.array([5, 2**63 + 5, 5, 7, 2**63 + 5], dtype=np.uint64)
    with PartitionedPairs(tmp_path / "p", buffer_rows=2, bits=1) as pairs:
        pairs.add(keys, np.arange(5))
        parts = [p.tolist() for p in pairs.partitions()]
    assert parts == [[(5, 0), (5, 2), (7, 3)], [(2**63 + 5, 1), (2**63 + 5, 4)]]


@pytest.mark.parametrize("buffer_rows", [10**6, 50])
def test_distinct_keys_per_split_and_a_key_in_two_splits(tmp_path, buffer_rows):
    groups = [f"mp-{k}" for k in range(400)]
    split_of = {g: k % 3 for k, g in enumerate(groups)}
    rows = [groups[k % 400] for k in range(2000)]  # every group 5 times
    with PartitionedPairs(tmp_path / "g", buffer_rows=buffer_rows, bits=3) as pairs:
        pairs.add(key_hashes(rows), np.array([split_of[g] for g in rows]))
        assert distinct_per_split(pairs, 3).tolist() == [134, 133, 133]
    with PartitionedPairs(tmp_path / "g2", buffer_rows=buffer_rows, bits=3) as pairs:
        pairs.add(key_hashes(rows), np.array([split_of[g] for g in rows]))
        pairs.add(key_hashes(["mp-7"]), np.array([2]))  # mp-7 is in split 1
        with pytest.raises(SplitConflict, match="splits 1 and 2"):
            distinct_per_split(pairs, 3)


def _write_chunks(out, chunks: list[dict[str, list[str]]]) -> None:
    (out / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    for index, splits in enumerate(chunks):
        record = {"shards": {split: {"ids": ids} for split, ids in splits.items()}}
        (out / PROGRESS_DIR / f"chunk-{index:06d}.json").write_text(json.dumps(record))


def test_find_duplicates_spilled_gives_the_same_rows(tmp_path, monkeypatch):
    """The same expectations as test_preprocess's in-memory case, with a write buffer of 2 pairs, so
    every chunk spills; the spill directory is gone afterwards."""
    _write_chunks(tmp_path, [{"train": ["a", "b", "c"], "val": ["d"]},
                             {"train": ["e", "a"], "test": ["b", "f"]},
                             {"val": ["a", "g"], "train": []}])
    monkeypatch.setattr(dedupe, "BUFFER_ROWS", 2)
    assert find_duplicates(tmp_path, 3) == {1: {"train": [1], "test": [0]}, 2: {"val": [0]}}
    assert not (tmp_path / PROGRESS_DIR / DEDUPE_DIR).exists()


def _peak_find_duplicates(out, n_ids: int, per_chunk: int = 4096) -> tuple[int, dict]:
    ids = [f"mp-{k}-0-{k % 7}" for k in range(n_ids)] + ["mp-3-0-3"]  # one duplicate, last
    chunks = [{"train": ids[s:s + per_chunk]} for s in range(0, len(ids), per_chunk)]
    _write_chunks(out, chunks)
    tracemalloc.start()
    try:
        found = find_duplicates(out, len(chunks))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, found


def test_the_duplicate_check_does_not_grow_with_the_corpus(tmp_path, monkeypatch):
    """20k and 200k ids: the traced peak of find_duplicates is the same (one completion record, the
    write buffer, one partition), where holding every hash and sorting them costs ~3 MB more at 200k."""
    monkeypatch.setattr(dedupe, "BUFFER_ROWS", 1 << 13)  # spill at this size, as 1 << 18 does at millions
    small, found_small = _peak_find_duplicates(tmp_path / "small", 20_000)
    large, found_large = _peak_find_duplicates(tmp_path / "large", 200_000)
    assert found_small == {4: {"train": [20_000 - 4 * 4096]}}  # the repeated id, last row of the last chunk
    assert found_large == {48: {"train": [200_000 - 48 * 4096]}}
    assert large < small + 512 * 1024, f"peak {small / 2**20:.2f} MB at 20k, {large / 2**20:.2f} MB at 200k"
