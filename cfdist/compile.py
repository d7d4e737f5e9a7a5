"""``torch.compile`` for the Crystalformer (the ``compute.compile`` run setting) and compile statistics.

:func:`compile_model` compiles a model in place (``nn.Module.compile``): the module object, its
parameters and its ``state_dict`` keys stay what they were (no ``_orig_mod.`` prefix, unlike the
wrapper ``torch.compile(model)`` returns), so DeepSpeed, DDP, checkpoints and portable exports
see the eager model, and a checkpoint of a compiled run loads into an eager one.

How the model compiles (measured with torch 2.13 on CPU; ``bench/step.py``):

- **Dynamic shapes.** Every batch differs in crystals B, atoms N, species S, image-table entries
  T, atom pairs P and basis blocks R, so the model is compiled with ``dynamic=True``: all sizes
  are symbols from the first compile on and a new batch shape does not recompile. Dynamo still
  specialises sizes 0 and 1, so the first batch with a single crystal (B = 1) compiles once more.
- **No graph breaks.** The batch's index work with data-dependent shapes (pairs of the image
  table, blocks of entries per atom) is done by the CPU collate (:func:`cfdist.batch.pair_blocks`),
  so the forward and backward hold no op whose output shape depends on tensor values and no
  host-device sync: a training step is one graph (before: 7 graph breaks, 10 compiled frames).
  An energy model's forces / stress still break it around the geometry made a leaf inside the
  forward (``requires_grad_``) and ``autograd.grad``: Dynamo's limits, not index work.
- **Sigma statistics** are set before compiling (:meth:`cfdist.Crystalformer.fit_sigma_statistics`)
  and never written by a forward, so the compiled model is the eager model from its first step.
- **Train / eval / no-grad** are guarded separately: validation compiles its own graphs once.
- **Energy models.** Energies and forces / stress by ``autograd.grad`` without ``create_graph``
  (evaluation, prediction, relaxations) work compiled and equal eager. Training on forces or
  stress does not: the force loss needs the gradient of a gradient (``create_graph=True``), and
  AOTAutograd's compiled backward cannot be differentiated again (torch raises "does not currently
  support double backward", or refuses donated buffers). The run configs refuse that combination
  (:func:`compile_refusal`).
- **Activation checkpointing** (``torch.utils.checkpoint(use_reentrant=False)`` around each
  block) fails inside Dynamo (torch 2.13: ``AssertionError: lift_tracked_freevar_to_input should
  not be called on root SubgraphTracer`` while tracing the checkpointed block), so it is refused
  with compile (tests/test_compile.py checks that torch still fails, so the refusal can go when
  it does not).
- **ZeRO-3** partitions parameters and gathers them in hooks around every sub-module's forward.
  Compiled, it trains correctly (2 ranks, tiny model, aot_eager: the same losses as eager to the
  last bit), but Dynamo then traces those hooks: the model falls apart into per-layer graphs,
  and the hooks' guards on each layer's ZeRO id recompile them for every layer (5 steps: 46
  compilations of which 22 recompiles, 20 graph breaks; ZeRO-2: 27 compilations, 0 recompiles,
  9 breaks, most of them DeepSpeed's own hook code), which runs into Dynamo's recompile limit
  (8 per function) and so back to eager. Refused: compile gains nothing there. ZeRO 0-2 and
  bf16 work (tests/test_compile.py: the compiled fp32 runs follow the eager trajectory).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where used: the run configs call compile_refusal without it
    from torch import nn

BACKEND_ENV = "CFDIST_COMPILE_BACKEND"


def compile_model(model: nn.Module, *, backend: str | None = None, dynamic: bool = True,
                  **options: Any) -> nn.Module:
    """Compile ``model`` (a :class:`cfdist.Crystalformer`) in place with ``Module.compile`` and return it.

    Compile a model whose sigma statistics are set (:meth:`cfdist.Crystalformer.fit_sigma_statistics`
    or a loaded checkpoint): a forward never changes them, so the compiled graphs hold no buffer writes.

    ``backend``: ``"inductor"`` (generated kernels: the speed-up; the default) or ``"aot_eager"``
    (the same graph capture, graph breaks, guards and AOTAutograd, without code generation:
    seconds instead of minutes to compile on a small CPU, so the training tests use it). None
    reads ``$CFDIST_COMPILE_BACKEND`` (default ``inductor``), which is how ``compute.compile=true``
    runs pick it. The first forward of each new mode (train / eval / no-grad) compiles.
    """
    backend = backend or os.environ.get(BACKEND_ENV) or "inductor"
    model.compile(backend=backend, dynamic=dynamic, **options)
    # recorded for is_compiled / describe; a deep copy (SWA's AveragedModel) keeps both
    model.compile_backend = backend
    return model


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` was compiled in place (:func:`compile_model`)."""
    return getattr(model, "compile_backend", None) is not None


