#!/usr/bin/env python
"""Does pretraining transfer? Energy-model pretraining on a CHGNet + MPtrj corpus, then fine-tuning
on small real tasks from that checkpoint vs from scratch; and cfdist's energy model vs MACE.

    python bench/make_transfer_corpus.py --out /tmp/cfdist-transfer-corpus --n 40000 --time-limit 720
    python bench/transfer.py --corpus /tmp/cfdist-transfer-corpus                       # pretrain + finetune
    python bench/transfer.py --sections finetune --tasks e_form --sizes 100,300 --seeds 0,1,2
    python bench/transfer.py --sections mace --mace-epochs 5 --mace-cfdist-steps 400
    python bench/transfer.py --quick --corpus DIR      # smoke run: tiny model, a few steps, one seed

Run it from the repository root. Sections (finished shards and runs are reused; ``--out/results.json``
keeps every number):

1. ``pretrain``: ``cfdist preprocess`` of the corpus (energy, forces, stress; 95/5/0 split grouped by
   ``source_id``, the real crystal a structure derives from / the MPtrj trajectory), then
   ``cfdist pretrain --config mptrj --no-ray`` of the ``--model`` encoder + energy head for
   ``--pretrain-steps`` steps of ``--pretrain-batch`` structures (CHGNet's loss weights).
2. ``finetune``: for each task (``--tasks``: the slice's ``e_form`` and ``gap pbe``), each training-set
   size (``--sizes``) and seed (``--seeds``): the first ``n`` of the slice's train ids shuffled by the
   seed, with the slice's own val and test splits (``cfdist preprocess --split-file``); ``cfdist
   finetune`` from the pretrained encoder (``init_from=pretrained``, ``transfer.head=auto``: a new
   property head) and from scratch (same architecture, envelope included, same seed), with the same
   budget: ``--ft-epochs`` epochs of batches of ``--ft-batch`` (SWA over the last quarter). Prints test
   MAE (SWA model) mean +- standard deviation over seeds and the pretrained / scratch ratio.
3. ``mace``: the real MPtrj frames (``examples/data/mptrj``, 80/10/10 split by trajectory, as
   ``bench/forces.py``), cfdist's energy model (``cfdist pretrain --no-ray``) and a small MACE model
   (``mace_run_train``, ``mace-torch``) from scratch, side by side, one thread each: cfdist for
   ``--mace-cfdist-steps`` steps, MACE for ``--mace-epochs`` epochs (pick them so that the printed
   wall times match; each run is stopped after 3 x ``--mace-seconds``); test energy (meV/atom), force
   (meV/A) and stress (GPa) MAE, both evaluated by this script on the same frames.

Nothing is derived from the slice's val/test crystals: see ``bench/make_transfer_corpus.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SLICE = REPO / "examples" / "data" / "megnet_slice.json.gz"
SLICE_SPLIT = REPO / "examples" / "data" / "megnet_slice_split.json"
FRAMES = REPO / "examples" / "data" / "mptrj"
TASK_CONFIG = {"e_form": "megnet_slice_eform", "gap pbe": "megnet_slice_bandgap"}
# the encoder pretrained and fine-tuned here: the paper's block, narrower, shallower and with a 5.94 A
# image-table cutoff (3 sigma_max instead of 4.5: ~1/3 of the entries) -- a 2-core CPU budget;
# --model '{}' is the paper's encoder
DEFAULT_MODEL = '{"n_blocks": 2, "d_model": 64, "n_heads": 4, "d_ff": 128, "head_hidden": 64, "cutoff_sigmas": 3.0}'
QUICK_MODEL = ('{"n_blocks": 1, "d_model": 16, "n_heads": 2, "d_ff": 32, "n_basis": 16, "head_hidden": 16, '
               '"cutoff_sigmas": 3.0}')


def env(threads: int) -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": "0",
            "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def cfdist_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "cfdist.cli", *map(str, args)]


RAY_START_TIMEOUT = "The current node timed out during startup"


def run(cmd: list[str], log: Path, threads: int = 1, tries: int = 3) -> float:
    """Run ``cmd`` (output to ``log``); the wall time in s. A local Ray node that did not start in
    time (an overloaded shared machine) is retried, up to ``tries`` starts in all."""
    print("$", " ".join(f"'{c}'" if " " in c or "{" in c else c for c in cmd), flush=True)
    for attempt in range(tries):
        start = time.perf_counter()
        with open(log, "w") as fh:
            code = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env(threads), cwd=REPO)
        if code == 0:
            return time.perf_counter() - start
        if RAY_START_TIMEOUT not in log.read_text() or attempt == tries - 1:
            raise SystemExit(f"failed ({code}); see {log}")
        print(f"  Ray did not start in time (machine overloaded); retrying", flush=True)


def parallel(jobs: dict[str, tuple[list[str], Path]], width: int, threads: int = 1,
             cpu: dict[str, float] | None = None) -> dict[str, float]:
    """Run the commands ``width`` at a time; {name: wall s}. ``cpu``, if given, gets {name: CPU s}
    (user + system of the process and the children it waited for: on a shared machine the wall
    time says little about the work done, the CPU time does)."""
    pending, running, walls = list(jobs.items()), {}, {}
    while pending or running:
        while pending and len(running) < width:
            name, (cmd, log) = pending.pop(0)
            print("$", " ".join(f"'{c}'" if " " in c or "{" in c else c for c in cmd), flush=True)
            running[name] = (subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                              env=env(threads), cwd=REPO), time.perf_counter(), log)
        time.sleep(0.5)
        for name, (proc, start, log) in list(running.items()):
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # reaps it: the rusage is this child's
            if pid == 0:
                continue
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed ({proc.returncode}); see {log}")
            walls[name] = time.perf_counter() - start
            if cpu is not None:
                cpu[name] = usage.ru_utime + usage.ru_stime
            del running[name]
    return walls


# ----------------------------------------------------------------------------- 1. pretraining
def corpus_shards(args) -> Path:
    shards = args.out / "corpus_shards"
    if not (shards / "manifest.json").is_file():
        if not args.corpus or not (args.corpus / "corpus.yaml").is_file():
            raise SystemExit(f"--corpus {args.corpus}: no corpus.yaml (run bench/make_transfer_corpus.py first)")
        run(cfdist_cmd("preprocess", *sorted(args.corpus.glob("*.extxyz")), "--out", shards, "--targets", "energy",
                       "--with-forces", "--with-stress", "--split-fractions", "0.95", "0.05", "0",
                       "--split-group", "meta:source_id", "--workers", "2", "--model-config", model_yaml(args)),
            args.out / "preprocess_corpus.log")
    return shards


def model_yaml(args) -> Path:
    """The ``--model`` encoder as a YAML file: ``cfdist preprocess --model-config`` takes its cutoff from it."""
    import yaml

    path = args.out / "model.yaml"
    text = yaml.safe_dump(json.loads(args.model))
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


def energy_model(args) -> str:
    return json.dumps({**json.loads(args.model), "energy": True})


def other_label(task: str) -> str:
    """The slice label a task does NOT use: the mixture's property dataset for that task."""
    (other,) = [t for t in TASK_CONFIG if t != task]
    return other


