"""The preprocessing job: raw structure files -> content-hashed Parquet shards (Ray Data).

The driver (:func:`build`) plans deterministic chunks of ``shard_size`` input records (several
inputs in parallel Ray tasks; compressed JSON and extxyz are decompressed once into ``.progress/spill``);
Ray Data maps every chunk on a worker (:func:`process_chunk`: read -> validate -> image tables
-> one zstd Parquet shard per split, its checksum and statistics) and streams a summary back;
:func:`finalize` drops duplicate ids and writes ``rejects.jsonl`` and the manifest. The split of a
record is a salted hash of its id, or of its group key with ``Settings.split_group`` (frames of one
trajectory stay together; :mod:`cfdist.preprocess.splits`), or a split file's entry. Output::

    DIR/<split>/part-<chunk>.parquet   rows of one chunk for that split (docs/shards.md)
    DIR/manifest.json                   shards, counts, statistics, content hash (cfdist.manifest)
    DIR/rejects.jsonl                   every rejected record: id, source, reason, message
    DIR/.progress/                      the plan and per-chunk completion records (resume state)

``DIR`` may be ``s3://...`` / ``gs://...``: the job then builds in a local staging directory and
publishes the finished build, manifest last (:mod:`cfdist.preprocess.publish`); inputs may be URIs.

Every input record is written or rejected (``n_input == n_written + n_rejected`` is checked
before the manifest is written). A chunk's completion record is written last, atomically, so
re-running the same build skips finished chunks and ends with the same manifest; a changed
input, cutoff or setting changes the content hash and the job refuses to mix with stale shards.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from cfdist import storage
from cfdist.cluster import init_ray
from cfdist.crystal import InvalidCrystalError, check_overlaps, validate
from cfdist.fileio import TMP_MARK, atomic_write, sha256_file, write_json_atomic
from cfdist.geometry import image_table
from cfdist.io import FORMATS, Chunk, default_id, expand_inputs, infer_format, plan_chunks, read_chunk
from cfdist.manifest import SPLITS, shard_record, write_manifest
from cfdist.preprocess.dedupe import (PartitionedPairs, SplitConflict, distinct_per_split, key_hashes,
                                      repeated_values)
from cfdist.preprocess.element_fit import FIT_COLUMNS
from cfdist.preprocess.publish import check_target, localize_inputs, publish
from cfdist.preprocess.splits import (MISSING_GROUP, BuildError, group_key, hash_split, load_split_file,
                                      missing_group_detail, parse_group_spec)
from cfdist.preprocess.statistics import StatsAccumulator
from cfdist.shards import (MAX_ATOMS, SCHEMA_VERSION, TRANSLATION_LIMIT, crystals_to_arrow, read_shard, shard_metadata,
                           write_shard)

PROGRESS_DIR = ".progress"
SPILL_DIR = "spill"  # under PROGRESS_DIR: decompressed copies of compressed JSON / extxyz inputs, removed at the end
DEDUPE_DIR = "dedupe"  # under PROGRESS_DIR: partitioned id hashes while finalize looks for duplicates
GROUPS_DIR = "groups"  # under PROGRESS_DIR: partitioned group-key hashes while finalize counts split groups


@dataclass
class Settings:
    """Everything that determines the shards' content (hashed into the manifest)."""

    cutoff: float
    targets: list[str]
    shard_size: int = 4096
    split_file: str | None = None
    split_fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    split_salt: str = "cfdist"
    min_distance: float = 0.5
    min_volume: float = 0.1
    max_entries: int = 500_000
    allow_missing_labels: bool = False
    with_forces: bool = False
    with_stress: bool = False
    split_group: str | None = None  # None: hash of the id; else a group spec (cfdist.preprocess.splits)
    split_group_missing: str = "reject"  # a record without a group key: "reject" (missing_group) or "id"
    # how the reader reads the inputs (--energy-key for mptrj, --columns for parquet; cfdist.io.plan_chunks)
    reader_options: dict[str, str] = field(default_factory=dict)


