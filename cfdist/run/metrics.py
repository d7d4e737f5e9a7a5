"""Per-step metrics: JSONL file + TensorBoard events in the run directory, tqdm bar on rank 0,
and the logging window both training loops accumulate between log steps."""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak memory of this process: GPU allocator peak on CUDA, max RSS otherwise (MB)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / 1024 if sys.platform != "darwin" else rss_kb / 2**20


class MetricLogger:
    """Writes one JSON object per log step to ``metrics.jsonl`` and scalars to TensorBoard.

    Only rank 0 writes; other ranks get a no-op logger (``enabled=False``).
    """

    def __init__(self, run_dir: Path | None, enabled: bool, total_steps: int, initial_step: int = 0):
        self.enabled = enabled and run_dir is not None
        self.file = None
        self.writer = None
        self.bar = None
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

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.file is not None:
            self.file.close()


@dataclass
class StepWindow:
    """What a rank did since the last log step; :meth:`summary` turns it into rates.

    ``loss_sum`` may be a device tensor (the fine-tuning loop keeps it there so that a step
    never waits for the device); it is read once, at the log step.
    """

    t0: float = field(default_factory=time.perf_counter)
    steps: int = 0
    structures: int = 0
    atoms: int = 0
    entries: int = 0
    loss_sum: Any = 0.0
    labelled: float = 0.0
    data_s: float = 0.0

    def add(self, batch, loss_sum, labelled: float, data_s: float) -> None:
        """One micro-batch (a :class:`cfdist.batch.CrystalBatch`) with its summed loss and label count."""
        self.structures += batch.n_crystals
        self.atoms += int(batch.n_atoms.sum())
        self.entries += batch.n_entries
        self.loss_sum += loss_sum
        self.labelled += labelled
        self.data_s += data_s

    def summary(self, world: int = 1, totals: Sequence[float] | None = None) -> dict:
        """Loss and throughput. ``totals``: [structures, atoms, entries, loss_sum, labelled, data_s]
        summed over the ``world`` ranks (default: this rank's own)."""
        wall = max(time.perf_counter() - self.t0, 1e-9)
        structures, atoms, entries, loss_sum, labelled, data_s = totals if totals is not None else (
            self.structures, self.atoms, self.entries, float(self.loss_sum), self.labelled, self.data_s)
        steps = max(self.steps, 1)
        return {
            "loss": float(loss_sum) / max(labelled, 1.0),
            "structures_per_step": structures / steps,
            "structures_per_s": structures / wall, "structures_per_s_per_worker": structures / wall / world,
            "atoms_per_s": atoms / wall, "entries_per_s": entries / wall, "entries_per_s_per_worker": entries / wall / world,
            "data_wait_pct": 100.0 * data_s / world / wall,
            "step_time_s": wall / steps,
        }


# metric names of an energy model's components (training: "mae/<name>", validation: "val_mae/<name>")
COMPONENT_METRICS = {"energy": "energy_mev_per_atom", "forces": "forces_mev_per_A", "stress": "stress_gpa"}


@dataclass
class ComponentWindow:
    """An energy model's per-component sums since the last log step (or over a validation pass).

    ``abs_sum[c]``: summed absolute errors in report units (meV/atom, meV/A, GPa); ``count[c]``:
    labels (structures, force components, stress components); ``loss_sum[c]``: summed elementwise
    loss (loss units); ``weighted_loss``: this rank's share of the step losses (their sum over
    ranks, divided by the micro-steps, is the mean training loss).
    """

    abs_sum: dict = field(default_factory=lambda: dict.fromkeys(COMPONENT_METRICS, 0.0))
    loss_sum: dict = field(default_factory=lambda: dict.fromkeys(COMPONENT_METRICS, 0.0))
    count: dict = field(default_factory=lambda: dict.fromkeys(COMPONENT_METRICS, 0.0))
    weighted_loss: float = 0.0
    micro_steps: int = 0

    def add(self, abs_sum: dict, loss_sum: dict, count: dict, weighted_loss: float = 0.0) -> None:
        """One micro-batch's sums for the components it has (a subset of energy, forces, stress)."""
        for c, value in abs_sum.items():
            self.abs_sum[c] += float(value)
            self.loss_sum[c] += float(loss_sum.get(c, 0.0))
            self.count[c] += float(count[c])
        self.weighted_loss += float(weighted_loss)
        self.micro_steps += 1

    def values(self) -> list[float]:
        """Flat sums to all-reduce (:meth:`summary` takes them back)."""
        return ([self.abs_sum[c] for c in COMPONENT_METRICS] + [self.loss_sum[c] for c in COMPONENT_METRICS]
                + [self.count[c] for c in COMPONENT_METRICS] + [self.weighted_loss])

    @staticmethod
    def summary(totals: Sequence[float], prefix: str, micro_steps: int = 0) -> dict:
        """MAE (and mean loss) per component with labels, from :meth:`values` summed over ranks;
        ``micro_steps`` (> 0 for training windows) adds ``loss``, the mean weighted step loss."""
        k = len(COMPONENT_METRICS)
        abs_sum, loss_sum, count = totals[:k], totals[k:2 * k], totals[2 * k:3 * k]
        out = {}
        for c, (name, metric) in enumerate(COMPONENT_METRICS.items()):
            if count[c]:
                out[f"{prefix}mae/{metric}"] = abs_sum[c] / count[c]
                out[f"{prefix}loss/{name}"] = loss_sum[c] / count[c]
        if micro_steps:
            out["loss"] = totals[3 * k] / micro_steps
        return out
