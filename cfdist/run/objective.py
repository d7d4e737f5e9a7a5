"""What a step fits and measures: the objective both loops, validation and ``cfdist evaluate`` share.

An :class:`Objective` names its *components* (property targets, or an energy model's energy /
forces / stress), runs the model's forward for them, turns an output and a batch into per-component
sums (:data:`SUM_ROWS`) and combines the sums into the loss. Every number the library reports
(training loss, validation MAE, test MAE) is a ratio of these sums, so a step
(:mod:`cfdist.run.step`) and an evaluation (:mod:`cfdist.run.evaluation`) compute it one way.
Sums are keyed by component so that a further key (e.g. the dataset of a mixture) is one more
entry, not another copy of the step.

Property models (:class:`PropertyObjective`): targets are standardised with the train split's mean
and standard deviation (the manifest's statistics, :func:`target_stats`), stored in the model's
``target_mean`` / ``target_std`` buffers so that a checkpoint predicts in original units. The loss
is the L1 error on standardised targets, averaged over all labels of the step. A missing label is
NaN; it contributes neither error nor count, so multi-target sets with gaps train on every label
they have.

Energy models (:class:`EnergyObjective`, pretraining's ``loss`` section) train on physical units
instead: :func:`energy_residuals` gives per-atom energy, force and stress residuals (eV/atom, eV/A,
GPa) with masks, :func:`elementwise_loss` the L1 / L2 / Huber terms, and
:func:`fit_element_energies` the per-element reference energies (least squares on the train split)
that the energy head learns the residual of.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from cfdist.preprocess.element_fit import FIT_COLUMNS, ElementFitSums, composition, solve
from cfdist.shards import parquet_file


def target_stats(shards, targets: Sequence[str], split: str,
                 transforms: Mapping[str, str] | None = None) -> dict[str, tuple[float, float]]:
    """{target: (mean, std)} on ``split`` of a :class:`cfdist.manifest.ShardSet` (std 0 -> 1), in
    the space the model learns each target in: a ``log`` target (``transforms``,
    :attr:`cfdist.config.CrystalformerConfig.target_transforms`) gets log10-space statistics."""
    stats = {}
    for t in targets:
        mean, std = shards.target_stats(t, split)
        if (transforms or {}).get(t) == "log":
            mean, std = log10_moments(mean, std, t)
        stats[t] = (mean, std)
    return stats


def log10_moments(mean: float, std: float, target: str = "target") -> tuple[float, float]:
    """(mean, std) of log10 y from y's mean and std, by matching a log-normal's moments:
    s^2 = ln(1 + std^2 / mean^2), mu = ln(mean) - s^2 / 2 (exact for log-normal y; only the
    normalisation of a ``log`` target uses it, so the manifest's moments suffice and start-up
    reads no labels)."""
    if not mean > 0:
        raise ValueError(f"target {target!r} has a log output transform but its train mean is {mean}; "
                         f"a log target needs positive labels")
    var_ln = math.log1p((std / mean) ** 2)
    ln10 = math.log(10.0)
    return (math.log(mean) - var_ln / 2) / ln10, max(math.sqrt(var_ln) / ln10, 1e-6)


def set_target_normalisation(model, stats: Mapping[str, tuple[float, float]]) -> None:
    """Write ``stats`` into the normalisation buffers of ``model`` (a model, or a mixture model's
    dataset head), in the order of its ``target_names``."""
    with torch.no_grad():
        for k, name in enumerate(model.target_names):
            model.target_mean[k], model.target_std[k] = stats[name]


def normalised_targets(model, labels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, T) labels in original units -> standardised targets in ``dtype`` (NaN stays NaN; ``log``
    targets standardised in log10 space, :meth:`cfdist.model.Crystalformer.label_space`)."""
    return standardised(model, model.label_space(labels.to(dtype)))


