"""The shard directory's index, ``DIR/manifest.json``: written once by the preprocessing job,
read (and checked) by training, fine-tuning and evaluation, and by the tests' fixtures.

    DIR/manifest.json                   this module
    DIR/<split>/part-<chunk>.parquet    rows (schema: cfdist.shards, docs/shards.md)

The manifest lists every shard file with its split, row count, size and sha256, the image
tables' cutoff, the targets, the accounting of the build (``n_input = n_written + n_rejected``)
and the statistics of :class:`cfdist.preprocess.statistics.StatsAccumulator`. ``ShardSet.verify``
checks everything the trainer relies on *before* any worker starts, so a bad directory fails in
seconds with a message naming the file and the problem instead of hours later inside a worker.

Verification cache: hashing every shard costs a full read of the dataset (minutes at millions of
structures) on every start and restart. After a file's sha256 matched, ``verify`` records it in
``DIR/.verified.json`` (:data:`VERIFY_CACHE`) with the file's size, mtime, ctime and inode; the
next cached check (``checksums=True``) skips hashing a file whose record still matches both the
file's ``stat`` and the manifest's sha256. Writing to a file changes its mtime and ctime (``os.utime``
can restore the mtime, nothing but the clock the ctime), and a copied or replaced file has another
inode, so a changed file is always re-hashed; ``checksums="full"`` re-hashes everything regardless.
When ``DIR`` is read-only the records go to the user cache directory
(:func:`cfdist.fileio.user_cache_dir`), or, failing that, are skipped with a one-line warning.

Object storage (``DIR`` = ``s3://...`` / ``gs://...``, :mod:`cfdist.storage`): sizes come from the
listing, footers are range requests, hashing streams each object once; the verification records
always live on local disk (the user cache, keyed by the URI) and record each object's identity
(size + ETag), which changes whenever the object is rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from concurrent.futures import ALL_COMPLETED, FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from cfdist import __version__, storage
from cfdist.fileio import sha256_file, user_cache_dir, write_json_atomic
from cfdist.shards import SCHEMA_VERSION, ShardError, read_metadata_from_schema

SPLITS = ("train", "val", "test")  # the shard directory's splits, in the order the manifest lists them
MANIFEST = "manifest.json"
VERIFY_CACHE = ".verified.json"  # verification records inside the shard directory
_CACHE_VERSION = 1
CHECKSUM_MODES = ("cached", "full", "off")
_PROGRESS_MIN_FILES = 64  # a progress bar for checks of at least this many files


# ----------------------------------------------------------------------------- writing
def shard_record(root: str | Path, file: str, split: str, rows: int, sha256: str | None = None) -> dict:
    """The manifest's entry for ``root/file``: size and (unless given) sha256 are read from disk."""
    path = Path(root) / file
    return {"file": file, "split": split, "rows": int(rows), "bytes": path.stat().st_size,
            "sha256": sha256 or sha256_file(path)}


def write_manifest(root: str | Path, *, cutoff: float, targets: Sequence[str], shards: Sequence[Mapping],
                   statistics: Mapping, n_input: int | None = None, rejected_by_reason: Mapping[str, int] | None = None,
                   **build_info: Any) -> dict:
    """Write ``root/manifest.json`` atomically and return it.

    ``shards``: :func:`shard_record` entries; split counts and ``n_written`` are derived from them.
    ``n_input`` defaults to ``n_written + n_rejected``. ``build_info``: provenance of the build
    (``content_hash``, ``format``, ``inputs``, ``settings``), stored as given.
    """
    rejected = dict(sorted((rejected_by_reason or {}).items()))
    counts = {s: sum(int(e["rows"]) for e in shards if e["split"] == s) for s in SPLITS}
    n_written = sum(counts.values())
    n_rejected = sum(rejected.values())
    manifest = {
        "schema_version": SCHEMA_VERSION, "cfdist_version": __version__, **build_info,
        "cutoff": float(cutoff), "targets": list(targets),
        "n_input": n_written + n_rejected if n_input is None else int(n_input), "n_written": n_written,
        "n_rejected": n_rejected, "rejected_by_reason": rejected, "splits": counts, "shards": [dict(e) for e in shards],
        "statistics": dict(statistics),
    }
    write_json_atomic(Path(root) / MANIFEST, manifest, sort_keys=True)
    return manifest


