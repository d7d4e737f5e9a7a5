"""Built-in example: real crystals -> Ray preprocessing -> shards -> Ray Train + DeepSpeed pretraining -> predictions.

1. Preprocess the MEGNet slice shipped in ``../shared/data`` (3,909 Materials Project
   crystals, MEGNet split) into image-table shards with the Ray Data job
   (``preprocess/build_shards.py``, on a local Ray instance it starts itself).
2. Pretrain the default Crystalformer on the train shards with ``launch/pretrain.py``:
   a Ray Train TorchTrainer with 2 workers, DeepSpeed ZeRO-2, streamed entry-budget batches,
   validation MAE, checkpoints, and a portable ``model.pt`` at the end (a short run: the
   point is the pipeline, not the accuracy).
3. Load ``model.pt`` with ``cfdist.load`` (no Ray, no DeepSpeed), predict the test split and
   write ``outputs/example/predictions.csv`` with the test MAE next to the train-mean predictor.

    python launch/example.py [--steps 40] [--workers 2] [--out outputs/example]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA / "megnet_slice.json.gz")
    parser.add_argument("--split", type=Path, default=DATA / "megnet_slice_split.json")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "example")
    parser.add_argument("--steps", type=int, default=40, help="pretraining optimiser steps")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    for path in (args.data, args.split):
        if not path.exists():
            parser.error(f"not found: {path}")
    t_start = time.perf_counter()
    from cfdist import CrystalformerConfig

    config = CrystalformerConfig.from_yaml(REPO / "configs" / "model" / "crystalformer.yaml")
    shards = args.out / "shards"
    print(f"== 1. preprocess {args.data.name} (cutoff {config.cutoff:.3f} A) -> {shards}", flush=True)
    from preprocess.build_shards import Settings, build

    manifest = build([str(args.data)], shards, Settings(cutoff=config.cutoff, targets=["e_form"],
                                                          split_file=str(args.split.resolve()), shard_size=1024))

    import ray

    ray.shutdown()  # the preprocessing instance; pretraining starts its own with spare CPUs for Ray Data
    print(f"\n== 2. pretrain {args.steps} steps on {args.workers} Ray Train workers (DeepSpeed ZeRO-2)", flush=True)
    from launch import pretrain

    run_name = "pretrain"
    pretrain.main(["--config", str(REPO / "configs" / "pretrain" / "megnet_slice.yaml"),
                   f"data.shards={shards}", f"output_dir={args.out / 'runs'}", f"run_name={run_name}",
                   f"max_steps={args.steps}", f"scaling.num_workers={args.workers}", "scaling.max_failures=0",
                   "data.max_structures=64", "log_every=5", f"val_every={args.steps}",
                   f"checkpoint_every={args.steps}"])
    run_dir = args.out / "runs" / run_name
    import ray

    ray.shutdown()

    print("\n== 3. predict the test split with the portable checkpoint", flush=True)
    import pyarrow.parquet as pq
    import torch

    import cfdist
    from cfdist.shards import collate_arrow

    model = cfdist.load(run_dir / "model.pt")
    train_mean = manifest["statistics"]["targets"]["e_form"]["train"]["mean"]
    out_csv = args.out / "predictions.csv"
    errors, baseline = [], []
    with out_csv.open("w", newline="") as f, torch.no_grad():
        writer = csv.writer(f)
        writer.writerow(["id", "e_form_true", "e_form_pred"])
        for shard in (s for s in manifest["shards"] if s["split"] == "test"):
            for record_batch in pq.ParquetFile(shards / shard["file"]).iter_batches(batch_size=128):
                batch = collate_arrow(record_batch, ["e_form"])
                pred = model.denormalize(model(batch))[:, 0]
                for rid, y, p in zip(batch.ids, batch.labels[:, 0].tolist(), pred.tolist()):
                    writer.writerow([rid, f"{y:.6f}", f"{p:.6f}"])
                    errors.append(abs(y - p))
                    baseline.append(abs(y - train_mean))
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in last if "loss" in r]
    print(f"{len(errors)} test structures -> {out_csv}")
    print(f"test MAE {sum(errors) / len(errors):.3f} eV/atom after {args.steps} steps "
          f"(train-mean predictor {sum(baseline) / len(baseline):.3f}); last logged throughput "
          f"{train_rows[-1]['structures_per_s']:.0f} structures/s, data wait {train_rows[-1]['data_wait_pct']:.0f}%")
    print(f"run directory {run_dir} (config.yaml, run_info.jsonl, metrics.jsonl, tensorboard/, ray/, model.pt); "
          f"total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
