"""The training objective both loops share: target standardisation and the masked L1 error.

Targets are standardised with the train split's mean and standard deviation (the manifest's
statistics, :func:`target_stats`), stored in the model's ``target_mean`` / ``target_std``
buffers so that a checkpoint predicts in original units (``model.denormalize``). A missing
label is NaN; it contributes neither error nor count, so multi-target sets with gaps train on
every label they have.

Energy models (pretraining's ``loss`` section, :class:`cfdist.train.config.LossSection`) train on
physical units instead: :func:`energy_residuals` gives per-atom energy, force and stress residuals
(eV/atom, eV/A, GPa) with masks, :func:`elementwise_loss` the L1 / L2 / Huber terms, and
:func:`fit_element_energies` the per-element reference energies (least squares on the train split)
that the energy head learns the residual of.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from cfdist.crystal import MAX_Z
from cfdist.shards import parquet_file


def target_stats(shards, targets: Sequence[str], split: str) -> dict[str, tuple[float, float]]:
    """{target: (mean, std)} on ``split`` of a :class:`cfdist.manifest.ShardSet` (std 0 -> 1)."""
    return {t: shards.target_stats(t, split) for t in targets}


def set_target_normalisation(model, stats: Mapping[str, tuple[float, float]]) -> None:
    """Write ``stats`` into the model's normalisation buffers, in the order of its ``target_names``."""
    with torch.no_grad():
        for k, name in enumerate(model.config.target_names):
            model.target_mean[k], model.target_std[k] = stats[name]


def normalised_targets(model, labels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, T) labels in original units -> standardised targets in ``dtype`` (NaN stays NaN)."""
    labels = labels.to(dtype)
    return (labels - model.target_mean.to(labels)) / model.target_std.to(labels)


def masked_abs_error(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(|pred - target| with 0 where the target is missing, the mask of present targets), both (B, T).

    ``err.sum()`` is a batch's summed L1 loss and ``mask.sum()`` its label count; ``err.sum(0)`` /
    ``mask.sum(0)`` give them per target.
    """
    mask = torch.isfinite(target)
    err = torch.where(mask, (pred - torch.nan_to_num(target)).abs(), torch.zeros_like(pred))
    return err, mask


# ----------------------------------------------------------------------------- energy models
EV_PER_A3_IN_GPA = 160.21766208  # 1 eV/A^3 in GPa
ENERGY_COMPONENTS = ("energy", "forces", "stress")


def elementwise_loss(residual: torch.Tensor, kind: str, huber_delta: float = 0.1) -> torch.Tensor:
    """``l1`` |r|, ``l2`` r^2 or ``huber`` (torch's HuberLoss: r^2 / 2 for |r| < delta, else
    delta (|r| - delta / 2)), elementwise."""
    if kind == "l1":
        return residual.abs()
    if kind == "l2":
        return residual * residual
    if kind == "huber":
        return torch.nn.functional.huber_loss(residual, torch.zeros_like(residual), reduction="none",
                                              delta=huber_delta)
    raise ValueError(f"unknown loss kind {kind!r}")


def energy_label_counts(batch, forces: bool, stress: bool) -> list[float]:
    """[labelled structures, labelled force components, labelled stress components] of a batch
    (the ``labels`` column 0 holds the total energy; force / stress counts are 0 when not trained)."""
    n_energy = float(torch.isfinite(batch.labels[:, 0]).sum())
    n_forces = float(torch.isfinite(batch.forces).sum()) if forces and batch.forces is not None else 0.0
    n_stress = float(torch.isfinite(batch.stress).sum()) if stress and batch.stress is not None else 0.0
    return [n_energy, n_forces, n_stress]


