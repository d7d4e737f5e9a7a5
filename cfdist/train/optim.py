"""AdamW parameter groups and learning-rate schedules (paper recipe: section 3.4 of the design doc)."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from cfdist.train.config import OptimSection


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight matrices/tensors with decay, biases (1-D ``*.bias``) without.

    Returns groups with a ``name`` key ("decay" / "no_decay") for logging and tests.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


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
