"""Building the model to fine-tune from a portable checkpoint, and freezing layers (per-layer
learning rates: :func:`cfdist.run.optim.parameter_groups`).

Heads (``transfer.head``): the Crystalformer head is ``Linear(d, hidden) -> ReLU -> Linear(hidden,
n_targets)``; output row k and ``target_mean[k]`` / ``target_std[k]`` belong to target k.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from cfdist.config import ConfigError, CrystalformerConfig


def model_from_pretrained(path, targets: Sequence[str], head: str = "auto",
                          train_stats: dict[str, tuple[float, float]] | None = None):
    """A :class:`cfdist.Crystalformer` for ``targets`` initialised from the portable checkpoint ``path``.

    The encoder (embedding, blocks, their frozen sigma statistics) is copied. ``head``:
    ``auto`` copies the hidden layer and the output rows (and normalisation) of targets the
    checkpoint knows, fresh rows for new ones; ``keep`` requires identical targets;
    ``replace`` re-initialises the head. New targets are standardised with ``train_stats``.

    Returns (model, report) where report says which targets were copied and which are new.
    """
    from cfdist.checkpoint import load
    from cfdist.model import Crystalformer

    source = load(path)
    old = list(source.config.target_names)
    targets = list(targets)
    if head == "keep" and old != targets:
        raise ConfigError(f"transfer.head=keep needs the checkpoint's targets {old}, got data.targets {targets}; "
                          f"use transfer.head=auto or replace")
    config = CrystalformerConfig.from_dict({**source.config.to_dict(), "target_names": targets})
    model = Crystalformer(config)  # fresh head initialisation for whatever is not copied below
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("head.") and k not in
             ("target_mean", "target_std")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) == {k for k in model.state_dict() if k.startswith("head.")} | \
        {"target_mean", "target_std"}, (missing, unexpected)
    copied: list[str] = []
    with torch.no_grad():
        if head != "replace":
            model.head[0].load_state_dict(source.head[0].state_dict())
            for k, name in enumerate(targets):
                if name in old:
                    j = old.index(name)
                    model.head[2].weight[k] = source.head[2].weight[j]
                    model.head[2].bias[k] = source.head[2].bias[j]
                    model.target_mean[k], model.target_std[k] = source.target_mean[j], source.target_std[j]
                    copied.append(name)
        for k, name in enumerate(targets):
            if name not in copied:
                if train_stats is None or name not in train_stats:
                    raise ValueError(f"target {name!r} is new to the checkpoint and has no train statistics")
                model.target_mean[k], model.target_std[k] = train_stats[name]
    report = {"checkpoint": str(path), "checkpoint_targets": old, "head": head, "copied_targets": copied,
              "new_targets": [t for t in targets if t not in copied],
              "sigma_stats_ready": model.sigma_stats_ready}
    return model, report


def freeze(model: nn.Module, *, embedding: bool, blocks: int) -> list[str]:
    """Turn off gradients of the embedding (if ``embedding``) and of the first ``blocks`` blocks.

    Returns the names of the frozen parameters.
    """
    if blocks > len(model.blocks):
        raise ConfigError(f"transfer.freeze_blocks={blocks} but the model has {len(model.blocks)} blocks")
    frozen = []
    prefixes = (["embedding."] if embedding else []) + [f"blocks.{i}." for i in range(blocks)]
    for name, param in model.named_parameters():
        if name.startswith(tuple(prefixes)):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen
