"""Fine-tune Crystalformer on a small labelled dataset (paper recipe by default).

    # from scratch, in this process (no Ray cluster needed)
    python launch/finetune.py --config configs/finetune/megnet_slice_eform.yaml

    # from a pretrained portable checkpoint, first two blocks frozen
    python launch/finetune.py --config configs/finetune/megnet_slice_eform.yaml \
        init_from=pretrained checkpoint=outputs/runs/megnet_slice/model.pt transfer.freeze_blocks=2 \
        run_name=eform_from_pretrained

    # continue an interrupted run
    python launch/finetune.py --config configs/finetune/megnet_slice_eform.yaml init_from=resume

    # the same config on Ray Train workers (DDP; output_dir on storage every node sees)
    ray job submit --working-dir . -- python launch/finetune.py --config ... scaling.num_workers=4

The run directory ``<output_dir>/<run_name>/`` gets the resolved config, versions and git SHA,
``metrics.jsonl`` + TensorBoard, ``checkpoints/{best,swa,final}.pt`` (portable; ``cfdist.load``)
and ``last.pt`` (resume state), ``evaluation/<model>/`` (metrics.json, predictions.csv,
parity.png on the test split) and ``results.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a script and under `ray job submit --working-dir .`
    sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="cfdist finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="fine-tuning YAML (configs/finetune/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. epochs=100 init_from=pretrained")
    parser.add_argument("--address", default=None, help="Ray cluster address when scaling.num_workers >= 1")
    return parser.parse_args(argv)


def prepare(cfg) -> None:
    """Resolve paths, check shards and the run directory, write the run files."""
    from cfdist.data import ShardSet
    from cfdist.finetune.loop import LAST, resume_config
    from cfdist.runinfo import write_run_files

    if not cfg.data.shards:
        raise SystemExit("data.shards is not set: pass data.shards=DIR (written by preprocess/build_shards.py "
                         "or cfdist prepare-task)")
    cfg.output_dir = str(Path(cfg.output_dir).resolve())
    run_dir = cfg.run_dir()
    last = run_dir / "checkpoints" / LAST
    if cfg.init_from == "resume":
        if not last.is_file():
            raise SystemExit(f"init_from=resume: {last} does not exist")
        cfg, _ = resume_config(cfg)  # a run continues with the settings it started with
    cfg.data.shards = str(Path(cfg.data.shards).resolve())
    if cfg.checkpoint:
        cfg.checkpoint = str(Path(cfg.checkpoint).resolve())
        if not Path(cfg.checkpoint).exists():
            raise SystemExit(f"checkpoint={cfg.checkpoint}: not found")
    if cfg.init_from == "scratch" and not isinstance(cfg.model, dict):
        model = cfg.model_config().to_dict()
        model.pop("target_names")
        cfg.model = model
    shards = ShardSet(cfg.data.shards)
    splits = [s for s in (cfg.data.train_split, cfg.data.val_split) if s]
    cutoff = cfg.model_config().cutoff if cfg.init_from == "scratch" else None  # others: checked on load
    shards.verify(splits, required_cutoff=cutoff, targets=cfg.data.targets, checksums=True)
    if cfg.init_from != "resume" and (run_dir / "checkpoints").exists():
        if not cfg.overwrite:
            raise SystemExit(f"{run_dir} already holds a run: continue it with init_from=resume, pick another "
                             f"run_name, or pass overwrite=true to start over")
        for name in ("checkpoints", "tensorboard", "evaluation", "ray"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        for name in ("metrics.jsonl", "results.json", "run_info.jsonl"):
            (run_dir / name).unlink(missing_ok=True)
    write_run_files(run_dir, cfg.to_dict(), shards_content_hash=shards.manifest.get("content_hash"))
    print(f"shards ok: {cfg.data.shards} ({', '.join(f'{s} {shards.n_rows(s):,}' for s in splits)} structures); "
          f"run directory: {run_dir}", flush=True)


def run_ray(cfg, address: str | None) -> dict:
    import json

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cfdist.finetune.loop import ray_finetune_loop

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    env = {"env_vars": {"RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"], "PYTHONPATH": str(REPO)}}
    address = address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        if address:
            ray.init(address=address, runtime_env=env)
        else:
            need = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + 1
            ray.init(num_cpus=max(int(need + 0.999), os.cpu_count() or 1), runtime_env=env,
                     include_dashboard=False, object_store_memory=1 << 29)
    trainer = TorchTrainer(
        ray_finetune_loop, train_loop_config={"config": cfg.to_dict()},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        run_config=RunConfig(name="ray", storage_path=str(cfg.run_dir())))
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return json.loads((cfg.run_dir() / "results.json").read_text())


def print_results(results: dict) -> None:
    test = results.get("test")
    if not test:
        print("no test split: see results.json for validation metrics")
        return
    print(f"\ntest split ({results['epochs']} epochs, best val epoch {results['best_epoch']}):")
    print("| model | target | n | MAE | RMSE | R^2 |\n|---|---|---|---|---|---|")
    fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
    for name, targets in test.items():
        for target, m in targets.items():
            print(f"| {name} | {target} | {m['n']} | {fmt(m.get('mae'))} | {fmt(m.get('rmse'))} | {fmt(m.get('r2'))} |")


def main(argv=None) -> int:
    args = parse_args(argv)
    from cfdist.finetune.config import load_finetune_config
    from cfdist.finetune.loop import local_finetune

    cfg = load_finetune_config(args.config, args.overrides)
    prepare(cfg)
    t0 = time.perf_counter()
    results = run_ray(cfg, args.address) if cfg.scaling.num_workers >= 1 else local_finetune(cfg)
    print(f"fine-tuning finished in {time.perf_counter() - t0:.1f} s -> {cfg.run_dir()}")
    print_results(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
