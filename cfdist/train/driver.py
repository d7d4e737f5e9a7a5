"""The pretraining driver: config -> shard check -> run directory -> Ray Train (or local ranks) -> export.

    cfdist pretrain --config megnet_slice [key=value ...]                  # starts a local Ray instance
    ray job submit --working-dir . -- python launch/pretrain.py --config megnet_slice \
        data.shards=/shared/shards/mptrj output_dir=/shared/runs scaling.num_workers=16 scaling.use_gpu=true
    torchrun --nproc_per_node 2 launch/pretrain.py --config ... --no-ray    # no Ray: torchrun ranks

Before any worker starts the driver checks the shards (manifest, sizes, checksums, cutoff and
elements vs the model, targets), writes ``<output_dir>/<run_name>/`` with the resolved config,
package versions and git SHA, and after training exports the portable checkpoint ``model.pt``.
Running the same command again resumes the run from its latest checkpoint.

Object storage: ``data.shards``, ``output_dir`` and ``init_from`` may be ``s3://`` / ``gs://``
URIs (:mod:`cfdist.storage`). With ``output_dir=s3://bucket/runs`` Ray Train's ``storage_path`` is
``s3://bucket/runs/<run_name>`` (it persists every checkpoint there and resumes from it after a
worker failure or a driver restart); config.yaml, run_info.jsonl, metrics.jsonl, TensorBoard files
and model.pt are written in a local staging directory and uploaded beside them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from cfdist import storage
from cfdist.checkpoint import export_deepspeed_checkpoint, find_latest_checkpoint, load
from cfdist.cluster import init_ray, train_logging_config
from cfdist.config import ConfigError
from cfdist.manifest import ShardSet
from cfdist.run.preempt import driver_stop, preemptible_torch_config
from cfdist.run.runinfo import pull_run_files, push_run_files, write_run_files
from cfdist.run.tracking import log_artifacts
from cfdist.run.transfer import check_encoder
from cfdist.shards import ShardError, read_schema
from cfdist.train.config import PretrainConfig, load_pretrain_config
from cfdist.train.datasets import check_mixture, mixture_weights
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
    if not cfg.data.shards and not cfg.data.is_mixture:
        raise SystemExit("data.shards is not set: pass data.shards=DIR (a directory written by `cfdist preprocess`), "
                         "or data.datasets for a mixture")
    cfg.storage.apply()  # endpoints into the environment (forwarded to every worker by init_ray)
    if cfg.data.is_mixture:
        for entry in cfg.data.datasets:
            entry.shards = storage.absolute(entry.shards)
    else:
        cfg.data.shards = storage.absolute(cfg.data.shards)
    cfg.output_dir = storage.absolute(cfg.output_dir)
    if cfg.init_from:
        cfg.init_from = storage.absolute(cfg.init_from)
    model = cfg.model_config().to_dict()
    model.pop("target_names")
    cfg.model = model
    return cfg


def check_shards(cfg: PretrainConfig):
    """Every file of the train (and val) split against the manifest, before any worker starts."""

    if cfg.data.is_mixture:
        return check_mixture_shards(cfg)
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


class MixtureShards:
    """What the driver keeps of a mixture's checked datasets (their content hashes for run_info)."""

    def __init__(self, sources):
        self.sources = sources
        self.manifest = {"content_hash": {s.name: s.shards.manifest.get("content_hash") for s in sources}}


def check_mixture_shards(cfg: PretrainConfig) -> MixtureShards:
    """Every dataset of a mixture checked (:func:`cfdist.train.datasets.check_mixture`) and its
    sampling probability printed, before any worker starts."""
    model = cfg.model_config()
    sources = check_mixture(cfg, model.n_elements, model.cutoff)
    if cfg.init_from:
        if not storage.is_file(cfg.init_from):
            raise ConfigError(f"init_from={cfg.init_from}: no such file (a portable checkpoint, model.pt)")
        check_encoder(model, load(cfg.init_from).config, cfg.init_from)
    p = mixture_weights(cfg, sources)
    how = "weights" if cfg.data.datasets[0].weight is not None else f"temperature {cfg.data.temperature:g}"
    for source, prob in zip(sources, p):
        kind = "energy" if source.entry.energy else "properties"
        print(f"dataset {source.name}: {source.shards.root} ({source.shards.n_rows(cfg.data.train_split):,} train "
              f"structures, {kind} {source.targets}); drawn with p = {prob:.3f} ({how}); {source.report.summary()}",
              flush=True)
    return MixtureShards(sources)


def check_energy_run(cfg: PretrainConfig, shards) -> None:
    """An energy run's label columns exist (forces / stress when weighted), and ``init_from`` names a
    checkpoint whose encoder fits the model: fail here, before any worker starts."""
    forces, stress = label_columns_wanted(cfg)
    splits = [cfg.data.train_split] + ([cfg.data.val_split] if cfg.data.val_split else [])
    for split in splits:
        for entry in shards.files(split):
            names = read_schema(entry.path).names
            for column, wanted, flag, weight in (("forces", forces, "--with-forces", "forces_weight"),
                                                  ("stress", stress, "--with-stress", "stress_weight")):
                if wanted and column not in names:
                    raise ShardError(f"{entry.path}: no {column!r} column, but the run trains on {column} "
                                     f"(loss.{weight} > 0); rebuild the shards with `cfdist preprocess "
                                     f"{flag}` or set loss.{weight}=0")
    if cfg.init_from:
        if not storage.is_file(cfg.init_from):
            raise ConfigError(f"init_from={cfg.init_from}: no such file (a portable checkpoint, model.pt)")
        source = load(cfg.init_from).config
        check_encoder(cfg.model_config(), source, cfg.init_from)
        heads = [h.name for h in source.heads]
        if cfg.init_head and cfg.init_head not in heads:
            raise ConfigError(f"init_head={cfg.init_head}: {cfg.init_from} has no head of that name (its heads: "
                              f"{heads or 'none: it was not pretrained on a mixture'})")


