"""``cfdist preprocess`` / ``python preprocess/build_shards.py``: the command line of the preprocessing job.

    cfdist preprocess INPUT... --out DIR [--format FMT] [--targets e_form gap]
        [--model-config crystalformer | --cutoff 8.91]
        [--split-file split.json | --split-fractions 0.8 0.1 0.1] [--split-group meta:mptrj_traj_id]
        [--shard-size 4096] [--with-forces] [--with-stress]
        [--energy-key corrected_total_energy | uncorrected_total_energy]   (mptrj)
        [--columns lemat | lattice=COL,species=COL,positions=COL,...]       (parquet)

or, against a running cluster (the job connects to it through RAY_ADDRESS):

    ray job submit --working-dir . -- python preprocess/build_shards.py ...

Inputs are files, directories or globs in any format of :mod:`cfdist.io` (CIF
directory + id_prop.csv, JARVIS JSON, pymatgen JSON, extxyz, ASE db, MPtrj JSON, fairchem .aselmdb,
Parquet tables). What the job writes and
how it resumes: :mod:`cfdist.preprocess.job`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from cfdist import storage
from cfdist.config import CrystalformerConfig, table_cutoff
from cfdist.io import FORMATS
from cfdist.preprocess.job import Settings, build
from cfdist.preprocess.splits import BuildError
from cfdist.storage import StorageError


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cfdist preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="input files, directories or globs")
    parser.add_argument("--out", required=True, help="output directory, or an s3:// / gs:// prefix (built locally, "
                        "then uploaded: shards first, the manifest last)")
    parser.add_argument("--format", choices=FORMATS, default=None, help="input format (default: from extension)")
    parser.add_argument("--targets", nargs="*", default=[], help="label names to keep (required per record)")
    cut = parser.add_mutually_exclusive_group()
    cut.add_argument("--cutoff", type=float, help="image-table cutoff in A")
    cut.add_argument("--model-config", help="model config (packaged name or YAML); cutoff = cutoff_sigmas * r0 / "
                                            "sqrt(b) (default: crystalformer, the paper's model)")
    sp = parser.add_mutually_exclusive_group()
    sp.add_argument("--split-file", help='JSON {"train": [ids], "val": [...], "test": [...]} or {id: split}; a path or an '
                    's3:// / gs:// URI (downloaded once into the user cache)')
    sp.add_argument("--split-fractions", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                    help="hash-based split fractions (default 0.8 0.1 0.1)")
    parser.add_argument("--split-salt", default="cfdist", help="salt of the hash-based split")
    parser.add_argument("--split-group", metavar="KEY", default=None,
                        help="hash a group key instead of the id, so a whole group lands in one split: "
                             "meta:NAME (a record's metadata string, e.g. meta:mptrj_traj_id), id-prefix:SEP "
                             "(the id up to its last SEP), id-prefix:SEP:N (its first N SEP-separated fields) "
                             "or composition (reduced formula); not with --split-file")
    parser.add_argument("--split-group-missing", choices=("reject", "id"), default="reject",
                        help="a record without a group key: reject it (reason missing_group, the default) "
                             "or group it by its own id")
    parser.add_argument("--shard-size", type=int, default=4096, help="input records per chunk (shard)")
    parser.add_argument("--max-entries", type=int, default=500_000, help="image-table entry budget per structure")
    parser.add_argument("--min-distance", type=float, default=0.5, help="reject atoms closer than this (A)")
    parser.add_argument("--min-volume", type=float, default=0.1, help="reject cells smaller than this (A^3)")
    parser.add_argument("--allow-missing-labels", action="store_true", help="store NaN instead of rejecting")
    parser.add_argument("--with-forces", action="store_true",
                        help="store per-atom forces (extxyz, ASE db, mptrj, aselmdb, parquet)")
    parser.add_argument("--with-stress", action="store_true",
                        help="store stress tensors (extxyz, ASE db, mptrj, aselmdb, parquet)")
    parser.add_argument("--energy-key", choices=("corrected_total_energy", "uncorrected_total_energy"), default=None,
                        help="mptrj only: which energy is the label 'energy' (default corrected_total_energy, the "
                             "MP2020-corrected energy CHGNet is trained on; docs/shards.md)")
    parser.add_argument("--columns", default=None, metavar="ROLE=COLUMN,...",
                        help="parquet only: which column holds what, e.g. lattice=cell,species=symbols,"
                             "positions=pos,energy=e,forces=f,stress=s,id=name, or a preset: lemat (LeMat-Bulk), "
                             "cfdist (columns named after the roles); default: the preset the table matches")
    parser.add_argument("--workers", type=int, default=None, help="parallel chunk workers (default: cluster CPUs)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild an output dir made with other settings")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
    if args.cutoff is not None:
        if not args.cutoff > 0:
            raise BuildError("--cutoff must be > 0")
        cutoff = float(args.cutoff)
    else:
        cutoff = table_cutoff(CrystalformerConfig.from_yaml(args.model_config or "crystalformer"))
    if args.shard_size < 1:
        raise BuildError("--shard-size must be >= 1")
    if args.split_group is not None and args.split_file:
        raise BuildError("--split-group and --split-file cannot be combined (a split file assigns every id itself; "
                         "group the ids in the file instead)")
    return Settings(cutoff=cutoff, targets=list(args.targets), shard_size=args.shard_size,
                    split_file=str(storage.cached_copy(args.split_file, 'inputs').resolve()) if args.split_file else None,
                    split_fractions=list(args.split_fractions or [0.8, 0.1, 0.1]), split_salt=args.split_salt,
                    min_distance=args.min_distance, min_volume=args.min_volume, max_entries=args.max_entries,
                    allow_missing_labels=args.allow_missing_labels, with_forces=args.with_forces,
                    with_stress=args.with_stress, split_group=args.split_group,
                    split_group_missing=args.split_group_missing, reader_options=reader_options(args))


def reader_options(args: argparse.Namespace) -> dict[str, str]:
    """The reader options given on the command line (checked against the format by cfdist.io)."""
    options = {}
    if args.energy_key is not None:
        options["energy_key"] = args.energy_key
    if args.columns is not None:
        options["columns"] = args.columns
    return options


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        build(args.inputs, args.out, settings_from_args(args), args.format, args.workers, args.overwrite)
    except (BuildError, FileNotFoundError, ValueError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
