"""``cfdist`` command line: one subcommand per pipeline stage.

    cfdist preprocess INPUT... --out DIR ...            raw structures -> shards (Ray Data job)
    cfdist pretrain --config NAME_OR_YAML [key=value]    Ray Train + DeepSpeed pretraining
    cfdist finetune --config NAME_OR_YAML [key=value]    fine-tuning (paper recipe), this process or Ray
    cfdist tune --config NAME_OR_YAML --space SPACE.yaml [key=value]   fine-tuning sweep (Ray Tune, ASHA)
    cfdist prepare-task TASK --out DIR [--source FILE]   download + paper split + preprocess
    cfdist export RUN_OR_CHECKPOINT OUT.pt               training checkpoint -> portable model.pt
    cfdist evaluate --checkpoint model.pt --data SHARDS_OR_INPUTS [--split test] [--out DIR]
    cfdist predict --checkpoint model.pt INPUT... [--out predictions.csv]
    cfdist configs [KIND [NAME]]                         list the packaged configs, or print one

``cfdist <command> --help`` documents each one. ``python launch/pretrain.py`` / ``launch/finetune.py``
and ``python preprocess/build_shards.py`` are the same commands as scripts (for ``ray job submit``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _one_head(model, head: str | None):
    """The model to predict with: a mixture model's head ``head`` as a single model (``--head``)."""
    heads = [h.name for h in model.config.heads]
    if heads and head is None:
        raise SystemExit(f"the checkpoint was pretrained on a mixture: choose the head with --head ({', '.join(heads)})")
    if head is not None and not heads:
        raise SystemExit(f"--head {head}: the checkpoint has no per-dataset heads")
    if head is not None and head not in heads:
        raise SystemExit(f"--head {head}: not one of the checkpoint's heads ({', '.join(heads)})")
    return model.for_dataset(head) if head is not None else model


def _predict(argv) -> int:
    parser = argparse.ArgumentParser(prog="cfdist predict", description="Predict targets for structures in any "
                                     "input format; unreadable or invalid structures, and input files that "
                                     "cannot be read, get an error row. Exit status 1 when nothing could be "
                                     "predicted (or, with --strict, when anything failed).")
    parser.add_argument("inputs", nargs="+", help="files, directories or globs (CIF, JARVIS/pymatgen JSON, extxyz, ASE db)")
    parser.add_argument("--checkpoint", required=True, help="portable checkpoint (model.pt; a path or an s3:// / "
                        "gs:// URI, downloaded once into the user cache)")
    parser.add_argument("--out", type=Path, default=Path("predictions.csv"))
    parser.add_argument("--format", default=None, help="input format (default: inferred per file)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 if any file or structure "
                        "failed (the CSV is written all the same)")
    parser.add_argument("--head", default=None, help="a model pretrained on a dataset mixture: the dataset whose "
                        "head predicts")
    args = parser.parse_args(argv)
    from cfdist.checkpoint import load
    from cfdist.io import iter_input_records
    from cfdist.preprocess.publish import localize_inputs
    from cfdist.predict import (
        exit_status,
        output_names,
        predict_records,
        row_counts,
        write_predictions,
    )

    model = _one_head(load(args.checkpoint, map_location=args.device).to(args.device), args.head)
    inputs = localize_inputs(args.inputs)  # s3:// / gs:// inputs: cached local copies
    rows = write_predictions(predict_records(model, iter_input_records(inputs, args.format, on_error="row"),
                                             args.batch_size), args.out, output_names(model))
    counts = row_counts(rows)
    print(f"{counts['rows']} rows -> {args.out}: {counts['summary']}")
    return exit_status(counts, [r.error for r in rows if r.scope == "file"], args.strict)