def slug(task: str) -> str:
    return task.replace(" ", "_")


def property_split(split: dict) -> dict:
    """The split of the mixture's property dataset: the slice's train crystals (trained on) and val
    crystals (pretraining's validation only); no test crystal ever (``cfdist preprocess`` rejects ids
    that are not in the split file, so test crystals never reach these shards)."""
    train, val = list(split["train"]), list(split["val"])
    if set(train) & set(val) or (set(train) | set(val)) & set(split["test"]):
        raise ValueError("the slice's split file has a crystal in two splits")
    return {"train": train, "val": val}


def property_shards(args, task: str) -> Path:
    """Shards of the slice's train + val crystals with only the label ``task`` does not use."""
    label = other_label(task)
    shards = args.out / "slice" / f"property-{slug(label)}"
    if not (shards / "manifest.json").is_file():
        split_file = args.out / "slice" / f"split-property-{slug(label)}.json"
        split_file.parent.mkdir(parents=True, exist_ok=True)
        split_file.write_text(json.dumps(property_split(json.loads(SLICE_SPLIT.read_text()))))
        run(cfdist_cmd("preprocess", SLICE, "--out", shards, "--targets", label, "--split-file", split_file,
                       "--workers", "1", "--model-config", model_yaml(args)),
            args.out / "slice" / f"preprocess-property-{slug(label)}.log")
    return shards


