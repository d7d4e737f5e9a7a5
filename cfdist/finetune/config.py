"""Typed fine-tuning config: YAML file + ``key=value`` overrides, unknown keys rejected.

    cfdist finetune --config megnet_slice_eform \
        init_from=pretrained checkpoint=outputs/runs/pretrain/model.pt transfer.freeze_blocks=2

Defaults are the paper's recipe (docs/model.md, "Fine-tuning recipe"): targets standardised on train, L1
loss, AdamW lr 5e-4 betas (0.9, 0.98) weight decay 1e-5 (not on biases), lr * sqrt(T / (T + t))
per step with T = 4000, gradient-norm clip 1.0, SWA over the last ``swa_epochs`` epochs (the
schedule is held while averaging), best-validation checkpoint. Run directory:
``<output_dir>/<run_name>`` (:meth:`FinetuneConfig.run_dir`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from cfdist.config import ConfigError, apply_overrides, build, inline_named_model, load_yaml, resolve_config
from cfdist.run.config import ComputeSection, DataSection, LossSection, OptimSection, RunConfigMixin
from cfdist.run.tracking import TrackingSection
from cfdist.storage import StorageSection

INIT_FROM = ("scratch", "pretrained", "resume")
HEAD_MODES = ("auto", "keep", "replace")


@dataclass
class FinetuneData(DataSection):
    """The data section of fine-tuning: the shared fields (:class:`cfdist.run.config.DataSection`;
    fine-tuning reads through the same stream and packer as pretraining) and those only
    fine-tuning uses.

    Attributes:
        test_split: split evaluated at the end (best, SWA and final models; "" = none).
        batch_size: structures per optimiser step over all ranks (paper: 128 for MEGNet tasks, 256
            for JARVIS), packed into micro-batches within the budget whose gradients add up to the step.
        drop_last: drop the last partial step of an epoch (paper: true).
    """

    test_split: str = "test"
    batch_size: int = 128
    drop_last: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.batch_size < 1:
            raise ConfigError("data.batch_size must be >= 1")


@dataclass
class TransferSection:
    """What a pretrained checkpoint contributes and what stays fixed.

    head: ``auto`` keeps the head's hidden layer and, per target, the output row and normalisation
        of targets the checkpoint already predicts; new targets get fresh rows (standardised on
        train). ``keep`` requires the same targets and keeps the whole head. ``replace`` starts
        a fresh head. A checkpoint pretrained on a mixture has one head per dataset: name the
        dataset whose property head to start from (``transfer.head: megnet``; per target as
        ``auto``); ``auto`` / ``keep`` pick the property head that predicts most of / exactly the
        run's targets (docs/model.md, "Dataset mixtures").
    freeze_embedding / freeze_blocks: the species embedding and the first k encoder blocks get
        no gradient (their weights stay bit-identical).
    lr_scale_blocks / lr_scale: the embedding (unless frozen) and the first k blocks (those not
        frozen) train at ``optim.lr * lr_scale``.
    """

    head: str = "auto"
    freeze_embedding: bool = False
    freeze_blocks: int = 0
    lr_scale_blocks: int = 0
    lr_scale: float = 1.0

    def __post_init__(self):
        if not self.head or "/" in str(self.head):
            raise ConfigError(f"transfer.head must be one of {HEAD_MODES} or the name of a pretrained dataset's "
                              f"head, got {self.head!r}")
        if self.freeze_blocks < 0 or self.lr_scale_blocks < 0 or self.lr_scale < 0:
            raise ConfigError("transfer.freeze_blocks, lr_scale_blocks and lr_scale must be >= 0")


@dataclass
class ReplaySection:
    """Replay of a pretraining dataset while fine-tuning, against forgetting (MACE's multi-head
    fine-tuning; :mod:`cfdist.finetune.replay`).

    Every optimiser step adds ``round(fraction * data.batch_size)`` structures of ``shards`` (its
    train split, reshuffled every epoch) on which the checkpoint's head ``head`` keeps training,
    beside the task's new head on the shared encoder. The saved checkpoints hold the task's head only.

    shards: the replay set's shard directory (off when empty).
    head: the pretrained head to keep training: a dataset of a mixture checkpoint, or empty for a
        single-dataset checkpoint's own head (energy or property).
    targets: the replay set's label columns: an energy head's total-energy column (default
        ``[energy]``), or a property head's targets (default: the head's).
    fraction: replay structures per task structure of a step (> 0).
    loss: an energy head's loss (weights of energy, forces, stress; CHGNet's by default).
    """

    shards: str = ""
    head: str = ""
    targets: list[str] = field(default_factory=list)
    fraction: float = 0.25
    loss: LossSection = field(default_factory=LossSection)

    def __post_init__(self):
        if not float(self.fraction) > 0:
            raise ConfigError(f"replay.fraction must be > 0 (replay structures per task structure), got {self.fraction}")

    @property
    def enabled(self) -> bool:
        return bool(self.shards)


@dataclass
class FinetuneScaling:
    """``num_workers: 0`` trains in this process; >= 1 runs the same loop on Ray Train workers (DDP)."""

    num_workers: int = 0
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    threads: int = 0  # torch intra-op threads per process (0 = torch's default)


@dataclass
class FinetuneConfig(RunConfigMixin):
    """Everything a fine-tuning run needs.

    init_from: ``scratch`` (``model`` config, fresh weights), ``pretrained`` (encoder from the
    portable ``checkpoint``, head per ``transfer.head``) or ``resume`` (continue this run from
    ``<run_dir>/checkpoints/last.pt``).
    """

    run_name: str = "finetune"
    output_dir: str = "outputs/finetune"
    seed: int = 123
    init_from: str = "scratch"
    checkpoint: str = ""
    model: Any = "crystalformer"
    epochs: int = 500
    swa_epochs: int = 50
    log_every: int = 20
    max_bad_steps: int = 5
    overwrite: bool = False
    task: str = ""  # name of the paper task the data comes from (informational; cfdist prepare-task)
    data: FinetuneData = field(default_factory=FinetuneData)
    optim: OptimSection = field(default_factory=OptimSection)
    compute: ComputeSection = field(default_factory=ComputeSection)
    transfer: TransferSection = field(default_factory=TransferSection)
    replay: ReplaySection = field(default_factory=ReplaySection)
    scaling: FinetuneScaling = field(default_factory=FinetuneScaling)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    storage: StorageSection = field(default_factory=StorageSection)  # endpoints, never secrets

    def __post_init__(self):
        self.take_run_settings()
        if self.init_from not in INIT_FROM:
            raise ConfigError(f"init_from must be one of {INIT_FROM}, got {self.init_from!r}")
        if self.init_from == "pretrained" and not self.checkpoint:
            raise ConfigError("init_from=pretrained needs checkpoint=PATH (a portable model.pt)")
        if self.epochs < 1 or self.log_every < 1 or self.max_bad_steps < 1:
            raise ConfigError("epochs, log_every and max_bad_steps must be >= 1")
        if not 0 <= self.swa_epochs <= self.epochs:
            raise ConfigError(f"swa_epochs must be in [0, epochs={self.epochs}], got {self.swa_epochs}")
        if self.replay.enabled and self.init_from == "scratch":
            raise ConfigError("replay needs a pretrained head: init_from=pretrained checkpoint=... (or resume)")


def load_finetune_config(path: str | Path | None, overrides: list[str] = ()) -> FinetuneConfig:
    """YAML file or packaged fine-tuning config name (a paper task: ``megnet_eform``, ...) + overrides."""
    path = resolve_config(path, "finetune") if path else None
    data = load_yaml(path) if path else {}
    data = apply_overrides(inline_named_model(data, list(overrides)), list(overrides))
    return build(FinetuneConfig, data, source=str(path or "config"))


def finetune_config_from_dict(data: Mapping[str, Any]) -> FinetuneConfig:
    return build(FinetuneConfig, data, source="config")
