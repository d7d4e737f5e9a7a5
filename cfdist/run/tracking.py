"""Experiment tracking: the ``tracking`` section and the tracker rank 0 logs to.

    tracking:
      backend: tensorboard      # tensorboard (default: metrics.jsonl + TensorBoard only) | mlflow | wandb
      uri: ""                   # mlflow: tracking URI (default sqlite:///<output_dir>/mlflow.db, offline)
      experiment: ""            # mlflow experiment / wandb project (default "cfdist")

``metrics.jsonl`` and TensorBoard are always written (:class:`cfdist.run.metrics.MetricLogger`);
``mlflow`` or ``wandb`` add a tracked run that gets the resolved config (flattened params), every
logged metric, and the final model (``model.pt`` / the fine-tuning checkpoints) as artifacts. Both
work offline: MLflow on a local ``sqlite:`` store (artifacts beside it, never in the working
directory), W&B with ``WANDB_MODE=offline`` (its default here unless the user sets WANDB_MODE).
MLflow's telemetry (on by default in MLflow 3, posting to an outside host) is switched off unless
the user set ``MLFLOW_DISABLE_TELEMETRY`` / ``DO_NOT_TRACK`` themselves.

The tracked run's id is written to ``<run_dir>/tracking.json``; a resumed run (same run directory)
reopens that run, so one training is one tracked run however often it was preempted. Only rank 0
tracks; the driver process logs the exported model afterwards through the same id.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cfdist.config import ConfigError
from cfdist.fileio import write_json_atomic

BACKENDS = ("tensorboard", "mlflow", "wandb")
TRACKING_FILE = "tracking.json"
EXTRAS = {"mlflow": "pip install 'cfdist[mlflow]'", "wandb": "pip install 'cfdist[wandb]'"}


@dataclass
class TrackingSection:
    """Where metrics go beside ``metrics.jsonl`` and TensorBoard (see the module docstring).

    Attributes:
        backend: ``tensorboard`` (nothing more), ``mlflow`` or ``wandb``.
        uri: MLflow tracking URI; "" = ``sqlite:///<output_dir>/mlflow.db`` (one store for every run
            of the output directory). Ignored by the other backends.
        experiment: MLflow experiment name / W&B project; "" = ``cfdist``.
    """

    backend: str = "tensorboard"
    uri: str = ""
    experiment: str = ""

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ConfigError(f"tracking.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1e-3}}`` -> ``{"optim.lr": 1e-3}`` (lists as their JSON text)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, tuple)) else value
    return out


def numeric(metrics: dict) -> dict[str, float]:
    """The finite numbers of a metrics record (bools and text left out)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _quiet_mlflow() -> None:
    # no usage telemetry to an outside host unless the user asked for it (either variable set wins)
    if "MLFLOW_DISABLE_TELEMETRY" not in os.environ and "DO_NOT_TRACK" not in os.environ:
        os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"


def _import(backend: str):
    try:
        if backend == "mlflow":
            _quiet_mlflow()
            import mlflow

            return mlflow
        os.environ.setdefault("WANDB_MODE", "offline")
        import wandb

        return wandb
    except ImportError:
        raise ConfigError(f"tracking.backend={backend} needs the {backend} package: {EXTRAS[backend]}") from None


class Tracker:
    """One tracked run of ``run_dir`` (rank 0 only). ``backend`` tensorboard: every call is a no-op."""

    def __init__(self, section: TrackingSection, run_dir: Path, config: dict | None = None, run_name: str = ""):
        self.section, self.run_dir = section, Path(run_dir)
        self.backend = section.backend
        self.run_id: str | None = None
        self._mod = None
        self._run = None
        if self.backend == "tensorboard":
            return
        self._mod = _import(self.backend)
        previous = read_run_id(self.run_dir, self.backend)
        experiment = section.experiment or "cfdist"
        if self.backend == "mlflow":
            mlflow = self._mod
            mlflow.set_tracking_uri(mlflow_uri(section, self.run_dir))
            if mlflow.get_experiment_by_name(experiment) is None:
                # artifacts beside the store, never in ./mlruns of whatever the working directory is
                mlflow.create_experiment(experiment, artifact_location=mlflow_artifacts(section, self.run_dir))
            mlflow.set_experiment(experiment)
            self._run = mlflow.start_run(run_id=previous) if previous else mlflow.start_run(run_name=run_name)
            self.run_id = self._run.info.run_id
            if config is not None and not previous:  # params are write-once in MLflow
                params = flatten(config)
                for chunk in range(0, len(params), 100):
                    mlflow.log_params(dict(list(params.items())[chunk:chunk + 100]))
        else:
            wandb = self._mod
            self._run = wandb.init(project=experiment, name=run_name or None, id=previous, resume="allow",
                                   dir=str(self.run_dir), config=config)
            self.run_id = self._run.id
        write_json_atomic(self.run_dir / TRACKING_FILE, {"backend": self.backend, "run_id": self.run_id,
                                                         "experiment": experiment})

    def log(self, step: int, metrics: dict) -> None:
        values = numeric(metrics)
        if self._mod is None or not values:
            return
        if self.backend == "mlflow":
            self._mod.log_metrics(values, step=int(step))
        else:
            self._run.log(values, step=int(step))

    def log_files(self, paths: list[Path]) -> None:
        """Attach files (checkpoints, results) to the tracked run."""
        if self._mod is None or not paths:
            return
        if self.backend == "mlflow":
            for path in paths:
                self._mod.log_artifact(str(path))
            return
        artifact = self._mod.Artifact(f"{self.run_dir.name}-model", type="model")
        for path in paths:
            artifact.add_file(str(path))
        self._run.log_artifact(artifact)

    def close(self, status: str = "FINISHED") -> None:
        """End the tracked run (``status``: FINISHED, KILLED when preempted: the next run reopens it)."""
        if self._mod is None:
            return
        if self.backend == "mlflow":
            self._mod.end_run(status=status)
        else:
            self._run.finish(exit_code=0 if status == "FINISHED" else 1)
        self._mod = None


def mlflow_uri(section: TrackingSection, run_dir: Path) -> str:
    return section.uri or f"sqlite:///{Path(run_dir).resolve().parent / 'mlflow.db'}"


def mlflow_artifacts(section: TrackingSection, run_dir: Path) -> str | None:
    """Artifact root of a new experiment: ``<output_dir>/mlflow-artifacts`` for the default local
    store; None (the server's choice) for a URI the user gave."""
    return None if section.uri else (Path(run_dir).resolve().parent / "mlflow-artifacts").as_uri()


def read_run_id(run_dir: Path, backend: str) -> str | None:
    """The tracked run id recorded in ``run_dir`` for ``backend`` (None: not tracked yet)."""
    path = Path(run_dir) / TRACKING_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record.get("run_id") if record.get("backend") == backend else None


def log_artifacts(section: TrackingSection, run_dir: Path, paths: list[Path]) -> None:
    """Attach files (the exported model) to the run's tracked run, from any process (the driver)."""
    if section.backend == "tensorboard":
        return
    run_id = read_run_id(run_dir, section.backend)
    if run_id is None:
        return
    mod = _import(section.backend)
    if section.backend == "mlflow":
        client = mod.MlflowClient(tracking_uri=mlflow_uri(section, run_dir))
        for path in paths:
            client.log_artifact(run_id, str(path))
        return
    run = mod.init(project=section.experiment or "cfdist", id=run_id, resume="allow", dir=str(run_dir))
    artifact = mod.Artifact(f"{run_dir.name}-model", type="model")
    for path in paths:
        artifact.add_file(str(path))
    run.log_artifact(artifact)
    run.finish()
