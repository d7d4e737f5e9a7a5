"""AdamW parameter groups and learning-rate schedules (the paper recipe by default; docs/model.md)."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from cfdist.config import ConfigError
from cfdist.run.config import OptimSection


def parameter_groups(model: nn.Module, weight_decay: float, *, scaled_blocks: int = 0,
                     lr_scale: float = 1.0) -> list[dict]:
    """AdamW groups: weights with decay ("decay"), biases (``*.bias``) without ("no_decay").

    With ``scaled_blocks`` > 0 the embedding and the first ``scaled_blocks`` encoder blocks go in
    two more groups ("decay_scaled", "no_decay_scaled") carrying ``lr_scale`` (the optimiser's lr
    times it; fine-tuning). Frozen parameters (``requires_grad=False``) are left out, so the
    optimiser never touches them (not even weight decay). Empty scaled groups are omitted.
    """
    if scaled_blocks and scaled_blocks > len(model.blocks):
        raise ConfigError(f"transfer.lr_scale_blocks={scaled_blocks} but the model has {len(model.blocks)} blocks")
    scaled = tuple(["embedding."] + [f"blocks.{i}." for i in range(scaled_blocks)]) if scaled_blocks else ()
    groups: dict[str, list] = {"decay": [], "no_decay": [], "decay_scaled": [], "no_decay_scaled": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = "no_decay" if name.endswith(".bias") else "decay"
        groups[key + ("_scaled" if scaled and name.startswith(scaled) else "")].append(param)
    out = []
    for key, params in groups.items():
        if key.endswith("_scaled") and not params:
            continue
        group = {"params": params, "weight_decay": 0.0 if key.startswith("no_decay") else weight_decay, "name": key}
        if scaled:
            group["lr_scale"] = lr_scale if key.endswith("_scaled") else 1.0
        out.append(group)
    return out


def make_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


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
