"""Evaluation of a model on a split: pretraining's and fine-tuning's validation, fine-tuning's test
split and ``cfdist evaluate`` all go through :func:`evaluate`, so one model on one split gives one
number wherever it is measured.

    batches = split_batches(shards, "val", label_names, budget, rank=rank, world=world)
    totals = evaluate(net, batches, objective, device, all_sum=all_sum)   # (6, C) float64, all ranks
    metrics(objective, totals, "val_")       # {"val_mae/<component>": ..., "val_loss": ...}
    target_report(objective, totals)         # {component: {"n", "mae", "rmse", "r2"}}

A split is read as the training stream reads it (:class:`cfdist.stream.EpochPlan` without any
shuffle: rank r of W gets the contiguous block r of the split's rows in manifest file order) and
packed with the run's :class:`cfdist.data.BatchBudget`, so an evaluation's memory is bounded as a
step's is. Errors are summed in float64 (:func:`cfdist.run.step.eval_step`); the order of the
sums is the only thing that differs between ranks counts or budgets (relative differences ~1e-15).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, Iterable, Iterator, Sequence

import torch

from cfdist.data import BatchBudget, pack_rows, training_columns
from cfdist.run.metrics import summarise
from cfdist.run.objective import SUM_ROWS, Objective
from cfdist.run.step import eval_step
from cfdist.shards import collate_arrow, read_schema
from cfdist.stream import EpochPlan, RowGroupReader


def split_tables(shards, split: str, columns: Sequence[str] | None, *, rank: int = 0, world: int = 1):
    """Rank ``rank``'s block of ``split`` (a :class:`cfdist.manifest.ShardSet` split), in file order."""
    plan = EpochPlan([(e.path, e.rows) for e in shards.files(split)], seed=0, epoch=0, rank=rank, world_size=world,
                     window=1, lanes=1, shuffle_files=False, shuffle_rows=False)
    reader = RowGroupReader(columns, cache=2)
    if plan.rows:
        for segment in plan.segments(int(plan.lane_start[0]), int(plan.lane_start[-1])):
            yield from reader.read(segment)


def split_batches(shards, split: str, labels: Sequence[str], budget: BatchBudget, *, forces: bool = False,
                  stress: bool = False, rank: int = 0, world: int = 1, block_width: int | None = None) -> Iterator:
    """Host :class:`cfdist.batch.CrystalBatch` es of rank ``rank``'s block of ``split``, packed
    within ``budget``; ``labels``: the label columns (property targets, or an energy model's energy)."""
    files = shards.files(split)
    if not files:
        return
    columns = training_columns(read_schema(files[0].path), labels, forces=forces, stress=stress)
    for table in pack_rows(split_tables(shards, split, columns, rank=rank, world=world), budget):
        yield collate_arrow(table, list(labels), cutoff=shards.cutoff, forces=forces, stress=stress,
                            block_width=block_width)


def evaluate(net, batches: Iterable, objective: Objective, device: torch.device | str, *,
             all_sum: Callable[[list[float]], list[float]] | None = None, lockstep: bool = False,
             hold: Callable = nullcontext, on_output: Callable | None = None) -> torch.Tensor:
    """Summed (6, C) float64 stats of ``batches`` (host batches, moved to ``device``), over all ranks.

    Args:
        net: the model as the loop calls it (engine, DDP wrapper or model); put in eval mode for
            the pass and restored after.
        all_sum: sums a list of floats over the ranks (None: a single process).
        lockstep: ranks must run every forward together (ZeRO-3 gathers parameters inside each
            forward): a rank that has finished repeats a forward on its last batch (not counted)
            until all are done.
        hold: context around each forward (e.g. ZeRO-3 parameters held for a double backward).
        on_output: called with (batch, output) of each counted batch (predictions).
    """
    was_training = net.training
    net.eval()
    totals = None
    last = None
    try:
        for batch in batches:
            if lockstep:
                all_sum([1.0])
            batch = batch.to(device)
            with hold():
                stats = eval_step(net, batch, objective, on_output)
            totals = stats if totals is None else totals + stats
            last = batch
        if lockstep:
            while all_sum([0.0])[0] > 0:
                if last is None:
                    raise RuntimeError("a rank got no evaluation rows under ZeRO-3; use a split with at least "
                                       "as many structures as workers")
                with hold():
                    eval_step(net, last, objective)
    finally:
        net.train(was_training)
    shape = (len(SUM_ROWS), len(objective.components))
    flat = totals.cpu().reshape(-1).tolist() if totals is not None else [0.0] * (shape[0] * shape[1])
    if all_sum is not None:
        flat = all_sum(flat)
    return torch.tensor(flat, dtype=torch.float64).reshape(shape)


def metrics(objective: Objective, totals: torch.Tensor, prefix: str = "val_") -> dict:
    """``<prefix>mae/<component>`` and ``<prefix>loss/<component>`` per component with labels,
    and ``<prefix>loss`` (the objective's loss over the split; NaN without labels)."""
    return summarise(objective, totals.reshape(-1).tolist() + [0.0], prefix)


def target_report(objective: Objective, totals: torch.Tensor) -> dict:
    """{component: {"n", "mae", "rmse", "r2"}} in report units (None where there are no labels;
    R^2 None where the labels do not vary)."""
    out = {}
    for k, name in enumerate(objective.components):
        abs_sum, _, n, sq, y, y_sq = (float(v) for v in totals[:, k])
        if not n:
            out[name] = {"n": 0, "mae": None, "rmse": None, "r2": None}
            continue
        ss_tot = y_sq - y * y / n
        out[name] = {"n": int(n), "mae": abs_sum / n, "rmse": math.sqrt(sq / n),
                     "r2": 1.0 - sq / ss_tot if ss_tot > 1e-12 * max(y_sq, 1e-300) else None}
    return out