# Fields added after the first release: left out of the content hash while they hold their
# default, so builds that do not use them keep the hash (and the resumable output) they had.
_HASH_IF_SET = {"split_group": None, "split_group_missing": "reject", "reader_options": {}}


# --------------------------------------------------------------------------------------------
# Worker side: one chunk


def lll_reduced(crystal):
    """The same crystal with its lattice in the LLL-reduced basis (positions unchanged)."""
    import dataclasses

    from pymatgen.core import Lattice

    reduced = Lattice(crystal.lattice).get_lll_reduced_lattice().matrix
    mapping = reduced @ np.linalg.inv(crystal.lattice)
    if not (np.allclose(mapping, np.round(mapping), atol=1e-6) and abs(round(np.linalg.det(mapping))) == 1):
        raise RuntimeError(f"crystal {crystal.id!r}: LLL reduction did not give a basis of the same lattice")
    return dataclasses.replace(crystal, lattice=np.round(mapping) @ crystal.lattice)


def _reject(rid: str | None, source: str, reason: str, message: str) -> dict:
    return {"id": rid, "source": source, "reason": reason, "message": message}


def estimate_entries(n_atoms: int, volume: float, cutoff: float) -> float:
    """Expected table size N^2 * (4/3 pi r_c^3) / V (uniform density), for an early budget check."""
    return n_atoms * n_atoms * (4.0 / 3.0 * math.pi * cutoff**3) / max(volume, 1e-12)