def read_manifest(root: str | Path) -> dict:
    """``root/manifest.json`` with clear errors for a missing, unreadable or foreign-version file."""
    path = storage.join(root, MANIFEST) if storage.is_uri(root) else Path(root) / MANIFEST
    if not storage.is_file(path):
        raise ShardError(f"{root}: no {MANIFEST}; is this a directory written by `cfdist preprocess` "
                         f"(and did the job finish)?")
    try:
        manifest = json.loads(storage.read_text(path))
    except json.JSONDecodeError as exc:
        raise ShardError(f"{path}: unreadable manifest ({exc})") from exc
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(f"{path}: shard schema version {manifest.get('schema_version')!r}, this cfdist "
                         f"reads {SCHEMA_VERSION}; rebuild the shards")
    return manifest


# ----------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class ShardEntry:
    """One shard file listed in the manifest."""

    path: Path | str  # a str for objects (s3://..., gs://...)
    split: str
    rows: int
    bytes: int
    sha256: str


class ShardSet:
    """A preprocessed shard directory (``DIR/manifest.json`` + ``DIR/<split>/*.parquet``)."""

    def __init__(self, root: str | Path):
        # a URI stays a string (never a Path: cfdist.storage); a local directory is a Path
        self.root = storage.absolute(root) if storage.is_uri(root) else Path(root)
        self.manifest = read_manifest(self.root)
        self.cutoff = float(self.manifest["cutoff"])
        self.targets = list(self.manifest.get("targets", []))
        where = (lambda f: storage.join(self.root, f)) if self.remote else (lambda f: self.root / f)
        self.entries = [ShardEntry(where(s["file"]), s["split"], int(s["rows"]), int(s["bytes"]), s["sha256"])
                        for s in self.manifest["shards"]]

    @property
    def remote(self) -> bool:
        """Whether the shards live on object storage."""
        return isinstance(self.root, str)

    def files(self, split: str) -> list[ShardEntry]:
        return [e for e in self.entries if e.split == split]

    def n_rows(self, split: str) -> int:
        return sum(e.rows for e in self.files(split))

    @property
    def max_element(self) -> int | None:
        """The highest atomic number in the shards (None for manifests without element counts)."""
        counts = self.manifest.get("statistics", {}).get("element_counts")
        return max(int(z) for z in counts) if counts else None

    def target_stats(self, target: str, split: str = "train") -> tuple[float, float]:
        """(mean, std) of a target on a split, from the manifest's statistics (std 0 or missing -> 1)."""
        try:
            stats = self.manifest["statistics"]["targets"][target][split]
        except KeyError:
            raise ShardError(f"{self.root}: manifest has no statistics for target {target!r} on split {split!r} "
                             f"(targets: {self.targets})") from None
        std = float(stats["std"]) if stats.get("std") else 1.0
        return float(stats["mean"]), std if std > 0 else 1.0

    def element_fit(self, target: str, split: str = "train") -> dict | None:
        """The preprocessing job's sufficient statistics of the per-atom reference-energy fit of
        ``target`` on ``split`` (JSON form of :class:`cfdist.preprocess.element_fit.ElementFitSums`),
        or None when the manifest has none (written before they existed; only the train split has them)."""
        if split != "train":
            return None
        return self.manifest.get("statistics", {}).get("element_fit", {}).get(target)

    def verify(self, splits: Sequence[str], *, required_cutoff: float | None = None,
               targets: Sequence[str] = (), n_elements: int | None = None, checksums: bool | str = True,
               workers: int | None = None, cache_fallback: str | Path | None = None,
               progress: bool | None = None) -> "VerifyReport":
        """Raise :class:`ShardError` unless every shard of ``splits`` is usable; return what was done.

        Checks: the split has shards; the tables' cutoff covers ``required_cutoff`` (a model
        whose Gaussians reach further than the tables would silently lose terms); the targets
        exist; no atom's Z exceeds the model's ``n_elements`` (its one-hot embedding); each
        file exists with the manifest's size, a readable Parquet footer whose row count,
        schema version and cutoff agree with the manifest, and its sha256 matches the manifest's.

        Args:
            checksums: ``True`` (cached): hash the files that have no matching verification record
                (see the module docstring) and record the ones that pass; ``"full"``: hash every
                file (and refresh the records); ``False``: no hashing (sizes and footers only).
            workers: threads for the footer checks and hashing (default: the CPU count, at most 32;
                hashlib and pyarrow release the GIL, so the files are read and hashed in parallel).
            cache_fallback: directory for the verification records when the shard directory cannot
                hold them (default: ``<user cache dir>/verified``, :func:`cfdist.fileio.user_cache_dir`).
            progress: show a progress bar (default: when there are at least 64 files).

        When several files are bad the error names one of them (checks stop at the first failure).
        """
        mode = checksum_mode(checksums)
        t0 = time.perf_counter()
        if required_cutoff is not None and self.cutoff + 1e-6 < required_cutoff:
            raise ShardError(f"{self.root}: image tables were built with cutoff {self.cutoff:.4f} A but the model "
                             f"needs {required_cutoff:.4f} A; rebuild the shards with --model-config pointing at "
                             f"this model (or lower cutoff_sigmas)")
        missing = [t for t in targets if t not in self.targets]
        if missing:
            raise ShardError(f"{self.root}: target(s) {missing} not in the shards (they hold {self.targets})")
        if n_elements is not None and self.max_element is not None and self.max_element > n_elements:
            raise ShardError(f"{self.root}: the shards hold element Z={self.max_element} but the model embeds only "
                             f"Z = 1..{n_elements} (model.n_elements); use a model with n_elements >= "
                             f"{self.max_element}")
        for split in splits:
            if not self.files(split):
                raise ShardError(f"{self.root}: no shards for split {split!r} "
                                 f"(splits: {sorted({e.split for e in self.entries})})")
        wanted = set(splits)
        entries = [e for e in self.entries if e.split in wanted]  # manifest order
        workers = max(1, min(workers or min(32, os.cpu_count() or 1), len(entries)))
        show = len(entries) >= _PROGRESS_MIN_FILES if progress is None else progress
        cache = _VerifyCache(self, cache_fallback) if mode != "off" else None
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cfdist-verify") as pool:
            # cheap checks of every file first, so a truncated last file fails before hours of hashing
            stats = _run_all(pool, lambda e: verify_shard_file(e, self.cutoff, checksum=False), entries,
                             "shard footers", show, stop_early=False)
            to_hash = entries
            if mode == "cached":
                to_hash = [e for e, st in zip(entries, stats) if not cache.matches(e, st)]
            elif mode == "off":
                to_hash = []
            try:
                _run_all(pool, lambda e: cache.record(e, _hash_checked(e)), to_hash, "shard sha256", show)
            finally:
                if cache is not None:  # also after a failure: the files that passed stay verified
                    cache.save()
        cached = 0 if mode == "off" else len(entries) - len(to_hash)
        return VerifyReport(files=len(entries), hashed=len(to_hash), cached=cached,
                            seconds=time.perf_counter() - t0, mode=mode,
                            cache=cache.path if cache is not None else None,
                            warning=cache.warning if cache is not None else None)