# CHGNet's loss weights on the E/F/S corpus (eV/atom, eV/A, GPa; configs/pretrain/mptrj.yaml)
CORPUS_LOSS = {"energy_weight": 1.0, "forces_weight": 1.0, "stress_weight": 0.1, "kind": "huber", "huber_delta": 0.1}


def mixture_datasets(task: str, corpus: Path, prop: Path, weights: dict[str, float] | None = None) -> list[dict]:
    """``data.datasets`` of the pretraining mixture for the downstream ``task``: the E/F/S corpus (an
    energy head) and the slice's other label (a property head). The task's own label is never a
    pretraining target (the no-leak rule: pretraining sees no label the fine-tuning is scored on)."""
    label = other_label(task)
    manifest = json.loads((Path(prop) / "manifest.json").read_text())
    if task in manifest["targets"] or manifest["splits"].get("test", 0):
        raise ValueError(f"{prop}: the property set for task {task!r} holds that label or test crystals "
                         f"(targets {manifest['targets']}, splits {manifest['splits']})")
    transforms = {label: "softplus"} if label == "gap pbe" else {}  # as configs/finetune/*bandgap.yaml
    out = [{"name": "corpus", "shards": str(corpus), "targets": ["energy"], "energy": True, "loss": CORPUS_LOSS},
           {"name": f"slice_{slug(label)}", "shards": str(prop), "targets": [label], "transforms": transforms}]
    if weights:
        out[0]["weight"], out[1]["weight"] = weights["corpus"], weights["slice"]
    return out


def pretrained_path(args, task: str) -> Path:
    """The checkpoint the ``task``'s pretrained arm starts from: one per task (mixture mode), or the
    one energy model (``--pretrain-mode energy``)."""
    name = "pretrained" if args.pretrain_mode == "energy" else f"pretrained-{slug(task)}"
    return args.out / "runs" / name / "model.pt"


def pretrain_overrides(args, steps: int) -> list[str]:
    return [f"max_steps={steps}", f"data.max_structures={args.pretrain_batch}", f"log_every={max(1, steps // 20)}",
            f"val_every={steps}", f"checkpoint_every={steps}", f"optim.warmup_steps={max(1, steps // 20)}",
            f"seed={args.pretrain_seed}"]


def section_pretrain(args) -> dict:
    return pretrain_energy(args) if args.pretrain_mode == "energy" else pretrain_mixture(args)


def pretrain_mixture(args) -> dict:
    """One mixture pretraining per task: the E/F/S corpus + the slice's other label, ``--parallel``
    runs at a time, ``--threads`` threads each."""
    corpus = corpus_shards(args)
    weights = None
    if args.pretrain_weights:
        weights = dict((k, float(v)) for k, v in (kv.split("=") for kv in args.pretrain_weights.split(",")))
        if set(weights) != {"corpus", "slice"}:
            raise SystemExit(f"--pretrain-weights: corpus=W,slice=W, got {args.pretrain_weights}")
    jobs, info = {}, {}
    for task in args.tasks:
        datasets = mixture_datasets(task, corpus, property_shards(args, task), weights)
        name = pretrained_path(args, task).parent.name
        info[task] = {"run": name, "datasets": datasets}
        if pretrained_path(args, task).is_file():
            continue
        jobs[name] = (cfdist_cmd("pretrain", "--config", "mptrj", "--no-ray", "data.shards=",
                                 f"data.datasets={json.dumps(datasets)}", f"data.temperature={args.pretrain_temperature}",
                                 f"output_dir={args.out / 'runs'}", f"run_name={name}", f"model={args.model}",
                                 *pretrain_overrides(args, args.pretrain_steps)),
                      args.out / f"{name}.log")
    walls = parallel(jobs, args.parallel, threads=args.threads)
    print(f"\n## Mixture pretraining: {args.pretrain_steps} steps of {args.pretrain_batch} structures")
    for task, rec in info.items():
        rec.update(wall_s=walls.get(rec["run"]), val=last_val(args.out / "runs" / rec["run"]))
        print(f"- {task}: {[d['name'] for d in rec['datasets']]}, wall {rec['wall_s'] or float('nan'):.0f} s; "
              f"validation {rec['val']}")
    return {"mode": "mixture", "steps": args.pretrain_steps, "batch": args.pretrain_batch,
            "temperature": args.pretrain_temperature, "weights": weights, "tasks": info, "model": json.loads(args.model)}


