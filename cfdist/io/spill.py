"""Planning helpers every byte-addressed reader shares: opening plain / ``.gz`` / ``.bz2`` inputs,
cutting a run of records into deterministic chunks, and the decompression spill.

Chunks: ``plain_chunks`` (records addressed by index: CIF rows, database rows), ``byte_chunks``
(records addressed by byte offset and line: extxyz frames, JSON lines), ``list_chunks`` (elements of
a JSON list addressed by the separators between them).

Spill: offsets into a ``.gz``/``.bz2`` input are offsets into its decompressed stream. Seeking there
means decompressing everything before, once per worker; instead, planning copies the decompressed
bytes into a spill directory on its one pass (:func:`spill_source`) and points the chunks'
``data_path`` at the copy (:func:`with_data_path`), so workers seek directly.
"""

from __future__ import annotations

import bz2
import contextlib
import dataclasses
import gzip
import hashlib
import io
import os

import numpy as np

from cfdist.fileio import atomic_write
from cfdist.io.records import Chunk

COMPRESSED_SUFFIXES = (".gz", ".bz2")


def open_binary(path: str):
    """``path`` opened for binary reading, decompressed on the fly when it ends in ``.gz`` or ``.bz2``."""
    low = path.lower()
    if low.endswith(".gz"):
        return gzip.open(path, "rb")
    if low.endswith(".bz2"):
        return bz2.open(path, "rb")
    return open(path, "rb")


def open_text(path: str):
    """:func:`open_binary` as UTF-8 text (a leading byte-order mark is dropped)."""
    return io.TextIOWrapper(open_binary(path), encoding="utf-8-sig")


def spill_source(path: str, spill_dir: str | None) -> tuple[str, str | None, str | None]:
    """Where planning reads ``path`` from and where it copies the decompressed bytes to.

    Returns ``(source, copy, spill)``: ``spill`` is the decompressed copy's path (None for an
    uncompressed input or without ``spill_dir``); ``source`` is that copy when a finished one exists
    (reused), else ``path``; ``copy`` is where to write the copy during this planning pass (None when
    reusing one or not spilling)."""
    compressed = path.lower().endswith(COMPRESSED_SUFFIXES)
    spill = spill_path(spill_dir, path) if spill_dir and compressed else None
    source = spill if spill and os.path.exists(spill) else path  # a finished copy is reused
    copy = spill if spill and source == path else None
    return source, copy, spill


def with_data_path(chunks: list[Chunk], spill: str | None) -> list[Chunk]:
    """``chunks`` reading their bytes from the decompressed copy ``spill`` (unchanged when None)."""
    return [dataclasses.replace(c, data_path=spill) for c in chunks] if spill else chunks


def spill_path(spill_dir: str, path: str) -> str:
    """Where the decompressed copy of ``path`` lives: named after the file, unique per path."""
    name = os.path.basename(path)
    stem = name[: -len(".bz2")] if name.lower().endswith(".bz2") else name[: -len(".gz")]
    tag = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
    return os.path.join(spill_dir, f"{tag}-{stem}")


@contextlib.contextmanager
def spilling(target: str | None):
    """A file to copy decompressed bytes into, renamed to ``target`` only if planning succeeds."""
    if target is None:
        yield None
        return
    with atomic_write(target) as tmp, open(tmp, "wb") as f:
        yield f


def plain_chunks(fmt: str, path: str, n: int, chunk_size: int) -> list[Chunk]:
    """Index-range chunks over ``n`` records (no byte addresses): rows, blocks, whole-document lists."""
    return [Chunk(fmt, path, start, min(chunk_size, n - start)) for start in range(0, n, chunk_size)]


def byte_chunks(fmt: str, path: str, records: list[tuple[int, int]], end: int, chunk_size: int) -> list[Chunk]:
    """Chunks over records given as (byte offset, line number); chunk k spans up to chunk k+1."""
    chunks = []
    n = len(records)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        offset, line = records[start]
        next_offset = records[stop][0] if stop < n else end
        chunks.append(Chunk(fmt, path, start, stop - start, offset, next_offset - offset, line))
    return chunks


def list_chunks(fmt: str, path: str, seps: np.ndarray, n: int, chunk_size: int) -> list[Chunk]:
    """Chunks of the first ``n`` elements of a JSON list, element ``k`` spanning ``seps[k] + 1 : seps[k + 1]``."""
    chunks = []
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        offset = int(seps[start]) + 1  # just after '[' or the comma before element `start`
        chunks.append(Chunk(fmt, path, start, stop - start, offset, int(seps[stop]) - offset))
    return chunks
