"""Built-in example, the whole story on real crystals: preprocess -> pretrain -> fine-tune -> evaluate -> predict.

1. Preprocess the MEGNet slice shipped in ``examples/data`` (3,909 Materials Project crystals,
   MEGNet split, labels e_form and "gap pbe") into image-table shards with the Ray Data job
   (``cfdist preprocess``, on a local Ray instance it starts itself).
2. Pretrain the default Crystalformer on formation energy (``cfdist pretrain``): a Ray Train
   TorchTrainer with 2 workers, DeepSpeed ZeRO-2, streamed entry-budget batches, a portable
   ``model.pt`` at the end (a short run: the point is the pipeline).
3. Fine-tune that checkpoint on the band gap (``cfdist finetune``; paper recipe, a few
   epochs, SWA over the last ones, best-validation checkpoint), in this process.
4. Evaluate the SWA model on the test split (``cfdist evaluate``: metrics.json, predictions.csv,
   parity.png) against the train-mean predictor.
5. Predict CIF files (``cfdist predict``): a few test crystals written as CIFs plus one broken
   file, which gets an error row instead of stopping the batch.

    python launch/example.py [--steps 40] [--epochs 6] [--workers 2] [--out outputs/example]

Run it from the repository root (the data paths default to ``examples/data/`` there).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

DATA = Path("examples") / "data"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA / "megnet_slice.json.gz")
    parser.add_argument("--split", type=Path, default=DATA / "megnet_slice_split.json")
    parser.add_argument("--out", type=Path, default=Path("outputs") / "example")
    parser.add_argument("--steps", type=int, default=40, help="pretraining optimiser steps")
    parser.add_argument("--epochs", type=int, default=6, help="fine-tuning epochs")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    for path in (args.data, args.split):
        if not path.exists():
            parser.error(f"not found: {path} (run from the repository root, or pass --data / --split)")
    args.out = args.out.resolve()
    t_start = time.perf_counter()
    from cfdist import CrystalformerConfig

    config = CrystalformerConfig.from_yaml("crystalformer")
    shards = args.out / "shards"
    print(f"== 1. preprocess {args.data.name} (cutoff {config.cutoff:.3f} A) -> {shards}", flush=True)
    from cfdist.preprocess.job import Settings, build

    manifest = build([str(args.data)], shards, Settings(cutoff=config.cutoff, targets=["e_form", "gap pbe"],
                                                          split_file=str(args.split.resolve()), shard_size=1024))

    import ray

    ray.shutdown()  # the preprocessing instance; pretraining starts its own with spare CPUs for Ray Data
    print(f"\n== 2. pretrain on e_form: {args.steps} steps on {args.workers} Ray Train workers (DeepSpeed ZeRO-2)",
          flush=True)
    from cfdist.train import driver as pretrain

    run_name = "pretrain"
    pretrain.main(["--config", "megnet_slice",
                   f"data.shards={shards}", f"output_dir={args.out / 'runs'}", f"run_name={run_name}",
                   f"max_steps={args.steps}", f"scaling.num_workers={args.workers}", "scaling.max_failures=0",
                   "data.targets=[e_form]", "data.max_structures=64", "log_every=5", f"val_every={args.steps}",
                   f"checkpoint_every={args.steps}"])
    run_dir = args.out / "runs" / run_name
    import ray

    ray.shutdown()

    pretrained = run_dir / "model.pt"
    print(f"\n== 3. fine-tune {pretrained.name} on the band gap: {args.epochs} epochs, paper recipe, in this process",
          flush=True)
    from cfdist.finetune import driver as finetune

    finetune.main(["--config", "megnet_slice_bandgap",
                   f"data.shards={shards}", f"output_dir={args.out / 'runs'}", "run_name=finetune_bandgap",
                   "init_from=pretrained", f"checkpoint={pretrained}", f"epochs={args.epochs}",
                   f"swa_epochs={max(1, args.epochs // 3)}", "overwrite=true"])
    ft_dir = args.out / "runs" / "finetune_bandgap"
    swa = ft_dir / "checkpoints" / "swa.pt"

    print(f"\n== 4. cfdist evaluate --checkpoint {swa.relative_to(args.out)} --data shards --split test", flush=True)
    from cfdist.cli import main as cfdist_cli

    cfdist_cli(["evaluate", "--checkpoint", str(swa), "--data", str(shards), "--split", "test",
                "--out", str(args.out / "evaluation")])
    results = json.loads((ft_dir / "results.json").read_text())
    print(f"train-mean predictor on the same split: MAE {results['test']['train_mean']['gap pbe']['mae']:.4g} eV")

    print("\n== 5. cfdist predict on CIF files (one of them broken)", flush=True)
    from cfdist.crystal import to_pymatgen
    from cfdist.shards import arrow_to_crystals, read_shard

    cif_dir = args.out / "cifs"
    cif_dir.mkdir(parents=True, exist_ok=True)
    test_file = next(shards / s["file"] for s in manifest["shards"] if s["split"] == "test")
    for crystal in arrow_to_crystals(read_shard(test_file))[0][:5]:
        to_pymatgen(crystal).to(filename=str(cif_dir / f"{crystal.id}.cif"))
    (cif_dir / "broken.cif").write_text("data_broken\n_cell_length_a 3.0\nthis is not a CIF\n")
    predictions = args.out / "predictions.csv"
    cfdist_cli(["predict", "--checkpoint", str(swa), str(cif_dir), "--out", str(predictions)])
    with predictions.open() as fh:
        print(fh.read().rstrip())
    print(f"\nall outputs under {args.out}; total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
