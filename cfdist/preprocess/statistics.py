"""Sufficient statistics of a shard build, accumulated per chunk in the workers and merged exactly.

Everything is a sum (counts, sums of labels and their squares, histograms, the composition Gram
matrix and right-hand sides), so chunks combine in any order to the same result. The summary
goes into the manifest (``statistics``): target moments per split (training standardises with
them), element counts (the shard check compares them with a model's ``n_elements``), size
histograms, per-element reference values fitted by least squares on the train split, and per
target the sufficient statistics of the per-atom reference-energy fit (``element_fit``,
:mod:`cfdist.preprocess.element_fit`) from which a training run solves its reference energies
without a pass over the train split.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from cfdist.crystal import MAX_Z
from cfdist.fileio import atomic_write
from cfdist.preprocess.element_fit import ElementFitSums
from cfdist.preprocess.element_fit import composition as element_counts
from cfdist.manifest import SPLITS

ATOM_BINS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2**31]
ENTRY_BINS = [0, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000, 2**62]


class StatsAccumulator:
    """Sufficient statistics over shards: target moments, element counts, histograms, reference energies."""

    def __init__(self, targets: Sequence[str]):
        self.targets = list(targets)
        self.moments = {s: {t: np.zeros(3) for t in self.targets} for s in SPLITS}  # count, sum, sum sq
        self.elements = np.zeros(MAX_Z + 1, dtype=np.int64)
        self.atoms_hist = np.zeros(len(ATOM_BINS) - 1, dtype=np.int64)
        self.entries_hist = np.zeros(len(ENTRY_BINS) - 1, dtype=np.int64)
        self.gram = np.zeros((MAX_Z + 1, MAX_Z + 1))
        self.rhs = {t: np.zeros(MAX_Z + 1) for t in self.targets}
        self.total_atoms = 0
        self.total_entries = 0
        # per target, train split: sums of the per-atom least-squares reference fit (label / N)
        self.element_fit = {t: ElementFitSums() for t in self.targets}
        self.element_fit_complete = True  # False once a chunk file without them was merged

    def save(self, path: Path) -> None:
        """Write the accumulated sums atomically (``.npz``), for :meth:`load` and :meth:`merge`."""
        arrays = {"elements": self.elements, "atoms_hist": self.atoms_hist, "entries_hist": self.entries_hist,
                  "gram": self.gram, "totals": np.array([self.total_atoms, self.total_entries], dtype=np.int64)}
        for t_index, t in enumerate(self.targets):
            arrays[f"rhs.{t_index}"] = self.rhs[t]
            for s in SPLITS:
                arrays[f"moments.{s}.{t_index}"] = self.moments[s][t]
            arrays.update(self.element_fit[t].arrays(f"element_fit.{t_index}"))
        with atomic_write(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path: Path, targets: Sequence[str]) -> "StatsAccumulator":
        """Sums saved by :meth:`save` (a chunk's file is written before its completion record)."""
        acc = cls(targets)
        with np.load(path) as z:
            acc.elements, acc.atoms_hist, acc.entries_hist, acc.gram = (z["elements"], z["atoms_hist"],
                                                                      z["entries_hist"], z["gram"])
            acc.total_atoms, acc.total_entries = (int(v) for v in z["totals"])
            for t_index, t in enumerate(acc.targets):
                acc.rhs[t] = z[f"rhs.{t_index}"]
                for s in SPLITS:
                    acc.moments[s][t] = z[f"moments.{s}.{t_index}"]
                if f"element_fit.{t_index}.gram" in z:
                    acc.element_fit[t] = ElementFitSums.from_arrays(z, f"element_fit.{t_index}")
                else:  # written by an older version (a resumed build): the manifest gets no element_fit
                    acc.element_fit_complete = False
        return acc

    def merge(self, other: "StatsAccumulator") -> None:
        """Add ``other``'s sums (all statistics are sums, so chunks combine exactly)."""
        self.elements = self.elements + other.elements
        self.atoms_hist = self.atoms_hist + other.atoms_hist
        self.entries_hist = self.entries_hist + other.entries_hist
        self.gram = self.gram + other.gram
        self.total_atoms += other.total_atoms
        self.total_entries += other.total_entries
        for t in self.targets:
            self.rhs[t] = self.rhs[t] + other.rhs[t]
            for s in SPLITS:
                self.moments[s][t] = self.moments[s][t] + other.moments[s][t]
            self.element_fit[t].merge(other.element_fit[t])
        self.element_fit_complete = self.element_fit_complete and other.element_fit_complete

    def add(self, split: str, table) -> None:
        n_atoms = table["n_atoms"].to_numpy().astype(np.int64)
        n_entries = table["n_entries"].to_numpy().astype(np.int64)
        numbers = table["numbers"].combine_chunks().values.to_numpy().astype(np.int64)
        for t in self.targets:
            y = table[f"y.{t}"].to_numpy()
            y = y[np.isfinite(y)]
            self.moments[split][t] += [len(y), y.sum(), (y * y).sum()]
        self.elements += np.bincount(numbers, minlength=MAX_Z + 1)[: MAX_Z + 1]
        self.atoms_hist += np.histogram(n_atoms, ATOM_BINS)[0]
        self.entries_hist += np.histogram(n_entries, ENTRY_BINS)[0]
        self.total_atoms += int(n_atoms.sum())
        self.total_entries += int(n_entries.sum())
        if split == "train":
            row = np.repeat(np.arange(len(n_atoms)), n_atoms)
            composition = np.zeros((len(n_atoms), MAX_Z + 1))
            np.add.at(composition, (row, numbers), 1.0)
            composition /= n_atoms[:, None]
            self.gram += composition.T @ composition
            for t in self.targets:
                y = table[f"y.{t}"].to_numpy()
                ok = np.isfinite(y)
                self.rhs[t] += composition[ok].T @ y[ok]
            counts, atoms = element_counts(table)
            for t in self.targets:
                self.element_fit[t].add(counts, atoms, table[f"y.{t}"].to_numpy().astype(np.float64))

    def summary(self) -> dict:
        targets = {}
        for t in self.targets:
            per_split = {}
            for s in SPLITS:
                n, total, total_sq = self.moments[s][t]
                if n:
                    mean = total / n
                    per_split[s] = {"count": int(n), "mean": mean, "std": math.sqrt(max(total_sq / n - mean**2, 0.0))}
            targets[t] = per_split
        present = np.nonzero(np.diag(self.gram) > 0)[0]
        reference = {}
        for t in self.targets:
            if len(present):
                g = self.gram[np.ix_(present, present)]
                coef = np.linalg.lstsq(g + 1e-10 * np.eye(len(present)), self.rhs[t][present], rcond=None)[0]
                reference[t] = {str(int(z)): float(c) for z, c in zip(present, coef)}
        return {
            "targets": targets,
            "element_counts": {str(z): int(c) for z, c in enumerate(self.elements) if c},
            "atoms_histogram": {"edges": ATOM_BINS, "counts": self.atoms_hist.tolist()},
            "entries_histogram": {"edges": ENTRY_BINS, "counts": self.entries_hist.tolist()},
            "total_atoms": self.total_atoms, "total_entries": self.total_entries,
            "reference_per_element": reference,
            "reference_note": "least-squares fit of each target on composition fractions (train split): "
                              "y ~ sum_Z x_Z mu_Z; multiply by N for per-structure totals",
            **({"element_fit": {t: self.element_fit[t].to_dict() for t in self.targets},
                "element_fit_note": "per target, train split: sufficient statistics of the per-atom least-squares "
                                    "fit y / N ~ sum_Z (n_Z / N) mu_Z of an extensive label (cfdist.preprocess."
                                    "element_fit)"} if self.element_fit_complete else {}),
        }

