"""Preprocessing throughput: the Ray Data job vs a plain loop over the same chunk function.

Replicates the real MEGNet slice (3,909 crystals, 1-25 atoms) to ``--n`` structures (default
100,000; ids made unique) in one JARVIS JSON file, then measures end to end (read -> validate
-> image tables at the default cutoff -> zstd Parquet):

* ``loop``: one process calling ``process_chunk`` over every chunk (no Ray) - the floor;
* ``ray-1`` / ``ray-2``: ``build_shards.build`` with 1 and 2 Ray Data workers (includes Ray
  start-up, actor start-up, planning and the final manifest pass).

and prints structures/s, structures/s per core, the Ray overhead and bytes per structure.

    python bench/preprocess.py [--n 100000] [--shard-size 4096] [--work /tmp/cfdist-bench-pre]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from preprocess.build_shards import Settings, build, process_chunk  # noqa: E402
from preprocess.readers import plan_chunks  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--shard-size", type=int, default=4096)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "megnet_slice.json.gz")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cfdist-bench-pre"))
    parser.add_argument("--skip-loop", action="store_true")
    args = parser.parse_args()

    from cfdist.config import CrystalformerConfig

    cutoff = CrystalformerConfig().cutoff
    with gzip.open(args.data, "rt") as f:
        base = json.load(f)
    records = []
    for k in range(args.n):
        rec = dict(base[k % len(base)])
        rec["id"] = f"{rec['id']}-r{k // len(base)}"
        records.append(rec)
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    raw = args.work / "replicated.json"
    raw.write_text(json.dumps(records))
    del records
    print(f"# {args.n:,} structures (MEGNet slice x{args.n / len(base):.1f}), cutoff {cutoff:.3f} A, "
          f"shard size {args.shard_size}, {os.cpu_count()} cores, input {raw.stat().st_size / 1e6:.0f} MB")
    settings = Settings(cutoff=cutoff, targets=["e_form"], shard_size=args.shard_size)
    rows = []

    if not args.skip_loop:
        out = args.work / "loop"
        chunks = plan_chunks(str(raw), "jarvis", args.shard_size)
        start = time.perf_counter()
        written = 0
        for index, chunk in enumerate(chunks):
            written += process_chunk(index, chunk, settings, str(out), None)["n_written"]
        elapsed = time.perf_counter() - start
        size = sum(p.stat().st_size for p in out.rglob("*.parquet"))
        rows.append(("loop (1 process, no Ray)", 1, elapsed, written, size))

    import ray

    for workers in (1, 2):
        out = args.work / f"ray-{workers}"
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", object_store_memory=512 * 1024**2)
        start = time.perf_counter()
        manifest = build([str(raw)], out, settings, workers=workers)
        elapsed = time.perf_counter() - start
        ray.shutdown()
        size = sum(s["bytes"] for s in manifest["shards"])
        rows.append((f"Ray Data, {workers} worker(s)", workers, elapsed, manifest["n_written"], size))

    print()
    print("| pipeline | workers | wall s | structures/s | structures/s/core | bytes/structure |")
    print("|---|---|---|---|---|---|")
    for name, workers, elapsed, written, size in rows:
        print(f"| {name} | {workers} | {elapsed:.1f} | {written / elapsed:,.0f} | {written / elapsed / workers:,.0f} | "
              f"{size / written:,.0f} |")
    by = {r[0]: r for r in rows}
    if not args.skip_loop:
        loop, ray1 = rows[0], rows[1]
        print(f"\nRay overhead (1 worker vs plain loop): {ray1[2] / loop[2]:.2f}x wall time")
    print(f"scaling 1 -> 2 workers: {rows[-2][2] / rows[-1][2]:.2f}x")
    del by


if __name__ == "__main__":
    main()
