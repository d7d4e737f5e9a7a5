"""Fine-tuning sweeps: Ray Tune with ASHA over fine-tuning settings, each trial a normal fine-tuning run.

    cfdist tune --config megnet_slice_eform --space sweep.yaml init_from=pretrained checkpoint=model.pt

The space file (typed; unknown keys are errors)::

    tune:                       # the sweep itself (:class:`TuneSection`)
      num_samples: 8            # trials
      max_concurrent_trials: 2  # trials at once (default: as many as the cluster's CPUs / GPUs hold)
      cpus_per_trial: 1
      gpus_per_trial: 0
      grace_period: 2           # ASHA: epochs every trial runs before it can be stopped
      reduction_factor: 2       # ASHA: keep the best 1/reduction_factor at each rung
    space:                      # dotted fine-tuning config keys -> a distribution or a value
      optim.lr: {loguniform: [1.0e-4, 1.0e-3]}
      epochs: {choice: [20, 40]}
      transfer.head: {choice: [keep, replace]}
      transfer.freeze_blocks: {choice: [0, 2, 4]}
      transfer.lr_scale: {uniform: [0.1, 1.0]}     # lr factor of the lower blocks
      optim.layer_decay: {uniform: [0.6, 1.0]}     # layer-wise lr decay (1 = off)
      data.batch_size: {choice: [32, 64]}           # batch budget

Distributions: ``choice``, ``grid`` (every value, times ``num_samples``), ``uniform``,
``loguniform``, ``randint`` ([low, high)). Every trial is :class:`cfdist.finetune.loop.FinetuneTrainer`
in its Tune worker (``scaling.num_workers`` is forced to 0: a trial is one process with
``cpus_per_trial`` threads or one GPU), reporting ``val_loss`` after every epoch, which ASHA
compares (``time_attr``: the epoch). Trials write their runs to
``<output_dir>/<run_name>/trials/<trial>`` (``last.pt``, ``best.pt``, metrics, tracking as usual),
Tune's own state to ``<output_dir>/<run_name>/tune``; at the end a table of trials is printed and
the best trial's ``best.pt`` (lowest validation loss) and its resolved config are copied to
``<output_dir>/<run_name>/best.pt`` / ``best_config.yaml``. ``output_dir`` may be an ``s3://`` /
``gs://`` URI (:mod:`cfdist.storage`): trial runs, Tune's state, ``sweep.json`` and the exported
checkpoint are then all on the bucket (each trial uploads its run as a fine-tuning run does).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cfdist import storage
from cfdist.cluster import init_ray
from cfdist.config import ConfigError, build, load_yaml
from cfdist.finetune.config import FinetuneConfig, finetune_config_from_dict, load_finetune_config
from cfdist.finetune.loop import BEST, FinetuneTrainer
from cfdist.run.runinfo import write_run_files

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
METRIC = "val_loss"


@dataclass
class TuneSection:
    """The sweep's own settings (see the module docstring)."""

    num_samples: int = 8
    max_concurrent_trials: int = 0
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    grace_period: int = 1
    reduction_factor: int = 2
    seed: int = 0

    def __post_init__(self):
        if self.num_samples < 1 or self.grace_period < 1 or self.reduction_factor < 2:
            raise ConfigError("tune: num_samples and grace_period must be >= 1, reduction_factor >= 2")
        if self.max_concurrent_trials < 0 or self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise ConfigError("tune: max_concurrent_trials >= 0, cpus_per_trial > 0, gpus_per_trial >= 0")


@dataclass
class SweepSpec:
    tune: TuneSection = field(default_factory=TuneSection)
    space: dict = field(default_factory=dict)


