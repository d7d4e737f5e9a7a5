"""The datasets a pretraining mixture reads (``data.datasets``): each one's shards, label columns,
micro-batch budget and sampling probability, and the checks that run before any worker starts.

    sources = mixture_sources(cfg)            # [DatasetSource], in data.datasets order
    probabilities = mixture_weights(cfg, sources)

A single-dataset run (``data.shards``) does not come through here: its stream, checks and
columns are those of :mod:`cfdist.train.loop` and :mod:`cfdist.train.driver` as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cfdist.data import BatchBudget, training_columns
from cfdist.manifest import ShardSet
from cfdist.mixture import mixture_probabilities
from cfdist.shards import ShardError, read_schema
from cfdist.train.config import DatasetEntry, PretrainConfig


@dataclass
class DatasetSource:
    """One dataset of a mixture as the training loop reads it."""

    entry: DatasetEntry
    shards: ShardSet
    columns: list[str]
    budget: BatchBudget

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def targets(self) -> list[str]:
        return list(self.entry.targets)

    @property
    def forces(self) -> bool:
        return self.entry.wants()[0]

    @property
    def stress(self) -> bool:
        return self.entry.wants()[1]


def dataset_budget(cfg: PretrainConfig, entry: DatasetEntry) -> BatchBudget:
    """The micro-batch budget of ``entry``'s batches: datasets trained on forces / stress pack
    ``max_entries / data.force_memory_factor`` entries (the graph kept for the double backward),
    the others the full budget."""
    d = cfg.data
    max_entries = d.max_entries
    if any(entry.wants()):
        max_entries = max(1, int(d.max_entries / d.force_memory_factor))
    return BatchBudget(max_entries, d.max_atoms, d.max_structures)


def mixture_sources(cfg: PretrainConfig) -> list[DatasetSource]:
    """Every dataset of ``cfg.data.datasets`` with its shard set, columns and budget."""
    out = []
    for entry in cfg.data.datasets:
        shards = ShardSet(entry.shards)
        files = shards.files(cfg.data.train_split)
        if not files:
            raise ShardError(f"dataset {entry.name!r}: {entry.shards} has no {cfg.data.train_split!r} split")
        forces, stress = entry.wants()
        columns = training_columns(read_schema(files[0].path), entry.targets, forces=forces, stress=stress)
        out.append(DatasetSource(entry, shards, columns, dataset_budget(cfg, entry)))
    return out


def mixture_weights(cfg: PretrainConfig, sources: list[DatasetSource]) -> np.ndarray:
    """(D,) float64 sampling probabilities: the entries' weights, or p_i ~ n_i^(1/T) of the train
    splits' sizes (``data.temperature``)."""
    sizes = [s.shards.n_rows(cfg.data.train_split) for s in sources]
    weights = [s.entry.weight for s in sources]
    return mixture_probabilities(sizes, None if weights[0] is None else weights, cfg.data.temperature)


def check_mixture(cfg: PretrainConfig, n_elements: int, cutoff: float) -> list[DatasetSource]:
    """Before any worker starts: every dataset's files against its manifest, its image tables'
    cutoff covering the model's, its elements within the model's embedding (so their union is),
    its targets present, and forces / stress columns where its loss weights them."""
    splits = [cfg.data.train_split] + ([cfg.data.val_split] if cfg.data.val_split else [])
    sources = mixture_sources(cfg)
    for source in sources:
        name = source.name
        try:
            report = source.shards.verify(splits if source.shards.files(cfg.data.val_split or "") else splits[:1],
                                          required_cutoff=cutoff, targets=source.targets, n_elements=n_elements,
                                          checksums=cfg.data.verify_checksums)
        except ShardError as exc:
            raise ShardError(f"dataset {name!r}: {exc}") from None
        for split in splits:
            for entry in source.shards.files(split):
                names = read_schema(entry.path).names
                for column, wanted, weight in (("forces", source.forces, "forces_weight"),
                                               ("stress", source.stress, "stress_weight")):
                    if wanted and column not in names:
                        raise ShardError(f"dataset {name!r}: {entry.path} has no {column!r} column, but its loss "
                                         f"trains on {column} (loss.{weight} > 0); rebuild its shards with "
                                         f"`cfdist preprocess --with-{column}` or set data.datasets[{name}].loss."
                                         f"{weight}=0")
        source.report = report  # type: ignore[attr-defined]
    return sources