def energy_residuals(out, batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{component: (residual, mask)} of an :class:`cfdist.model.EnergyOutput` against the batch's
    labels, in float64 and the loss units: energy per atom (eV/atom), forces (eV/A), stress (GPa).
    Missing labels have residual 0 and mask False (so they carry no gradient)."""
    n_atoms = batch.n_atoms.to(device=out.energy.device, dtype=torch.float64)
    pairs = {"energy": (out.energy.double() / n_atoms, batch.labels[:, 0].double() / n_atoms)}
    if out.forces is not None and batch.forces is not None:
        pairs["forces"] = (out.forces.double(), batch.forces.double())
    if out.stress is not None and batch.stress is not None:
        pairs["stress"] = (out.stress.double() * EV_PER_A3_IN_GPA, batch.stress.double() * EV_PER_A3_IN_GPA)
    result = {}
    for name, (pred, label) in pairs.items():
        mask = torch.isfinite(label)
        result[name] = (torch.where(mask, pred - torch.nan_to_num(label), torch.zeros_like(pred)), mask)
    return result


# Errors are reported in these units: meV/atom, meV/A, GPa.
REPORT_SCALE = {"energy": 1000.0, "forces": 1000.0, "stress": 1.0}


def fit_element_energies(paths, energy_label: str, n_elements: int, *, ridge: float = 1e-8,
                         fallback_scale: float = 1.0, rows_per_read: int = 4096) -> dict:
    """Per-element reference energies by least squares on shard files (one columnar pass, float64).

    The model is E ~ sum_Z n_Z mu_Z (n_Z: atoms of element Z, occupancy-weighted on disordered
    sites, as the model's reference sum counts them); each structure's equation is divided by
    its atom count N, so the fit minimises the squared per-atom residual e = E / N - sum_Z x_Z mu_Z
    (x_Z = n_Z / N) that the energy loss also measures. Only elements present get a reference (the
    others 0); a ridge of ``ridge`` times the mean diagonal of the normal matrix settles
    elements that always occur in fixed ratios. Sufficient statistics (normal matrix, right-hand
    side, sums of e and e^2) make the residual's moments exact in the same pass.

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
    import numpy as np

    width = MAX_Z + 1
    gram, rhs, col_sum = np.zeros((width, width)), np.zeros(width), np.zeros(width)
    count, e_sum, e_sq = 0, 0.0, 0.0
    columns = ["n_atoms", "numbers", "disorder_site", "disorder_z", "disorder_occupancy", f"y.{energy_label}"]
    for path in paths:
        for record_batch in parquet_file(path).iter_batches(batch_size=rows_per_read, columns=columns):
            n_atoms = record_batch.column("n_atoms").to_numpy().astype(np.int64)
            energy = record_batch.column(f"y.{energy_label}").to_numpy(zero_copy_only=False).astype(np.float64)
            rows = len(n_atoms)
            atom_row = np.repeat(np.arange(rows), n_atoms)
            numbers = record_batch.column("numbers").flatten().to_numpy(zero_copy_only=False).astype(np.int64)
            comp = np.zeros((rows, width))
            np.add.at(comp, (atom_row, numbers), 1.0)
            d_col = record_batch.column("disorder_site")
            d_site = d_col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
            if len(d_site):
                d_off = d_col.offsets.to_numpy().astype(np.int64)
                d_row = np.repeat(np.arange(rows), np.diff(d_off))
                atom_offset = np.concatenate([[0], np.cumsum(n_atoms)[:-1]])
                sites = np.unique(d_site + atom_offset[d_row])  # each disordered site once
                np.add.at(comp, (atom_row[sites], numbers[sites]), -1.0)  # its majority species out
                d_z = record_batch.column("disorder_z").flatten().to_numpy(zero_copy_only=False).astype(np.int64)
                d_occ = record_batch.column("disorder_occupancy").flatten().to_numpy(zero_copy_only=False)
                np.add.at(comp, (d_row, d_z), d_occ.astype(np.float64))
            ok = np.isfinite(energy) & (n_atoms > 0)
            x = comp[ok] / n_atoms[ok, None]
            e = energy[ok] / n_atoms[ok]
            gram += x.T @ x
            rhs += x.T @ e
            col_sum += x.sum(0)
            count += int(ok.sum())
            e_sum += float(e.sum())
            e_sq += float(e @ e)
    if count == 0:
        raise ValueError(f"no finite {energy_label!r} labels to fit reference energies on")
    present = np.nonzero(np.diag(gram) > 0)[0]
    present = present[(present >= 1) & (present <= n_elements)]
    g = gram[np.ix_(present, present)]
    mu = np.linalg.solve(g + ridge * np.trace(g) / max(len(present), 1) * np.eye(len(present)), rhs[present])
    # residual moments from the sufficient statistics: sum r = sum e - mu.sum x; sum r^2 = sum e^2 - 2 mu.b + mu'G mu
    r_sum = e_sum - float(mu @ col_sum[present])
    r_sq = e_sq - 2.0 * float(mu @ rhs[present]) + float(mu @ g @ mu)
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
