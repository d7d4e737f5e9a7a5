"""The shard directory's index, ``DIR/manifest.json``: written once by the preprocessing job,
read (and checked) by training, fine-tuning and evaluation, and by the tests' fixtures.

    DIR/manifest.json                   this module
    DIR/<split>/part-<chunk>.parquet    rows (schema: cfdist.shards, docs/shards.md)

The manifest lists every shard file with its split, row count, size and sha256, the image
tables' cutoff, the targets, the accounting of the build (``n_input = n_written + n_rejected``)
and the statistics of :class:`cfdist.preprocess.statistics.StatsAccumulator`. ``ShardSet.verify``
checks everything the trainer relies on *before* any worker starts, so a bad directory fails in
seconds with a message naming the file and the problem instead of hours later inside a worker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from cfdist.fileio import sha256_file, write_json_atomic
from cfdist.shards import SCHEMA_VERSION, ShardError, read_metadata_from_schema

MANIFEST = "manifest.json"


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
    from cfdist import __version__
    from cfdist.preprocess.splits import SPLITS

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
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ShardError(f"{root}: no {MANIFEST}; is this a directory written by `cfdist preprocess` "
                         f"(and did the job finish)?")
    try:
        manifest = json.loads(path.read_text())
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

    path: Path
    split: str
    rows: int
    bytes: int
    sha256: str


class ShardSet:
    """A preprocessed shard directory (``DIR/manifest.json`` + ``DIR/<split>/*.parquet``)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.cutoff = float(self.manifest["cutoff"])
        self.targets = list(self.manifest.get("targets", []))
        self.entries = [ShardEntry(self.root / s["file"], s["split"], int(s["rows"]), int(s["bytes"]), s["sha256"])
                        for s in self.manifest["shards"]]

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

    def verify(self, splits: Sequence[str], *, required_cutoff: float | None = None,
               targets: Sequence[str] = (), n_elements: int | None = None, checksums: bool = True) -> None:
        """Raise :class:`ShardError` unless every shard of ``splits`` is usable.

        Checks: the split has shards; the tables' cutoff covers ``required_cutoff`` (a model
        whose Gaussians reach further than the tables would silently lose terms); the targets
        exist; no atom's Z exceeds the model's ``n_elements`` (its one-hot embedding); each
        file exists with the manifest's size, a readable Parquet footer whose row count,
        schema version and cutoff agree with the manifest, and (``checksums``) the manifest's sha256.
        """
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
            for entry in self.files(split):
                verify_shard_file(entry, self.cutoff, checksum=checksums)


def verify_shard_file(entry: ShardEntry, cutoff: float, *, checksum: bool = True) -> None:
    path = entry.path
    if not path.is_file():
        raise ShardError(f"{path}: listed in the manifest but missing")
    size = path.stat().st_size
    if size != entry.bytes:
        raise ShardError(f"{path}: {size:,} bytes, the manifest says {entry.bytes:,} (truncated or rewritten file)")
    try:
        meta = pq.read_metadata(path)
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ShardError(f"{path}: not a readable Parquet file ({exc})") from exc
    if meta.num_rows != entry.rows:
        raise ShardError(f"{path}: {meta.num_rows} rows, the manifest says {entry.rows}")
    file_meta = read_metadata_from_schema(schema)
    if file_meta.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(f"{path}: schema version {file_meta.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    if abs(float(file_meta.get("cutoff", -1.0)) - cutoff) > 1e-9:
        raise ShardError(f"{path}: built with cutoff {file_meta.get('cutoff')} A, the manifest says {cutoff} A")
    if checksum:
        digest = sha256_file(path)
        if digest != entry.sha256:
            raise ShardError(f"{path}: sha256 {digest[:12]}... does not match the manifest's "
                             f"{entry.sha256[:12]}... (corrupted or replaced file)")