def ray_storage(cfg: PretrainConfig) -> dict:
    """RunConfig's storage arguments: the run's ``ray/`` directory, locally, or the run's prefix on
    object storage with its filesystem (the path then has no scheme)."""
    if cfg.remote:
        fs, path = storage.filesystem(cfg.run_location())
        return {"storage_path": path, "storage_filesystem": fs}
    return {"storage_path": str(cfg.run_dir())}


def run_ray(cfg: PretrainConfig, shards, address: str | None = None,
            num_cpus: int | None = None) -> tuple[str | Path | None, dict]:
    """Train on a Ray Train worker group; returns (the last checkpoint's directory (a URI when the
    run is on object storage), its metrics).

    SIGTERM / Ctrl-C to this driver or to a worker: the workers checkpoint at the next step
    boundary and return (``metrics["preempted"]``; :mod:`cfdist.run.preempt`)."""
    # workers read their own rows (cfdist.stream): no Ray Data tasks need CPUs beside them
    need = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    init_ray(address=address, num_cpus=num_cpus or max(4, os.cpu_count() or 1, int(need + 0.999)),
             use_gpu=cfg.scaling.use_gpu, include_dashboard=True)
    with driver_stop() as board:
        return _fit(cfg, board)


def _fit(cfg: PretrainConfig, board: str) -> tuple[str | Path | None, dict]:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config={"config": cfg.to_dict(), "stop_board": board},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
                                     placement_strategy=cfg.scaling.placement_strategy),
        torch_config=preemptible_torch_config("nccl" if cfg.scaling.use_gpu else "gloo"),
        run_config=RunConfig(name="ray", **ray_storage(cfg),
                             failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             logging_config=train_logging_config()),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    metrics = dict(result.metrics or {})
    if result.checkpoint is None:
        return None, metrics
    if cfg.remote:  # the checkpoint's path has no scheme
        return cfg.stored_location(result.checkpoint.path), metrics
    return Path(result.checkpoint.path), metrics


def export_run(cfg: PretrainConfig, checkpoint) -> str:
    """The portable ``model.pt`` of the run from ``checkpoint`` (a local directory, or a URI that is
    downloaded first); uploaded beside the run's checkpoints when the run is on object storage."""
    run_dir = cfg.run_dir()
    if storage.is_uri(str(checkpoint)):
        local = run_dir / "export" / storage.basename(str(checkpoint))
        shutil.rmtree(local, ignore_errors=True)
        storage.download_tree(str(checkpoint), local)
        checkpoint = local
    out = export_deepspeed_checkpoint(checkpoint, run_dir / "model.pt")
    if cfg.remote:
        shutil.rmtree(run_dir / "export", ignore_errors=True)
        push_run_files(run_dir, cfg.run_location())
        return storage.join(cfg.run_location(), "model.pt")
    return str(out)


def main(argv=None) -> int:
    args = parse_args(argv)

    cfg = resolve(load_pretrain_config(args.config, args.overrides))
    # Under torchrun every rank runs this driver; only rank 0 checks, writes and exports.
    rank = int(os.environ.get("RANK", 0)) if args.no_ray else 0
    run_dir = cfg.run_dir()
    if rank == 0:
        shards = check_shards(cfg)
        if cfg.remote:
            if args.no_ray:
                raise SystemExit(f"output_dir={cfg.output_dir}: runs on object storage need Ray Train (which "
                                 f"persists their checkpoints); drop --no-ray or use a shared path")
            pull_run_files(run_dir, cfg.run_location())
        write_run_files(run_dir, cfg.to_dict(), cfg.run_location(),
                        shards_content_hash=shards.manifest.get("content_hash"),
                        model_config=cfg.model_config().to_dict())
        print(f"run directory: {cfg.run_location()}", flush=True)
    t0 = time.perf_counter()
    if args.no_ray:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.scaling.use_gpu else "cpu")
        final = local_train_loop(cfg)
        if rank != 0:
            return 0
        checkpoint = find_latest_checkpoint(run_dir / "checkpoints")
    else:
        checkpoint, final = run_ray(cfg, shards, args.address, args.num_cpus)
        if checkpoint is None and not cfg.remote:
            checkpoint = find_latest_checkpoint(run_dir / "ray")
    if final.get("preempted"):  # stopped by a signal: saved, not finished; no model.pt yet
        print(f"run stopped after {time.perf_counter() - t0:.1f} s at step {final.get('step')}, before max_steps="
              f"{cfg.max_steps}; checkpoint {checkpoint}; run the same command again to resume", flush=True)
        if cfg.remote:
            push_run_files(run_dir, cfg.run_location())
        return 0
    print(f"training finished in {time.perf_counter() - t0:.1f} s; last checkpoint {checkpoint}", flush=True)
    if not args.no_export:
        out = export_run(cfg, checkpoint)
        log_artifacts(cfg.tracking, run_dir, [run_dir / "model.pt"])  # the tracked run gets the model
        print(f"portable checkpoint: {out}  (cfdist.load('{out}').predict(structures))", flush=True)
    elif cfg.remote:
        push_run_files(run_dir, cfg.run_location())
    return 0


if __name__ == "__main__":
    sys.exit(main())