def pretrain_energy(args) -> dict:
    """The energy-only mode: one energy model on the E/F/S corpus for every task."""
    shards = corpus_shards(args)
    manifest = json.loads((shards / "manifest.json").read_text())
    run_dir = args.out / "runs" / "pretrained"
    wall = None
    if not (run_dir / "model.pt").is_file():
        steps = args.pretrain_steps
        wall = run(cfdist_cmd("pretrain", "--config", "mptrj", "--no-ray", f"data.shards={shards}",
                              f"output_dir={args.out / 'runs'}", "run_name=pretrained", f"model={energy_model(args)}",
                              *pretrain_overrides(args, steps)),
                   args.out / "pretrain.log", threads=args.threads)
    val = last_val(run_dir)
    print(f"\n## Pretraining: {manifest['splits']} structures, {args.pretrain_steps} steps of "
          f"{args.pretrain_batch}, wall {wall or float('nan'):.0f} s; validation {val}")
    return {"mode": "energy", "splits": manifest["splits"], "steps": args.pretrain_steps, "batch": args.pretrain_batch,
            "wall_s": wall, "val": val, "model": json.loads(energy_model(args))}


def last_val(run_dir: Path) -> dict:
    """The last ``val_mae/...`` numbers of a pretraining run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    out = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            out.update({k: v for k, v in rec.items() if k.startswith("val_mae")})
    return out


# ----------------------------------------------------------------------------- 2. fine-tuning
def subset_shards(args, size: int, seed: int) -> Path:
    """Shards of the slice: the first ``size`` train ids shuffled with ``seed``, the slice's val and test."""
    import random

    shards = args.out / "slice" / f"n{size}-s{seed}"
    if not (shards / "manifest.json").is_file():
        split = json.loads(SLICE_SPLIT.read_text())
        train = sorted(split["train"])
        random.Random(seed).shuffle(train)
        if size > len(train):
            raise SystemExit(f"--sizes {size}: the slice has {len(train)} train crystals")
        split_file = args.out / "slice" / f"split-n{size}-s{seed}.json"
        split_file.parent.mkdir(parents=True, exist_ok=True)
        split_file.write_text(json.dumps({"train": train[:size], "val": split["val"], "test": split["test"]}))
        run(cfdist_cmd("preprocess", SLICE, "--out", shards, "--targets", "e_form", "gap pbe", "--split-file",
                       split_file, "--workers", "1", "--model-config", model_yaml(args)),
            args.out / "slice" / f"preprocess-n{size}-s{seed}.log")
    return shards