def process_chunk(index: int, chunk: Chunk, settings: Settings, out_dir: str,
                  split_of: dict[str, str] | None) -> dict:
    """Read, validate and tabulate one chunk; write its shards and completion record."""

    out = Path(out_dir)
    rows: dict[str, list] = defaultdict(list)
    groups: dict[str, list[str]] = defaultdict(list)  # group key of every row (group splits only)
    fallback: dict[str, list[int]] = defaultdict(list)  # rows grouped by their id (--split-group-missing id)
    # a split file wins (build() refuses to combine the two)
    group_spec = parse_group_spec(settings.split_group) if settings.split_group and split_of is None else None
    rejects: list[dict] = []
    n_input = 0
    for record in read_chunk(chunk):
        n_input += 1
        rid = record.id if record.id else default_id(chunk.path, record.index)
        if record.error_reason is not None or record.crystal is None:
            rejects.append(_reject(rid, record.source, record.error_reason or "unparseable",
                                   record.error or "unreadable record"))
            continue
        labels = dict(record.labels)
        crystal = record.crystal
        try:
            validate(crystal, min_volume=settings.min_volume, check_overlap=False)  # overlaps: below
        except InvalidCrystalError as exc:
            rejects.append(_reject(rid, record.source, exc.reason, f"crystal {rid!r}: {exc.detail}"))
            continue
        kept, problem = {}, None
        for name in settings.targets:
            value = labels.get(name)
            value = float("nan") if value is None else float(value)
            if math.isinf(value):
                problem = ("non_finite_label", f"label {name!r} is {value}")
                break
            if math.isnan(value) and not settings.allow_missing_labels:
                problem = ("missing_label", f"label {name!r} is missing")
                break
            kept[name] = value
        if problem:
            rejects.append(_reject(rid, record.source, problem[0], f"crystal {rid!r}: {problem[1]}"))
            continue
        if split_of is not None:
            split = split_of.get(rid)
            if split is None:
                rejects.append(_reject(rid, record.source, "not_in_split_file",
                                       f"crystal {rid!r}: id not found in the split file"))
                continue
        elif group_spec is not None:
            group = group_key(group_spec, rid, record.meta, crystal)
            used_id = group is None
            if used_id and settings.split_group_missing != "id":
                rejects.append(_reject(rid, record.source, "missing_group",
                                       f"crystal {rid!r}: no split group for --split-group "
                                       f"{settings.split_group}: {missing_group_detail(group_spec)}"))
                continue
            group = rid if used_id else group
            split = hash_split(group, settings.split_fractions, settings.split_salt)
        else:
            split = hash_split(rid, settings.split_fractions, settings.split_salt)
        if crystal.n_atoms > MAX_ATOMS:
            rejects.append(_reject(rid, record.source, "table_too_large",
                                   f"crystal {rid!r}: {crystal.n_atoms} atoms, shards hold at most {MAX_ATOMS}"))
            continue
        estimate = estimate_entries(crystal.n_atoms, crystal.volume, settings.cutoff)
        if estimate > 4 * settings.max_entries:
            rejects.append(_reject(rid, record.source, "table_too_large",
                                   f"crystal {rid!r}: about {estimate:,.0f} image-table entries expected, "
                                   f"budget {settings.max_entries:,}"))
            continue
        table = image_table(crystal.lattice, crystal.positions, max(settings.cutoff, settings.min_distance))
        try:
            check_overlaps(crystal, settings.min_distance, table)
        except InvalidCrystalError as exc:
            rejects.append(_reject(rid, record.source, exc.reason, f"crystal {rid!r}: {exc.detail}"))
            continue
        if settings.min_distance > settings.cutoff:
            table = image_table(crystal.lattice, crystal.positions, settings.cutoff)
        if len(table) and np.abs(table.n).max() > TRANSLATION_LIMIT:
            # A strongly skewed basis: store the same lattice in its LLL-reduced basis (the
            # model is exactly invariant to the choice of basis), which needs small translations.
            crystal = lll_reduced(crystal)
            table = image_table(crystal.lattice, crystal.positions, settings.cutoff)
            if np.abs(table.n).max() > TRANSLATION_LIMIT:
                rejects.append(_reject(rid, record.source, "table_too_large",
                                       f"crystal {rid!r}: lattice translations beyond +-{TRANSLATION_LIMIT} even "
                                       f"in the LLL-reduced basis"))
                continue
        if len(table) > settings.max_entries:
            rejects.append(_reject(rid, record.source, "table_too_large",
                                   f"crystal {rid!r}: {len(table):,} image-table entries, budget "
                                   f"{settings.max_entries:,}"))
            continue
        rows[split].append((crystal.relabelled(rid, kept), table, record.source,
                            record.forces, record.stress))
        if group_spec is not None:
            if used_id:
                fallback[split].append(len(groups[split]))
            groups[split].append(group)
    if n_input != chunk.count:
        raise RuntimeError(f"{chunk.path}: chunk {index} planned {chunk.count} records but read {n_input}")

    shards = {}
    stats = StatsAccumulator(settings.targets)
    for split in SPLITS:
        if not rows[split]:
            continue
        crystals, tables, sources, forces, stress = map(list, zip(*rows[split]))
        arrow = crystals_to_arrow(crystals, tables, sources, settings.targets,
                                  forces if settings.with_forces else None, stress if settings.with_stress else None)
        rel = f"{split}/part-{index:06d}.parquet"
        write_shard(out / rel, arrow, shard_metadata(settings.cutoff, settings.targets, chunk=index, split=split))
        stats.add(split, arrow)
        # Checksums and statistics here, in parallel, rather than in a serial pass on the driver.
        shards[split] = {"file": rel, "ids": [c.id for c in crystals], "sources": sources,
                         "bytes": (out / rel).stat().st_size, "sha256": sha256_file(out / rel)}
        if group_spec is not None:  # for the manifest's split_groups (finalize)
            shards[split]["groups"] = groups[split]
            if fallback[split]:
                shards[split]["group_fallback"] = fallback[split]
    stats.save(out / PROGRESS_DIR / f"chunk-{index:06d}.stats.npz")
    record = {"chunk": index, "input": asdict(chunk), "n_input": n_input, "rejects": rejects, "shards": shards,
              "dropped": {}}
    write_json_atomic(out / PROGRESS_DIR / f"chunk-{index:06d}.json", record, sort_keys=True)  # the commit point
    n_written = sum(len(s["ids"]) for s in shards.values())
    return {"chunk": index, "n_input": n_input, "n_written": n_written, "n_rejected": len(rejects)}


