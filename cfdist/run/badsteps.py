"""Bad steps: an optimiser step whose loss or gradients are not finite is skipped, not applied.

A NaN label, an overflowing double backward or a corrupt row would otherwise write NaN into every
weight (and AdamW's moments) in one step. The loops check before the optimiser step:

    bad = local_bad(loss_shares, params)        # this rank: any non-finite loss or gradient
    if any_rank(bad):                           # all ranks agree (one all-reduce)
        guard.skipped(step, ids)                # logged with structure ids, counted, limit enforced
        ... zero the gradients, no optimiser / schedule step ...

``max_bad_steps`` consecutive bad steps stop the run with :class:`BadStepError` (a run that keeps
producing them is broken, and skipping would only hide it); a good step resets the count. The
total goes to ``metrics.jsonl`` as ``bad_steps``.
"""

from __future__ import annotations

import sys
from typing import Iterable, Sequence

import torch


class BadStepError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def local_bad(losses: Iterable[torch.Tensor], params: Iterable[torch.nn.Parameter]) -> bool:
    """Whether any of this rank's micro-batch ``losses`` (scalars) or held gradients (``p.grad`` that
    are not None; ZeRO-partitioned ones are checked by DeepSpeed) is non-finite. One device sync."""
    flags = [~torch.isfinite(x).all() for x in losses]
    flags += [~torch.isfinite(p.grad).all() for p in params if p.grad is not None]
    if not flags:
        return False
    return bool(torch.stack([f.to(flags[0].device) for f in flags]).any())


class BadStepGuard:
    """Counts skipped steps (``total``, ``consecutive``) and enforces ``max_bad_steps``."""

    def __init__(self, max_bad_steps: int, rank: int = 0):
        self.max_bad_steps, self.rank = int(max_bad_steps), rank
        self.total = 0
        self.consecutive = 0

    def good(self) -> None:
        self.consecutive = 0

    def skipped(self, step: int, ids: Sequence[str], why: str = "non-finite loss or gradient") -> None:
        """Record a skipped step (``step``: the 1-based number it would have had) whose micro-batches
        on this rank held structures ``ids``; raises :class:`BadStepError` at the limit."""
        self.total += 1
        self.consecutive += 1
        shown = ", ".join(ids[:20]) + (f", ... ({len(ids)} in all)" if len(ids) > 20 else "")
        print(f"rank {self.rank}: skipped step {step} ({why}; no update); this rank's structures: {shown}",
              file=sys.stderr, flush=True)
        if self.consecutive >= self.max_bad_steps:
            raise BadStepError(f"{self.consecutive} consecutive steps with a {why} (max_bad_steps="
                               f"{self.max_bad_steps}), the last at step {step}; this rank's structures in it: "
                               f"{shown}. Check those rows' labels or lower the learning rate")
