"""What every run config shares: the data, optimiser and compute sections, the run directory, the
model config.

Pretraining (:mod:`cfdist.train.config`) and fine-tuning (:mod:`cfdist.finetune.config`) build
their configs from these pieces and the generic machinery of :mod:`cfdist.config`.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from cfdist import storage
from cfdist.config import RUN_SETTINGS, ConfigError, CrystalformerConfig, load_yaml, resolve_config
from cfdist.data import DEFAULT_MAX_ENTRIES
from cfdist.manifest import checksum_mode


@dataclass
class DataSection:
    """Where the shards are and how they are streamed and packed; pretraining
    (:class:`cfdist.train.config.PretrainData`) and fine-tuning
    (:class:`cfdist.finetune.config.FinetuneData`) add the fields only they use.

    Attributes:
        shards: shard directory written by ``cfdist preprocess`` (or ``cfdist prepare-task``).
        targets: label columns to train on (a property model gets one output per target; an energy
            model's one target is the total-energy column).
        transforms: {target: output transform} (``softplus``: predictions >= 0, for band gaps and
            moduli; ``log``: learnt in log10, for quantities spanning decades); the model config's
            ``target_transforms`` (:class:`cfdist.config.CrystalformerConfig`), kept in checkpoints.
        train_split / val_split: split names in the manifest (val_split "" = no validation).
        max_entries / max_atoms / max_structures: per-rank micro-batch budget
            (:class:`cfdist.data.BatchBudget`; training, validation and test passes). The one
            ``max_entries`` default, 400k image-table entries, is sized by memory: about 1.5 GB
            peak RSS per CPU worker with the paper's model in fp32 (docs/scaling.md, "Training
            memory per worker"); an energy step costs ~7.6 kB per entry, ~16-19 kB with the
            forces' graph kept (README, "Training on energies, forces and stress"), which is what
            pretraining's ``force_memory_factor`` divides by. Memory is about linear in it: lower
            it for smaller machines, raise it on large GPUs.
        shuffle_rows: rows per shuffle window of the stream (:mod:`cfdist.stream`); <= 1: no row
            shuffle (rows in file order). A window covering the whole split is a full permutation.
        shuffle_lanes: places of the stream's block each window draws rows from (mixes files within
            a window; memory holds about ``shuffle_lanes + 2`` decoded Parquet row groups).
        shuffle_files: permute the order of the shard files every epoch (seeded by seed, epoch).
        prefetch_batches: batches (fine-tuning: steps) read, packed and collated ahead of the
            trainer, in a thread that runs on into the next epoch.
        verify_checksums: the shard check before training (``cfdist.manifest.ShardSet.verify``):
            ``true`` (default) sha256 every shard against the manifest, except files verified before
            whose size, mtime, ctime and inode are unchanged (records in ``<shards>/.verified.json``,
            docs/shards.md); ``"full"`` re-hash every file; ``false`` sizes and Parquet footers only.
    """

    shards: str = ""
    targets: list[str] = field(default_factory=lambda: ["e_form"])
    transforms: dict[str, str] = field(default_factory=dict)
    train_split: str = "train"
    val_split: str = "val"
    max_entries: int = DEFAULT_MAX_ENTRIES
    max_atoms: int = 4_096
    max_structures: int = 256
    shuffle_rows: int = 2_048
    shuffle_lanes: int = 8
    shuffle_files: bool = True
    prefetch_batches: int = 4
    verify_checksums: bool | str = True

    def __post_init__(self):
        try:
            checksum_mode(self.verify_checksums)
        except ValueError as exc:
            raise ConfigError(f"data.{exc}") from None
        for name in ("max_entries", "max_atoms", "max_structures", "shuffle_lanes", "prefetch_batches"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class OptimSection:
    """AdamW and the learning-rate schedule (paper recipe by default).

    schedule: ``inverse_sqrt`` (lr * sqrt(T / (T + t)), T = ``inverse_sqrt_t``; paper) or
    ``warmup_cosine`` (linear warmup over ``warmup_steps`` then cosine to ``min_lr_ratio`` * lr at
    ``max_steps``) or ``constant``.

    layer_decay: layer-wise learning-rate decay in (0, 1] (1 = off): the heads train at ``lr``,
    block i of n at ``lr * layer_decay ** (n - i)``, the embedding at ``lr * layer_decay ** (n + 1)``
    (:func:`cfdist.run.optim.parameter_groups`; JMP fine-tunes with per-layer multipliers of this kind).
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
    layer_decay: float = 1.0

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        if not 0.0 < float(self.layer_decay) <= 1.0:
            raise ConfigError(f"optim.layer_decay must be in (0, 1] (1 = no layer-wise decay), got {self.layer_decay}")
        if self.schedule not in ("inverse_sqrt", "warmup_cosine", "constant"):
            raise ConfigError(f"optim.schedule must be inverse_sqrt, warmup_cosine or constant, got {self.schedule!r}")