def checksum_mode(value: bool | str) -> str:
    """The mode (:data:`CHECKSUM_MODES`) of a ``checksums`` / ``data.verify_checksums`` value:
    ``True`` -> ``"cached"``, ``"full"`` -> ``"full"``, ``False`` -> ``"off"``; anything else is a
    ``ValueError`` (an int 0/1 too: a bool is meant)."""
    if value is True or value is False:
        return "cached" if value else "off"
    if isinstance(value, str) and value == "full":
        return "full"
    raise ValueError(f"verify_checksums must be true (sha256 of files not verified before or changed since), "
                     f"\"full\" (sha256 of every file) or false (sizes and footers only), got {value!r}")


@dataclass(frozen=True)
class VerifyReport:
    """What :meth:`ShardSet.verify` did.

    Attributes:
        files: shard files checked; hashed / cached: of those, files hashed now / skipped thanks
            to a matching verification record; seconds: wall time of the whole check; mode: one of
            :data:`CHECKSUM_MODES`; cache: the verification-record file read and written (None when
            checksums are off or no location was writable); warning: why the records could not be
            saved, if so.
    """

    files: int
    hashed: int
    cached: int
    seconds: float
    mode: str
    cache: Path | None = None
    warning: str | None = None

    def summary(self) -> str:
        """One line for the drivers, e.g. ``checked 250 shards (3 hashed, 247 cached) in 0.41 s``."""
        if self.mode == "off":
            return f"checked {self.files} shards (sizes and footers; checksums off) in {self.seconds:.2f} s"
        full = "; full re-hash" if self.mode == "full" else ""
        return f"checked {self.files} shards ({self.hashed} hashed, {self.cached} cached{full}) in {self.seconds:.2f} s"