def section_finetune(args) -> dict:
    for task in args.tasks:
        if "pretrained" in args.inits and not pretrained_path(args, task).is_file():
            raise SystemExit(f"{pretrained_path(args, task)}: run the pretrain section first")
    jobs, meta = {}, {}
    for size in args.sizes:
        for seed in args.seeds:
            shards = subset_shards(args, size, seed)
            for task in args.tasks:
                for init in args.inits:
                    name = f"{task.replace(' ', '_')}-n{size}-s{seed}-{init}"
                    meta[name] = (task, size, seed, init)
                    if (args.out / "runs" / name / "results.json").is_file():
                        continue
                    # from the mixture: a fresh head for the task's target (the other label's head
                    # is left behind) and layer-wise lr decay; same epochs, batch and lr as scratch
                    extra = ([f"checkpoint={pretrained_path(args, task)}", f"transfer.head={args.ft_head}",
                              f"optim.layer_decay={args.ft_layer_decay}"] if init == "pretrained"
                             else [f"model={json.dumps({**json.loads(args.model), 'envelope': True})}"])
                    cmd = cfdist_cmd("finetune", "--config", TASK_CONFIG[task], f"data.shards={shards}",
                                     f"data.targets={json.dumps([task])}", f"epochs={args.ft_epochs}",
                                     f"swa_epochs={max(1, args.ft_epochs // 4)}", f"data.batch_size={args.ft_batch}",
                                     f"init_from={init}", f"seed={seed}", f"output_dir={args.out / 'runs'}",
                                     f"run_name={name}", "scaling.threads=1", "overwrite=true", *extra)
                    jobs[name] = (cmd, args.out / f"{name}.log")
    parallel(jobs, args.parallel)
    rows = {}
    for name, (task, size, seed, init) in meta.items():
        res = json.loads((args.out / "runs" / name / "results.json").read_text())
        rows[name] = {"task": task, "size": size, "seed": seed, "init": init,
                      "mae": res["test"]["swa"][task]["mae"], "best": res["test"]["best"][task]["mae"],
                      "train_mean": res["test"]["train_mean"][task]["mae"]}
    tables = {key: summarise(rows, key) for key in ("mae", "best")}
    for key, table in tables.items():
        print(f"\n## Transfer: fine-tuning on the MEGNet slice, test split ({args.ft_epochs} epochs, batch "
              f"{args.ft_batch}, {'SWA' if key == 'mae' else 'best-validation'} model), mean +- std over seeds "
              f"{args.seeds}")
        print("| task | train crystals | scratch | from pretrained | ratio | train-mean |\n|---|---|---|---|---|---|")
        for (task, size), row in table.items():
            print(f"| {task} | {size} | {row['scratch'][0]:.4f} +- {row['scratch'][1]:.4f} | "
                  f"{row['pretrained'][0]:.4f} +- {row['pretrained'][1]:.4f} | {row['ratio']:.3f} | "
                  f"{row['train_mean']:.4f} |")
    return {"runs": rows, "table": {f"{t}|{n}": v for (t, n), v in tables["mae"].items()},
            "table_best": {f"{t}|{n}": v for (t, n), v in tables["best"].items()},
            "ft_epochs": args.ft_epochs, "ft_batch": args.ft_batch, "ft_head": args.ft_head,
            "ft_layer_decay": args.ft_layer_decay, "pretrain_mode": args.pretrain_mode}


def summarise(rows: dict, key: str = "mae") -> dict:
    """{(task, size): {scratch: (mean, std), pretrained: (mean, std), ratio, train_mean}} over seeds, of
    the test MAE ``key`` (``mae``: the SWA model; ``best``: the best-validation epoch's model)."""
    groups: dict = {}
    for row in rows.values():
        groups.setdefault((row["task"], row["size"]), {}).setdefault(row["init"], []).append(row)
    out = {}
    for group, by_init in sorted(groups.items()):
        stats = {init: (statistics.fmean(r[key] for r in rs),
                        statistics.stdev([r[key] for r in rs]) if len(rs) > 1 else 0.0)
                 for init, rs in by_init.items()}
        if {"scratch", "pretrained"} <= set(stats):
            out[group] = {**stats, "ratio": stats["pretrained"][0] / stats["scratch"][0],
                          "train_mean": statistics.fmean(r["train_mean"] for r in by_init["scratch"])}
    return out


# ----------------------------------------------------------------------------- 3. MACE
def frame_shards(args) -> Path:
    shards = args.out / "mptrj_shards"
    if not (shards / "manifest.json").is_file():
        run(cfdist_cmd("preprocess", *sorted(FRAMES.glob("*.extxyz.gz")), "--out", shards, "--targets", "energy",
                       "--with-forces", "--with-stress", "--split-fractions", "0.8", "0.1", "0.1",
                       "--split-group", "meta:mptrj_traj_id", "--split-group-missing", "id", "--workers", "2",
                       "--model-config", model_yaml(args)),
            args.out / "preprocess_mptrj.log")
    return shards


