"""A K-times larger shard directory made from a real one without preprocessing again: every shard
file of the source listed K times (hard links or copies under new names) and a manifest whose
per-file records, split counts, content hash and additive statistics are those of the K copies.

    python bench/replicate_shards.py /tmp/cfdist-reference-fit/shards-100000 /tmp/big-1M --copies 10

What it is for: timing what a training run does at start-up (the shard check, the manifest's
statistics, the stream's plan and first window) at a corpus size that would take an hour to
preprocess on a small machine. A 10-copy set of a 100k-structure build holds 1M rows in 10x the
files and bytes of the source, so start-up reads the same kind and number of files, footers and
bytes as a real 1M build; **the rows repeat** (every structure occurs K times), so it is no use
for anything that looks at the labels' variety (accuracy, shuffle quality, deduplication).

The manifest is exact for the K copies, from cfdist's own functions: file records by
:func:`cfdist.manifest.shard_record` (size from disk, the source's sha256: a link or copy has the
same bytes), split counts and ``n_written`` by :func:`cfdist.manifest.write_manifest`, the
content hash by :func:`cfdist.preprocess.job.content_hash` over the source's inputs listed K times,
and the statistics as the sums of K copies (:func:`replicate_statistics`: counts, histograms and
totals times K; the reference-energy sums of :class:`cfdist.preprocess.element_fit.ElementFitSums`
merged K times; target moments keep their mean and population std) and the per-element
least-squares values (``reference_per_element``, not a sum) by the job's own
:class:`cfdist.preprocess.statistics.StatsAccumulator` over the source's train split merged K times
(one pass over the source's small columns; seconds at 100k). A statistic this script does not know
is an error, not a silent copy. The manifest also records ``replicated_from``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pyarrow.parquet as pq  # noqa: E402

from cfdist.manifest import MANIFEST, SPLITS, ShardSet, read_manifest, shard_record, write_manifest  # noqa: E402
from cfdist.preprocess.element_fit import FIT_COLUMNS, ElementFitSums  # noqa: E402
from cfdist.preprocess.job import Settings, content_hash  # noqa: E402
from cfdist.preprocess.statistics import StatsAccumulator  # noqa: E402

NOTE = ("{copies} copies of the real shard rows of {source} (hard links or copies under new names, manifest and "
        "statistics summed by bench/replicate_shards.py): the same files, footers and bytes as a real build of "
        "this size, but every row occurs {copies} times")


def copy_name(file: str, copy: int, copies: int) -> str:
    """``train/part-000003.parquet`` -> ``train/copy07-part-000003.parquet`` (unchanged for one copy)."""
    if copies == 1:
        return file
    split, name = file.split("/", 1)
    return f"{split}/copy{copy:02d}-{name}"


def replicate_statistics(stats: dict, copies: int, reference_per_element: dict | None = None) -> dict:
    """The manifest statistics (``StatsAccumulator.summary``) of ``copies`` copies of the data they
    describe; every key is handled explicitly (an unknown one raises ``KeyError``).

    ``reference_per_element`` (:func:`replicated_reference`) replaces the source's least-squares values
    when ``copies > 1``: the job solves them with a fixed absolute ridge, so K copies' values differ
    from the source's wherever the fit is ill-conditioned, and the manifest has no sums to redo it."""
    out = {}
    for key, value in stats.items():
        if key in ("element_counts",):
            out[key] = {z: int(c) * copies for z, c in value.items()}
        elif key in ("atoms_histogram", "entries_histogram"):
            out[key] = {"edges": list(value["edges"]), "counts": [int(c) * copies for c in value["counts"]]}
        elif key in ("total_atoms", "total_entries"):
            out[key] = int(value) * copies
        elif key == "targets":  # per target and split: count, mean, population std
            out[key] = {t: {s: {"count": int(m["count"]) * copies, "mean": m["mean"], "std": m["std"]}
                            for s, m in per_split.items()} for t, per_split in value.items()}
        elif key == "element_fit":  # sums: merged exactly as the preprocessing job merges its chunks
            merged = {}
            for target, data in value.items():
                one, total = ElementFitSums.from_dict(data), ElementFitSums()
                for _ in range(copies):
                    total.merge(one)
                merged[target] = total.to_dict()
            out[key] = merged
        elif key == "reference_per_element":
            if copies > 1 and reference_per_element is None:
                raise ValueError("reference_per_element of several copies needs replicated_reference(...)")
            out[key] = value if copies == 1 else reference_per_element
        elif key in ("reference_note", "element_fit_note"):
            out[key] = value
        else:
            raise KeyError(f"statistics.{key}: unknown to bench/replicate_shards.py; teach replicate_statistics "
                           f"how {copies} copies change it")
    return out


