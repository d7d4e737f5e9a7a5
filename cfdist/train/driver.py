"""The pretraining driver: config -> shard check -> run directory -> Ray Train (or local ranks) -> export.

    cfdist pretrain --config megnet_slice [key=value ...]                  # starts a local Ray instance
    ray job submit --working-dir . -- python launch/pretrain.py --config megnet_slice \
        data.shards=/shared/shards/mptrj output_dir=/shared/runs scaling.num_workers=16 scaling.use_gpu=true
    torchrun --nproc_per_node 2 launch/pretrain.py --config ... --no-ray    # no Ray: torchrun ranks

Before any worker starts the driver checks the shards (manifest, sizes, checksums, cutoff and
elements vs the model, targets), writes ``<output_dir>/<run_name>/`` with the resolved config,
package versions and git SHA, and after training exports the portable checkpoint ``model.pt``.
Running the same command again resumes the run from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from cfdist.checkpoint import export_deepspeed_checkpoint, find_latest_checkpoint, load
from cfdist.cluster import init_ray, train_logging_config
from cfdist.config import ConfigError
from cfdist.manifest import ShardSet
from cfdist.run.preempt import driver_stop, preemptible_torch_config
from cfdist.run.runinfo import write_run_files
from cfdist.run.tracking import log_artifacts
from cfdist.run.transfer import check_encoder
from cfdist.shards import ShardError
from cfdist.train.config import PretrainConfig, load_pretrain_config
from cfdist.train.loop import label_columns_wanted, local_train_loop, ray_train_loop


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cfdist pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="pretraining config: a packaged name (megnet_slice) or a YAML path")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=3e-4 deepspeed.zero_stage=2")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a new local instance)")
    parser.add_argument("--no-ray", action="store_true", help="train in this process / torchrun ranks, without Ray")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="logical CPUs of a local Ray instance (default: max(4, cores, workers x "
                             "scaling.cpus_per_worker))")
    parser.add_argument("--no-export", action="store_true", help="skip the portable checkpoint export")
    return parser.parse_args(argv)


def resolve(cfg: PretrainConfig) -> PretrainConfig:
    """Make the config self-contained for workers that run elsewhere: absolute paths, inline model."""
    if not cfg.data.shards:
        raise SystemExit("data.shards is not set: pass data.shards=DIR (a directory written by `cfdist preprocess`)")
    cfg.data.shards = str(Path(cfg.data.shards).resolve())
    cfg.output_dir = str(Path(cfg.output_dir).resolve())
    if cfg.init_from:
        cfg.init_from = str(Path(cfg.init_from).resolve())
    model = cfg.model_config().to_dict()
    model.pop("target_names")
    cfg.model = model
    return cfg


def check_shards(cfg: PretrainConfig):
    """Every file of the train (and val) split against the manifest, before any worker starts."""

    shards = ShardSet(cfg.data.shards)
    splits = [cfg.data.train_split] + ([cfg.data.val_split] if cfg.data.val_split else [])
    model = cfg.model_config()
    # parallel sha256; files verified before and unchanged since are not re-hashed (docs/shards.md)
    report = shards.verify(splits, required_cutoff=model.cutoff, targets=cfg.data.targets,
                           n_elements=model.n_elements, checksums=cfg.data.verify_checksums)
    check_energy_run(cfg, shards)
    n = {s: shards.n_rows(s) for s in splits}
    print(f"shards ok: {cfg.data.shards} ({', '.join(f'{s} {k:,}' for s, k in n.items())} structures, "
          f"cutoff {shards.cutoff:.4f} A; {report.summary()})", flush=True)
    return shards


def check_energy_run(cfg: PretrainConfig, shards) -> None:
    """An energy run's label columns exist (forces / stress when weighted), and ``init_from`` names a
    checkpoint whose encoder fits the model: fail here, before any worker starts."""
    import pyarrow.parquet as pq

    forces, stress = label_columns_wanted(cfg)
    splits = [cfg.data.train_split] + ([cfg.data.val_split] if cfg.data.val_split else [])
    for split in splits:
        for entry in shards.files(split):
            names = pq.read_schema(entry.path).names
            for column, wanted, flag, weight in (("forces", forces, "--with-forces", "forces_weight"),
                                                  ("stress", stress, "--with-stress", "stress_weight")):
                if wanted and column not in names:
                    raise ShardError(f"{entry.path}: no {column!r} column, but the run trains on {column} "
                                     f"(loss.{weight} > 0); rebuild the shards with `cfdist preprocess "
                                     f"{flag}` or set loss.{weight}=0")
    if cfg.init_from:
        if not Path(cfg.init_from).is_file():
            raise ConfigError(f"init_from={cfg.init_from}: no such file (a portable checkpoint, model.pt)")
        check_encoder(cfg.model_config(), load(cfg.init_from).config, cfg.init_from)


def run_ray(cfg: PretrainConfig, shards, address: str | None = None,
            num_cpus: int | None = None) -> tuple[Path | None, dict]:
    """Train on a Ray Train worker group; returns (the last checkpoint's directory, its metrics).

    SIGTERM / Ctrl-C to this driver or to a worker: the workers checkpoint at the next step
    boundary and return (``metrics["preempted"]``; :mod:`cfdist.run.preempt`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # workers read their own rows (cfdist.stream): no Ray Data tasks need CPUs beside them
    need = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    init_ray(address=address, num_cpus=num_cpus or max(4, os.cpu_count() or 1, int(need + 0.999)),
             use_gpu=cfg.scaling.use_gpu, include_dashboard=True)
    with driver_stop() as board:
        return _fit(cfg, board)


def _fit(cfg: PretrainConfig, board: str) -> tuple[Path | None, dict]:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config={"config": cfg.to_dict(), "stop_board": board},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
                                     placement_strategy=cfg.scaling.placement_strategy),
        torch_config=preemptible_torch_config("nccl" if cfg.scaling.use_gpu else "gloo"),
        run_config=RunConfig(name="ray", storage_path=str(cfg.run_dir()),
                             failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             logging_config=train_logging_config()),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return (Path(result.checkpoint.path) if result.checkpoint is not None else None), dict(result.metrics or {})


def main(argv=None) -> int:
    args = parse_args(argv)

    cfg = resolve(load_pretrain_config(args.config, args.overrides))
    # Under torchrun every rank runs this driver; only rank 0 checks, writes and exports.
    rank = int(os.environ.get("RANK", 0)) if args.no_ray else 0
    run_dir = cfg.run_dir()
    if rank == 0:
        shards = check_shards(cfg)
        write_run_files(run_dir, cfg.to_dict(), shards_content_hash=shards.manifest.get("content_hash"),
                        model_config=cfg.model_config().to_dict())
        print(f"run directory: {run_dir}", flush=True)
    t0 = time.perf_counter()
    if args.no_ray:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.scaling.use_gpu else "cpu")
        final = local_train_loop(cfg)
        if rank != 0:
            return 0
        checkpoint = find_latest_checkpoint(run_dir / "checkpoints")
    else:
        checkpoint, final = run_ray(cfg, shards, args.address, args.num_cpus)
        checkpoint = checkpoint or find_latest_checkpoint(run_dir / "ray")
    if final.get("preempted"):  # stopped by a signal: saved, not finished; no model.pt yet
        print(f"run stopped after {time.perf_counter() - t0:.1f} s at step {final.get('step')}, before max_steps="
              f"{cfg.max_steps}; checkpoint {checkpoint}; run the same command again to resume", flush=True)
        return 0
    print(f"training finished in {time.perf_counter() - t0:.1f} s; last checkpoint {checkpoint}", flush=True)
    if not args.no_export:
        out = export_deepspeed_checkpoint(checkpoint, run_dir / "model.pt")
        log_artifacts(cfg.tracking, run_dir, [out])  # the tracked run (tracking.backend) gets the model
        print(f"portable checkpoint: {out}  (cfdist.load('{out}').predict(structures))", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
