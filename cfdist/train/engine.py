"""DeepSpeed engine from the typed settings: ZeRO stage, precision, clipping, accumulation.

A client ``torch.optim.AdamW`` (bias-free decay groups) and a ``LambdaLR`` schedule are passed
to ``deepspeed.initialize``; DeepSpeed's own fused/CPU optimisers would need a C++ JIT build
(1-2 minutes on a fresh machine, measured on our 2-core CI machines) for no gain on CPU.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from cfdist.run.config import OptimSection
from cfdist.run.optim import make_optimizer, make_scheduler
from cfdist.train.config import DeepSpeedSection

FLOAT_BUFFERS_KEPT_FP32 = ("sigma_mean", "sigma_std", "target_mean", "target_std")


def deepspeed_config(ds: DeepSpeedSection, optim: OptimSection, micro_batch: int) -> dict[str, Any]:
    """The DeepSpeed JSON config. ``micro_batch`` is nominal (batches are packed by entries)."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(micro_batch),
        "gradient_accumulation_steps": int(ds.gradient_accumulation_steps),
        "gradient_clipping": float(optim.grad_clip),
        "zero_optimization": {"stage": int(ds.zero_stage)},
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16"},
        # a plain torch optimiser under ZeRO (no DeepSpeed C++ optimiser build)
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    for key, value in ds.extra.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def init_distributed(backend: str) -> None:
    """Join (or create) the process group; on CPU skip DeepSpeed's shm_comm JIT build (~40 s)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if backend == "gloo" else "cuda")
    import deepspeed

    if backend == "gloo":
        import deepspeed.ops as ds_ops

        ds_ops.__compatible_ops__["deepspeed_shm_comm"] = False
    for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                         ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        os.environ.setdefault(key, default)  # single process: avoid DeepSpeed's MPI discovery
    deepspeed.init_distributed(dist_backend=backend)


def build_engine(model: nn.Module, ds: DeepSpeedSection, optim: OptimSection, max_steps: int, micro_batch: int):
    """-> (engine, optimizer, scheduler). Float buffers stay float32 under bf16/fp16."""
    import deepspeed

    if ds.precision == "fp16":
        from deepspeed.accelerator import get_accelerator

        if not get_accelerator().is_fp16_supported():
            raise RuntimeError("deepspeed.precision=fp16 is not supported on this accelerator "
                               f"({get_accelerator().device_name()}); use bf16 or fp32")
    model.activation_checkpointing = bool(ds.activation_checkpointing)
    optimizer = make_optimizer(model, optim)
    scheduler = make_scheduler(optimizer, optim, max_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(ds, optim, micro_batch))
    keep_float_buffers(engine.module)
    return engine, optimizer, scheduler


def keep_float_buffers(module: nn.Module) -> None:
    """Undo DeepSpeed's half-precision cast of the statistics buffers (sigma and target moments).

    In bf16 a sigma mean of ~3 would be rounded to 3 significant digits; the buffers are
    tiny, so they stay float32 (the model casts them where used).
    """
    for name, buf in module.named_buffers():
        if name.rsplit(".", 1)[-1] in FLOAT_BUFFERS_KEPT_FP32 and buf.is_floating_point() and buf.dtype != torch.float32:
            buf.data = buf.data.float()