@dataclass
class ComputeSection:
    """How a run computes the model: settings of the run, not of the model (checkpoints do not record them).

    Attributes:
        compile: train with the model compiled by ``torch.compile`` (dynamic shapes;
            :mod:`cfdist.compile`). Off by default, by measurement (``bench/step.py`` on the 2-core
            CPU machines, float32, batches of 64 real structures): compiled steps are faster, but
            every process compiles for ~100 s (default model, cold cache) before its first
            compiled training step, and again for its first eval forward, which outweighs the gain
            in short runs, fine-tuning on small sets and tests; and it cannot train an energy model
            on forces or stress, nor run with ZeRO-3 or activation checkpointing (the run configs
            refuse those). Turn it on for long runs.
        entry_chunk: image-table entries per block in the attention op's blocked basis product
            (a speed knob: the batch collate lays the entries out in blocks of this width,
            :func:`cfdist.batch.pair_blocks`; results do not depend on it).
    """

    compile: bool = False
    entry_chunk: int = RUN_SETTINGS["entry_chunk"]

    def __post_init__(self):
        if not isinstance(self.compile, bool):
            raise ConfigError(f"compute.compile must be true or false, got {self.compile!r}")
        if not isinstance(self.entry_chunk, int) or self.entry_chunk < 1:
            raise ConfigError(f"compute.entry_chunk must be an integer >= 1, got {self.entry_chunk!r}")


LOSS_KINDS = ("l1", "l2", "huber")


@dataclass
class LossSection:
    """The loss of an energy model (``model.energy: true``); property models ignore it (L1 on
    standardised targets, :mod:`cfdist.run.objective`).

    loss = energy_weight * L(E / N) + forces_weight * L(F) + stress_weight * L(sigma), each term the
    mean of the elementwise ``kind`` loss over the step's labels across all ranks: energies per atom
    (eV/atom) over labelled structures, forces (eV/A) over labelled force components, stress (GPa,
    converted from the shards' eV/A^3) over labelled stress components. Missing labels (NaN) are
    masked. A zero weight switches the term off (for forces and stress the model then skips that
    derivative).

    Defaults are CHGNet's (Deng et al., "CHGNet as a pretrained universal neural network potential
    for charge-informed atomistic modelling", Nat. Mach. Intell. 5, 1031 (2023); ``chgnet.trainer.
    Trainer`` and ``CombinedLoss``): energy per atom 1, forces 1, stress 0.1 with the same units
    (eV/atom, eV/A, GPa), and the Huber loss with ``delta`` 0.1 of its ``CombinedLoss`` (CHGNet's
    trainer also offers MSE, its default criterion: ``kind: l2`` here, and MAE: ``l1``).

    kind: ``l1`` |r|, ``l2`` r^2, ``huber`` (torch's: r^2 / 2 below ``huber_delta``, else
        delta (|r| - delta / 2)), r in the units above.
    """

    energy_weight: float = 1.0
    forces_weight: float = 1.0
    stress_weight: float = 0.1
    kind: str = "huber"
    huber_delta: float = 0.1

    def __post_init__(self):
        if self.kind not in LOSS_KINDS:
            raise ConfigError(f"loss.kind must be one of {', '.join(LOSS_KINDS)}, got {self.kind!r}")
        for name in ("energy_weight", "forces_weight", "stress_weight"):
            if not float(getattr(self, name)) >= 0:
                raise ConfigError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if self.energy_weight == self.forces_weight == self.stress_weight == 0:
            raise ConfigError("loss: at least one of energy_weight, forces_weight, stress_weight must be > 0")
        if not self.huber_delta > 0:
            raise ConfigError(f"loss.huber_delta must be > 0, got {self.huber_delta}")