@functools.lru_cache(maxsize=2)
def _split_map(path: str, mtime_ns: int, size: int) -> dict[str, str]:
    """A split file's id -> split map, parsed once per worker process (Ray reuses task workers);
    keyed by the file's identity so an edited file is re-read."""
    return load_split_file(path)


def process_chunks(batch: dict, settings: dict, out_dir: str) -> dict:
    """Ray Data task UDF: :func:`process_chunk` for every chunk of ``batch`` (one per call).

    A plain function in a task pool rather than an actor class: Ray keeps an actor's constructor
    arguments in the object store to restart it, and logs an error about it for every actor.
    Inputs, split file and output live on storage every worker sees (a shared FS on clusters).
    """
    settings = Settings(**settings)
    split_of = None
    if settings.split_file:
        stat = os.stat(settings.split_file)
        split_of = _split_map(settings.split_file, stat.st_mtime_ns, stat.st_size)
    results = [process_chunk(int(i), Chunk(**json.loads(c)), settings, out_dir, split_of)
               for i, c in zip(batch["index"], batch["chunk"])]
    return {key: np.array([r[key] for r in results]) for key in results[0]}


# --------------------------------------------------------------------------------------------
# Driver side: plan, run, finalise


def input_fingerprint(paths: Sequence[str]) -> list[dict]:
    """Content digests of every input file (a CIF directory: id_prop.csv and every file in it)."""
    out = []
    for path in paths:
        p = Path(path)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        digest = hashlib.sha256()
        for f in files:
            digest.update(f.relative_to(p).as_posix().encode() if p.is_dir() else b"")
            digest.update(sha256_file(f).encode())
        out.append({"path": str(p), "sha256": digest.hexdigest(), "bytes": sum(f.stat().st_size for f in files)})
    return out


def content_hash(inputs: list[dict], fmt: str, settings: Settings) -> str:
    hashed = {k: v for k, v in asdict(settings).items() if k not in _HASH_IF_SET or v != _HASH_IF_SET[k]}
    spec = {"schema_version": SCHEMA_VERSION, "format": fmt, "inputs": [i["sha256"] for i in inputs],
            "settings": hashed}
    if settings.split_file:
        spec["split_file_sha256"] = sha256_file(Path(settings.split_file))
        spec["settings"] = {**spec["settings"], "split_file": None}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def prepare_output(out: Path, digest: str, overwrite: bool) -> None:
    """Create ``out`` or check that it holds (part of) a build with the same content hash."""
    plan_file = out / PROGRESS_DIR / "plan.json"
    if out.exists() and any(out.iterdir()):
        existing = json.loads(plan_file.read_text())["content_hash"] if plan_file.exists() else None
        if existing != digest:
            if not overwrite:
                what = f"content hash {existing[:12]}" if existing else "files not made by this job"
                raise BuildError(f"{out} holds {what}, but this command's inputs/settings hash to "
                                 f"{digest[:12]}; use a new --out or pass --overwrite to rebuild")
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def run_chunks(pending: list[tuple[int, Chunk]], settings: Settings, out: Path, workers: int | None,
               total_input: int, already: int) -> None:
    """Map ``process_chunk`` over the pending chunks with Ray Data, with a progress bar."""
    import ray
    from tqdm import tqdm

    if not pending:
        return
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = False
    items = [{"index": i, "chunk": json.dumps(asdict(c))} for i, c in pending]
    concurrency = max(1, min(len(items), workers or int(ray.cluster_resources().get("CPU", 1))))
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(process_chunks, batch_size=1, num_cpus=1, compute=ray.data.TaskPoolStrategy(size=concurrency),
                        fn_kwargs={"settings": asdict(settings), "out_dir": str(out)})
    start = time.perf_counter()
    done_structs = 0
    with tqdm(total=total_input, initial=already, unit="struct", desc="shards", mininterval=2.0,
              file=sys.stderr) as bar:
        for row in ds.iter_rows():
            done_structs += int(row["n_input"])
            bar.update(int(row["n_input"]))
            bar.set_postfix(rejected=int(row["n_rejected"]), refresh=False)
    elapsed = time.perf_counter() - start
    print(f"processed {done_structs:,} structures in {elapsed:.1f} s ({done_structs / max(elapsed, 1e-9):,.0f} "
          f"structures/s with {concurrency} worker(s))", file=sys.stderr)


