"""The preprocessing driver's checks over every record (duplicate ids, distinct split groups) in
bounded memory, whatever the corpus size.

Both checks compare 64-bit hashes of strings across the whole corpus. Holding every hash in one
array costs the driver 8-16 bytes per record (~1.6 GB at 100 M frames, plus the sort's copies).
Instead, :class:`PartitionedPairs` spills ``(hash, value)`` pairs to disk as they are read, split
by the hash's top :data:`PARTITION_BITS` bits into partitions, and hands them back one partition at a
time: equal hashes always land in the same partition, so each check runs per partition, sorting
1/512 of the pairs. The driver holds one write buffer (:data:`BUFFER_ROWS` pairs, 4 MB) and one
partition (3 MB at 100 M records), each with the ~3x of a sort's copies: ~20 MB, flat up to ~100 M
records, growing by 1/512 of the corpus beyond. A corpus that fits the write buffer (262,144
records) never touches the disk.

    duplicate ids:   pairs (hash of the id, position in input order) -> :func:`repeated_values`
                     gives the positions whose hash repeats; only those ids are then compared
                     as strings (a hash collision between different ids drops nothing)
    split groups:    pairs (hash of the group key, split index) -> :func:`distinct_per_split`
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

PARTITION_BITS = 9  # 512 partitions
BUFFER_ROWS = 1 << 18  # pairs held before a flush to the partition files (4 MB)
PAIR = np.dtype([("key", "<u8"), ("value", "<i8")])


def key_hashes(keys: Sequence[str]) -> np.ndarray:
    """(N,) uint64 hashes (blake2b, 8 bytes) of strings: ids and group keys are compared as these."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") for k in keys),
                       dtype=np.uint64, count=len(keys))


class PartitionedPairs:
    """``(key uint64, value int64)`` pairs written in batches and read back one hash partition at a time.

    Partition ``p`` holds the pairs whose key's top :data:`PARTITION_BITS` bits are ``p``, in the
    order they were added. Files live in ``directory`` (created on the first flush, removed by
    :meth:`close` / the ``with`` block). Use once: add everything, then iterate :meth:`partitions`.
    """

    def __init__(self, directory: Path, buffer_rows: int | None = None, bits: int | None = None):
        """``buffer_rows`` / ``bits``: default :data:`BUFFER_ROWS` / :data:`PARTITION_BITS` (read at
        construction, so a test can make a small corpus spill)."""
        self.directory = Path(directory)
        self.buffer_rows = int(BUFFER_ROWS if buffer_rows is None else buffer_rows)
        self.bits = int(PARTITION_BITS if bits is None else bits)
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._spilled = False
        self.count = 0

    def __enter__(self) -> "PartitionedPairs":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._buffer, self._buffered = [], 0
        if self._spilled:
            shutil.rmtree(self.directory, ignore_errors=True)

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Add pairs ``keys[k], values[k]`` (equal lengths)."""
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys but {len(values)} values")
        pairs = np.empty(len(keys), dtype=PAIR)
        pairs["key"], pairs["value"] = keys, values
        self._buffer.append(pairs)
        self._buffered += len(pairs)
        self.count += len(pairs)
        if self._buffered >= self.buffer_rows:
            self._flush()

    def _path(self, part: int) -> Path:
        return self.directory / f"part-{part:04d}.bin"

    def _flush(self) -> None:
        if not self._buffered:
            return
        if not self._spilled:
            shutil.rmtree(self.directory, ignore_errors=True)  # leftovers of a killed run
            self.directory.mkdir(parents=True)
            self._spilled = True
        pairs = np.concatenate(self._buffer)
        self._buffer, self._buffered = [], 0
        part = (pairs["key"] >> np.uint64(64 - self.bits)).astype(np.int64)
        order = np.argsort(part, kind="stable")  # keeps the order of addition inside a partition
        pairs, part = pairs[order], part[order]
        bounds = np.searchsorted(part, np.arange(2**self.bits + 1))
        for p in np.flatnonzero(np.diff(bounds)):
            with open(self._path(int(p)), "ab") as f:
                f.write(pairs[bounds[p]:bounds[p + 1]].tobytes())

    def partitions(self) -> Iterator[np.ndarray]:
        """Every non-empty partition as a ``PAIR`` array (all pairs at once when nothing was spilled)."""
        if not self._spilled:
            if self._buffered:
                yield np.concatenate(self._buffer)
            return
        self._flush()
        for p in range(2**self.bits):
            path = self._path(p)
            if path.exists():
                yield np.fromfile(path, dtype=PAIR)


def repeated_values(pairs: PartitionedPairs) -> np.ndarray:
    """Sorted values of every pair whose key occurs more than once (int64): the positions whose
    id hash repeats, for :func:`cfdist.preprocess.job.find_duplicates`."""
    found = []
    for part in pairs.partitions():
        order = np.argsort(part["key"], kind="stable")
        keys = part["key"][order]
        repeated = np.flatnonzero(keys[1:] == keys[:-1]) + 1
        if len(repeated):
            found.append(part["value"][order][np.union1d(repeated, repeated - 1)])
    return np.unique(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)


class SplitConflict(ValueError):
    """A group key found in two splits (the split is a function of the group key: a bug)."""

    def __init__(self, first: int, second: int):
        super().__init__(f"a split group is in splits {first} and {second}")
        self.first, self.second = first, second


def distinct_per_split(pairs: PartitionedPairs, n_splits: int) -> np.ndarray:
    """(n_splits,) int64 number of distinct keys per split value; :class:`SplitConflict` naming the
    two split indices when a key comes with two split values."""
    counts = np.zeros(n_splits, dtype=np.int64)
    for part in pairs.partitions():
        unique = np.unique(part)  # sorted by (key, value), repeats dropped
        clash = np.flatnonzero(unique["key"][1:] == unique["key"][:-1])
        if len(clash):
            raise SplitConflict(int(unique["value"][clash[0]]), int(unique["value"][clash[0] + 1]))
        counts += np.bincount(unique["value"], minlength=n_splits)
    return counts
