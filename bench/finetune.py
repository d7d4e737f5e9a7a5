"""Test MAE on the real MEGNet slice: from scratch (paper recipe) vs fine-tuned from a checkpoint
trained on the other label (band gap -> e_form and e_form -> band gap), vs the train-mean predictor.

    cfdist preprocess examples/data/megnet_slice.json.gz --out data/megnet_slice \
        --targets e_form "gap pbe" --split-file examples/data/megnet_slice_split.json
    python bench/finetune.py [--epochs 40] [--swa-epochs 10] [--threads 1] [--out outputs/bench_finetune]

Stage 1 trains both labels from scratch side by side (one process each, ``--threads`` torch
threads each); stage 2 fine-tunes each label from the other label's SWA checkpoint
(``transfer.head=auto``: encoder and head hidden layer kept, fresh output row). Prints a
Markdown table of test MAE (best-val and SWA models) with the wall time of every run.
``--control`` adds scratch runs of twice the epochs (the fine-tuned models have seen the structures
for 2 x epochs in total); ``--reuse`` keeps finished runs (their results.json) instead of re-running.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

TASKS = {"e_form": "megnet_slice_eform", "gap pbe": "megnet_slice_bandgap"}  # packaged fine-tuning configs


def launch(config: str, run_name: str, args, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cfdist.cli", "finetune", "--config", config,
           f"run_name={run_name}", f"output_dir={args.out}", f"epochs={args.epochs}", f"swa_epochs={args.swa_epochs}",
           f"scaling.threads={args.threads}", f"data.shards={args.shards}", f"seed={args.seed}", "overwrite=true",
           *extra]
    log = open(Path(args.out) / f"{run_name}.log", "w")
    print("$", " ".join(f"'{c}'" if " " in c else c for c in cmd), flush=True)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def finished(args, name: str) -> bool:
    return args.reuse and (Path(args.out) / name / "results.json").is_file()


def wall_time(args, name: str) -> float | None:
    """Seconds the run reported for itself ("fine-tuning finished in X s" in its log)."""
    match = re.search(r"fine-tuning finished in ([0-9.]+) s", (Path(args.out) / f"{name}.log").read_text())
    return float(match.group(1)) if match else None


def wait_all(procs: dict[str, subprocess.Popen | None], args) -> dict[str, float | None]:
    for name, proc in procs.items():
        if proc is not None and proc.wait() != 0:
            raise SystemExit(f"run {name} failed; see {Path(args.out) / name}.log")
    return {name: wall_time(args, name) for name in procs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--swa-epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--shards", default=str(Path("data/megnet_slice").resolve()))
    parser.add_argument("--out", default=str(Path("outputs/bench_finetune").resolve()))
    parser.add_argument("--control", action="store_true", help="also train from scratch for 2 x epochs")
    parser.add_argument("--reuse", action="store_true", help="keep runs that already have results.json")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    names = {"e_form": "eform", "gap pbe": "bandgap"}

    t0 = time.perf_counter()

    def start(cfg, name, extra):
        return None if finished(args, name) else launch(cfg, name, args, extra)

    times = wait_all({f"{names[t]}_scratch": start(cfg, f"{names[t]}_scratch", []) for t, cfg in TASKS.items()}, args)
    other = {"e_form": "gap pbe", "gap pbe": "e_form"}
    stage2 = {}
    for t, cfg in TASKS.items():
        ckpt = Path(args.out) / f"{names[other[t]]}_scratch" / "checkpoints" / "swa.pt"
        name = f"{names[t]}_from_{names[other[t]]}"
        stage2[name] = start(cfg, name, ["init_from=pretrained", f"checkpoint={ckpt}"])
    times.update(wait_all(stage2, args))
    inits = ["scratch", "from_{}"]
    if args.control:
        long = f"scratch_{2 * args.epochs}ep"
        times.update(wait_all({f"{names[t]}_{long}": start(cfg, f"{names[t]}_{long}", [f"epochs={2 * args.epochs}"])
                               for t, cfg in TASKS.items()}, args))
        inits.append(long)

    print(f"\nMEGNet slice test split, {args.epochs} epochs unless named (SWA over the last {args.swa_epochs}), batch 128, "
          f"seed {args.seed}, {args.threads} thread(s) per run, two runs side by side; total "
          f"{time.perf_counter() - t0:.0f} s\n")
    print("| target | init | test MAE best-val | test MAE SWA | train-mean MAE | wall s |")
    print("|---|---|---|---|---|---|")
    for t in TASKS:
        for init in inits:
            init = init.format(names[other[t]])
            name = f"{names[t]}_{init}"
            res = json.loads((Path(args.out) / name / "results.json").read_text())
            test = res["test"]
            print(f"| {t} | {init} | {test['best'][t]['mae']:.4f} | {test['swa'][t]['mae']:.4f} | "
                  f"{test['train_mean'][t]['mae']:.4f} | {times[name] or float('nan'):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