class RunConfigMixin:
    """What pretraining and fine-tuning configs share: the run directory and the model config."""

    model: Any
    data: Any
    compute: ComputeSection
    output_dir: str
    run_name: str

    def take_run_settings(self) -> None:
        """Move ``compile`` / ``entry_chunk`` of an inline model section (where older run configs set
        them, e.g. ``model.compile=true``) onto the ``compute`` section, with a warning."""
        if not isinstance(self.model, Mapping):
            return
        moved = {key: self.model[key] for key in RUN_SETTINGS if key in self.model}
        if moved:
            warnings.warn(f"model.{', model.'.join(moved)} moved to compute.{', compute.'.join(moved)}: they are "
                          f"run settings, not model parameters (set them in the compute section)", UserWarning,
                          stacklevel=3)
            self.model = {key: value for key, value in self.model.items() if key not in RUN_SETTINGS}
            self.compute = dataclasses.replace(self.compute, **moved)

    def model_config(self) -> CrystalformerConfig:
        """The model config with ``target_names`` set to the data's targets (and their transforms)."""
        return resolve_model_config(self.model, self.data.targets, self.data.transforms)

    def run_location(self) -> str:
        """Where the run's files live: ``<output_dir>/<run_name>``, a local path or an ``s3://`` /
        ``gs://`` URI (never through pathlib)."""
        if storage.is_uri(self.output_dir):
            return storage.join(storage.absolute(self.output_dir), self.run_name)
        return str(Path(self.output_dir).resolve() / self.run_name)

    def stored_location(self, fs_path: str) -> str:
        """A path on the run's filesystem as Ray Train reports it (``bucket/key``, without the
        scheme, when the run is on object storage) as a location cfdist.storage takes."""
        if not self.remote:
            return fs_path
        return self.output_dir.split("://", 1)[0] + "://" + fs_path.lstrip("/")

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


def model_mapping(model: Any) -> tuple[dict, str]:
    """(the model section as a mapping, where it came from): an inline mapping, a YAML path or a
    packaged model config name."""
    if isinstance(model, Mapping):
        return dict(model), "model"
    path = resolve_config(model, "model")
    return load_yaml(path), str(path)


def resolve_model_config(model: Any, targets: list[str],
                         transforms: Mapping[str, str] | None = None) -> CrystalformerConfig:
    """``model`` (an inline mapping, a YAML path or a packaged model config name such as
    ``crystalformer``) -> :class:`CrystalformerConfig` with ``target_names = targets`` and
    ``transforms`` (``data.transforms``) over the model config's own ``target_transforms``."""
    data, source = model_mapping(model)
    # the targets before the config checks: its own target_transforms name them (an inlined model
    # section, as cfdist.finetune.driver.prepare writes it, keeps its transforms)
    cfg = CrystalformerConfig.from_dict({**data, "target_names": list(targets)}, source=source)
    if not isinstance(transforms or {}, Mapping):
        raise ConfigError(f"data.transforms must be a mapping target -> transform, got {transforms!r}")
    cfg.target_transforms = {**cfg.target_transforms, **(transforms or {})}
    try:
        cfg.check_transforms()
    except ConfigError as exc:
        raise ConfigError(f"data.transforms: {exc}") from None
    return cfg