def _stat_key(st: os.stat_result | dict) -> dict:
    if isinstance(st, dict):  # an object's identity (cfdist.storage.identity)
        return dict(st)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}


class _VerifyCache:
    """Verification records of one shard directory: ``{"version", "files": {file: {size, mtime_ns,
    ctime_ns, inode, sha256}}}`` in ``DIR/.verified.json``, or in the fallback directory when
    ``DIR`` cannot be written (read from both, so a directory that became read-only keeps its records)."""

    def __init__(self, shards: "ShardSet", fallback: str | Path | None):
        self.root = shards.root
        where = str(self.root) if shards.remote else str(self.root.resolve())
        self.names = {e.path: storage.relative(str(e.path), str(self.root)) for e in shards.entries}
        key = hashlib.sha256(where.encode()).hexdigest()[:32]
        # objects: records only on local disk (never written into the bucket)
        self.local = None if shards.remote else self.root / VERIFY_CACHE
        self.where = where
        self.fallback = Path(fallback if fallback is not None else user_cache_dir() / "verified") / f"{key}.json"
        self.records: dict[str, dict] = {**self._read(self.fallback),
                                         **(self._read(self.local) if self.local else {})}
        self.changed = False
        self.path: Path | None = self.local or self.fallback
        self.warning: str | None = None

    @staticmethod
    def _read(path: Path | None) -> dict[str, dict]:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):  # missing, unreadable or torn: the records are only a shortcut
            return {}
        files = data.get("files") if isinstance(data, dict) and data.get("version") == _CACHE_VERSION else None
        return {k: v for k, v in files.items() if isinstance(v, dict)} if isinstance(files, dict) else {}

    def matches(self, entry: "ShardEntry", st: os.stat_result) -> bool:
        record = self.records.get(self.names[entry.path])
        return record == {**_stat_key(st), "sha256": entry.sha256}

    def record(self, entry: "ShardEntry", st: os.stat_result | None) -> None:
        """Remember that ``entry`` matched its sha256 with ``st`` (called from the hashing threads: one
        dict assignment each, atomic under the GIL)."""
        if st is not None:  # None: the file changed while it was hashed; do not vouch for it
            self.records[self.names[entry.path]] = {**_stat_key(st), "sha256": entry.sha256}
            self.changed = True

    def save(self) -> None:
        if not self.changed:
            return
        # only files of this manifest (a rebuilt directory's old names are dropped)
        valid = set(self.names.values())
        data = {"version": _CACHE_VERSION, "root": self.where,
                "files": {k: v for k, v in sorted(self.records.items()) if k in valid}}
        errors = []
        for path in (p for p in (self.local, self.fallback) if p is not None):
            try:
                write_json_atomic(path, data, sort_keys=True)
                self.path = path
                return
            except OSError as exc:
                errors.append(f"{path}: {exc.strerror or exc}")
        self.path = None
        self.warning = (f"warning: shard verification records not saved ({'; '.join(errors)}); the next check "
                        f"hashes these files again")
        print(self.warning, file=sys.stderr, flush=True)


def _run_all(pool: ThreadPoolExecutor, fn, items: Sequence, desc: str, progress: bool, stop_early: bool = True) -> list:
    """``[fn(x) for x in items]`` on ``pool``; raises the earliest failure in ``items`` order.

    ``stop_early``: the first exception cancels what has not started (for expensive work; the
    error raised is then the earliest among the items that ran). Otherwise every item runs, so the
    error is deterministic: the first bad item in order."""
    if not items:
        return []
    futures = [pool.submit(fn, x) for x in items]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(futures), desc=desc, unit="file", file=sys.stderr, mininterval=1.0)
        for f in futures:
            f.add_done_callback(lambda _: bar.update(1))
    try:
        done, _ = wait(futures, return_when=FIRST_EXCEPTION if stop_early else ALL_COMPLETED)
        failed = [f for f in futures if f in done and f.exception() is not None]
        if failed:
            for f in futures:
                f.cancel()
            wait(futures)  # let running ones finish before the pool is left
            raise failed[0].exception()
        return [f.result() for f in futures]
    finally:
        if bar is not None:
            bar.close()