def run_chunks_here(pending: list[tuple[int, Chunk]], settings: Settings, out: Path) -> None:
    """``build(in_process=True)``: the pending chunks one after the other in this process, through
    :func:`process_chunks`, the function the Ray Data tasks map (so both paths write the same files)."""
    for index, chunk in pending:
        process_chunks({"index": [index], "chunk": [json.dumps(asdict(chunk))]}, asdict(settings), str(out))
    if pending:
        print(f"processed {len(pending)} chunk(s) in this process", file=sys.stderr)


def _chunk_record(out: Path, index: int) -> dict:
    return json.loads((out / PROGRESS_DIR / f"chunk-{index:06d}.json").read_text())


def find_duplicates(out: Path, n_chunks: int) -> dict[int, dict[str, list[int]]]:
    """Rows whose id an earlier row (in input order: chunk, split, row) already has, per chunk and
    split. One pass over the completion records spills every row's (id hash, position) to
    hash-partitioned files (:mod:`cfdist.preprocess.dedupe`: the driver's memory stays flat); rows
    whose hash repeats are then compared by their id strings (a hash collision between different ids
    drops nothing)."""
    blocks: list[tuple[int, str, int]] = []  # per (chunk, split) block: chunk, split, position of its first row
    position = 0
    with PartitionedPairs(out / PROGRESS_DIR / DEDUPE_DIR) as pairs:
        for index in range(n_chunks):
            rec = _chunk_record(out, index)
            for split in SPLITS:
                shard = rec["shards"].get(split)
                if shard is not None and shard["ids"]:
                    n = len(shard["ids"])
                    pairs.add(key_hashes(shard["ids"]), np.arange(position, position + n, dtype=np.int64))
                    blocks.append((index, split, position))
                    position += n
        candidates = repeated_values(pairs)  # positions in input order
    if not len(candidates):
        return {}
    starts = np.array([b[2] for b in blocks], dtype=np.int64)
    owner = np.searchsorted(starts, candidates, side="right") - 1
    ids: dict[int, str] = {}
    for block in np.unique(owner):
        index, split, first = blocks[block]
        shard_ids = _chunk_record(out, index)["shards"][split]["ids"]
        for at in candidates[owner == block]:
            ids[int(at)] = shard_ids[int(at - first)]
    seen: set[str] = set()
    dropped: dict[int, dict[str, list[int]]] = {}
    for at, block in zip(candidates.tolist(), owner.tolist()):
        if ids[at] in seen:
            index, split, first = blocks[block]
            dropped.setdefault(index, {}).setdefault(split, []).append(at - first)
        seen.add(ids[at])
    return dropped


