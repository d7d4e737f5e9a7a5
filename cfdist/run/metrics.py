"""Per-step metrics: JSONL file + TensorBoard events in the run directory, tqdm bar on rank 0,
and the logging windows both training loops and every evaluation accumulate."""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from cfdist.run.objective import SUM_ROWS


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak memory of this process: GPU allocator peak on CUDA, max RSS otherwise (MB)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / 1024 if sys.platform != "darwin" else rss_kb / 2**20


class MetricLogger:
    """Writes one JSON object per log step to ``metrics.jsonl`` and scalars to TensorBoard.

    Only rank 0 writes; other ranks get a no-op logger (``enabled=False``). ``tracker``: an
    experiment tracker (:class:`cfdist.run.tracking.Tracker`) that gets every record too.
    """

    def __init__(self, run_dir: Path | None, enabled: bool, total_steps: int, initial_step: int = 0,
                 tracker=None):
        self.enabled = enabled and run_dir is not None
        self.file = None
        self.writer = None
        self.bar = None
        self.tracker = tracker if self.enabled else None
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # tensorboard is a dependency; keep training if a user removed it
            self.writer = None
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", desc="train", mininterval=5.0,
                        dynamic_ncols=True, file=sys.stderr)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        self.file.write(json.dumps(record) + "\n")
        if self.tracker is not None:
            self.tracker.log(step, metrics)
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and value == value:
                    self.writer.add_scalar(key, value, step)
        if self.bar is not None:
            self.bar.n = step
            shown = {k: metrics[k] for k in ("loss", "lr", "structures_per_s", "data_wait_pct") if k in metrics}
            if shown:  # validation-only records keep the last training figures on the bar
                self.bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in shown.items()},
                                     refresh=False)
            self.bar.refresh()

    def close(self, status: str = "FINISHED") -> None:
        """``status`` ends the tracked run: FINISHED, KILLED (preempted: a resumed run reopens it), FAILED."""
        if self.tracker is not None:
            self.tracker.close(status)
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.file is not None:
            self.file.close()


@dataclass
class StepWindow:
    """Throughput of a rank since the last log step; :meth:`summary` turns it into rates (the loss
    and errors are in the :class:`ComponentWindow` beside it)."""

    t0: float = field(default_factory=time.perf_counter)
    steps: int = 0
    structures: int = 0
    atoms: int = 0
    entries: int = 0
    data_s: float = 0.0

    def add(self, batch, data_s: float) -> None:
        """One micro-batch (a :class:`cfdist.batch.CrystalBatch`) and the time spent waiting for it."""
        self.structures += batch.n_crystals
        self.atoms += int(batch.n_atoms.sum())
        self.entries += batch.n_entries
        self.data_s += data_s

    def values(self) -> list[float]:
        """Flat sums to all-reduce (:meth:`summary` takes them back)."""
        return [self.structures, self.atoms, self.entries, self.data_s]

    def summary(self, world: int = 1, totals: Sequence[float] | None = None) -> dict:
        """Throughput. ``totals``: :meth:`values` summed over the ``world`` ranks (default: this rank's own)."""
        wall = max(time.perf_counter() - self.t0, 1e-9)
        structures, atoms, entries, data_s = totals if totals is not None else self.values()
        steps = max(self.steps, 1)
        return {
            "structures_per_step": structures / steps,
            "structures_per_s": structures / wall, "structures_per_s_per_worker": structures / wall / world,
            "atoms_per_s": atoms / wall, "entries_per_s": entries / wall, "entries_per_s_per_worker": entries / wall / world,
            "data_wait_pct": 100.0 * data_s / world / wall,
            "step_time_s": wall / steps,
        }


class ComponentWindow:
    """Per-component sums (:data:`cfdist.run.objective.SUM_ROWS`) since the last log step, or over
    a validation pass, and this rank's share of the step losses.

    The sums stay where the step computed them (a device tensor: a step never waits for the
    device) until :meth:`values` reads them once, at the log step.
    """

    def __init__(self, objective):
        self.objective = objective
        self.sums: torch.Tensor | float = 0.0
        self.loss_share: torch.Tensor | float = 0.0
        self.micro_steps = 0

    def add(self, sums: torch.Tensor, loss_share: torch.Tensor | float = 0.0, new_step: bool = True) -> None:
        """One micro-batch's (6, C) sums and its loss share (summed over ranks: its loss).

        ``new_step``: the micro-batch starts a loss of its own (pretraining: every micro-batch's
        loss is a mean over its labels); fine-tuning's micro-batches share their step's loss, so
        only the first of a step counts."""
        self.sums = self.sums + sums
        self.loss_share = self.loss_share + loss_share
        self.micro_steps += int(new_step)

    def values(self) -> list[float]:
        """Flat sums to all-reduce: the (6, C) sums row by row, then the loss shares."""
        n = len(SUM_ROWS) * len(self.objective.components)
        sums = self.sums.detach().double().reshape(-1).cpu().tolist() if torch.is_tensor(self.sums) else [0.0] * n
        return sums + [float(self.loss_share)]

    def summary(self, totals: Sequence[float] | None, prefix: str, train: bool = False) -> dict:
        """MAE (and mean loss) per component with labels from :meth:`values` summed over ranks
        (default: this rank's own). Training windows (``train``) add ``loss``, the mean step loss;
        evaluations add ``<prefix>loss``, the objective's loss over the whole split."""
        return summarise(self.objective, totals if totals is not None else self.values(), prefix,
                         micro_steps=self.micro_steps if train else 0)


def summarise(objective, totals: Sequence[float], prefix: str, micro_steps: int = 0) -> dict:
    """Metrics from flat :meth:`ComponentWindow.values` totals (see there)."""
    c = len(objective.components)
    table = torch.tensor(list(totals[:len(SUM_ROWS) * c]), dtype=torch.float64).reshape(len(SUM_ROWS), c)
    out = {}
    for k, name in enumerate(objective.components):
        n = float(table[2, k])
        if n:
            metric = objective.metric_name(name)
            out[f"{prefix}mae/{metric}"] = float(table[0, k]) / n
            out[f"{prefix}loss/{name}"] = float(table[1, k]) / n
    if micro_steps:
        out["loss"] = float(totals[-1]) / micro_steps
    else:
        out[f"{prefix}loss"] = objective.selection_loss(table)
    return out