def load_space(path: str | Path, base: FinetuneConfig) -> SweepSpec:
    """The space file, checked: every key is a fine-tuning config key (a config is built with each
    distribution's first value), every distribution known."""
    spec = build(SweepSpec, load_yaml(path) or {}, source=str(path))
    if not spec.space:
        raise ConfigError(f"{path}: the space section is empty (dotted config keys -> distributions)")
    for key, dist in spec.space.items():
        if isinstance(dist, dict):
            if len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
                raise ConfigError(f"{path}: space.{key} must be one of {{{', '.join(DISTRIBUTIONS)}: ...}} "
                                  f"or a plain value, got {dist!r}")
            (kind, args), = dist.items()
            if kind in ("uniform", "loguniform", "randint") and not (isinstance(args, list) and len(args) == 2):
                raise ConfigError(f"{path}: space.{key}: {kind} takes [low, high], got {args!r}")
            if kind in ("choice", "grid") and not (isinstance(args, list) and args):
                raise ConfigError(f"{path}: space.{key}: {kind} takes a non-empty list, got {args!r}")
        if key in ("scaling.num_workers", "run_name", "output_dir", "init_from"):
            raise ConfigError(f"{path}: space.{key}: the sweep sets it (one process per trial, its own run)")
    trial_config(base.to_dict(), {k: first_value(v) for k, v in spec.space.items()}, "check", "/tmp")
    return spec


def first_value(dist):
    if not isinstance(dist, dict):
        return dist
    (kind, args), = dist.items()
    return int(args[0]) if kind == "randint" else args[0]


def search_space(space: dict) -> dict:
    """Space file entries -> Ray Tune sampling objects (dotted keys kept flat)."""
    from ray import tune

    out = {}
    for key, dist in space.items():
        if not isinstance(dist, dict):
            out[key] = dist
            continue
        (kind, args), = dist.items()
        out[key] = {"choice": tune.choice, "grid": tune.grid_search}[kind](list(args)) if kind in ("choice", "grid") \
            else {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[kind](*args)
    return out


def trial_config(base: dict, values: dict, name: str, trials_dir: str | Path) -> FinetuneConfig:
    """``base`` (a resolved fine-tuning config dict) with the trial's ``values`` (dotted keys) set."""
    data = copy.deepcopy(base)
    for key, value in values.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"space.{key}: {part!r} is not a section of the fine-tuning config")
            node = node[part]
        node[parts[-1]] = value
    data.update(run_name=name, output_dir=str(trials_dir), overwrite=True)
    data["scaling"]["num_workers"] = 0
    return finetune_config_from_dict(data)


def run_trial(config: dict) -> None:
    """The Tune trainable: one fine-tuning run, ``val_loss`` reported after every epoch."""
    import ray.tune
    import torch

    base, trials_dir, threads = config.pop("_base"), config.pop("_trials_dir"), config.pop("_threads")
    name = ray.tune.get_context().get_trial_id()
    cfg = trial_config(base, config, name, trials_dir)
    torch.set_num_threads(max(1, int(threads)))
    device = "cuda" if torch.cuda.is_available() and cfg.scaling.use_gpu else "cpu"
    # config.yaml + run_info.jsonl, as any run (uploaded when the sweep is on object storage)
    write_run_files(cfg.run_dir(), cfg.to_dict(), cfg.run_location(), trial=name)

    def report(metrics: dict) -> None:
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        ray.tune.report({**metrics, "run_dir": cfg.run_location()})

    FinetuneTrainer(cfg, device=device, report=report).run()


