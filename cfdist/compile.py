"""``torch.compile`` for the Crystalformer (the ``model.compile`` option) and compile statistics.

:func:`compile_model` compiles a model in place (``nn.Module.compile``): the module object, its
parameters and its ``state_dict`` keys stay what they were (no ``_orig_mod.`` prefix, unlike the
wrapper ``torch.compile(model)`` returns), so DeepSpeed, DDP, checkpoints and portable exports
see the eager model, and a checkpoint of a compiled run loads into an eager one.

How the model compiles (measured with torch 2.13 on CPU; ``bench/step.py``):

- **Dynamic shapes.** Every batch differs in crystals B, atoms N, species S, image-table entries
  T, atom pairs P and basis blocks R, so the model is compiled with ``dynamic=True``: all sizes
  are symbols from the first compile on and a new batch shape does not recompile. Dynamo still
  specialises sizes 0 and 1, so the first batch with a single crystal (B = 1) compiles once more.
- **Graph breaks.** ``PeriodicGraph.build`` derives the batch's pairs and blocks with
  data-dependent shapes (boolean-mask indexing, ``bincount``, ``repeat_interleave``, a ``.item()``
  for the block count). Dynamo runs those few integer ops eagerly and compiles the float math
  between and after them (distances, Gaussian basis, envelope, then embedding, every block and
  the head as one graph): 7 graph breaks, 10 compiled frames for a training step.
- **Sigma statistics.** Traced by Dynamo, the first training forward's statistics update was lost
  (:class:`EagerUntilSigmaReady`): until they are frozen, training forwards run eagerly.
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
    """Compile ``model`` (a :class:`cfdist.Crystalformer`) in place with ``torch.compile`` and return it.

    ``backend``: ``"inductor"`` (generated kernels: the speed-up; the default) or ``"aot_eager"``
    (the same graph capture, graph breaks, guards and AOTAutograd, without code generation:
    seconds instead of minutes to compile on a small CPU, so the training tests use it). None
    reads ``$CFDIST_COMPILE_BACKEND`` (default ``inductor``), which is how ``model.compile=true``
    runs pick it. The first forward of each new mode (train / eval / no-grad) compiles.
    """
    import torch

    backend = backend or os.environ.get(BACKEND_ENV) or "inductor"
    model.compile(backend=backend, dynamic=dynamic, **options)
    compiled = getattr(model, "_compiled_call_impl", None)
    if compiled is None:  # nn.Module.compile keeps the compiled __call__ there (torch >= 2.2)
        raise RuntimeError(f"torch {torch.__version__}: nn.Module.compile did not set _compiled_call_impl")
    gate = EagerUntilSigmaReady(compiled, model, backend)
    model._compiled_call_impl = gate
    # a loaded state dict resets the layers' host mirrors of sigma_ready: one eager forward again
    # (a bound method, so that a deep copy of the model gets a hook on its own copy of the gate)
    model.register_load_state_dict_post_hook(gate.after_load)
    return model


class EagerUntilSigmaReady:
    """The compiled ``__call__`` of a model, run eagerly until its sigma statistics are frozen.

    A Crystalformer's first training forward sets each layer's sigma statistics (a host read, a
    collective over ranks, buffer writes); traced by Dynamo, those writes are lost (torch 2.13:
    the compiled model keeps sigma_mean = 0 while the eager one sets it; a test checks that this
    is still so).
    So training forwards run eagerly until every layer reports its statistics ready (one host
    read of a flag per layer per forward, only until then) and once more after that, which
    also sets the layers' host mirrors of the flag (the compiled graph is guarded on them, so
    this avoids a recompile); eval forwards never set statistics and always run compiled.
    Deep copies (``AveragedModel`` for SWA) copy the gate with the model.
    """

    def __init__(self, compiled, model: nn.Module, backend: str):
        self.compiled, self.model, self.backend = compiled, model, backend
        self.ready = False

    def after_load(self, module, incompatible_keys) -> None:
        self.ready = False

    def __call__(self, *args, **kwargs):
        model = self.model
        if model.training and not self.ready:
            self.ready = bool(model.sigma_stats_ready)  # checked before: a forward that sets them is eager
            return model._call_impl(*args, **kwargs)
        return self.compiled(*args, **kwargs)


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` was compiled in place (:func:`compile_model`)."""
    return isinstance(getattr(model, "_compiled_call_impl", None), EagerUntilSigmaReady)


def describe(model: nn.Module) -> str:
    """One line for run logs: how ``model`` runs."""
    if not is_compiled(model):
        return "model eager"
    return f"model compiled (torch.compile, backend {model._compiled_call_impl.backend}, dynamic shapes)"


def compile_refusal(*, energy: bool, double_backward: bool, zero_stage: int = 0,
                    activation_checkpointing: bool = False) -> str | None:
    """Why ``model.compile`` cannot run with these settings (None when it can).

    ``double_backward``: an energy model trained on forces or stress (the loss differentiates
    the forces again). ``zero_stage`` / ``activation_checkpointing``: a pretraining run's DeepSpeed
    settings.
    """
    if energy and double_backward:
        return ("model.compile=true cannot train an energy model on forces or stress: the force loss "
                "differentiates the forces again (double backward), which torch.compile's AOTAutograd "
                "backward does not support; set model.compile=false, or loss.forces_weight=0 and "
                "loss.stress_weight=0 to train on energies only")
    if zero_stage == 3:
        return ("model.compile=true gains nothing under DeepSpeed ZeRO-3: its per-layer parameter-gathering hooks "
                "split the compiled model into per-layer graphs that recompile for every layer (cfdist.compile); "
                "use deepspeed.zero_stage 0, 1 or 2 (ZeRO-2 also shards gradients and optimiser states), "
                "or model.compile=false")
    if activation_checkpointing:
        return ("model.compile=true does not work with deepspeed.activation_checkpointing=true (torch.compile "
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
