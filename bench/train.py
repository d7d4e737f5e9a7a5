"""Training throughput on the real slice's shards: workers, ZeRO stage, precision, activation checkpointing.

    python bench/train.py [--shards outputs/example/shards] [--steps 30] [--batch 64] [--quick]

Every row is a real ``launch/pretrain.py`` Ray Train run (TorchTrainer + DeepSpeed, default
853,505-parameter model) in one shared local Ray instance, side by side in one process. Shards
default to the example's (run ``python launch/example.py`` first, or pass --shards).

Columns: structures/s (total over workers) = median over log windows after the first (which
holds start-up), and the same per worker; data wait % = mean share of the step spent waiting for
the next packed batch; peak memory = max RSS per worker (MB). On a 2-core machine two workers
share the two cores (and their prefetch threads), so "2 workers" measures contention, not scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path


ROWS = [  # (workers, zero stage, precision, activation checkpointing)
    (1, 0, "fp32", False),
    (2, 0, "fp32", False),
    (2, 2, "fp32", False),
    (2, 3, "fp32", False),
    (2, 2, "bf16", False),
    (2, 2, "fp32", True),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, default=Path("outputs") / "example" / "shards")
    parser.add_argument("--out", type=Path, default=Path("/tmp/cfdist-bench-train"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64, help="max structures per worker and step")
    parser.add_argument("--quick", action="store_true", help="first two rows, 10 steps")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not (args.shards / "manifest.json").is_file():
        parser.error(f"{args.shards}: no shards (run python launch/example.py first, or pass --shards)")
    rows = ROWS[:2] if args.quick else ROWS
    steps = 10 if args.quick else args.steps

    from cfdist.train.config import load_pretrain_config
    from cfdist.train.driver import check_shards, resolve, run_ray

    results = []
    for workers, stage, precision, ckpt in rows:
        name = f"w{workers}-z{stage}-{precision}" + ("-ckpt" if ckpt else "")
        cfg = resolve(load_pretrain_config("megnet_slice", [
            f"data.shards={args.shards.resolve()}", f"output_dir={args.out.resolve()}", f"run_name={name}-{int(time.time())}",
            f"max_steps={steps}", "log_every=5", f"val_every={10**6}", f"checkpoint_every={steps}",
            f"data.max_structures={args.batch}", "data.max_entries=1000000", "data.verify_checksums=false",
            f"scaling.num_workers={workers}", "scaling.max_failures=0",
            f"deepspeed.zero_stage={stage}", f"deepspeed.precision={precision}",
            f"deepspeed.activation_checkpointing={str(ckpt).lower()}", "data.val_split="]))
        shards = check_shards(cfg)
        t0 = time.perf_counter()
        run_ray(cfg, shards)
        wall = time.perf_counter() - t0
        logs = [json.loads(line) for line in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
        logs = [r for r in logs if "structures_per_s" in r]
        steady = logs[1:] or logs
        results.append({
            "row": name, "workers": workers, "zero": stage, "precision": precision, "ckpt": ckpt,
            "structures_per_s": statistics.median(r["structures_per_s"] for r in steady),
            "per_worker": statistics.median(r["structures_per_s_per_worker"] for r in steady),
            "entries_per_s": statistics.median(r["entries_per_s"] for r in steady),
            "data_wait_pct": statistics.mean(r["data_wait_pct"] for r in steady),
            "step_time_s": statistics.median(r["step_time_s"] for r in steady),
            "structures_per_step": statistics.mean(r["structures_per_step"] for r in steady),
            "peak_memory_mb": max(r["peak_memory_mb"] for r in logs),
            "fit_wall_s": wall,
        })
        print(f"done {name}: {results[-1]['structures_per_s']:.0f} structures/s", flush=True)

    import platform

    print(f"\n## Training throughput ({steps} steps per row, <= {args.batch} structures per worker-step, "
          f"default model; {os.cpu_count()} CPUs, {platform.processor() or platform.machine()})\n")
    print("| workers | ZeRO | precision | act. ckpt | structures/s | per worker | table entries/s | data wait % "
          "| step time (s) | structures/step | peak RSS/worker (MB) | fit wall (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['workers']} | {r['zero']} | {r['precision']} | {'on' if r['ckpt'] else 'off'} | "
              f"{r['structures_per_s']:.0f} | {r['per_worker']:.0f} | {r['entries_per_s']:,.0f} | "
              f"{r['data_wait_pct']:.1f} | {r['step_time_s']:.3f} | {r['structures_per_step']:.0f} | "
              f"{r['peak_memory_mb']:.0f} | {r['fit_wall_s']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