def standardised(model, labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels already in the model's label space -> (labels - mean) / std."""
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


# ----------------------------------------------------------------------------- objectives
# Rows of a sums tensor (6, C), one column per component, float64:
SUM_ROWS = ("abs", "loss", "count", "sq", "label", "label_sq")
# abs: summed |error| in report units; loss: summed elementwise loss (loss units; carries the
# gradient in a training step); count: labels; sq: summed squared error (report units);
# label / label_sq: summed labels and squared labels (report units, for R^2).


def unwrap(net):
    """The model inside a DeepSpeed engine or DDP wrapper (its buffers hold the normalisation)."""
    return getattr(net, "module", net)


class Objective:
    """Base of the objectives: components, label counts, forward, per-component sums and the loss.

    ``components``: component names (the sums' columns, in this order); ``metric_names``: the name
    of each in metrics (``mae/<name>``, ``loss/<name>``); ``needs_grad``: the forward differentiates
    (forces / stress), so evaluation runs with autograd on.
    """

    components: tuple[str, ...] = ()
    needs_grad: bool = False
    dataset: str | None = None  # the head of a mixture model this objective trains (None: the model's own)

    def call(self, net, batch, **kwargs):
        """The model's forward, routed to this objective's dataset head when it has one."""
        if self.dataset is not None:
            kwargs["dataset"] = self.dataset
        return net(batch, **kwargs)

    def head(self, model):
        """The output head whose buffers (normalisation, references) this objective reads."""
        return model.output(self.dataset) if self.dataset is not None else model

    def metric_name(self, component: str) -> str:
        return component

    def label_counts(self, batch) -> list[float]:
        """Labels per component of a (host) batch; all-reduced before the forward to scale the loss."""
        raise NotImplementedError

    def forward(self, net, batch) -> Any:
        raise NotImplementedError

    def sums(self, model, out, batch, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(stats (6, C) float64 detached in :data:`SUM_ROWS` order, loss sums (C,) with gradient).

        ``dtype``: the precision of the loss terms (float32 in training, float64 in evaluation).
        """
        raise NotImplementedError

    def loss(self, loss_sums: torch.Tensor, global_counts: Sequence[float], world: int) -> torch.Tensor:
        """This rank's loss: its summed terms scaled so that, after averaging gradients over the
        ``world`` ranks, the gradient is that of the step's mean over all ranks' labels."""
        raise NotImplementedError

    def selection_loss(self, totals: torch.Tensor) -> float:
        """The loss over a whole split from its summed stats (validation loss, best-checkpoint choice)."""
        raise NotImplementedError


class PropertyObjective(Objective):
    """L1 on standardised property targets (the paper's loss); one component per target.

    The loss is one mean over all labels of all targets (targets with more labels weigh more),
    as in the paper's multi-target runs.
    """

    def __init__(self, targets: Sequence[str], transforms: Mapping[str, str] | None = None,
                 dataset: str | None = None):
        self.components = tuple(targets)
        self.dataset = dataset
        # a log target's non-positive labels are missing in its log10 space (Crystalformer.label_space)
        self.positive_only = [(transforms or {}).get(t) == "log" for t in targets]

    def label_counts(self, batch) -> list[float]:
        ok = torch.isfinite(batch.labels)
        if any(self.positive_only):
            ok = ok & ~(torch.tensor(self.positive_only, device=ok.device) & (batch.labels <= 0))
        return ok.sum(0).double().tolist()

    def forward(self, net, batch) -> torch.Tensor:
        return self.call(net, batch)

    def sums(self, model, out, batch, dtype):
        model = self.head(model)
        # errors and label moments in the space the target is learnt in (log10 for ``log`` targets)
        labels = model.label_space(batch.labels.to(out.device).double())
        err, mask = masked_abs_error(out.to(dtype), standardised(model, labels.to(dtype)))
        loss_sums = err.sum(0)
        std = model.target_std.to(device=out.device, dtype=torch.float64)
        abs_err = err.detach().double() * std  # original units
        y = torch.where(mask, labels.double(), torch.zeros((), dtype=torch.float64, device=out.device))
        stats = torch.stack([abs_err.sum(0), loss_sums.detach().double(), mask.sum(0).double(),
                             (abs_err * abs_err).sum(0), y.sum(0), (y * y).sum(0)])
        return stats, loss_sums

    def loss(self, loss_sums, global_counts, world):
        return loss_sums.sum() * (world / max(float(sum(global_counts)), 1.0))

    def selection_loss(self, totals):
        count = float(totals[2].sum())
        return float(totals[1].sum()) / count if count else float("nan")


# metric names of an energy model's components (training: "mae/<name>", validation: "val_mae/<name>")
COMPONENT_METRICS = {"energy": "energy_mev_per_atom", "forces": "forces_mev_per_A", "stress": "stress_gpa"}


class EnergyObjective(Objective):
    """w_E L(E / N) + w_F L(F) + w_S L(sigma) of an energy model (``loss``: a
    :class:`cfdist.train.config.LossSection`); each term the mean over the step's labels of that
    component on all ranks. Forces / stress are computed when their weight is nonzero (fixed by
    the config, never by a batch, so every rank runs the same passes and collectives)."""

    components = ENERGY_COMPONENTS

    def __init__(self, loss, dataset: str | None = None):
        self.dataset = dataset
        self.weights = {"energy": float(loss.energy_weight), "forces": float(loss.forces_weight),
                        "stress": float(loss.stress_weight)}
        self.kind, self.huber_delta = loss.kind, float(loss.huber_delta)
        self.forces, self.stress = self.weights["forces"] > 0, self.weights["stress"] > 0
        self.needs_grad = self.forces or self.stress

    def metric_name(self, component: str) -> str:
        return COMPONENT_METRICS[component]

    def label_counts(self, batch) -> list[float]:
        return energy_label_counts(batch, self.forces, self.stress)

    def forward(self, net, batch):
        return self.call(net, batch, forces=self.forces, stress=self.stress)

    def sums(self, model, out, batch, dtype):
        residuals = energy_residuals(out, batch)
        labels = energy_labels(batch, out.energy.device)
        columns, loss_sums = [], []
        zero = out.energy.new_zeros((), dtype=torch.float64)
        for name in self.components:
            if name not in residuals:
                columns.append(torch.zeros(6, dtype=torch.float64, device=zero.device))
                loss_sums.append(zero)
                continue
            res, mask = residuals[name]
            terms = elementwise_loss(res, self.kind, self.huber_delta)
            term_sum = torch.where(mask, terms, torch.zeros_like(terms)).sum()
            r = res.detach().abs() * REPORT_SCALE[name]
            y = torch.where(mask, torch.nan_to_num(labels[name]) * REPORT_SCALE[name], torch.zeros_like(r))
            columns.append(torch.stack([r.sum(), term_sum.detach(), mask.sum().double(), (r * r).sum(), y.sum(),
                                        (y * y).sum()]))
            loss_sums.append(term_sum)
        return torch.stack(columns, 1), torch.stack(loss_sums)

    def loss(self, loss_sums, global_counts, world):
        loss = loss_sums.new_zeros(())
        for k, name in enumerate(self.components):
            if self.weights[name] > 0 and global_counts[k] > 0:
                loss = loss + self.weights[name] * loss_sums[k] * (world / global_counts[k])
        return loss.float()

    def selection_loss(self, totals):
        value, any_labels = 0.0, False
        for k, name in enumerate(self.components):
            if self.weights[name] > 0 and float(totals[2, k]) > 0:
                value += self.weights[name] * float(totals[1, k]) / float(totals[2, k])
                any_labels = True
        return value if any_labels else float("nan")


class MixtureObjective(Objective):
    """The objective of a dataset mixture: each dataset's own objective (its head, its loss
    section), side by side. Components are ``<dataset>/<component>`` (metrics
    ``mae/<dataset>/<metric>``); a micro-batch comes from one dataset (``batch.dataset``) and only
    that dataset's columns get its sums and label counts, the others zeros.

    The loss of a micro-step is the sum over datasets of each one's loss, each the mean over that
    dataset's labels in the micro-step on all ranks (ranks may draw different datasets in one
    micro-step); how much each dataset weighs overall is set by how often it is drawn
    (:mod:`cfdist.mixture`) and by its own loss weights.
    """

    def __init__(self, parts: Mapping[str, Objective]):
        if not parts:
            raise ValueError("a mixture objective needs at least one dataset")
        self.parts = dict(parts)
        self.names = list(self.parts)
        self.slices: dict[str, slice] = {}
        components: list[str] = []
        for name, part in self.parts.items():
            self.slices[name] = slice(len(components), len(components) + len(part.components))
            components += [f"{name}/{c}" for c in part.components]
        self.components = tuple(components)
        self.needs_grad = any(p.needs_grad for p in self.parts.values())

    def part(self, batch) -> tuple[str, Objective]:
        name = getattr(batch, "dataset", None)
        if name not in self.parts:
            raise ValueError(f"batch of dataset {name!r}: not one of the mixture's datasets {self.names}")
        return name, self.parts[name]

    def metric_name(self, component: str) -> str:
        name, _, rest = component.partition("/")
        return f"{name}/{self.parts[name].metric_name(rest)}"

    def label_counts(self, batch) -> list[float]:
        name, part = self.part(batch)
        counts = [0.0] * len(self.components)
        counts[self.slices[name]] = part.label_counts(batch)
        return counts

    def forward(self, net, batch):
        return self.part(batch)[1].forward(net, batch)

    def sums(self, model, out, batch, dtype):
        name, part = self.part(batch)
        stats, loss_sums = part.sums(model, out, batch, dtype)
        cut = self.slices[name]
        full_stats = stats.new_zeros(stats.shape[0], len(self.components))
        full_stats[:, cut] = stats
        full_loss = loss_sums.new_zeros(len(self.components))
        full_loss = torch.cat([full_loss[:cut.start], loss_sums, full_loss[cut.stop:]])  # keeps the gradient
        return full_stats, full_loss

    def loss(self, loss_sums, global_counts, world):
        total = None
        for name, part in self.parts.items():
            cut = self.slices[name]
            counts = list(global_counts[cut])
            if sum(counts) == 0:
                continue  # not drawn on any rank this micro-step
            term = part.loss(loss_sums[cut], counts, world).float()
            total = term if total is None else total + term
        return total if total is not None else loss_sums.sum().float() * 0.0

    def selection_loss(self, totals):
        values = [part.selection_loss(totals[:, self.slices[name]]) for name, part in self.parts.items()]
        values = [v for v in values if v == v]
        return float(sum(values)) if values else float("nan")


def make_objective(model_config, targets: Sequence[str], loss=None, losses: Mapping[str, Any] | None = None) -> Objective:
    """The objective of a model config: :class:`EnergyObjective` (``loss`` section) for an energy
    model, :class:`PropertyObjective` over ``targets`` otherwise; for a model with per-dataset heads
    a :class:`MixtureObjective` of each head's (``losses``: {dataset: loss section} of the energy
    heads)."""
    if model_config.heads:
        parts: dict[str, Objective] = {}
        for spec in model_config.heads:
            if spec.energy:
                section = (losses or {}).get(spec.name)
                if section is None:
                    raise ValueError(f"dataset {spec.name!r} has an energy head but no loss section")
                parts[spec.name] = EnergyObjective(section, dataset=spec.name)
            else:
                parts[spec.name] = PropertyObjective(spec.targets, spec.transforms, dataset=spec.name)
        return MixtureObjective(parts)
    if model_config.energy:
        if loss is None:
            raise ValueError("an energy model needs a loss section (energy / forces / stress weights)")
        return EnergyObjective(loss)
    return PropertyObjective(targets, model_config.target_transforms)


def energy_labels(batch, device) -> dict[str, torch.Tensor]:
    """The labels :func:`energy_residuals` compares with, in loss units (float64, NaN = missing)."""
    n_atoms = batch.n_atoms.to(device=device, dtype=torch.float64)
    out = {"energy": batch.labels[:, 0].to(device).double() / n_atoms}
    if batch.forces is not None:
        out["forces"] = batch.forces.to(device).double()
    if batch.stress is not None:
        out["stress"] = batch.stress.to(device).double() * EV_PER_A3_IN_GPA
    return out


def fit_element_energies(paths, energy_label: str, n_elements: int, *, ridge: float = 1e-8,
                         fallback_scale: float = 1.0, rows_per_read: int = 4096) -> dict:
    """Per-element reference energies by least squares on shard files (one columnar pass, float64):
    the sums of :class:`cfdist.preprocess.element_fit.ElementFitSums` over the files, solved by
    :func:`cfdist.preprocess.element_fit.solve` (its docstring: the model, the ridge, the energy
    scale and the returned dict). Training uses the manifest's sums instead when the preprocessing
    job wrote them (``ShardSet.element_fit``), so start-up reads no labels; this pass serves shards
    written before that, and checks that the two agree (tests)."""
    sums = ElementFitSums()
    columns = FIT_COLUMNS + [f"y.{energy_label}"]
    for path in paths:
        for record_batch in parquet_file(path).iter_batches(batch_size=rows_per_read, columns=columns):
            comp, n_atoms = composition(record_batch)
            label = record_batch.column(f"y.{energy_label}").to_numpy(zero_copy_only=False).astype(np.float64)
            sums.add(comp, n_atoms, label)
    return solve(sums, n_elements, ridge=ridge, fallback_scale=fallback_scale, label=energy_label)