def finalize(out: Path, n_chunks: int, digest: str, fmt: str, inputs: list[dict], settings: Settings) -> dict:
    """Drop duplicate ids, gather statistics, write rejects.jsonl and manifest.json.

    The completion records are read one at a time (never all at once); ids and group keys are
    compared as 64-bit hashes spilled to hash-partitioned files (:mod:`cfdist.preprocess.dedupe`),
    so the driver's memory does not grow with the number of structures (docs/scaling.md)."""
    import pyarrow.parquet as pq

    # Duplicate ids: the first occurrence in input order is kept, later ones are rejected.
    duplicates = find_duplicates(out, n_chunks)
    for index in range(n_chunks):
        rec = _chunk_record(out, index)
        dropped = duplicates.get(index, {})
        if dropped != rec["dropped"]:
            for split, rows in dropped.items():
                path = out / rec["shards"][split]["file"]
                table = read_shard(path)
                if table.num_rows == len(rec["shards"][split]["ids"]):  # not filtered yet (idempotent on resume)
                    keep = np.setdiff1d(np.arange(table.num_rows), rows)
                    write_shard(path, table.take(keep), json.loads(table.schema.metadata[b"cfdist"]))
            rec["dropped"] = dropped
            write_json_atomic(out / PROGRESS_DIR / f"chunk-{index:06d}.json", rec, sort_keys=True)

    stats = StatsAccumulator(settings.targets)
    shards = []
    n_input = n_rejected = 0
    reasons: dict[str, int] = defaultdict(int)
    # Group splits: the distinct group keys of the written rows per split (the workers list every
    # row's key next to its id, so this is a pass over the completion records, not over the shards).
    groups = PartitionedPairs(out / PROGRESS_DIR / GROUPS_DIR)
    n_fallback = 0
    with groups, atomic_write(out / "rejects.jsonl") as tmp, open(tmp, "w") as rejects_file:
        def reject(r: dict) -> None:
            nonlocal n_rejected
            rejects_file.write(json.dumps(r, sort_keys=True) + "\n")
            reasons[r["reason"]] += 1
            n_rejected += 1

        for index in range(n_chunks):
            rec = _chunk_record(out, index)
            n_input += rec["n_input"]
            for r in rec["rejects"]:
                reject(r)
            # The worker's statistics and checksums hold unless duplicates were dropped from its shards.
            chunk_stats = None if rec["dropped"] else StatsAccumulator.load(
                out / PROGRESS_DIR / f"chunk-{rec['chunk']:06d}.stats.npz", settings.targets)
            if chunk_stats is not None:
                stats.merge(chunk_stats)
            for split in SPLITS:
                shard = rec["shards"].get(split)
                if shard is None:
                    continue
                path = out / shard["file"]
                gone = rec["dropped"].get(split, [])
                for row in gone:
                    rid = shard["ids"][row]
                    reject(_reject(rid, shard["sources"][row], "duplicate_id",
                                   f"crystal {rid!r}: id already used by an earlier record"))
                rows = len(shard["ids"]) - len(gone)
                if settings.split_group:
                    n_fallback += len(set(shard.get("group_fallback", [])) - set(gone))
                    kept = np.delete(key_hashes(shard["groups"]), gone)
                    groups.add(kept, np.full(len(kept), SPLITS.index(split), dtype=np.int64))
                if rows == 0:
                    path.unlink(missing_ok=True)
                    continue
                if chunk_stats is None:
                    stats.add(split, pq.read_table(path, columns=sorted({"n_entries", *FIT_COLUMNS})
                                                   + [f"y.{t}" for t in settings.targets]))
                # The worker's checksum holds unless duplicates were dropped (the file was rewritten).
                keep_sha = chunk_stats is not None and shard.get("bytes") == path.stat().st_size
                shards.append(shard_record(out, shard["file"], split, rows, shard["sha256"] if keep_sha else None))
        n_written = sum(e["rows"] for e in shards)
        if n_input != n_written + n_rejected:
            raise BuildError(f"accounting failed: {n_input} inputs != {n_written} written + {n_rejected} rejected")
        extra = {}
        if settings.split_group:
            extra["split_groups"] = {"key": settings.split_group, "groups": _groups_per_split(groups),
                                     "grouped_by_id": n_fallback}
    return write_manifest(out, cutoff=settings.cutoff, targets=settings.targets, shards=shards,
                          statistics=stats.summary(), n_input=n_input, rejected_by_reason=reasons,
                          content_hash=digest, format=fmt, inputs=inputs, settings=asdict(settings), **extra)


def _groups_per_split(groups: PartitionedPairs) -> dict[str, int]:
    """Distinct group keys per split; a key in two splits cannot happen (the split is a function of
    the group key) and is an error."""
    try:
        counts = distinct_per_split(groups, len(SPLITS))
    except SplitConflict as exc:
        raise BuildError(f"a split group is in both {SPLITS[exc.first]!r} and {SPLITS[exc.second]!r}") from None
    return {split: int(n) for split, n in zip(SPLITS, counts)}


