"""Distributed pretraining: Ray Train TorchTrainer + DeepSpeed, streaming preprocessed shards.

    # local: starts a Ray instance on this machine
    python launch/pretrain.py --config configs/pretrain/megnet_slice.yaml [key=value ...]

    # a running cluster (shards and output_dir on storage every node sees)
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python launch/pretrain.py --config configs/pretrain/megnet_slice.yaml \
        data.shards=/shared/shards/mptrj output_dir=/shared/runs scaling.num_workers=16 scaling.use_gpu=true

    # no Ray at all: this process (or each torchrun rank) trains on rank-strided shard files
    python launch/pretrain.py --config ... --no-ray

Before any worker starts the driver checks the shards (manifest, sizes, checksums, cutoff vs
the model, targets), writes ``<output_dir>/<run_name>/`` with the resolved config, package
versions and git SHA, and after training exports the portable checkpoint ``model.pt``.
Running the same command again resumes the run from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a script and under `ray job submit --working-dir .`
    sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="pretraining YAML (configs/pretrain/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=3e-4 deepspeed.zero_stage=2")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a new local instance)")
    parser.add_argument("--no-ray", action="store_true", help="train in this process / torchrun ranks, without Ray")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="logical CPUs of a local Ray instance (default: max(4, cores); Ray Data needs "
                             "spare CPUs beside the train workers)")
    parser.add_argument("--no-export", action="store_true", help="skip the portable checkpoint export")
    return parser.parse_args(argv)


def write_run_files(cfg, shards) -> Path:
    from cfdist.runinfo import write_run_files as write

    return write(cfg.run_dir(), cfg.to_dict(), shards_content_hash=shards.manifest.get("content_hash"),
                 model_config=cfg.model_config().to_dict())


def check_shards(cfg):
    from cfdist.data import ShardSet

    shards = ShardSet(cfg.data.shards)
    splits = [cfg.data.train_split] + ([cfg.data.val_split] if cfg.data.val_split else [])
    t0 = time.perf_counter()
    shards.verify(splits, required_cutoff=cfg.model_config().cutoff, targets=cfg.data.targets,
                  checksums=cfg.data.verify_checksums)
    n = {s: shards.n_rows(s) for s in splits}
    print(f"shards ok: {cfg.data.shards} ({', '.join(f'{s} {k:,}' for s, k in n.items())} structures, "
          f"cutoff {shards.cutoff:.4f} A; verified in {time.perf_counter() - t0:.1f} s)", flush=True)
    return shards


def run_ray(cfg, shards, args):
    import ray
    import ray.data
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cfdist.data import training_columns
    from cfdist.train.loop import ray_train_loop

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    env = {"env_vars": {"DS_ACCELERATOR": "cuda" if cfg.scaling.use_gpu else "cpu",
                        "RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"], "PYTHONPATH": str(REPO)}}
    address = args.address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        print("reusing the Ray instance this process already started", flush=True)
    elif address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        need = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + 2
        num_cpus = args.num_cpus or max(4, os.cpu_count() or 1, int(need + 0.999))
        ray.init(num_cpus=num_cpus, include_dashboard=True, runtime_env=env, object_store_memory=1 << 30)
    ray.data.DataContext.get_current().enable_progress_bars = False

    import pyarrow.parquet as pq

    first = shards.files(cfg.data.train_split)[0].path
    columns = training_columns(pq.read_schema(first), cfg.data.targets)
    datasets = {"train": ray.data.read_parquet([str(e.path) for e in shards.files(cfg.data.train_split)],
                                               columns=columns, shuffle=None)}
    if cfg.data.val_split:
        datasets["val"] = ray.data.read_parquet([str(e.path) for e in shards.files(cfg.data.val_split)],
                                                columns=columns, shuffle=None)
    run_dir = cfg.run_dir()
    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config={"config": cfg.to_dict()},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
                                     placement_strategy=cfg.scaling.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        datasets=datasets,
        # preserve_order: the same rows reach the same rank in the same order on every run,
        # which is what makes a resumed run replay exactly (cfdist.train.loop docstring)
        dataset_config=DataConfig(datasets_to_split="all", execution_options=ExecutionOptions(preserve_order=True)),
        run_config=RunConfig(name="ray", storage_path=str(run_dir),
                             failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return result.checkpoint.path if result.checkpoint is not None else None


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from cfdist.checkpoint import export_deepspeed_checkpoint, find_latest_checkpoint
    from cfdist.train.config import load_pretrain_config

    cfg = load_pretrain_config(args.config, args.overrides)
    if not cfg.data.shards:
        raise SystemExit("data.shards is not set: pass data.shards=DIR (a directory written by preprocess/build_shards.py)")
    # Resolve everything workers need (they run elsewhere, in other directories).
    cfg.data.shards = str(Path(cfg.data.shards).resolve())
    cfg.output_dir = str(Path(cfg.output_dir).resolve())
    model_config = cfg.model_config().to_dict()
    model_config.pop("target_names")
    cfg.model = model_config
    shards = check_shards(cfg)
    run_dir = write_run_files(cfg, shards)
    print(f"run directory: {run_dir}", flush=True)
    t0 = time.perf_counter()
    if args.no_ray:
        from cfdist.train.loop import local_train_loop

        os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.scaling.use_gpu else "cpu")
        local_train_loop(cfg)
        if int(os.environ.get("RANK", 0)) != 0:
            return 0
        checkpoint = find_latest_checkpoint(run_dir / "checkpoints")
    else:
        checkpoint = run_ray(cfg, shards, args)
        checkpoint = checkpoint or find_latest_checkpoint(run_dir / "ray")
    print(f"training finished in {time.perf_counter() - t0:.1f} s; last checkpoint {checkpoint}", flush=True)
    if not args.no_export:
        out = export_deepspeed_checkpoint(checkpoint, run_dir / "model.pt")
        print(f"portable checkpoint: {out}  (cfdist.load('{out}').predict(structures))", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
