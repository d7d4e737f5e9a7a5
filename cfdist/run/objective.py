"""The training objective both loops share: target standardisation and the masked L1 error.

Targets are standardised with the train split's mean and standard deviation (the manifest's
statistics, :func:`target_stats`), stored in the model's ``target_mean`` / ``target_std``
buffers so that a checkpoint predicts in original units (``model.denormalize``). A missing
label is NaN; it contributes neither error nor count, so multi-target sets with gaps train on
every label they have.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch


def target_stats(shards, targets: Sequence[str], split: str) -> dict[str, tuple[float, float]]:
    """{target: (mean, std)} on ``split`` of a :class:`cfdist.manifest.ShardSet` (std 0 -> 1)."""
    return {t: shards.target_stats(t, split) for t in targets}


def set_target_normalisation(model, stats: Mapping[str, tuple[float, float]]) -> None:
    """Write ``stats`` into the model's normalisation buffers, in the order of its ``target_names``."""
    with torch.no_grad():
        for k, name in enumerate(model.config.target_names):
            model.target_mean[k], model.target_std[k] = stats[name]


def normalised_targets(model, labels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, T) labels in original units -> standardised targets in ``dtype`` (NaN stays NaN)."""
    labels = labels.to(dtype)
    return (labels - model.target_mean.to(labels)) / model.target_std.to(labels)


def masked_abs_error(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(|pred - target| with 0 where the target is missing, the mask of present targets), both (B, T).

    ``err.sum()`` is a batch's summed L1 loss and ``mask.sum()`` its label count; ``err.sum(0)`` /
    ``mask.sum(0)`` give them per target.
    """
    mask = torch.isfinite(target)
    err = torch.where(mask, (pred - torch.nan_to_num(target)).abs(), torch.zeros_like(pred))
    return err, mask