def build(inputs: Sequence[str], out: str | Path, settings: Settings, fmt: str | None = None,
          workers: int | None = None, overwrite: bool = False, in_process: bool = False) -> dict:
    """Build (or resume) the shards of ``inputs`` into ``out`` (a directory, or an ``s3://`` /
    ``gs://`` prefix); returns the manifest.

    ``in_process=True`` runs the planning and every chunk in the calling process, one after the
    other, through the same functions the Ray tasks run (:func:`plan_chunks`, :func:`process_chunks`)
    and the same :func:`finalize`: identical shards and manifest without starting Ray, for small
    builds (tests, a few hundred structures) where a cluster's start-up costs more than the work.
    """

    target = storage.absolute(out) if storage.is_uri(str(out)) else None
    # a URI never goes through pathlib: the build happens in a local staging directory
    out = storage.staging_dir(target, "preprocess") if target else Path(out).resolve()
    paths = expand_inputs(localize_inputs(inputs))
    formats = {infer_format(p) for p in paths} if fmt is None else {fmt}
    if len(formats) != 1:
        raise BuildError(f"inputs mix formats {sorted(formats)}; pass --format or build them separately")
    fmt = formats.pop()
    if fmt not in FORMATS:
        raise BuildError(f"unknown format {fmt!r}; choose from {list(FORMATS)}")
    if settings.split_file is None and (len(settings.split_fractions) != 3 or
                                        abs(sum(settings.split_fractions) - 1) > 1e-9 or
                                        min(settings.split_fractions) < 0):
        raise BuildError(f"--split-fractions must be three non-negative numbers summing to 1, got "
                         f"{settings.split_fractions}")
    if settings.split_file:
        load_split_file(settings.split_file)  # fail early on a malformed file
    if settings.split_group is not None:
        if settings.split_file:
            raise BuildError("--split-group and --split-file cannot be combined (a split file assigns every "
                             "id itself; group the ids in the file instead)")
        parse_group_spec(settings.split_group)  # fail early on a malformed spec
    if settings.split_group_missing not in MISSING_GROUP:
        raise BuildError(f"--split-group-missing must be one of {list(MISSING_GROUP)}, "
                         f"got {settings.split_group_missing!r}")
    if settings.split_group is None and settings.split_group_missing != "reject":
        raise BuildError("--split-group-missing only applies with --split-group")

    print(f"hashing {len(paths)} input(s) ...", file=sys.stderr)
    fingerprint = input_fingerprint(paths)
    digest = content_hash(fingerprint, fmt, settings)
    if target and check_target(target, digest, overwrite):
        manifest = json.loads(storage.read_text(storage.join(target, "manifest.json")))
        print(f"{target} already holds this build (content hash {digest[:12]})", file=sys.stderr)
        print_summary(manifest)
        return manifest
    prepare_output(out, digest, overwrite or bool(target))  # a staging directory is only a cache
    done_files = {int(p.name[6:12]) for p in (out / PROGRESS_DIR).glob("chunk-[0-9]*.json")}
    chunks = _reusable_plan(out, done_files)
    if chunks is None:
        chunks = plan_inputs(paths, fmt, settings.shard_size, out / PROGRESS_DIR / SPILL_DIR, settings.reader_options,
                             in_process=in_process)
        write_json_atomic(out / PROGRESS_DIR / "plan.json",
                           {"content_hash": digest, "n_chunks": len(chunks), "chunks": [asdict(c) for c in chunks]},
                          sort_keys=True)
    done = {i for i in range(len(chunks)) if i in done_files}
    pending = [(i, c) for i, c in enumerate(chunks) if i not in done]
    total = sum(c.count for c in chunks)
    already = sum(chunks[i].count for i in done)
    print(f"{fmt}: {total:,} records in {len(chunks)} chunk(s); {len(done)} already done, {len(pending)} to run; "
          f"cutoff {settings.cutoff:.4f} A; content hash {digest[:12]}", file=sys.stderr)
    _remove_partial_files(out)
    if in_process:
        run_chunks_here(pending, settings, out)
    else:
        if pending:
            init_ray(object_store_memory=512 * 1024**2)
            if target:
                _single_node(target)
        run_chunks(pending, settings, out, workers, total, already)
    manifest = finalize(out, len(chunks), digest, fmt, fingerprint, settings)
    shutil.rmtree(out / PROGRESS_DIR / SPILL_DIR, ignore_errors=True)  # decompressed copies: no longer needed
    if target:
        publish(out, target, manifest)
    print_summary(manifest)
    return manifest


