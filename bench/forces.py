#!/usr/bin/env python
"""Energy / force / stress models on the real MPtrj frames: accuracy against the per-element
baseline, what the force path costs, and transfer of the encoder to property fine-tuning.

    python bench/forces.py                        # the whole table (see --help for the budgets)
    python bench/forces.py --sections cost        # any of: train,cost,transfer,envelope
    python bench/forces.py --steps 60 --ft-epochs 2 --quick-cost    # a smoke run

Run it from the repository root. Sections:

1. ``train``: shards of the 3,762 frames in ``examples/data/mptrj/`` (``cfdist preprocess``,
   split 80/10/10 by trajectory: ``--split-group meta:mptrj_traj_id``; the MD frames without a
   trajectory id by their own id), then ``cfdist pretrain --config mptrj --no-ray`` (one process,
   the paper's encoder + the energy head, CHGNet's loss weights) for ``--steps`` optimiser steps.
   The test split's energy MAE (meV/atom), force MAE (meV/A) and stress MAE (GPa) of the trained
   model against the baseline "per-element reference energies fitted on train, zero forces, zero
   stress" (the starting point the network learns the residual of).
2. ``cost``: forward + backward step time and peak resident memory (fresh process per case) of
   the same batches of train frames for: the property model (mean-pooled head, the energy label
   as its target), the energy model on energies only, energies + forces, energies + forces +
   stress. Ratios to the property model.
3. ``transfer``: fine-tune on the MEGNet slice (``examples/data``) formation energy and band gap
   for ``--ft-epochs`` epochs (paper recipe, ``transfer.head=auto``) from the section-1 model's
   encoder, against from scratch with the same fine-tuning budget; test MAE of the SWA models and
   the train-mean predictor.
4. ``envelope``: what the smooth cutoff envelope (on by default for energy models only) costs the
   paper's property model: formation energy on the MEGNet slice from scratch for ``--ft-epochs``
   epochs with ``model={envelope: true}`` against the default (no envelope), same seed and budget.

Prints one Markdown table per section and writes every number to ``--out/results.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

FRAMES = Path("examples/data/mptrj")
MEGNET = Path("examples/data/megnet_slice.json.gz")
MEGNET_SPLIT = Path("examples/data/megnet_slice_split.json")
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def cli(*args, log: Path) -> float:
    """Run ``python -m cfdist.cli ARGS`` (output to ``log``); returns the wall time in s."""
    cmd = [sys.executable, "-m", "cfdist.cli", *map(str, args)]
    print("$", " ".join(f"'{c}'" if " " in c or "{" in c else c for c in cmd), flush=True)
    start = time.perf_counter()
    with open(log, "w") as fh:
        code = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=ENV)
    if code != 0:
        raise SystemExit(f"failed ({code}); see {log}")
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- 1. accuracy
def build_frame_shards(out: Path) -> Path:
    shards = out / "mptrj_shards"
    if not (shards / "manifest.json").is_file():
        cli("preprocess", *sorted(FRAMES.glob("*.extxyz.gz")), "--out", shards, "--targets", "energy",
            "--with-forces", "--with-stress", "--split-fractions", "0.8", "0.1", "0.1",
            "--split-group", "meta:mptrj_traj_id", "--split-group-missing", "id", log=out / "preprocess_mptrj.log")
    return shards


def evaluate_energy_model(model, shards: Path, split: str, batch_rows: int = 16) -> dict:
    """Mean absolute errors on ``split`` in report units: energy meV/atom, forces meV/A, stress GPa."""
    from cfdist.data import iter_local_shards
    from cfdist.manifest import ShardSet
    from cfdist.run.objective import REPORT_SCALE, energy_residuals
    from cfdist.shards import collate_arrow

    shard_set = ShardSet(shards)
    sums = {name: [0.0, 0] for name in REPORT_SCALE}
    model.eval()
    for table in iter_local_shards([e.path for e in shard_set.files(split)], rows_per_read=batch_rows):
        batch = collate_arrow(table, ["energy"], cutoff=shard_set.cutoff, forces=True, stress=True)
        out = model(batch, forces=True, stress=True)
        for name, (residual, mask) in energy_residuals(out, batch).items():
            sums[name][0] += float(residual.detach().abs()[mask].sum())
            sums[name][1] += int(mask.sum())
        del out
    return {name: REPORT_SCALE[name] * total / max(count, 1) for name, (total, count) in sums.items()}


def section_train(args, out: Path) -> dict:
    import torch

    import cfdist
    from cfdist.manifest import ShardSet
    from cfdist.run.objective import fit_element_energies

    shards = build_frame_shards(out)
    manifest = json.loads((shards / "manifest.json").read_text())
    run = out / "runs" / "energy"
    wall = None
    if not (run / "model.pt").is_file():
        wall = cli("pretrain", "--config", "mptrj", "--no-ray", f"data.shards={shards.resolve()}",
                   f"output_dir={(out / 'runs').resolve()}", "run_name=energy", f"max_steps={args.steps}",
                   f"data.max_structures={args.batch}", f"log_every={max(1, args.steps // 20)}",
                   f"val_every={args.steps}", f"checkpoint_every={args.steps}", "optim.warmup_steps=20",
                   log=out / "pretrain_energy.log")
    model = cfdist.load(run / "model.pt").double()
    with torch.no_grad():
        trained = evaluate_energy_model(model, shards, "test")
        fit = fit_element_energies([e.path for e in ShardSet(shards).files("train")], "energy",
                                   model.config.n_elements)
        model.element_energy.copy_(torch.from_numpy(fit["element_energy"]))
        model.energy_scale.zero_()  # the energy head contributes nothing: references only, F = 0, sigma = 0
    baseline = evaluate_energy_model(model, shards, "test")
    result = {"splits": manifest["splits"], "split_groups": manifest.get("split_groups"), "steps": args.steps,
              "batch": args.batch, "train_wall_s": wall, "trained": trained, "baseline": baseline}
    print(f"\n## Accuracy on the test split ({manifest['splits']['test']} frames; train {manifest['splits']['train']}, "
          f"split by trajectory), {args.steps} steps of {args.batch} structures, default encoder")
    print("| model | energy MAE (meV/atom) | force MAE (meV/A) | stress MAE (GPa) |\n|---|---|---|---|")
    for name, row in (("per-element references, F = 0, sigma = 0", baseline), ("cfdist energy model", trained)):
        print(f"| {name} | {row['energy']:.1f} | {row['forces']:.1f} | {row['stress']:.3f} |")
    return result


# ----------------------------------------------------------------------------- 2. cost
COST_CASES = {  # name: (energy model?, forces, stress)
    "property model (mean pool)": (False, False, False),
    "energy only": (True, False, False),
    "energy + forces": (True, True, False),
    "energy + forces + stress": (True, True, True),
}


def _cost_child(case: str, shards: str, n_batches: int, batch_rows: int, repeats: int, queue) -> None:
    """One case in a fresh process: median fwd+bwd step time and peak RSS of one step."""
    import torch

    from memory import PeakRSS  # bench/memory.py

    from cfdist import Crystalformer, CrystalformerConfig
    from cfdist.data import iter_local_shards
    from cfdist.manifest import ShardSet
    from cfdist.run.objective import elementwise_loss, energy_residuals
    from cfdist.shards import collate_arrow

    torch.set_num_threads(1)
    energy, forces, stress = COST_CASES[case]
    shard_set = ShardSet(shards)
    tables = []
    for table in iter_local_shards([e.path for e in shard_set.files("train")], rows_per_read=batch_rows):
        tables.append(table)
        if len(tables) == n_batches + 1:
            break
    batches = [collate_arrow(t, ["energy"], cutoff=shard_set.cutoff, forces=forces, stress=stress) for t in tables]
    torch.manual_seed(0)
    config = CrystalformerConfig(energy=True, target_names=[]) if energy else CrystalformerConfig(target_names=["energy"])
    model = Crystalformer(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(batch):
        optimizer.zero_grad(set_to_none=True)
        if energy:
            residuals = energy_residuals(model(batch, forces=forces, stress=stress), batch)
            loss = sum(elementwise_loss(r, "huber")[m].mean() for r, m in residuals.values())
        else:
            loss = (model(batch)[:, 0] - batch.labels[:, 0].float() / batch.n_atoms).abs().mean()
        loss.backward()
        optimizer.step()

    step(batches[0])  # warm-up (thread pools, allocator, sigma statistics)
    times, peaks = [], []
    for batch in batches[1:]:
        with PeakRSS() as peak:
            start = time.perf_counter()
            step(batch)
            times.append(time.perf_counter() - start)
        peaks.append(peak.peak_mb)
        for _ in range(repeats - 1):
            start = time.perf_counter()
            step(batch)
            times.append(time.perf_counter() - start)
    queue.put({"step_s": statistics.median(times), "peak_mb": max(peaks),
               "structures": sum(b.n_crystals for b in batches[1:]), "atoms": sum(int(b.n_atoms.sum()) for b in batches[1:]),
               "entries": sum(b.n_entries for b in batches[1:])})


def section_cost(args, out: Path) -> dict:
    shards = build_frame_shards(out)
    ctx = mp.get_context("spawn")
    n_batches, repeats = (2, 1) if args.quick_cost else (args.cost_batches, 2)
    results = {}
    for case in COST_CASES:
        queue = ctx.Queue()
        proc = ctx.Process(target=_cost_child, args=(case, str(shards), n_batches, args.cost_rows, repeats, queue))
        proc.start()
        results[case] = queue.get()
        proc.join()
    base = results["property model (mean pool)"]
    first = results["energy only"]
    print(f"\n## Cost of the force path: the same {n_batches} batches of {args.cost_rows} train frames "
          f"({first['atoms'] / max(first['structures'], 1):.1f} atoms, "
          f"{first['entries'] / max(first['structures'], 1):,.0f} table entries per frame), default encoder, "
          f"fp32, 1 thread, AdamW step included")
    print("| model | step time (s) | x property | peak memory (MB) | x property |\n|---|---|---|---|---|")
    for case, row in results.items():
        print(f"| {case} | {row['step_s']:.3f} | {row['step_s'] / base['step_s']:.2f} | {row['peak_mb']:.0f} | "
              f"{row['peak_mb'] / max(base['peak_mb'], 1e-9):.2f} |")
    return results


# ----------------------------------------------------------------------------- 3. transfer
def section_transfer(args, out: Path) -> dict:
    pretrained = out / "runs" / "energy" / "model.pt"
    if not pretrained.is_file():
        raise SystemExit(f"{pretrained}: run the train section first")
    shards = megnet_shards(out)
    runs, meta = {}, {}
    for target, config in (("e_form", "megnet_slice_eform"), ("gap pbe", "megnet_slice_bandgap")):
        for init in ("scratch", "pretrained"):
            name = f"{config}-{init}"
            meta[name] = (target, init)
            runs[name] = ["--config", config, f"data.shards={shards.resolve()}", f"epochs={args.ft_epochs}",
                          f"swa_epochs={max(1, args.ft_epochs // 4)}", f"init_from={init}",
                          *([f"checkpoint={pretrained.resolve()}", "transfer.head=auto"] if init == "pretrained" else [])]
    finished = finetune_runs(runs, out)
    results = {}
    print(f"\n## Transfer: fine-tuning on the MEGNet slice for {args.ft_epochs} epochs (test split, SWA model)")
    print("| target | init | test MAE | train-mean MAE | wall s |\n|---|---|---|---|---|")
    for name, (target, init) in meta.items():
        res = finished[name]
        mae = res["test"]["swa"][target]["mae"]
        base = res["test"]["train_mean"][target]["mae"]
        results[name] = {"target": target, "init": init, "mae": mae, "train_mean": base, "wall_s": res["wall_s"]}
        print(f"| {target} | {'from the energy model' if init == 'pretrained' else 'scratch'} | {mae:.4f} | "
              f"{base:.4f} | {res['wall_s'] or float('nan'):.0f} |")
    return results


def megnet_shards(out: Path) -> Path:
    shards = out / "megnet_shards"
    if not (shards / "manifest.json").is_file():
        cli("preprocess", MEGNET, "--out", shards, "--targets", "e_form", "gap pbe", "--split-file", MEGNET_SPLIT,
            log=out / "preprocess_megnet.log")
    return shards


def finetune_runs(runs: dict[str, list[str]], out: Path) -> dict[str, dict]:
    """``cfdist finetune`` runs, two one-thread runs at a time on two cores; {name: results.json + wall_s}."""
    names = list(runs)
    for k in range(0, len(names), 2):
        started = {}
        for name in names[k:k + 2]:
            cmd = [sys.executable, "-m", "cfdist.cli", "finetune", *runs[name], f"output_dir={(out / 'runs').resolve()}",
                   f"run_name={name}", "scaling.threads=1", "overwrite=true"]
            print("$", " ".join(cmd), flush=True)
            started[name] = subprocess.Popen(cmd, stdout=open(out / f"{name}.log", "w"), stderr=subprocess.STDOUT,
                                             env=ENV)
        for name, proc in started.items():
            if proc.wait() != 0:
                raise SystemExit(f"run {name} failed; see {out / name}.log")
    results = {}
    for name in names:
        res = json.loads((out / "runs" / name / "results.json").read_text())
        wall = re.search(r"fine-tuning finished in ([0-9.]+) s", (out / f"{name}.log").read_text())
        res["wall_s"] = float(wall.group(1)) if wall else None
        results[name] = res
    return results


def section_envelope(args, out: Path) -> dict:
    shards = megnet_shards(out)
    common = ["--config", "megnet_slice_eform", f"data.shards={shards.resolve()}", f"epochs={args.ft_epochs}",
              f"swa_epochs={max(1, args.ft_epochs // 4)}"]
    runs = {"eform-no-envelope": common, "eform-envelope": [*common, "model={envelope: true}"]}
    results = finetune_runs(runs, out)
    print(f"\n## The envelope on the property model: MEGNet-slice formation energy, {args.ft_epochs} epochs from "
          f"scratch (test split)")
    print("| model | test MAE best-val (eV/atom) | test MAE SWA | wall s |\n|---|---|---|---|")
    rows = {}
    for name, res in results.items():
        best, swa = res["test"]["best"]["e_form"]["mae"], res["test"]["swa"]["e_form"]["mae"]
        rows[name] = {"best": best, "swa": swa, "wall_s": res["wall_s"]}
        label = {"eform-no-envelope": "paper model (no envelope)",
                 "eform-envelope": "envelope (1 A switching shell below the cutoff)"}[name]
        print(f"| {label} | {best:.4f} | {swa:.4f} | {res['wall_s'] or float('nan'):.0f} |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="train,cost,transfer,envelope")
    parser.add_argument("--out", type=Path, default=Path("/tmp/cfdist-bench-forces"))
    parser.add_argument("--steps", type=int, default=300, help="energy-model training steps (section train)")
    parser.add_argument("--batch", type=int, default=32, help="max structures per step (section train)")
    parser.add_argument("--cost-batches", type=int, default=4)
    parser.add_argument("--cost-rows", type=int, default=16, help="frames per batch in section cost")
    parser.add_argument("--quick-cost", action="store_true", help="2 batches, no repeats")
    parser.add_argument("--ft-epochs", type=int, default=8, help="fine-tuning epochs (section transfer)")
    args = parser.parse_args()
    for path in (FRAMES, MEGNET):
        if not path.exists():
            parser.error(f"not found: {path} (run from the repository root)")
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    sections = {"train": section_train, "cost": section_cost, "transfer": section_transfer,
                "envelope": section_envelope}
    for name in args.sections.split(","):
        start = time.perf_counter()
        results[name] = sections[name](args, args.out)
        results[name]["section_wall_s"] = time.perf_counter() - start
        results_file.write_text(json.dumps(results, indent=1, default=str))
    print(f"\nall numbers: {results_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
