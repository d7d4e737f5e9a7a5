"""DeepSpeed engine from the typed settings: ZeRO stage, precision, clipping, accumulation.

A client ``torch.optim.AdamW`` (bias-free decay groups) and a ``LambdaLR`` schedule are passed
to ``deepspeed.initialize``; DeepSpeed's own fused/CPU optimisers would need a C++ JIT build
(1-2 minutes on a fresh machine, measured on our 2-core CI machines) for no gain on CPU.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from cfdist.run.config import OptimSection
from cfdist.run.deepspeed_import import import_deepspeed
from cfdist.run.optim import make_optimizer, make_scheduler
from cfdist.train.config import DeepSpeedSection

FLOAT_BUFFERS_KEPT_FP32 = ("sigma_mean", "sigma_std", "target_mean", "target_std", "energy_scale")
FLOAT_BUFFERS_KEPT_FP64 = ("element_energy",)


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
    deepspeed = import_deepspeed()

    if backend == "gloo":
        import deepspeed.ops as ds_ops

        ds_ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if "WORLD_SIZE" not in os.environ:  # a single process: a group of one, on a free local port
        # (a fixed port such as torch's 29500 collides with any other single-process run on the machine)
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
    deepspeed.init_distributed(dist_backend=backend)


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_engine(model: nn.Module, ds: DeepSpeedSection, optim: OptimSection, max_steps: int, micro_batch: int):
    """-> (engine, optimizer, scheduler). Float buffers stay float32 under bf16/fp16."""
    deepspeed = import_deepspeed()

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
    """Undo DeepSpeed's half-precision cast of the statistics buffers (sigma and target moments,
    an energy model's energy scale), and check that the reference energies stayed float64.

    In bf16 a sigma mean of ~3 would be rounded to 3 significant digits; the buffers are
    tiny, so they stay float32 (the model casts them where used). ``element_energy`` (tens of eV
    per atom, summed over hundreds of atoms) must never pass through a half-precision cast: the
    model's ``_apply`` keeps it float64 under ``.half()`` / ``.bfloat16()``; a cast that bypassed
    it would already have rounded the values, so that is an error, not something to undo.
    """
    for name, buf in module.named_buffers():
        short = name.rsplit(".", 1)[-1]
        if short in FLOAT_BUFFERS_KEPT_FP32 and buf.is_floating_point() and buf.dtype != torch.float32:
            buf.data = buf.data.float()
        if short in FLOAT_BUFFERS_KEPT_FP64 and buf.dtype != torch.float64:
            raise RuntimeError(f"buffer {name} became {buf.dtype} inside the DeepSpeed engine; reference "
                               f"energies must stay float64")


_HOLD_ID = -1  # a pseudo sub-module id (DeepSpeed's module ids are >= 0)


@contextmanager
def zero3_parameters_held(engine, enabled: bool = True) -> Iterator[None]:
    """Keep every ZeRO-3 parameter of the engine's module gathered for the duration (forward and
    backward of an energy model); a no-op when ``enabled`` is False or the parameters are not
    ZeRO-3 ones.

    ZeRO-3 gathers a module's parameters in hooks around the module's forward and around the
    backward of its outputs, and releases them after. An energy model defeats both: its forward
    returns an :class:`cfdist.model.EnergyOutput` (hooks cannot see the tensors inside, so the
    backward finds released parameters), and the forces are ``autograd.grad`` of the energy taken
    with ``create_graph``: the loss's backward then runs the derivative graph, whose nodes use the
    weights but are no module's forward or backward, so no hook gathers them (it fails with shape
    errors against the released, empty parameters). Here all parameters are gathered up front
    (``deepspeed.zero.GatheredParameters``) and pinned by a pseudo active sub-module, so the hooks'
    releases are no-ops until the context ends and partitions them again. Modules whose backward
    hooks fired without their post-backward hook (the ``autograd.grad`` inside an eval forward)
    are drained at the end, as DeepSpeed does after a backward. ZeRO-3 still partitions gradients
    and optimiser states; what is lost is the parameter partitioning during a micro-step (0.85M
    parameters for the paper's model: a few MB).
    """
    params = [p for p in engine.module.parameters() if hasattr(p, "ds_id")] if enabled else []
    if not params:
        yield
        return
    deepspeed = import_deepspeed()

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        for p in params:
            p.ds_active_sub_modules.add(_HOLD_ID)
        try:
            yield
        finally:
            offload = getattr(engine.optimizer, "parameter_offload", None)
            if offload is not None:
                offload.release_backward_leftovers()  # its releases are no-ops while the hold is on
            for p in params:
                p.ds_active_sub_modules.clear()  # the micro-step's forward and backward are over


def skip_step(engine) -> None:
    """End a gradient-accumulation cycle without an update: the pattern of DeepSpeed's fp16 loss
    scaler on overflow. ``engine.step()`` still runs (its micro-step and boundary counters stay
    consistent, gradients are cleared), but the optimiser reports an overflow, so no parameter,
    moment or schedule changes (``engine.skipped_steps`` counts it).

    ZeRO-1/2 optimisers have that overflow path themselves (they also free their partitioned
    gradient buffers there): their overflow check is switched on for this step, and the NaN /
    Inf gradients trip it (on every rank: the check all-reduces). Others (ZeRO-0, whose optimiser is
    our AdamW) get a no-op ``step`` that reports an overflow."""
    opt = engine.optimizer
    if hasattr(opt, "check_grad_overflow"):
        before = opt.check_grad_overflow
        opt.check_grad_overflow = True
        try:
            engine.step()
        finally:
            opt.check_grad_overflow = before
        if not opt.overflow:
            raise RuntimeError("a bad step could not be skipped: DeepSpeed's ZeRO optimiser found its gradients "
                               "finite (the loss was not); the step was applied")
        return
    had_overflow, had_step = "overflow" in vars(opt), "step" in vars(opt)
    old_overflow, old_step = vars(opt).get("overflow"), vars(opt).get("step")  # torch's scheduler wraps step
    opt.step = lambda *args, **kwargs: None  # the instance attribute shadows the class's step
    opt.overflow = True
    try:
        engine.step()
    finally:
        if had_step:
            opt.step = old_step
        else:
            del opt.step
        if had_overflow:
            opt.overflow = old_overflow
        else:
            del opt.overflow
