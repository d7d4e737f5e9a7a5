"""Typed pretraining config: YAML file + ``key=value`` overrides, unknown keys rejected.

    cfdist pretrain --config megnet_slice optim.lr=3e-4 deepspeed.zero_stage=3 scaling.num_workers=4

Run directories are derived in one place (:meth:`PretrainConfig.run_dir`):
``<output_dir>/<run_name>`` holds the resolved config, versions, metrics, TensorBoard
events, the Ray Train checkpoints (``ray/``) and the portable export (``model.pt``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from cfdist.config import ConfigError, apply_overrides, build, load_yaml, resolve_config
from cfdist.run.config import OptimSection, RunConfigMixin


@dataclass
class DataSection:
    """Where the shards are and how batches are cut.

    Attributes:
        shards: shard directory written by ``cfdist preprocess``.
        targets: label columns to train on (the model gets one output per target).
        train_split / val_split: split names in the manifest (val_split "" = no validation).
        max_entries / max_atoms / max_structures: per-rank micro-batch budget (cfdist.data.BatchBudget).
        shuffle_rows: streaming shuffle window per rank (rows); 0 = stream order.
        rows_per_read: Arrow rows fetched per read from the stream.
        verify_checksums: sha256 every shard against the manifest before training.
    """

    shards: str = ""
    targets: list[str] = field(default_factory=lambda: ["e_form"])
    train_split: str = "train"
    val_split: str = "val"
    max_entries: int = 400_000
    max_atoms: int = 4_096
    max_structures: int = 256
    shuffle_rows: int = 2_048
    rows_per_read: int = 256
    verify_checksums: bool = True


@dataclass
class DeepSpeedSection:
    """DeepSpeed engine settings (rendered to a DeepSpeed JSON config by cfdist.train.engine).

    precision: fp32 | bf16 | fp16 (fp16 only where the accelerator supports it).
    zero_stage: 0-3. activation_checkpointing: recompute each encoder block in backward.
    gradient_accumulation_steps: micro-batches per optimiser step.
    """

    zero_stage: int = 0
    precision: str = "fp32"
    activation_checkpointing: bool = False
    gradient_accumulation_steps: int = 1
    extra: dict[str, Any] = field(default_factory=dict)  # merged verbatim into the DeepSpeed config

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"deepspeed.precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.gradient_accumulation_steps < 1:
            raise ConfigError("deepspeed.gradient_accumulation_steps must be >= 1")


@dataclass
class ScalingSection:
    """Ray Train workers. ``use_gpu`` selects nccl, otherwise gloo."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 0
    placement_strategy: str = "PACK"


@dataclass
class PretrainConfig(RunConfigMixin):
    """Everything a pretraining run needs; ``model`` is a model config path or an inline mapping."""

    run_name: str = "pretrain"
    output_dir: str = "outputs/runs"
    seed: int = 0
    max_steps: int = 1000
    log_every: int = 10
    val_every: int = 200
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    model: Any = "crystalformer"
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)

    def __post_init__(self):
        for name in ("max_steps", "log_every", "val_every", "checkpoint_every", "keep_checkpoints"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")



def load_pretrain_config(path: str | Path | None, overrides: list[str] = ()) -> PretrainConfig:
    """YAML file or packaged pretraining config name (optional) + overrides -> validated :class:`PretrainConfig`.

    A ``deepspeed`` value that is a string names a YAML file or a packaged DeepSpeed config
    (``zero0`` .. ``zero3``).
    """
    path = resolve_config(path, "pretrain") if path else None
    data = load_yaml(path) if path else {}
    # A named deepspeed file is resolved before each override, so ``deepspeed.zero_stage=3``
    # edits the file's settings (and ``deepspeed=zero3`` may still name another file).
    for item in overrides:
        data = apply_overrides(_resolve_deepspeed(data), [item])
    return build(PretrainConfig, _resolve_deepspeed(data), source=str(path or "config"))


def _resolve_deepspeed(data: dict) -> dict:
    ds = data.get("deepspeed")
    if isinstance(ds, str):
        data = {**data, "deepspeed": load_yaml(resolve_config(ds, "deepspeed"))}
    return data


def config_from_dict(data: Mapping[str, Any]) -> PretrainConfig:
    """Rebuild a config from :meth:`PretrainConfig.to_dict` (e.g. inside Ray workers)."""
    return build(PretrainConfig, data, source="config")
