"""Typed pretraining config: YAML file + ``key=value`` overrides, unknown keys rejected.

    python launch/pretrain.py --config configs/pretrain/megnet_slice.yaml \
        optim.lr=3e-4 deepspeed.zero_stage=3 scaling.num_workers=4

Run directories are derived in one place (:meth:`PretrainConfig.run_dir`):
``<output_dir>/<run_name>`` holds the resolved config, versions, metrics, TensorBoard
events, the Ray Train checkpoints (``ray/``) and the portable export (``model.pt``).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from cfdist.config import ConfigError, CrystalformerConfig, from_mapping, load_yaml

REPO = Path(__file__).resolve().parents[2]


@dataclass
class DataSection:
    """Where the shards are and how batches are cut.

    Attributes:
        shards: shard directory written by ``preprocess/build_shards.py``.
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


class RunConfigMixin:
    """What pretraining and fine-tuning configs share: the run directory and the model config."""

    model: Any
    data: Any
    output_dir: str
    run_name: str

    def model_config(self) -> CrystalformerConfig:
        """The model config with ``target_names`` set to the data's targets."""
        return resolve_model_config(self.model, self.data.targets)

    def run_dir(self) -> Path:
        return Path(self.output_dir).resolve() / self.run_name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
    model: Any = "configs/model/crystalformer.yaml"
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)

    def __post_init__(self):
        for name in ("max_steps", "log_every", "val_every", "checkpoint_every", "keep_checkpoints"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")



def resolve_model_config(model: Any, targets: list[str]) -> CrystalformerConfig:
    """``model`` (an inline mapping or a YAML path, absolute, relative to the working directory or
    to the repository) -> :class:`CrystalformerConfig` with ``target_names = targets``."""
    if isinstance(model, Mapping):
        cfg = CrystalformerConfig.from_dict(model)
    else:
        path = Path(model)
        cfg = CrystalformerConfig.from_yaml(path if path.is_absolute() or path.exists() else REPO / path)
    cfg.target_names = list(targets)
    return cfg


def build(cls: type, data: Mapping[str, Any], source: str):
    """Dataclass ``cls`` from a mapping; nested dataclass fields recurse; unknown keys raise."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    values = dict(data)
    for f in dataclasses.fields(cls):
        kind = hints.get(f.name)
        if dataclasses.is_dataclass(kind) and f.name in values:
            values[f.name] = build(kind, values[f.name] or {}, f"{source}: {f.name}")
        elif kind is float and isinstance(values.get(f.name), str):
            # PyYAML (YAML 1.1) reads ``3e-4`` (no dot) as a string; a float field takes it as a number
            try:
                values[f.name] = float(values[f.name])
            except ValueError:
                raise ConfigError(f"{source}: {f.name} must be a number, got {values[f.name]!r}") from None
    return from_mapping(cls, values, source=source)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``a.b=value`` strings into a nested mapping; values parsed as YAML (``3e-4``, ``[a, b]``, ``true``)."""
    import yaml

    data = _deep_copy(data)
    loader = _override_loader()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. optim.lr=3e-4)")
        key, raw = item.split("=", 1)
        value = yaml.load(raw, Loader=loader) if raw != "" else ""
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _override_loader():
    """SafeLoader that also reads YAML 1.2 floats without a dot or exponent sign (``3e-4``, ``1e5``)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"))
    return Loader


def _deep_copy(data):
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def load_pretrain_config(path: str | Path | None, overrides: list[str] = ()) -> PretrainConfig:
    """YAML file (optional) + overrides -> validated :class:`PretrainConfig`.

    A ``deepspeed`` value that is a string names a YAML file (absolute, relative to the
    working directory, or to ``configs/deepspeed/`` without the extension).
    """
    data = load_yaml(path) if path else {}
    # A named deepspeed file is resolved before each override, so ``deepspeed.zero_stage=3``
    # edits the file's settings (and ``deepspeed=zero3`` may still name another file).
    for item in overrides:
        data = apply_overrides(_resolve_deepspeed(data), [item])
    return build(PretrainConfig, _resolve_deepspeed(data), source=str(path or "config"))


def _resolve_deepspeed(data: dict) -> dict:
    ds = data.get("deepspeed")
    if isinstance(ds, str):
        data = {**data, "deepspeed": load_yaml(_resolve_named(ds, "deepspeed"))}
    return data


def _resolve_named(name: str, kind: str) -> Path:
    for candidate in (Path(name), REPO / name, REPO / "configs" / kind / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{kind} config {name!r} not found (looked in ., the repository and configs/{kind}/)")


def config_from_dict(data: Mapping[str, Any]) -> PretrainConfig:
    """Rebuild a config from :meth:`PretrainConfig.to_dict` (e.g. inside Ray workers)."""
    return build(PretrainConfig, data, source="config")