def sweep(base: FinetuneConfig, spec: SweepSpec, address: str | None = None) -> dict:
    """Run the sweep; returns ``{"trials": [...], "best": {...}}`` (also ``<sweep dir>/sweep.json``)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    if base.init_from == "resume":
        raise ConfigError("cfdist tune: init_from=resume is for one run; a sweep starts each trial afresh")
    sweep_dir = base.run_location()  # a local path or an s3:// / gs:// URI
    trials_dir = storage.join(sweep_dir, "trials")
    if base.remote:
        fs, path = storage.filesystem(sweep_dir)  # Tune's state on the bucket too (no scheme in the path)
        tune_storage = {"storage_path": path, "storage_filesystem": fs}
    else:
        Path(trials_dir).mkdir(parents=True, exist_ok=True)
        tune_storage = {"storage_path": sweep_dir}
    t = spec.tune
    init_ray(address=address, use_gpu=t.gpus_per_trial > 0, object_store_memory=1 << 29)
    base_dict = base.to_dict()
    base_dict["scaling"]["use_gpu"] = t.gpus_per_trial > 0
    max_epochs = max([base.epochs] + [int(v) for v in _values(spec.space.get("epochs"))])
    param_space = {**search_space(spec.space), "_base": base_dict, "_trials_dir": str(trials_dir),
                   "_threads": max(1, int(t.cpus_per_trial))}
    scheduler = ASHAScheduler(time_attr="epoch", max_t=max_epochs, grace_period=t.grace_period,
                              reduction_factor=t.reduction_factor)
    tuner = tune.Tuner(
        tune.with_resources(run_trial, {"cpu": t.cpus_per_trial, "gpu": t.gpus_per_trial}),
        param_space=param_space,
        tune_config=tune.TuneConfig(metric=METRIC, mode="min", scheduler=scheduler, num_samples=t.num_samples,
                                    max_concurrent_trials=t.max_concurrent_trials or None),
        run_config=tune.RunConfig(name="tune", verbose=0, **tune_storage),
    )
    t0 = time.perf_counter()
    grid = tuner.fit()
    trials = []
    for result in grid:
        history = result.metrics_dataframe
        values = {k: v for k, v in (result.config or {}).items() if not k.startswith("_")}
        best_val = float(history[METRIC].min()) if history is not None and METRIC in history else math.nan
        run_dir = (result.metrics or {}).get("run_dir")
        trials.append({"trial": storage.basename(run_dir) if run_dir else "?", "run_dir": run_dir, "params": values,
                       "epochs": int((result.metrics or {}).get("epoch", 0)), "best_val_loss": best_val,
                       "error": str(result.error) if result.error else None})
    done = [tr for tr in trials if math.isfinite(tr["best_val_loss"]) and tr["run_dir"]]
    if not done:
        raise RuntimeError(f"cfdist tune: no trial reported a finite {METRIC}; see {storage.join(sweep_dir, 'tune')}")
    best = min(done, key=lambda tr: tr["best_val_loss"])
    # the trials' files are where their runs put them (uploaded by each trial's rank 0 when remote)
    storage.copy(storage.join(best["run_dir"], "checkpoints", BEST), storage.join(sweep_dir, "best.pt"))
    storage.copy(storage.join(best["run_dir"], "config.yaml"), storage.join(sweep_dir, "best_config.yaml"))
    out = {"trials": trials, "best": best, "best_checkpoint": storage.join(sweep_dir, "best.pt"),
           "seconds": time.perf_counter() - t0}
    storage.write_text(storage.join(sweep_dir, "sweep.json"), json.dumps(out, indent=1, default=str))
    return out


def _values(dist) -> list:
    if dist is None:
        return []
    if not isinstance(dist, dict):
        return [dist]
    (kind, args), = dist.items()
    if kind in ("choice", "grid"):
        return list(args)
    return [args[1]]


def print_table(out: dict) -> None:
    keys = sorted({k for tr in out["trials"] for k in tr["params"]})
    print("| trial | " + " | ".join(keys) + " | epochs run | best val_loss |")
    print("|---" * (len(keys) + 3) + "|")
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    for tr in sorted(out["trials"], key=lambda tr: (not math.isfinite(tr["best_val_loss"]), tr["best_val_loss"])):
        mark = " (best)" if tr["trial"] == out["best"]["trial"] else ""
        print(f"| {tr['trial']}{mark} | " + " | ".join(fmt(tr["params"].get(k, "")) for k in keys)
              + f" | {tr['epochs']} | {fmt(tr['best_val_loss'])} |")
    print(f"\nbest trial {out['best']['trial']}: val_loss {out['best']['best_val_loss']:.4g}; "
          f"checkpoint {out['best_checkpoint']} (its config: best_config.yaml beside it)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cfdist tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="fine-tuning config: a packaged name or a YAML path")
    parser.add_argument("--space", required=True, help="YAML with the tune and space sections")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the fine-tuning config")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a new local instance)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    base = load_finetune_config(args.config, args.overrides)
    # a self-contained config for trials that run elsewhere: absolute paths, the model inline
    base.storage.apply()  # endpoints into the environment (forwarded to every trial by init_ray)
    base.output_dir = storage.absolute(base.output_dir)  # output_dir may be an s3:// / gs:// URI too
    base.data.shards = storage.absolute(base.data.shards)  # shards and checkpoint may be s3:// / gs:// URIs
    if base.checkpoint:
        base.checkpoint = storage.absolute(base.checkpoint)
    if base.init_from == "scratch" and not isinstance(base.model, dict):
        model = base.model_config().to_dict()
        model.pop("target_names")
        base.model = model
    spec = load_space(args.space, base)
    print_table(sweep(base, spec, args.address))
    return 0


if __name__ == "__main__":
    sys.exit(main())