def shard_frames(shards: Path, split: str) -> list:
    """The frames of one split as ASE Atoms with energy / forces / stress in ``info`` / ``arrays``
    (the rows cfdist trains on, so both models see exactly the same structures and labels)."""
    import ase
    import numpy as np

    from cfdist.data import iter_local_shards
    from cfdist.manifest import ShardSet

    frames = []
    columns = ["id", "numbers", "lattice", "positions", "y.energy", "forces", "stress"]
    for table in iter_local_shards([e.path for e in ShardSet(shards).files(split)], columns=columns):
        for row in table.to_pylist():
            n = len(row["numbers"])
            atoms = ase.Atoms(numbers=row["numbers"], cell=np.reshape(row["lattice"], (3, 3)),
                              positions=np.reshape(row["positions"], (n, 3)), pbc=True)
            atoms.info["REF_energy"] = row["y.energy"]
            atoms.info["REF_stress"] = np.reshape(row["stress"], (3, 3))
            atoms.arrays["REF_forces"] = np.reshape(np.asarray(row["forces"], dtype=np.float64), (n, 3))
            atoms.info["id"] = row["id"]
            frames.append(atoms)
    return frames


def maes(pred: list[tuple[float, "np.ndarray", "np.ndarray"]], frames: list) -> dict:
    """Energy meV/atom, forces meV/A (per component), stress GPa (per component) MAE."""
    import numpy as np

    e = [abs(p[0] - f.info["REF_energy"]) / len(f) for p, f in zip(pred, frames)]
    fo = np.concatenate([np.abs(p[1] - f.arrays["REF_forces"]).ravel() for p, f in zip(pred, frames)])
    st = np.concatenate([np.abs(p[2] - f.info["REF_stress"]).ravel() for p, f in zip(pred, frames)])
    return {"energy": 1000 * float(np.mean(e)), "forces": 1000 * float(fo.mean()),
            "stress": 160.21766208 * float(st.mean())}


def cfdist_predictions(model_path: Path, frames: list) -> list:
    import torch

    import cfdist
    from cfdist.calculator import CrystalformerCalculator

    calc = CrystalformerCalculator(cfdist.load(model_path), dtype="float64", skin=0.0)
    out = []
    with torch.enable_grad():
        for atoms in frames:
            a = atoms.copy()
            a.calc = calc
            out.append((a.get_potential_energy(), a.get_forces(), a.get_stress(voigt=False)))
    return out


def mace_predictions(model_path: Path, frames: list) -> list:
    from mace.calculators import MACECalculator

    calc = MACECalculator(model_paths=str(model_path), device="cpu", default_dtype="float64")
    out = []
    for atoms in frames:
        a = atoms.copy()
        a.calc = calc
        out.append((a.get_potential_energy(), a.get_forces(), a.get_stress(voigt=False)))
    return out