def _hash_checked(entry: "ShardEntry") -> os.stat_result | None:
    """Hash ``entry``'s file; ShardError on a mismatch. Returns the file's stat if it did not change
    while it was read (then the result may be recorded), else None."""
    remote = storage.is_uri(entry.path)
    before = storage.identity(entry.path) if remote else entry.path.stat()
    digest = _sha256_object(entry.path) if remote else sha256_file(entry.path)
    if digest != entry.sha256:
        raise ShardError(f"{entry.path}: sha256 {digest[:12]}... does not match the manifest's "
                         f"{entry.sha256[:12]}... (corrupted or replaced file)")
    after = storage.identity(entry.path) if remote else entry.path.stat()
    return after if _stat_key(after) == _stat_key(before) else None


def _sha256_object(location: str, block_size: int = 1 << 22) -> str:
    """Hex sha256 of an object, streamed once (constant memory)."""
    fs, key = storage.filesystem(location)
    digest = hashlib.sha256()
    with fs.open_input_stream(key) as fh:
        for block in iter(lambda: fh.read(block_size), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify_object(entry: ShardEntry, cutoff: float, checksum: bool) -> dict:
    """:func:`verify_shard_file` for an object: identity (one HEAD), footer by range request."""
    try:
        ident = storage.identity(entry.path)
    except FileNotFoundError:
        raise ShardError(f"{entry.path}: listed in the manifest but missing") from None
    if ident["size"] != entry.bytes:
        raise ShardError(f"{entry.path}: {ident['size']:,} bytes, the manifest says {entry.bytes:,} "
                         f"(truncated or rewritten object)")
    fs, key = storage.filesystem(entry.path)
    try:
        meta = pq.read_metadata(key, filesystem=fs)
        schema = meta.schema.to_arrow_schema()
    except (pa.ArrowInvalid, OSError) as exc:
        raise ShardError(f"{entry.path}: not a readable Parquet file ({exc})") from exc
    _check_footer(entry, meta, schema, cutoff)
    if checksum:
        digest = _sha256_object(entry.path)
        if digest != entry.sha256:
            raise ShardError(f"{entry.path}: sha256 {digest[:12]}... does not match the manifest's "
                             f"{entry.sha256[:12]}... (corrupted or replaced object)")
    return ident


def _check_footer(entry: ShardEntry, meta, schema, cutoff: float) -> None:
    path = entry.path
    if meta.num_rows != entry.rows:
        raise ShardError(f"{path}: {meta.num_rows} rows, the manifest says {entry.rows}")
    file_meta = read_metadata_from_schema(schema)
    if file_meta.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(f"{path}: schema version {file_meta.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    if abs(float(file_meta.get("cutoff", -1.0)) - cutoff) > 1e-9:
        raise ShardError(f"{path}: built with cutoff {file_meta.get('cutoff')} A, the manifest says {cutoff} A")


def verify_shard_file(entry: ShardEntry, cutoff: float, *, checksum: bool = True) -> os.stat_result | dict:
    """Check one shard file against its manifest entry (existence, size, Parquet footer: rows, schema
    version, cutoff; with ``checksum`` its sha256); ShardError naming the file otherwise. Returns the
    file's ``os.stat`` (taken before the checks), or an object's identity (:func:`cfdist.storage.identity`)."""
    if storage.is_uri(entry.path):
        return _verify_object(entry, cutoff, checksum)
    path = entry.path
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ShardError(f"{path}: listed in the manifest but missing") from None
    if not path.is_file():
        raise ShardError(f"{path}: listed in the manifest but missing")
    size = st.st_size
    if size != entry.bytes:
        raise ShardError(f"{path}: {size:,} bytes, the manifest says {entry.bytes:,} (truncated or rewritten file)")
    try:
        meta = pq.read_metadata(path)
        schema = meta.schema.to_arrow_schema()  # with the file's key-value metadata; one footer read
    except (pa.ArrowInvalid, OSError) as exc:
        raise ShardError(f"{path}: not a readable Parquet file ({exc})") from exc
    _check_footer(entry, meta, schema, cutoff)
    if checksum:
        digest = sha256_file(path)
        if digest != entry.sha256:
            raise ShardError(f"{path}: sha256 {digest[:12]}... does not match the manifest's "
                             f"{entry.sha256[:12]}... (corrupted or replaced file)")
    return st
