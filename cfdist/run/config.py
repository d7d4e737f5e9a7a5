"""What every run config shares: the optimiser section, the run directory, the model config.

Pretraining (:mod:`cfdist.train.config`) and fine-tuning (:mod:`cfdist.finetune.config`) build
their configs from these pieces and the generic machinery of :mod:`cfdist.config`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from cfdist import storage
from cfdist.config import ConfigError, CrystalformerConfig


@dataclass
class OptimSection:
    """AdamW and the learning-rate schedule (paper recipe by default).

    schedule: ``inverse_sqrt`` (lr * sqrt(T / (T + t)), T = ``inverse_sqrt_t``; paper) or
    ``warmup_cosine`` (linear warmup over ``warmup_steps`` then cosine to ``min_lr_ratio`` * lr at
    ``max_steps``) or ``constant``.
    """

    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 1e-5
    grad_clip: float = 1.0
    schedule: str = "inverse_sqrt"
    inverse_sqrt_t: int = 4000
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        if self.schedule not in ("inverse_sqrt", "warmup_cosine", "constant"):
            raise ConfigError(f"optim.schedule must be inverse_sqrt, warmup_cosine or constant, got {self.schedule!r}")


class RunConfigMixin:
    """What pretraining and fine-tuning configs share: the run directory and the model config."""

    model: Any
    data: Any
    output_dir: str
    run_name: str

    def model_config(self) -> CrystalformerConfig:
        """The model config with ``target_names`` set to the data's targets."""
        return resolve_model_config(self.model, self.data.targets)

    def run_location(self) -> str:
        """Where the run's files live: ``<output_dir>/<run_name>``, a local path or an ``s3://`` /
        ``gs://`` URI (never through pathlib)."""
        if storage.is_uri(self.output_dir):
            return storage.join(storage.absolute(self.output_dir), self.run_name)
        return str(Path(self.output_dir).resolve() / self.run_name)

    def run_dir(self) -> Path:
        """The local directory the run writes into: the run directory itself, or for an
        ``output_dir`` on object storage a staging directory in the user cache whose files are
        uploaded to :meth:`run_location` (:mod:`cfdist.run.runinfo`)."""
        if storage.is_uri(self.output_dir):
            return storage.staging_dir(self.run_location(), "runs")
        return Path(self.output_dir).resolve() / self.run_name

    @property
    def remote(self) -> bool:
        """Whether ``output_dir`` is on object storage."""
        return storage.is_uri(self.output_dir)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve_model_config(model: Any, targets: list[str]) -> CrystalformerConfig:
    """``model`` (an inline mapping, a YAML path or a packaged model config name such as
    ``crystalformer``) -> :class:`CrystalformerConfig` with ``target_names = targets``."""
    cfg = CrystalformerConfig.from_dict(model) if isinstance(model, Mapping) else CrystalformerConfig.from_yaml(model)
    cfg.target_names = list(targets)
    return cfg
