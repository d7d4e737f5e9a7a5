"""The fine-tuning driver: config -> effective config (resume) -> shard check -> run directory ->
this process or Ray Train workers -> results.

    cfdist finetune --config megnet_slice_eform [key=value ...]                 # in this process
    cfdist finetune --config megnet_slice_eform init_from=pretrained checkpoint=model.pt transfer.freeze_blocks=2
    cfdist finetune --config megnet_slice_eform run_name=NAME init_from=resume    # continue an interrupted run
    ray job submit --working-dir . -- python launch/finetune.py --config ... scaling.num_workers=4

The run directory ``<output_dir>/<run_name>/`` gets the resolved config, versions and git SHA,
``metrics.jsonl`` + TensorBoard, ``checkpoints/{best,swa,final}.pt`` (portable; ``cfdist.load``)
and ``last.pt`` (resume state), ``evaluation/<model>/`` (metrics.json, predictions.csv,
parity.png on the test split) and ``results.json``.

``output_dir`` may be an ``s3://`` / ``gs://`` URI (:mod:`cfdist.storage`): the run is then
``<output_dir>/<run_name>/`` on the bucket, with the same files; rank 0 writes them in a staging
directory in the user cache and uploads each when it is complete (``last.pt`` after every epoch and
at a preemption, the rest when the run ends). ``init_from=resume`` reads the stored ``last.pt``,
on any machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time

from cfdist import storage
from cfdist.cluster import init_ray, train_logging_config
from cfdist.finetune.config import FinetuneConfig, load_finetune_config
from cfdist.finetune.loop import LAST, local_finetune, ray_finetune_loop, resume_config
from cfdist.manifest import ShardSet
from cfdist.run.preempt import driver_stop, preemptible_torch_config
from cfdist.run.runinfo import pull_run_files, write_run_files


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cfdist finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="fine-tuning config: a packaged name (megnet_slice_eform, a paper task "
                                         "such as megnet_eform) or a YAML path")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. epochs=100 init_from=pretrained")
    parser.add_argument("--address", default=None, help="Ray cluster address when scaling.num_workers >= 1")
    return parser.parse_args(argv)


def prepare(cfg: FinetuneConfig) -> tuple[FinetuneConfig, dict | None]:
    """(the effective config of the run, the resume state or None).

    For ``init_from=resume`` the effective config is the run's own saved one and the state is
    ``last.pt`` (read once, here). Paths are resolved, the shards and the run directory checked
    and the run files written.
    """

    if not cfg.data.shards:
        raise SystemExit("data.shards is not set: pass data.shards=DIR (written by `cfdist preprocess` "
                         "or `cfdist prepare-task`)")
    cfg.storage.apply()  # endpoints into the environment (forwarded to Ray workers by init_ray)
    cfg.output_dir = storage.absolute(cfg.output_dir)
    run_dir, location = cfg.run_dir(), cfg.run_location()  # the same directory unless on object storage
    if cfg.remote:
        # the bucket holds the run; the staging directory is only a cache of it: start it afresh,
        # so that a stale copy (another run of the same name on this machine) is never continued
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
    last = storage.join(location, "checkpoints", LAST)
    state = None
    if cfg.init_from == "resume":
        if not storage.is_file(last):
            raise SystemExit(f"init_from=resume: {last} does not exist")
        cfg, state = resume_config(cfg)  # a run continues with the settings it started with
    cfg.data.shards = storage.absolute(cfg.data.shards)
    if cfg.checkpoint:
        cfg.checkpoint = storage.absolute(cfg.checkpoint)  # s3:// / gs://: cached by cfdist.checkpoint.load
        if not storage.exists(cfg.checkpoint):
            raise SystemExit(f"checkpoint={cfg.checkpoint}: not found")
    if cfg.init_from == "scratch" and not isinstance(cfg.model, dict):
        model = cfg.model_config().to_dict()
        model.pop("target_names")
        cfg.model = model
    shards = ShardSet(cfg.data.shards)
    splits = [s for s in (cfg.data.train_split, cfg.data.val_split) if s]
    model = cfg.model_config() if cfg.init_from == "scratch" else None  # others: checked when loaded
    # parallel sha256; files verified before and unchanged since are not re-hashed (docs/shards.md)
    report = shards.verify(splits, required_cutoff=model.cutoff if model else None, targets=cfg.data.targets,
                           n_elements=model.n_elements if model else None, checksums=cfg.data.verify_checksums)
    held = storage.list_files(storage.join(location, "checkpoints")) if cfg.remote else \
        (run_dir / "checkpoints").exists()
    if cfg.init_from != "resume" and held:
        if not cfg.overwrite:
            raise SystemExit(f"{location} already holds a run: continue it with init_from=resume, pick another "
                             f"run_name, or pass overwrite=true to start over")
        for name in ("checkpoints", "tensorboard", "evaluation", "ray", "metrics.jsonl", "results.json",
                     "run_info.jsonl"):
            storage.remove(storage.join(location, name))
    pull_run_files(run_dir, location)  # object storage: run_info.jsonl and metrics.jsonl go on from the stored
    write_run_files(run_dir, cfg.to_dict(), location, shards_content_hash=shards.manifest.get("content_hash"))
    print(f"shards ok: {cfg.data.shards} ({', '.join(f'{s} {shards.n_rows(s):,}' for s in splits)} structures; "
          f"{report.summary()}); run directory: {location}", flush=True)
    return cfg, state


def run_ray(cfg: FinetuneConfig, address: str | None = None) -> dict:
    """The fine-tuning loop on ``scaling.num_workers`` Ray Train workers (DDP); returns results.json."""
    import os

    need = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + 1
    init_ray(address=address, num_cpus=max(int(need + 0.999), os.cpu_count() or 1), use_gpu=cfg.scaling.use_gpu,
             object_store_memory=1 << 29)
    with driver_stop() as board:  # SIGTERM / Ctrl-C here: the workers save last.pt at the next step
        return _fit(cfg, board)


def _fit(cfg: FinetuneConfig, board: str) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        ray_finetune_loop, train_loop_config={"config": cfg.to_dict(), "stop_board": board},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        torch_config=preemptible_torch_config("nccl" if cfg.scaling.use_gpu else "gloo"),
        run_config=RunConfig(name="ray", storage_path=str(cfg.run_dir()), logging_config=train_logging_config()))
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    # rank 0 wrote (and, on object storage, uploaded) these, on whichever node it ran
    if (result.metrics or {}).get("preempted"):
        return {"preempted": 1, "step": result.metrics.get("step"),
                "checkpoint": storage.join(cfg.run_location(), "checkpoints", LAST)}
    return json.loads(storage.read_text(storage.join(cfg.run_location(), "results.json")))


def run(cfg: FinetuneConfig, address: str | None = None) -> dict:
    """Prepare, then train where the *effective* config says (a resumed run keeps its own scaling)."""

    cfg, state = prepare(cfg)
    t0 = time.perf_counter()
    # Ray workers read last.pt themselves (each needs the state); here it is passed on, not re-read
    results = run_ray(cfg, address) if cfg.scaling.num_workers >= 1 else local_finetune(cfg, resume_state=state)
    if results.get("preempted"):
        print(f"fine-tuning stopped after {time.perf_counter() - t0:.1f} s at step {results.get('step')}; checkpoint "
              f"{results.get('checkpoint')}; run the same command with init_from=resume to continue", flush=True)
        return results
    print(f"fine-tuning finished in {time.perf_counter() - t0:.1f} s -> {cfg.run_location()}")
    return results


def print_results(results: dict) -> None:
    if results.get("preempted"):
        return
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
    print_results(run(load_finetune_config(args.config, args.overrides), args.address))
    return 0


if __name__ == "__main__":
    sys.exit(main())