def section_mace(args) -> dict:
    import ase.io

    shards = frame_shards(args)
    mdir = args.out / "mace"
    mdir.mkdir(parents=True, exist_ok=True)
    splits = {s: shard_frames(shards, s) for s in ("train", "val", "test")}
    if args.mace_frames:  # smoke runs: MACE on the first frames only (cfdist's steps are capped instead)
        splits = {s: frames[:args.mace_frames] for s, frames in splits.items()}
    # MACE's own train / validation files: a (seeded) subset where MACE cannot get through all the
    # train frames in the CPU time cfdist gets (its validation only picks its saved epoch); both
    # models are scored on all the same test frames
    mace_files = {"train": splits["train"], "val": splits["val"]}
    for s, limit in (("train", args.mace_train_frames), ("val", args.mace_val_frames)):
        if limit and limit < len(mace_files[s]):
            import random

            mace_files[s] = random.Random(0).sample(mace_files[s], limit)
    for s, frames in {**mace_files, "test": splits["test"]}.items():
        ase.io.write(mdir / f"{s}.extxyz", frames, format="extxyz")
    elements = sorted({int(z) for frames in splits.values() for atoms in frames for z in atoms.numbers})
    budget = args.mace_seconds
    # cfdist: steps that fit the budget, from a measured rate (first 20 steps), then the run itself
    jobs = {}
    cf_run = args.out / "runs" / "mace-cfdist"
    cf_steps = args.mace_cfdist_steps
    jobs["cfdist"] = (["timeout", str(int(budget * 3)),
                       *cfdist_cmd("pretrain", "--config", "mptrj", "--no-ray", f"data.shards={shards}",
                                   f"output_dir={args.out / 'runs'}", "run_name=mace-cfdist",
                                   f"model={energy_model(args)}", f"max_steps={cf_steps}",
                                   f"data.max_structures={args.pretrain_batch}", f"log_every={max(1, cf_steps // 20)}",
                                   f"val_every={cf_steps}", f"checkpoint_every={cf_steps}",
                                   f"optim.warmup_steps={max(1, cf_steps // 20)}")],
                      args.out / "mace-cfdist.log")
    mace_model = mdir / "mace_small.model"
    jobs["mace"] = (["timeout", str(int(budget * 3)), str(Path(sys.executable).parent / "mace_run_train"),
                     "--name", "mace_small", "--work_dir", str(mdir), "--train_file", str(mdir / "train.extxyz"),
                     "--valid_file", str(mdir / "val.extxyz"), "--energy_key", "REF_energy", "--forces_key",
                     "REF_forces", "--stress_key", "REF_stress", "--model", "MACE", "--hidden_irreps", args.mace_irreps,
                     "--r_max", "5.0", "--num_interactions", "2", "--max_L", "1", "--correlation", "2",
                     "--atomic_numbers", str(elements),  # every element of any split (a test
                     # frame's element missing from the train frames would have no index in MACE's table)
                     "--E0s", "average", "--loss", "universal", "--energy_weight", "1", "--forces_weight", "1",
                     "--stress_weight", "1", "--compute_stress", "True", "--batch_size", str(args.mace_batch or args.pretrain_batch),
                     "--max_num_epochs", str(args.mace_epochs), "--lr", "0.005", "--device", "cpu",
                     "--default_dtype", "float32", "--seed", "0", "--eval_interval", str(args.mace_epochs),
                     "--num_workers", "0", "--save_cpu"], mdir / "mace_train.log")
    walls_file = mdir / "walls.json"  # kept with the models, so a rerun that reuses them reports them
    done = {"cfdist": (cf_run / "model.pt").is_file(), "mace": mace_model.is_file()}
    todo = {name: job for name, job in jobs.items() if not done[name]}  # a finished model is kept
    walls = json.loads(walls_file.read_text()) if walls_file.is_file() else {}
    if todo:
        cpu: dict[str, float] = {}
        walls.update(parallel(todo, 2, threads=1, cpu=cpu))
        walls.update({f"{k}_cpu": v for k, v in cpu.items()})
        walls_file.write_text(json.dumps(walls))
    if not mace_model.is_file():
        found = sorted(mdir.glob("*.model"))
        if not found:
            raise SystemExit(f"no MACE model written; see {mdir / 'mace_train.log'}")
        mace_model = found[0]
    test = splits["test"]
    results = {"walls": walls, "n": {s: len(f) for s, f in splits.items()},
               "mace_n": {s: len(f) for s, f in mace_files.items()},
               "cfdist": maes(cfdist_predictions(cf_run / "model.pt", test), test),
               "mace": maes(mace_predictions(mace_model, test), test)}
    print(f"\n## cfdist energy model vs MACE from scratch on the MPtrj frames ({results['n']}), one thread each, "
          f"side by side")
    print("| model | wall s | CPU s | energy MAE (meV/atom) | force MAE (meV/A) | stress MAE (GPa) |\n"
          "|---|---|---|---|---|---|")
    for name in ("cfdist", "mace"):
        r = results[name]
        print(f"| {name} | {walls.get(name, float('nan')):.0f} | {walls.get(name + '_cpu', float('nan')):.0f} | "
              f"{r['energy']:.1f} | {r['forces']:.1f} | {r['stress']:.3f} |")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="pretrain,finetune")
    parser.add_argument("--corpus", type=Path, default=None, help="bench/make_transfer_corpus.py output")
    parser.add_argument("--out", type=Path, default=Path("/tmp/cfdist-bench-transfer"))
    parser.add_argument("--model", default=DEFAULT_MODEL, help="encoder config (JSON mapping)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each pretraining run")
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--pretrain-batch", type=int, default=32)
    parser.add_argument("--pretrain-seed", type=int, default=0)
    parser.add_argument("--pretrain-mode", default="mixture", choices=("mixture", "energy"),
                        help="mixture: per task, the E/F/S corpus + the slice's other label; energy: the corpus alone")
    parser.add_argument("--pretrain-temperature", type=float, default=2.0, help="p_i ~ n_i^(1/T) over the train sizes")
    parser.add_argument("--pretrain-weights", default="", help="corpus=W,slice=W: explicit sampling weights instead")
    parser.add_argument("--ft-head", default="replace", help="transfer.head of the pretrained arm")
    parser.add_argument("--ft-layer-decay", type=float, default=0.8, help="optim.layer_decay of the pretrained arm")
    parser.add_argument("--tasks", default="e_form,gap pbe")
    parser.add_argument("--sizes", default="100,300,1000")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--ft-epochs", type=int, default=30)
    parser.add_argument("--ft-batch", type=int, default=32)
    parser.add_argument("--inits", default="scratch,pretrained",
                        help="which fine-tuning runs (scratch needs no pretrained model: start it early)")
    parser.add_argument("--parallel", type=int, default=2, help="fine-tuning runs at a time (one thread each)")
    parser.add_argument("--mace-seconds", type=int, default=300, help="each mace-section run is stopped after 3x this")
    parser.add_argument("--mace-epochs", type=int, default=5)
    parser.add_argument("--mace-cfdist-steps", type=int, default=400)
    parser.add_argument("--mace-irreps", default="32x0e + 32x1o")
    parser.add_argument("--mace-frames", type=int, default=0, help="MACE on the first N frames of each split (0: all)")
    parser.add_argument("--mace-train-frames", type=int, default=0,
                        help="MACE trains on N train frames drawn with seed 0 (0: all; cfdist always sees all)")
    parser.add_argument("--mace-val-frames", type=int, default=0, help="MACE validates on N val frames (0: all)")
    parser.add_argument("--mace-batch", type=int, default=0, help="MACE's batch size (0: --pretrain-batch)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, few steps, one size/seed")
    args = parser.parse_args()
    if args.quick:
        args.model, args.pretrain_steps, args.pretrain_batch = QUICK_MODEL, 4, 8
        args.sizes, args.seeds, args.ft_epochs, args.ft_batch = "40", "0", 2, 16
        args.mace_epochs, args.mace_cfdist_steps, args.mace_irreps, args.mace_frames = 1, 4, "8x0e", 32
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.inits = [i for i in args.inits.split(",") if i]
    if not set(args.inits) <= {"scratch", "pretrained"}:
        parser.error(f"--inits: scratch and/or pretrained, got {args.inits}")
    for task in args.tasks:
        if task not in TASK_CONFIG:
            parser.error(f"--tasks: {task!r} is not one of {sorted(TASK_CONFIG)}")
    args.out = args.out.resolve()
    args.corpus = args.corpus.resolve() if args.corpus else None
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    sections = {"pretrain": section_pretrain, "finetune": section_finetune, "mace": section_mace}
    for name in args.sections.split(","):
        if name not in sections:
            parser.error(f"--sections: {name!r} is not one of {sorted(sections)}")
        start = time.perf_counter()
        results[name] = sections[name](args)
        results[name]["section_wall_s"] = time.perf_counter() - start
        results_file.write_text(json.dumps(results, indent=1, default=str))
    print(f"\nall numbers: {results_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