def describe(model: nn.Module) -> str:
    """One line for run logs: how ``model`` runs."""
    if not is_compiled(model):
        return "model eager"
    return f"model compiled (torch.compile, backend {model.compile_backend}, dynamic shapes)"


def compile_refusal(*, energy: bool, double_backward: bool, zero_stage: int = 0,
                    activation_checkpointing: bool = False) -> str | None:
    """Why ``compute.compile`` cannot run with these settings (None when it can).

    ``double_backward``: an energy model trained on forces or stress (the loss differentiates
    the forces again). ``zero_stage`` / ``activation_checkpointing``: a pretraining run's DeepSpeed
    settings.
    """
    if energy and double_backward:
        return ("compute.compile=true cannot train an energy model on forces or stress: the force loss "
                "differentiates the forces again (double backward), which torch.compile's AOTAutograd "
                "backward does not support; set compute.compile=false, or loss.forces_weight=0 and "
                "loss.stress_weight=0 to train on energies only")
    if zero_stage == 3:
        return ("compute.compile=true gains nothing under DeepSpeed ZeRO-3: its per-layer parameter-gathering hooks "
                "split the compiled model into per-layer graphs that recompile for every layer (cfdist.compile); "
                "use deepspeed.zero_stage 0, 1 or 2 (ZeRO-2 also shards gradients and optimiser states), "
                "or compute.compile=false")
    if activation_checkpointing:
        return ("compute.compile=true does not work with deepspeed.activation_checkpointing=true (torch.compile "
                "fails to trace the checkpointed encoder blocks); turn one of them off")
    return None


@dataclass
class CompileEvent:
    """One Dynamo compilation of a code object (a frame)."""

    compile_id: str
    function: str
    recompile_reason: str | None
    seconds: float


@dataclass
class CompileLog:
    """Dynamo compilations since :meth:`start` (process-wide: Dynamo's own records).

    Attributes:
        events: every frame compilation after ``start``, oldest first.
        graph_breaks: graph breaks Dynamo recorded after ``start``.
    """

    events: list[CompileEvent] = field(default_factory=list)
    graph_breaks: int = 0
    _seen: int = 0
    _breaks0: int = 0
    _t0: float = 0.0

    def start(self) -> CompileLog:
        from torch._dynamo import utils

        # keep every event (the default keeps 64): a run counts its own recompilations
        utils.set_compilation_metrics_limit(100_000)
        self._seen = len(utils.get_compilation_metrics())
        self._breaks0 = _graph_break_count()
        self._t0 = time.perf_counter()
        return self

    def update(self) -> CompileLog:
        from torch._dynamo import utils

        metrics = utils.get_compilation_metrics()
        for m in metrics[self._seen:]:
            self.events.append(CompileEvent(
                compile_id=str(m.compile_id), function=f"{m.co_name} ({m.co_filename}:{m.co_firstlineno})",
                recompile_reason=m.recompile_reason,
                seconds=float(m.entire_frame_compile_time_s or 0.0)))
        self._seen = len(metrics)
        self.graph_breaks = _graph_break_count() - self._breaks0
        return self

    @property
    def compiles(self) -> int:
        """Frame compilations (first compiles and recompiles)."""
        return len(self.events)

    @property
    def recompiles(self) -> int:
        """Compilations of a frame that had been compiled before (a guard failed: new shape, mode, ...)."""
        return sum(1 for e in self.events if e.recompile_reason is not None)

    def reasons(self) -> list[str]:
        return [f"{e.function}: {e.recompile_reason}" for e in self.events if e.recompile_reason is not None]


def _graph_break_count() -> int:
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))
