"""AdamW parameter groups and learning-rate schedules (the paper recipe by default; docs/model.md)."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from cfdist.config import ConfigError
from cfdist.run.config import OptimSection


def layer_index(name: str, n_blocks: int) -> int:
    """Depth of a parameter for layer-wise lr decay: the embedding 0, block i i + 1, heads n_blocks + 1."""
    if name.startswith("embedding."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return n_blocks + 1


def parameter_groups(model: nn.Module, weight_decay: float, *, scaled_blocks: int = 0,
                     lr_scale: float = 1.0, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups: weights with decay ("decay"), biases (``*.bias``) without ("no_decay").

    With ``scaled_blocks`` > 0 the embedding and the first ``scaled_blocks`` encoder blocks go in
    two more groups ("decay_scaled", "no_decay_scaled") carrying ``lr_scale`` (the optimiser's lr
    times it; fine-tuning). With ``layer_decay`` < 1 (``optim.layer_decay``; layer-wise lr decay
    as in JMP / BEiT fine-tuning) every depth gets its own groups (names suffixed ``.layer<k>``):
    the heads (depth n_blocks + 1) train at the full lr, block i at ``layer_decay ** (n_blocks -
    i)``, the embedding at ``layer_decay ** (n_blocks + 1)``, times ``lr_scale`` where that applies.
    Frozen parameters (``requires_grad=False``) are left out, so the optimiser never touches them
    (not even weight decay). Empty groups are omitted. ``lr_scale`` of a group is its lr multiplier
    (present whenever some group's differs from 1).
    """
    if scaled_blocks and scaled_blocks > len(model.blocks):
        raise ConfigError(f"transfer.lr_scale_blocks={scaled_blocks} but the model has {len(model.blocks)} blocks")
    scaled = tuple(["embedding."] + [f"blocks.{i}." for i in range(scaled_blocks)]) if scaled_blocks else ()
    by_layer = layer_decay != 1.0
    n_blocks = len(model.blocks) if by_layer else 0
    groups: dict[str, dict] = {}
    for key in ("decay", "no_decay", "decay_scaled", "no_decay_scaled"):  # the order of the groups
        groups[key] = {"params": [], "scale": lr_scale if key.endswith("_scaled") else 1.0}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = ("no_decay" if name.endswith(".bias") else "decay") + ("_scaled" if scaled and name.startswith(scaled)
                                                                     else "")
        scale = groups[key]["scale"]
        if by_layer:
            depth = layer_index(name, n_blocks)
            scale *= layer_decay ** (n_blocks + 1 - depth)
            key = f"{key}.layer{depth}"
        groups.setdefault(key, {"params": [], "scale": scale})["params"].append(param)
    out = []
    for key, group in groups.items():
        if not group["params"] and (by_layer or key.endswith("_scaled")):
            continue
        entry = {"params": group["params"], "weight_decay": 0.0 if key.startswith("no_decay") else weight_decay,
                 "name": key}
        if scaled or by_layer:
            entry["lr_scale"] = group["scale"]
        out.append(entry)
    return out


def make_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups` (with ``cfg.layer_decay``), each group at ``cfg.lr`` times its scale."""
    groups = parameter_groups(model, cfg.weight_decay, layer_decay=cfg.layer_decay)
    for group in groups:
        group["lr"] = cfg.lr * group.get("lr_scale", 1.0)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def lr_factor(cfg: OptimSection, max_steps: int) -> Callable[[int], float]:
    """step (0-based count of optimiser steps taken) -> multiplier of ``cfg.lr``."""
    if cfg.schedule == "constant":
        return lambda step: 1.0
    if cfg.schedule == "inverse_sqrt":
        t0 = float(cfg.inverse_sqrt_t)
        return lambda step: math.sqrt(t0 / (t0 + step))
    warmup, floor = int(cfg.warmup_steps), float(cfg.min_lr_ratio)

    def warmup_cosine(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return warmup_cosine


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimSection, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, max_steps))
