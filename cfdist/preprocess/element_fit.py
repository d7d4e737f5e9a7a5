"""Per-element reference energies by least squares, from sufficient statistics that add over chunks.

The model is E ~ sum_Z n_Z mu_Z (n_Z: atoms of element Z, occupancy-weighted on disordered sites,
as the model's reference sum counts them); each structure's equation is divided by its atom count
N, so the fit minimises the squared per-atom residual e = E / N - sum_Z x_Z mu_Z (x_Z = n_Z / N)
that the energy loss also measures. The normal matrix sum x x^T, the right-hand side sum x e, the
column sums sum x and the moments (count, sum e, sum e^2) over the structures with a finite label
are sums, so preprocessing chunks accumulate them in parallel, the job merges them exactly, and
the manifest carries them (``statistics.element_fit``): a training run solves for the references
without reading the train split (:func:`solve`), at any N. :func:`cfdist.run.objective.fit_element_energies`
accumulates the same sums over shard files, for shards written before the manifest carried them.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from cfdist.crystal import MAX_Z

WIDTH = MAX_Z + 1  # columns indexed by Z (column 0 unused)
FIT_COLUMNS = ["n_atoms", "numbers", "disorder_site", "disorder_z", "disorder_occupancy"]


def composition(table) -> tuple[np.ndarray, np.ndarray]:
    """(rows, WIDTH) float64 occupancy-weighted element counts n_Z of a pyarrow table or record
    batch with :data:`FIT_COLUMNS`, and the (rows,) int64 atom counts."""
    n_atoms = table.column("n_atoms").to_numpy().astype(np.int64)
    rows = len(n_atoms)
    atom_row = np.repeat(np.arange(rows), n_atoms)
    numbers = _flat(table.column("numbers")).astype(np.int64)
    comp = np.zeros((rows, WIDTH))
    np.add.at(comp, (atom_row, numbers), 1.0)
    d_col = table.column("disorder_site")
    d_site = _flat(d_col).astype(np.int64)
    if len(d_site):
        d_off = _offsets(d_col)
        d_row = np.repeat(np.arange(rows), np.diff(d_off))
        atom_offset = np.concatenate([[0], np.cumsum(n_atoms)[:-1]])
        sites = np.unique(d_site + atom_offset[d_row])  # each disordered site once
        np.add.at(comp, (atom_row[sites], numbers[sites]), -1.0)  # its majority species out
        d_z = _flat(table.column("disorder_z")).astype(np.int64)
        d_occ = _flat(table.column("disorder_occupancy")).astype(np.float64)
        np.add.at(comp, (d_row, d_z), d_occ)
    return comp, n_atoms


def _flat(column) -> np.ndarray:
    if hasattr(column, "combine_chunks"):  # ChunkedArray (a Table's column)
        column = column.combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False)


def _offsets(column) -> np.ndarray:
    if hasattr(column, "combine_chunks"):
        column = column.combine_chunks()
    offsets = column.offsets.to_numpy().astype(np.int64)
    return offsets - offsets[0]


class ElementFitSums:
    """The sums of one label: ``gram`` (WIDTH, WIDTH), ``rhs`` (WIDTH,), ``col_sum`` (WIDTH,),
    ``count``, ``e_sum``, ``e_sq`` (e = label / N, per structure with a finite label)."""

    def __init__(self):
        self.gram, self.rhs, self.col_sum = np.zeros((WIDTH, WIDTH)), np.zeros(WIDTH), np.zeros(WIDTH)
        self.count, self.e_sum, self.e_sq = 0, 0.0, 0.0

    def add(self, comp: np.ndarray, n_atoms: np.ndarray, label: np.ndarray) -> None:
        """Add structures: (rows, WIDTH) compositions, (rows,) atom counts, (rows,) extensive labels."""
        ok = np.isfinite(label) & (n_atoms > 0)
        x = comp[ok] / n_atoms[ok, None]
        e = label[ok] / n_atoms[ok]
        self.gram += x.T @ x
        self.rhs += x.T @ e
        self.col_sum += x.sum(0)
        self.count += int(ok.sum())
        self.e_sum += float(e.sum())
        self.e_sq += float(e @ e)

    def merge(self, other: "ElementFitSums") -> None:
        self.gram = self.gram + other.gram
        self.rhs = self.rhs + other.rhs
        self.col_sum = self.col_sum + other.col_sum
        self.count += other.count
        self.e_sum += other.e_sum
        self.e_sq += other.e_sq

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """For ``np.savez``: the sums under ``prefix``."""
        return {f"{prefix}.gram": self.gram, f"{prefix}.rhs": self.rhs, f"{prefix}.col_sum": self.col_sum,
                f"{prefix}.moments": np.array([self.count, self.e_sum, self.e_sq], dtype=np.float64)}

    @classmethod
    def from_arrays(cls, z, prefix: str) -> "ElementFitSums":
        out = cls()
        out.gram, out.rhs, out.col_sum = z[f"{prefix}.gram"], z[f"{prefix}.rhs"], z[f"{prefix}.col_sum"]
        count, out.e_sum, out.e_sq = (float(v) for v in z[f"{prefix}.moments"])
        out.count = int(count)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON form for the manifest: only the present elements' rows and columns (exact floats)."""
        present = np.nonzero(np.diag(self.gram) > 0)[0]
        return {"elements": [int(z) for z in present], "gram": self.gram[np.ix_(present, present)].tolist(),
                "rhs": self.rhs[present].tolist(), "col_sum": self.col_sum[present].tolist(),
                "count": self.count, "e_sum": self.e_sum, "e_sq": self.e_sq}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ElementFitSums":
        out = cls()
        present = np.asarray(data["elements"], dtype=np.int64)
        out.gram[np.ix_(present, present)] = np.asarray(data["gram"], dtype=np.float64).reshape(len(present), -1)
        out.rhs[present] = data["rhs"]
        out.col_sum[present] = data["col_sum"]
        out.count, out.e_sum, out.e_sq = int(data["count"]), float(data["e_sum"]), float(data["e_sq"])
        return out