def _evaluate(argv) -> int:
    parser = argparse.ArgumentParser(prog="cfdist evaluate", description="MAE / RMSE / R^2 per target (energy "
                                     "models: energy meV/atom, forces meV/A, stress GPa, as training's val_mae), "
                                     "predictions CSV and parity plot. Raw inputs that cannot be read get "
                                     "error rows, as in `cfdist predict`.")
    parser.add_argument("--checkpoint", required=True, help="portable checkpoint (a path or an s3:// / gs:// URI)")
    parser.add_argument("--data", required=True, nargs="+", help="a shard directory (or s3:// / gs:// prefix), or "
                        "labelled raw inputs")
    parser.add_argument("--split", default="test", help="split of a shard directory (default test)")
    parser.add_argument("--out", type=Path, default=Path("evaluation"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--strict", action="store_true", help="exit with status 1 if any file or structure "
                        "failed (the outputs are written all the same)")
    parser.add_argument("--head", default=None, help="a model pretrained on a dataset mixture: the dataset whose "
                        "head is evaluated")
    parser.add_argument("--energy-label", default="energy", help="an energy model's total-energy label (eV; the "
                        "run's data.targets, shard column y.<label>; default energy)")
    args = parser.parse_args(argv)
    from cfdist.checkpoint import load
    from cfdist.predict import evaluate, exit_status

    result = evaluate(_one_head(load(args.checkpoint), args.head), args.data, args.out, split=args.split,
                      batch_size=args.batch_size, energy_label=args.energy_label)
    print("| target | n | MAE | RMSE | R^2 |\n|---|---|---|---|---|")
    for name, m in result["targets"].items():
        fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
        print(f"| {name} | {m['n']} | {fmt(m['mae'])} | {fmt(m['rmse'])} | {fmt(m['r2'])} |")
    counts = result["counts"]
    print(f"{counts['rows']} rows -> {args.out}/{{metrics.json, predictions.csv, parity.png}}: {counts['summary']}")
    return exit_status(counts, [f["error"] for f in result["failed_inputs"]], args.strict)


def _prepare_task(argv) -> int:
    from cfdist.finetune.tasks import TASKS, prepare_task

    parser = argparse.ArgumentParser(prog="cfdist prepare-task", description="Download a paper benchmark dataset "
                                     "(or read a local copy), apply the task's exact split rule and preprocess it "
                                     "into shards for `cfdist finetune`.")
    parser.add_argument("task", choices=sorted(TASKS), help="benchmark task (its fine-tuning config has the same name)")
    parser.add_argument("--out", required=True, type=Path, help="shard directory to write")
    parser.add_argument("--source", type=Path, default=None,
                        help="local copy of the dataset (.zip as downloaded, .json or .json.gz); default: download")
    parser.add_argument("--source-split", nargs=3, metavar="SPLIT=FILE", default=None,
                        help="pre-split files (bulk/shear tasks): train=FILE val=FILE test=FILE")
    parser.add_argument("--sizes", nargs=3, type=int, default=None, metavar=("TRAIN", "VAL", "TEST"),
                        help="MEGNet-rule split sizes (default: the published 60000 5000 4239)")
    parser.add_argument("--cutoff", type=float, default=None, help="table cutoff (default: the default model's)")
    parser.add_argument("--workers", type=int, default=None, help="Ray Data workers")
    args = parser.parse_args(argv)
    source_split = None
    if args.source_split:
        if not all("=" in item for item in args.source_split):
            parser.error("--source-split takes train=FILE val=FILE test=FILE")
        source_split = dict(item.split("=", 1) for item in args.source_split)
    manifest = prepare_task(args.task, args.out, source=args.source, source_split=source_split, sizes=args.sizes,
                            cutoff=args.cutoff, workers=args.workers)
    print(f"{args.task}: {manifest['n_written']:,} structures written to {args.out} "
          f"({manifest['n_rejected']:,} rejected, reasons in {args.out}/rejects.jsonl)")
    return 0


def _configs(argv) -> int:
    from cfdist.config import CONFIG_KINDS, packaged_configs, resolve_config

    parser = argparse.ArgumentParser(prog="cfdist configs", description="The configs shipped with cfdist. Any "
                                     "--config (and model=, deepspeed=) takes one by name; to start your own, "
                                     "print one into a file and edit it.")
    parser.add_argument("kind", nargs="?", choices=CONFIG_KINDS, help="model, pretrain, finetune or deepspeed")
    parser.add_argument("name", nargs="?", help="print this config's YAML")
    args = parser.parse_args(argv)
    if args.name:
        print(resolve_config(args.name, args.kind).read_text(), end="")
        return 0
    for kind in [args.kind] if args.kind else CONFIG_KINDS:
        print(f"{kind}:")
        for name in packaged_configs(kind):
            first = next((line[1:].strip() for line in resolve_config(name, kind).read_text().splitlines()
                          if line.startswith("#")), "")
            print(f"  {name:24s} {first[:90]}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("preprocess", "pretrain", "finetune", "tune", "prepare-task", "export", "evaluate", "predict",
                "configs")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command == "preprocess":
        from cfdist.preprocess.cli import main as run
    elif command == "pretrain":
        from cfdist.train.driver import main as run
    elif command == "finetune":
        from cfdist.finetune.driver import main as run
    elif command == "tune":
        from cfdist.finetune.sweep import main as run
    elif command == "configs":
        run = _configs
    elif command == "prepare-task":
        run = _prepare_task
    elif command == "export":
        from cfdist.export import main as run
    elif command == "evaluate":
        run = _evaluate
    else:
        run = _predict
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
