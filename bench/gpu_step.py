#!/usr/bin/env python
"""Training throughput of the Crystalformer on one GPU, with torch alone.

    python bench/gpu_step.py --shards data/megnet_slice --json $OUT/gpu_step.json     # on a CUDA machine
    python bench/gpu_step.py --shards DIR --device cpu --quick                          # CI smoke run (tiny model)

It needs only torch, numpy, pyarrow and pyyaml (and cfdist's model, config, batch, graph, shards,
manifest, compile and dense-box modules, imported from the checkout when cfdist is not installed):
no ray, deepspeed, pymatgen or ase, so it runs on a bare GPU machine.
The shards are made beforehand on a machine with the full stack (the MEGNet slice: ~8 MB):

    cfdist preprocess examples/data/megnet_slice.json.gz --out data/megnet_slice \\
        --targets e_form "gap pbe" --split-file examples/data/megnet_slice_split.json --model-config crystalformer

What it measures (one process, one device, cases side by side): a training step = geometry +
forward + backward + AdamW step (L1 loss on the standardised first target), train mode, for the
default model (853,505 parameters) at 64, 128 and 256 structures per batch (the paper trains with
128 and 256), in fp32 and under bf16 autocast, eager and compiled (``cfdist.compile``: dynamic
shapes, inductor), plus the reference implementation's dense-box attention math
(``cfdist.ops.dense_box``: every atom pair x a 5x5x5 translation box) eager fp32 at the same batches
for the ratio. Batches are real shard rows (a seeded permutation of ``--split``; every step takes
the next batch of a pool of distinct batches, so shapes change every step as in training),
collated and moved to the device before timing, as a data loader's prefetch would (the collate
also computes the pair and block indices, so the step itself never reads anything back to the host).

Per case: the sigma statistics are fitted on the first pool batch before compiling
(``Crystalformer.fit_sigma_statistics``), then warm-up steps (the compiled cases compile there;
"warm-up s" holds it), then timed
steps (CUDA synchronised) until ``--steps`` or ``--case-s`` seconds; structures/s = structures per
step / median step time; peak memory = ``torch.cuda.max_memory_allocated`` since the case began
(model, optimiser state and activations; on CPU the process's max RSS). A case that runs out of
GPU memory is reported as OOM and the run goes on. The whole run keeps to ``--budget-s`` (default
450 s, inside 8 minutes with start-up): cases that would not fit are reported as skipped.

Output: one markdown table (plus the ratios), and the same numbers as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

T_START = time.perf_counter()
# --quick: a tiny model with a shorter cutoff (fewer entries), for the CPU smoke run in CI
TINY = {"n_blocks": 2, "d_model": 32, "n_heads": 4, "d_ff": 64, "n_basis": 16, "head_hidden": 32, "cutoff_sigmas": 4.0}
COMPILE_RESERVE_S = 180.0  # a compiled case starts only with this much budget left (its compile takes most)
CASE_RESERVE_S = 15.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=Path, required=True, help="a shard directory (cfdist preprocess)")
    p.add_argument("--split", default="train", help="split whose rows make the batches ('' = all)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--model", default="crystalformer", help="packaged model config name or YAML path")
    p.add_argument("--batches", default="64,128,256", help="structures per step")
    p.add_argument("--precisions", default="fp32,bf16", help="fp32 and/or bf16 (autocast)")
    p.add_argument("--modes", default="eager,compiled,dense", help="eager, compiled, dense (dense box, eager)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per case (>= 3 for compiled cases)")
    p.add_argument("--pool", type=int, default=6, help="distinct batches per batch size")
    p.add_argument("--case-s", type=float, default=30.0, help="stop timing a case after this many seconds")
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of the whole run")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=Path("gpu_step.json"))
    p.add_argument("--quick", action="store_true",
                   help="CI smoke run: tiny model, batches 4,8, 2 timed steps, every mode and precision")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.batches, args.steps, args.pool, args.case_s = "tiny", "4,8", 2, 2, 10.0
    args.warmup = max(args.warmup, 3 if "compiled" in args.modes else 1)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        import cfdist
    except ImportError:  # a bare GPU machine: cfdist is not installed (pip would want ray & co.), run from the checkout
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import numpy as np
    import pyarrow as pa
    import torch

    import cfdist
    from cfdist.compile import compile_model
    from cfdist.config import CrystalformerConfig
    from cfdist.manifest import ShardSet
    from cfdist.model import Crystalformer, count_parameters
    from cfdist.shards import collate_arrow, read_shard

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    shards = ShardSet(args.shards)
    files = [e.path for e in (shards.files(args.split) if args.split else shards.entries)]
    if not files:
        raise SystemExit(f"{args.shards}: no shard files in split {args.split!r}")
    target = shards.targets[0]
    table = pa.concat_tables([read_shard(f) for f in files])
    table = table.take(pa.array(np.random.default_rng(args.seed).permutation(table.num_rows)))
    mean, std = shards.target_stats(target, args.split or "train")
    config = CrystalformerConfig(**{**TINY, "target_names": [target]}) if args.model == "tiny" else \
        CrystalformerConfig.from_dict({**_model_mapping(args.model), "target_names": [target]})
    if shards.cutoff + 1e-9 < config.cutoff:
        raise SystemExit(f"{args.shards}: tables reach {shards.cutoff:.4f} A, the model needs {config.cutoff:.4f} A")

    device_name = torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    header = {"device": device_name, "torch": torch.__version__, "cuda": torch.version.cuda, "cfdist": cfdist.__version__,
              "python": platform.python_version(), "model": args.model, "parameters": count_parameters(Crystalformer(config)),
              "shards": str(args.shards), "rows": table.num_rows, "float32_matmul_precision": torch.get_float32_matmul_precision(),
              "compile_backend": args.compile_backend, "argv": sys.argv[1:]}
    print(f"# bench/gpu_step.py on {device_name}: torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"Python {platform.python_version()}, model {args.model} ({header['parameters']:,} parameters), "
          f"{table.num_rows} rows of {args.shards}", flush=True)

    sizes = [int(b) for b in args.batches.split(",")]
    pools = {}
    for size in sizes:  # distinct batches per size, cycling through the permuted rows
        n = max(1, min(args.pool, table.num_rows // size))
        pools[size] = [collate_arrow(table.slice(k * size, size), [target], shards.cutoff).to(device)
                       for k in range(n)]

    def loss_of(model, batch):
        y = model(batch).float()
        t = ((batch.labels - mean) / std).to(y.dtype)
        mask = torch.isfinite(t)
        return torch.where(mask, (y - torch.nan_to_num(t)).abs(), torch.zeros_like(y)).sum() / mask.sum().clamp_min(1)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    precisions = args.precisions.split(",")
    modes = args.modes.split(",")
    plan = [(m, p) for m in ("eager", "dense") if m in modes for p in (["fp32"] if m == "dense" else precisions)]
    plan += [("compiled", p) for p in precisions if "compiled" in modes]
    cases: list[dict] = []
    for mode, precision in plan:
        # one model and optimiser per (mode, precision) across the batch sizes: a compiled model then
        # compiles once (dynamic shapes), not once per batch size
        torch.manual_seed(args.seed)
        model = Crystalformer(config).to(device).train()
        if mode == "dense":
            from cfdist.ops.dense_box import DenseBoxAttention

            model.attention_backend = DenseBoxAttention(box_range=2)
        model.fit_sigma_statistics(pools[sizes[0]][0])  # before compiling, as the training loops do
        if mode == "compiled":
            compile_model(model, backend=args.compile_backend)
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), weight_decay=1e-5,
                                      **({"fused": True} if cuda else {}))
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        compiled_yet = False
        for size in sizes:
            case = {"mode": mode, "precision": precision, "batch": size, "status": "ok"}
            cases.append(case)
            left = args.budget_s - (time.perf_counter() - T_START)
            need = COMPILE_RESERVE_S if (mode == "compiled" and not compiled_yet) else CASE_RESERVE_S
            if left < need:
                case["status"] = f"skipped (time budget: {left:.0f} s left)"
                continue
            pool = pools[size]
            try:
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                sync()
                t0 = time.perf_counter()
                for k in range(args.warmup):
                    train_step(model, optimizer, autocast, pool[k % len(pool)], loss_of)
                sync()
                case["warmup_s"] = time.perf_counter() - t0
                compiled_yet = True
                times, t_case = [], time.perf_counter()
                for k in range(args.steps):
                    batch = pool[(args.warmup + k) % len(pool)]
                    sync()
                    t0 = time.perf_counter()
                    train_step(model, optimizer, autocast, batch, loss_of)
                    sync()
                    times.append(time.perf_counter() - t0)
                    if time.perf_counter() - t_case > args.case_s:
                        break
                step_s = statistics.median(times)
                used = [pool[(args.warmup + k) % len(pool)] for k in range(len(times))]
                case.update(steps=len(times), step_ms=1e3 * step_s, structures_per_s=size / step_s,
                            atoms_per_step=statistics.mean(int(b.positions.shape[0]) for b in used),
                            entries_per_step=statistics.mean(b.n_entries for b in used),
                            peak_mb=(torch.cuda.max_memory_allocated(device) if cuda else
                                     resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20)
            except torch.OutOfMemoryError:
                case["status"] = "OOM"
                optimizer.zero_grad(set_to_none=True)
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
            print(_row(case), flush=True)
        del model, optimizer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    result = {"header": header, "cases": cases, "wall_s": time.perf_counter() - T_START}
    print_tables(result, sizes, precisions)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
        print(f"\nwrote {args.json}")
    return result


def train_step(model, optimizer, autocast, batch, loss_of) -> None:
    """Forward (under ``autocast``) + backward + optimiser step."""
    optimizer.zero_grad(set_to_none=True)
    with autocast:
        loss = loss_of(model, batch)
    loss.backward()
    optimizer.step()


def _model_mapping(name: str) -> dict:
    from cfdist.config import load_yaml, resolve_config

    return load_yaml(resolve_config(name, "model"))


def _row(case: dict) -> str:
    if case["status"] != "ok":
        return f"{case['mode']:>8} {case['precision']:>4} batch {case['batch']:>4}: {case['status']}"
    return (f"{case['mode']:>8} {case['precision']:>4} batch {case['batch']:>4}: {case['structures_per_s']:10.0f} "
            f"structures/s, {case['step_ms']:8.1f} ms/step, peak {case['peak_mb']:8.0f} MB, "
            f"warm-up {case['warmup_s']:6.1f} s, {case['steps']} steps")


def print_tables(result: dict, sizes: list[int], precisions: list[str]) -> None:
    cases = result["cases"]
    print("\n| mode | precision | structures/step | structures/s | ms/step | peak memory MB | atoms/step | "
          "entries/step | warm-up s (incl. compile) | status |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in cases:
        ok = c["status"] == "ok"
        cells = [c["mode"], c["precision"], str(c["batch"])]
        cells += ([f"{c['structures_per_s']:.0f}", f"{c['step_ms']:.1f}", f"{c['peak_mb']:.0f}",
                   f"{c['atoms_per_step']:.0f}", f"{c['entries_per_step']:.0f}", f"{c['warmup_s']:.1f}"]
                  if ok else ["-"] * 6)
        print("| " + " | ".join(cells + [c["status"]]) + " |")
    by = {(c["mode"], c["precision"], c["batch"]): c.get("structures_per_s") for c in cases}
    print("\n| structures/step | precision | compiled / eager | table (eager) / dense box (eager) | bf16 / fp32 (eager) |")
    print("|---|---|---|---|---|")

    def ratio(a, b):
        return f"{a / b:.2f}" if a and b else "-"

    for size in sizes:
        for p in precisions:
            print(f"| {size} | {p} | {ratio(by.get(('compiled', p, size)), by.get(('eager', p, size)))} | "
                  f"{ratio(by.get(('eager', p, size)), by.get(('dense', p, size)))} | "
                  f"{ratio(by.get(('eager', 'bf16', size)), by.get(('eager', 'fp32', size))) if p == 'bf16' else '-'} |")
    print(f"\ntotal {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