def solve(sums: ElementFitSums, n_elements: int, *, ridge: float = 1e-8, fallback_scale: float = 1.0,
          label: str = "energy") -> dict:
    """The reference energies from ``sums`` (float64).

    Only elements present get a reference (the others 0); a ridge of ``ridge`` times the mean
    diagonal of the normal matrix settles elements that always occur in fixed ratios. The
    residual's moments are exact from the sums: sum r = sum e - mu . sum x, sum r^2 = sum e^2 -
    2 mu . b + mu' G mu.

    ``energy_scale`` (what the energy head's outputs are multiplied by) is the residual's standard
    deviation with the least-squares degrees-of-freedom correction, sqrt(RSS / (n - p)) for n
    structures and p fitted elements, when at least half of the structures are left as degrees of
    freedom; otherwise (few structures, many elements: the fit nearly interpolates and the residual
    says nothing about the data) it is ``fallback_scale`` (1 eV/atom). Without the correction a
    48-structure, 58-element split gave a scale of 1e-5 and an energy head that could not learn
    forces.

    Returns {"element_energy": (n_elements,) float64 eV/atom, "energy_scale" (eV/atom),
    "residual_std": population std of the per-atom residual (eV/atom), "residual_mean",
    "structures", "elements": present Z, "scale_from": "residual" | "fallback"}.
    """
    count = sums.count
    if count == 0:
        raise ValueError(f"no finite {label!r} labels to fit reference energies on")
    present = np.nonzero(np.diag(sums.gram) > 0)[0]
    outside = present[(present < 1) | (present > n_elements)]
    if len(outside):
        raise ValueError(f"the {label!r} data hold elements Z={outside.tolist()} beyond the model's "
                         f"n_elements={n_elements}")
    g = sums.gram[np.ix_(present, present)]
    b = sums.rhs[present]
    mu = np.linalg.solve(g + ridge * np.trace(g) / max(len(present), 1) * np.eye(len(present)), b)
    r_sum = sums.e_sum - float(mu @ sums.col_sum[present])
    r_sq = sums.e_sq - 2.0 * float(mu @ b) + float(mu @ g @ mu)
    mean = r_sum / count
    var = max(r_sq / count - mean * mean, 0.0)
    dof = count - len(present)
    corrected = math.sqrt(max(r_sq, 0.0) / dof) if dof > 0 else 0.0
    use_residual = dof >= 0.5 * count and corrected > 0
    element_energy = np.zeros(n_elements)
    element_energy[present - 1] = mu
    return {"element_energy": element_energy, "energy_scale": corrected if use_residual else float(fallback_scale),
            "scale_from": "residual" if use_residual else "fallback", "residual_std": math.sqrt(var),
            "residual_mean": mean, "structures": count, "elements": [int(z) for z in present]}