def _single_node(target: str) -> None:
    """The staging directory is on this machine's disk: workers on other machines could not write into it
    (several Ray nodes on this one machine can)."""
    import socket

    import ray

    here = socket.gethostname()
    elsewhere = [n for n in ray.nodes() if n.get("Alive") and n.get("NodeManagerHostname", here) != here]
    if elsewhere:
        raise BuildError(f"--out {target}: building for object storage stages the shards on the driver's disk, "
                         f"which the {len(elsewhere)} node(s) of this Ray cluster on other machines cannot write; "
                         f"run the build on one machine (or --out a shared path, then upload it)")


def _reusable_plan(out: Path, done: set[int]) -> list[Chunk] | None:
    """The chunks of an earlier run of this build (prepare_output checked its content hash), if
    every pending chunk can still be read (a decompressed copy may have been cleaned up)."""
    plan_file = out / PROGRESS_DIR / "plan.json"
    if not plan_file.exists():
        return None
    chunks = [Chunk(**c) for c in json.loads(plan_file.read_text())["chunks"]]
    if any(c.data_path and not os.path.exists(c.data_path) for i, c in enumerate(chunks) if i not in done):
        return None
    return chunks


def plan_inputs(paths: Sequence[str], fmt: str, shard_size: int, spill_dir: Path,
                options: dict[str, str] | None = None, in_process: bool = False) -> list[Chunk]:
    """Chunks of every input, in input order; several inputs are planned in parallel Ray tasks
    (planning a compressed input means decompressing it, which is the slow part), or one after
    the other in this process with ``in_process``. ``options``: the reader options
    (:func:`cfdist.io.plan_chunks`)."""
    import ray
    from tqdm import tqdm

    if in_process:
        return [c for p in paths for c in plan_chunks(p, fmt, shard_size, str(spill_dir), options)]
    if len(paths) == 1:
        print(f"planning {paths[0]} ...", file=sys.stderr)
        return plan_chunks(paths[0], fmt, shard_size, str(spill_dir), options)
    init_ray(object_store_memory=512 * 1024**2)
    remote_plan = ray.remote(num_cpus=1)(plan_chunks)
    refs = [remote_plan.remote(p, fmt, shard_size, str(spill_dir), options) for p in paths]
    with tqdm(total=len(refs), unit="input", desc="planning", file=sys.stderr) as bar:
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            bar.update(len(ready))
    try:
        planned = ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        raise (cause if isinstance(cause, Exception) else exc) from None
    return [c for chunks in planned for c in chunks]


def _remove_partial_files(out: Path) -> None:
    """Temporary files of a killed run (never referenced by a completion record)."""
    for tmp in out.rglob(f".*{TMP_MARK}*"):
        tmp.unlink(missing_ok=True)


def print_summary(manifest: dict) -> None:
    lines = ["", "| split | structures | shards | bytes |", "|---|---|---|---|"]
    for split in SPLITS:
        shards = [s for s in manifest["shards"] if s["split"] == split]
        lines.append(f"| {split} | {manifest['splits'][split]:,} | {len(shards)} | {sum(s['bytes'] for s in shards):,} |")
    total_bytes = sum(s["bytes"] for s in manifest["shards"])
    lines.append(f"| **all** | {manifest['n_written']:,} | {len(manifest['shards'])} | {total_bytes:,} |")
    lines.append("")
    lines.append(f"inputs {manifest['n_input']:,} = written {manifest['n_written']:,} + rejected "
                 f"{manifest['n_rejected']:,} {manifest['rejected_by_reason']}")
    if manifest["n_written"]:
        lines.append(f"{total_bytes / manifest['n_written']:,.0f} bytes/structure on disk; "
                     f"{manifest['statistics']['total_entries'] / max(manifest['statistics']['total_atoms'], 1):.0f} "
                     f"table entries/atom")
    print("\n".join(lines))
