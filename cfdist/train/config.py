"""Typed pretraining config: YAML file + ``key=value`` overrides, unknown keys rejected.

    cfdist pretrain --config megnet_slice optim.lr=3e-4 deepspeed.zero_stage=3 scaling.num_workers=4

Run directories are derived in one place (:meth:`PretrainConfig.run_dir`):
``<output_dir>/<run_name>`` holds the resolved config, versions, metrics, TensorBoard
events, the Ray Train checkpoints (``ray/``) and the portable export (``model.pt``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from cfdist.compile import compile_refusal
from cfdist.config import (ConfigError, CrystalformerConfig, HeadSpec, apply_overrides, build, inline_named_model,
                           load_yaml, resolve_config)
from cfdist.run.config import (LOSS_KINDS, ComputeSection, DataSection, LossSection, OptimSection,  # noqa: F401
                               RunConfigMixin, model_mapping, resolve_model_config)
from cfdist.run.tracking import TrackingSection
from cfdist.storage import StorageSection



@dataclass
class PretrainData(DataSection):
    """The data section of pretraining: the shared fields (:class:`cfdist.run.config.DataSection`)
    and one only pretraining uses.

    Attributes:
        force_memory_factor: an energy model trained on forces or stress keeps the autograd graph
            of the forces for the double backward, so a micro-batch costs more memory per
            image-table entry; such runs pack at most ``max_entries / force_memory_factor``
            entries per micro-batch (``max_atoms`` and ``max_structures`` unchanged). The default
            is the ratio of peak memory per entry measured with and without forces and stress
            (README, "Training on energies, forces and stress").
    """

    force_memory_factor: float = 2.5
    datasets: list[DatasetEntry] = field(default_factory=list)
    temperature: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if not self.force_memory_factor >= 1.0:
            raise ConfigError(f"data.force_memory_factor must be >= 1, got {self.force_memory_factor}")
        self.datasets = [d if isinstance(d, DatasetEntry) else build(DatasetEntry, d, f"data.datasets[{i}]")
                         for i, d in enumerate(self.datasets or [])]
        if not float(self.temperature) > 0:
            raise ConfigError(f"data.temperature must be > 0 (p_i ~ n_i^(1/T)), got {self.temperature}")
        if not self.datasets:
            return
        if self.shards:
            raise ConfigError(f"data.shards={self.shards!r} and data.datasets both set: a mixture names each "
                              f"dataset's shards in its entry (data.datasets[i].shards)")
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.datasets: names must be unique, got {names}")
        weighted = [d.weight is not None for d in self.datasets]
        if any(weighted) and not all(weighted):
            raise ConfigError(f"data.datasets: give every dataset a weight or none (then data.temperature "
                              f"decides); weights: {[d.weight for d in self.datasets]}")

    @property
    def is_mixture(self) -> bool:
        return bool(self.datasets)


@dataclass
class DatasetEntry:
    """One dataset of a pretraining mixture (``data.datasets``; docs/model.md, "Dataset mixtures").

    Attributes:
        name: the dataset's name: its head (``model.heads``), its metrics
            (``mae/<name>/<component>``, ``structures/<name>``) and ``transfer.head`` when fine-tuning.
        shards: its shard directory (``cfdist preprocess``), local or ``s3://`` / ``gs://``.
        targets: property targets (a property head), or with ``energy`` the one total-energy label.
        transforms: output transforms of property targets (as ``data.transforms``).
        energy: an energy dataset (energy / forces / stress through its own energy head and
            per-element reference energies, trained with ``loss``).
        loss: the energy dataset's loss section (weights of energy, forces, stress; ignored for a
            property dataset, whose loss is L1 on standardised targets).
        weight: relative sampling weight; given for every dataset or for none (then
            ``data.temperature`` sets p_i ~ n_i^(1/T) from the train splits' sizes).
    """

    name: str = ""
    shards: str = ""
    targets: list[str] = field(default_factory=list)
    transforms: dict[str, str] = field(default_factory=dict)
    energy: bool = False
    loss: LossSection = field(default_factory=LossSection)
    weight: float | None = None

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise ConfigError(f"data.datasets: every dataset needs a name without '/', got {self.name!r}")
        if not self.shards:
            raise ConfigError(f"data.datasets[{self.name}]: shards is not set (a directory written by `cfdist preprocess`)")
        if self.weight is not None and not (float(self.weight) > 0):
            raise ConfigError(f"data.datasets[{self.name}]: weight must be > 0, got {self.weight}")
        try:
            self.head_spec()
        except ConfigError as exc:
            raise ConfigError(f"data.datasets[{self.name}]: {exc}") from None

    def head_spec(self) -> HeadSpec:
        """The dataset's output head (:class:`cfdist.config.HeadSpec`)."""
        return HeadSpec(name=self.name, energy=self.energy, targets=list(self.targets),
                        transforms=dict(self.transforms))

    def wants(self) -> tuple[bool, bool]:
        """(forces, stress) label columns this dataset trains on."""
        if not self.energy:
            return False, False
        return self.loss.forces_weight > 0, self.loss.stress_weight > 0


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
    """Everything a pretraining run needs; ``model`` is a model config path or an inline mapping.

    An energy model (``model: {energy: true, ...}``) trains on energies, forces and stress with the
    ``loss`` section; ``data.targets`` then names the one label column holding the total energy per
    structure (eV, e.g. ``[energy]`` for extxyz inputs), and the model gets no property head.
    ``init_from``: a portable checkpoint (``model.pt``) whose encoder (embedding, blocks and their
    sigma statistics) starts the run; its architecture must equal ``model``'s (the energy switch,
    envelope and heads may differ). An energy checkpoint also gives an energy model its energy head
    and reference energies; a property checkpoint gives a property model with the same targets its
    head. Ignored when the run resumes from its own checkpoint.

    ``init_head``: with ``init_from`` a checkpoint pretrained on a mixture, the dataset whose head
    starts this run's head (an energy head for an energy run, a property head with the same
    targets for a property run); empty: the encoder only. ``init_references``: an energy head taken
    from ``init_from`` gets its per-element reference energies ``refit`` on this run's train split
    (default; DeePMD re-fits its energy bias when fine-tuning, since another dataset's DFT settings
    shift every energy) or ``keep``s the checkpoint's.
    """

    run_name: str = "pretrain"
    output_dir: str = "outputs/runs"
    seed: int = 0
    max_steps: int = 1000
    log_every: int = 10
    val_every: int = 200
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    max_bad_steps: int = 5
    model: Any = "crystalformer"
    init_from: str = ""
    init_head: str = ""
    init_references: str = "refit"
    data: PretrainData = field(default_factory=PretrainData)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    compute: ComputeSection = field(default_factory=ComputeSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    storage: StorageSection = field(default_factory=StorageSection)  # endpoints, never secrets

    def __post_init__(self):
        if self.init_references not in ("refit", "keep"):
            raise ConfigError(f"init_references must be refit or keep, got {self.init_references!r}")
        if self.init_head and not self.init_from:
            raise ConfigError(f"init_head={self.init_head} needs init_from (a checkpoint pretrained on a mixture)")
        for name in ("max_steps", "log_every", "val_every", "checkpoint_every", "keep_checkpoints",
                     "max_bad_steps"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.take_run_settings()
        self._check_compile()

    def _check_compile(self) -> None:
        """``compute.compile`` with settings it cannot run with is refused here, before any worker starts."""

        try:
            model = self.model_config()
        except ConfigError:
            return  # a broken model section is reported where the model config is built (model_config)
        if self.compute.compile:
            if self.data.is_mixture:
                double_backward = any(any(d.wants()) for d in self.data.datasets)
            else:
                double_backward = self.loss.forces_weight > 0 or self.loss.stress_weight > 0
            reason = compile_refusal(energy=model.any_energy, double_backward=double_backward,
                                     zero_stage=self.deepspeed.zero_stage,
                                     activation_checkpointing=self.deepspeed.activation_checkpointing)
            if reason:
                raise ConfigError(reason)

    def model_config(self) -> CrystalformerConfig:
        """The model config: ``target_names`` = ``data.targets`` for a property model; an energy
        model has no property targets (its one data target is the energy label). A mixture
        (``data.datasets``) gets one head per dataset (``heads``) and none of its own."""
        if self.data.is_mixture:
            data, source = model_mapping(self.model)
            if data.get("energy") or data.get("target_transforms") or self.data.transforms:
                raise ConfigError("a mixture (data.datasets) sets energy, targets and transforms per dataset; the model "
                                  "section keeps the encoder's settings (drop model.energy / target_transforms and "
                                  "data.transforms)")
            heads = [d.head_spec() for d in self.data.datasets]
            saved = data.get("heads") or []
            if saved and [HeadSpec(**h) if isinstance(h, dict) else h for h in saved] != heads:
                raise ConfigError(f"model.heads {saved} differ from the datasets' heads; drop model.heads "
                                  f"(they are derived from data.datasets)")
            return CrystalformerConfig.from_dict({**data, "target_names": [], "energy": False, "target_transforms": {},
                                                  "heads": [dataclasses.asdict(h) for h in heads]}, source=source)
        config = resolve_model_config(self.model, self.data.targets, self.data.transforms)
        if config.energy:
            if len(self.data.targets) != 1:
                raise ConfigError(f"an energy model (model.energy: true) trains on one label, the total energy per "
                                  f"structure (eV): set data.targets to it, e.g. [energy]; got {self.data.targets}")
            if config.target_transforms:
                raise ConfigError(f"data.transforms {config.target_transforms}: an energy model has no property "
                                  f"targets to transform (its energy is a sum over atoms in eV)")
            config.target_names = []
        return config



def load_pretrain_config(path: str | Path | None, overrides: list[str] = ()) -> PretrainConfig:
    """YAML file or packaged pretraining config name (optional) + overrides -> validated :class:`PretrainConfig`.

    A ``deepspeed`` value that is a string names a YAML file or a packaged DeepSpeed config
    (``zero0`` .. ``zero3``); a named ``model`` is inlined before a ``model.<key>=value`` override
    (:func:`cfdist.config.inline_named_model`).
    """
    path = resolve_config(path, "pretrain") if path else None
    data = load_yaml(path) if path else {}
    # A named deepspeed file is resolved before each override, so ``deepspeed.zero_stage=3``
    # edits the file's settings (and ``deepspeed=zero3`` may still name another file).
    for item in overrides:
        data = apply_overrides(_resolve_deepspeed(inline_named_model(data, [item])), [item])
    return build(PretrainConfig, _resolve_deepspeed(data), source=str(path or "config"))


def _resolve_deepspeed(data: dict) -> dict:
    ds = data.get("deepspeed")
    if isinstance(ds, str):
        data = {**data, "deepspeed": load_yaml(resolve_config(ds, "deepspeed"))}
    return data


def config_from_dict(data: Mapping[str, Any]) -> PretrainConfig:
    """Rebuild a config from :meth:`PretrainConfig.to_dict` (e.g. inside Ray workers)."""
    return build(PretrainConfig, data, source="config")
