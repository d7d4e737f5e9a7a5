"""One training / evaluation step, for every model kind: the only place a loss is formed.

    counts = objective.label_counts(host_batch)            # all-reduced by the loop -> global_counts
    result = train_step(net, batch, objective, global_counts, world, backward=engine.backward)
    sums = eval_step(net, batch, objective)                 # (6, C) float64, no optimiser involved

``net`` is what the loop calls: a DeepSpeed engine, a DDP wrapper or the bare model; the
normalisation buffers are read from the model inside it. The optimiser step stays with the loop
(DeepSpeed's ``engine.step`` vs clip + ``optimizer.step``); everything between a batch and its
gradient is here. The loss of a micro-batch is the objective's summed terms times world / the
global label count of the micro-batch (all ranks), so after the ranks' gradient averaging the
gradient is that of the mean over every label of the micro-batch, however unevenly batches are
packed (:meth:`cfdist.run.objective.Objective.loss`).

The sums come back in :data:`cfdist.run.objective.SUM_ROWS` order, one column per component
(:class:`cfdist.run.metrics.ComponentWindow` accumulates them; :mod:`cfdist.run.evaluation`
turns them into MAE / RMSE / R^2), and stay on the device: a step never waits for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from cfdist.run.objective import Objective, unwrap


@dataclass
class StepResult:
    """One micro-step: ``loss_share`` (this rank's loss / world: summed over ranks it is the
    micro-batch's loss; detached, scalar) and ``sums`` ((6, C) float64, detached)."""

    loss_share: torch.Tensor
    sums: torch.Tensor


def train_step(net, batch, objective: Objective, global_counts: Sequence[float], world: int,
               backward: Callable[[torch.Tensor], None] | None = None) -> StepResult:
    """Forward + loss + backward of one micro-batch (no optimiser step).

    Args:
        net: the model as the loop calls it (DeepSpeed engine, DDP wrapper or the model).
        batch: a :class:`cfdist.batch.CrystalBatch` on the model's device.
        global_counts: labels per component of this micro-batch summed over all ranks.
        world: number of data-parallel ranks (their gradients are averaged).
        backward: how to differentiate the loss (``engine.backward``; default ``loss.backward()``).
    """
    out = objective.forward(net, batch)
    stats, loss_sums = objective.sums(unwrap(net), out, batch, torch.float32)
    loss = objective.loss(loss_sums, global_counts, world)
    if backward is None:
        loss.backward()
    else:
        backward(loss)
    return StepResult(loss.detach().double() / world, stats)


def eval_step(net, batch, objective: Objective, on_output: Callable | None = None) -> torch.Tensor:
    """(6, C) float64 sums of one batch in evaluation (float64 errors; autograd only where the
    forward differentiates: forces and stress, with no graph kept in eval mode).

    ``on_output(batch, out)`` sees the model's output (e.g. to write predictions)."""
    with torch.enable_grad() if objective.needs_grad else torch.no_grad():
        out = objective.forward(net, batch)
    with torch.no_grad():
        stats, _ = objective.sums(unwrap(net), out, batch, torch.float64)
    if on_output is not None:
        on_output(batch, out)
    return stats