def replicated_reference(shards: ShardSet, copies: int) -> dict:
    """``statistics.reference_per_element`` of ``copies`` copies of ``shards``: one pass over the train
    split with the job's :class:`StatsAccumulator` (the columns its finalize reads), merged
    ``copies`` times and summarised as the job does."""
    one = StatsAccumulator(shards.targets)
    columns = sorted({"n_entries", *FIT_COLUMNS}) + [f"y.{t}" for t in shards.targets]
    for entry in shards.files("train"):
        one.add("train", pq.read_table(entry.path, columns=columns))
    total = StatsAccumulator(shards.targets)
    for _ in range(copies):
        total.merge(one)
    return total.summary()["reference_per_element"]


def replicate(source: str | Path, out: str | Path, copies: int, *, link: bool = True) -> dict:
    """Write ``out`` (a new directory): the shard files of ``source`` ``copies`` times (hard links when
    ``link`` and the file system allows, else byte copies) and their manifest; returns the manifest.

    The result is checked with ``ShardSet(out).verify(SPLITS, checksums=False)`` (every file's size,
    footer, row count, schema version and cutoff against the new manifest)."""
    source, out = Path(source), Path(out)
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    manifest = read_manifest(source)
    if (out / MANIFEST).exists():
        raise FileExistsError(f"{out}: already holds a manifest; remove the directory to rebuild it")
    records = []
    for copy in range(copies):
        for record in manifest["shards"]:
            name = copy_name(record["file"], copy, copies)
            target = out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                if link:
                    try:
                        os.link(source / record["file"], target)
                    except OSError:  # another file system, or links not allowed: copy the bytes
                        shutil.copyfile(source / record["file"], target)
                else:
                    shutil.copyfile(source / record["file"], target)
            records.append(shard_record(out, name, record["split"], record["rows"], sha256=record["sha256"]))
    # the source's order, copy after copy (write_manifest derives the split counts)
    rejects = source / "rejects.jsonl"
    if rejects.is_file():
        (out / "rejects.jsonl").write_text(rejects.read_text() * copies)
    reference = replicated_reference(ShardSet(source), copies) if copies > 1 else None
    settings = dict(manifest["settings"])
    inputs = list(manifest.get("inputs", [])) * copies
    digest = content_hash(inputs, manifest["format"], Settings(**settings)) if copies > 1 else manifest["content_hash"]
    build_info = {"content_hash": digest, "format": manifest["format"], "inputs": inputs, "settings": settings}
    if copies > 1:
        build_info["replicated_from"] = {"source": str(source), "copies": copies,
                                         "source_content_hash": manifest.get("content_hash"),
                                         "note": NOTE.format(copies=copies, source=source)}
    if manifest.get("split_groups"):  # distinct groups per split are not a sum over copies
        raise ValueError(f"{source}: grouped splits (split_groups) are not replicated by this script")
    written = write_manifest(out, cutoff=manifest["cutoff"], targets=manifest["targets"], shards=records,
                             statistics=replicate_statistics(manifest["statistics"], copies, reference),
                             n_input=int(manifest["n_input"]) * copies,
                             rejected_by_reason={k: int(v) * copies for k, v in manifest["rejected_by_reason"].items()},
                             **build_info)
    ShardSet(out).verify(list(SPLITS), checksums=False)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a shard directory written by `cfdist preprocess`")
    parser.add_argument("out", type=Path, help="the new directory")
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--copy-bytes", action="store_true", help="copy the files instead of hard-linking them")
    args = parser.parse_args(argv)
    m = replicate(args.source, args.out, args.copies, link=not args.copy_bytes)
    print(json.dumps({"out": str(args.out), "splits": m["splits"], "files": len(m["shards"]),
                      "content_hash": m["content_hash"], "note": m.get("replicated_from", {}).get("note")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
