"""Prediction and evaluation with a portable checkpoint.

    cfdist predict  --checkpoint model.pt INPUT... [--out predictions.csv]
    cfdist evaluate --checkpoint model.pt --data SHARDS_OR_INPUTS [--split test] [--out DIR]

Inputs are anything the preprocessor reads (CIF files or directories, JARVIS / pymatgen JSON,
extxyz, ASE db). Tables are built with the checkpoint's cutoff. A structure that cannot be read
or fails validation gets a row with the reason instead of stopping the batch; so does an input
file that cannot be found, opened or recognised (one row naming the file, reason in
:data:`cfdist.io.FILE_REASONS`), and a JSON list or JSON-lines file cut short gives its complete
records and one ``truncated`` row for the rest (the inputs are read by
:func:`cfdist.io.iter_input_records`). Evaluation also reads shard directories (their image tables
are reused when their cutoff covers the model's).

Evaluation measures through :func:`cfdist.run.evaluation.evaluate`, the code of the training
loops' validation and fine-tuning's test split, with the objective training uses
(:func:`cfdist.run.objective.make_objective`): a property model's MAE / RMSE / R^2 per target
(``log`` targets in log10 units, as training reports them), an energy model's energy (meV/atom),
forces (meV/A) and stress (GPa) under the training metrics' names (``energy_mev_per_atom``,
``forces_mev_per_A``, ``stress_gpa``); forces and stress are computed when the data can hold
them (a shard split with those columns; raw inputs always, reported where some record carries
them). Shard splits and raw inputs go through it alike (raw records are validated, tabled and
collated into batches, with their force / stress labels), so one model on the same structures
gives the same numbers from shards, from raw files and in training. Only a shard split that lacks
a label column the model needs (a property target, or an energy model's energy) is measured on
the written rows (:func:`regression_metrics`), as are an energy model's property targets (no
training objective measures them).
"""

from __future__ import annotations

import csv
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from cfdist import storage
from cfdist.batch import collate
from cfdist.crystal import InvalidCrystalError, validate
from cfdist.data import BatchBudget, iter_local_shards, pack_rows, training_columns
from cfdist.fileio import atomic_write, write_json_atomic
from cfdist.geometry import image_table
from cfdist.io import FileError, iter_input_records
from cfdist.manifest import ShardSet
from cfdist.run import evaluation
from cfdist.run.config import LossSection
from cfdist.run.objective import make_objective
from cfdist.shards import collate_arrow, read_schema, target_columns


@dataclass
class Prediction:
    """One output row: predictions (de-normalised) or the reason there are none.

    ``scope`` is ``"record"`` for a structure, ``"file"`` for an input that could not be read (at all,
    or past a cut: ``error_reason`` one of :data:`cfdist.io.FILE_REASONS`; ``source`` is the path).
    """

    id: str
    source: str
    values: list[float] | None
    labels: dict[str, float] = field(default_factory=dict)
    error_reason: str = ""
    error: str = ""
    scope: str = "record"


def predict_records(model, records: Iterable, batch_size: int = 64) -> Iterator[Prediction]:
    """Validate, build tables, batch and predict; failures become error rows (order kept)."""

    model.eval()
    device = model.embedding.weight.device
    pending: list[tuple[Prediction, object, object]] = []

    def flush():
        ok = [(row, c, t) for row, c, t in pending if c is not None]
        if ok:
            batch = collate([c for _, c, _ in ok], [t for _, _, t in ok]).to(device)
            with torch.no_grad():
                values = batch_values(model, batch)
            for (row, _, _), v in zip(ok, values):
                row.values = v
        out = [row for row, _, _ in pending]
        pending.clear()
        return out

    for row, crystal, table, _ in _tabled(model, records):
        pending.append((row, crystal, table))
        if len(pending) >= batch_size:
            yield from flush()
    yield from flush()


def _tabled(model, records: Iterable) -> Iterator[tuple[Prediction, object, object, object]]:
    """(row, validated crystal, image table, record) per input record; a record that cannot be read
    or fails validation gives its error row and crystal / table None."""
    for record in records:
        row = Prediction(id=record.id, source=record.source, values=None, labels=dict(record.labels),
                         scope="file" if isinstance(record, FileError) else "record")
        if record.crystal is None:
            row.error_reason, row.error = record.error_reason or "unparseable", record.error or "unreadable"
            yield row, None, None, record
            continue
        try:
            crystal = validate(record.crystal)
            table = image_table(crystal.lattice, crystal.positions, model.cutoff)
        except InvalidCrystalError as exc:
            row.error_reason, row.error = exc.reason, exc.detail
            yield row, None, None, record
            continue
        yield row, crystal, table, record


def predict_shards(model, shard_dir: str | Path, split: str, batch_size: int = 128) -> Iterator[Prediction]:
    """Predict a split of a shard directory, reusing its image tables."""

    shards = ShardSet(shard_dir)
    shards.verify([split], required_cutoff=model.cutoff, checksums=False)
    names = output_names(model)
    device = model.embedding.weight.device
    model.eval()
    for table in iter_local_shards([e.path for e in shards.files(split)], rows_per_read=batch_size):
        have = set(target_columns(table.schema))
        labelled = [n for n in names if n in have]
        batch = collate_arrow(table, labelled or None, cutoff=shards.cutoff).to(device)
        with torch.no_grad():
            values = batch_values(model, batch)
        labels = batch.labels.tolist() if batch.labels is not None else [[] for _ in values]
        sources = table["source"].to_pylist() if "source" in table.column_names else [str(shard_dir)] * len(values)
        for rid, src, v, y in zip(batch.ids, sources, values, labels):
            yield Prediction(id=rid, source=src, values=v, labels=dict(zip(labelled, y)))


def output_names(model) -> list[str]:
    """The prediction columns of ``model``: an energy model's ``energy`` (eV) and ``energy_per_atom``
    (eV/atom) first, then its property targets."""
    names = list(model.config.target_names)
    return ["energy", "energy_per_atom", *names] if model.config.energy else names


def batch_values(model, batch) -> list[list[float]]:
    """One row of :func:`output_names` values per crystal of ``batch`` (original units)."""
    return output_values(model, batch, model(batch))


def output_values(model, batch, out) -> list[list[float]]:
    """:func:`output_names` values per crystal from the model's output ``out`` on ``batch``: (B, T)
    normalised properties, or an :class:`cfdist.model.EnergyOutput` (energy in eV, energy per
    atom in eV/atom, then the de-normalised properties)."""
    if not model.config.energy:
        return model.denormalize(out.detach()).double().cpu().tolist()
    energy = out.energy.detach().double()
    columns = [energy[:, None], (energy / batch.n_atoms.to(energy))[:, None],
               model.denormalize(out.properties.detach()).double()]
    return torch.cat(columns, 1).cpu().tolist()


def write_predictions(rows: Iterable[Prediction], path: str | Path, target_names: Sequence[str],
                      with_labels: bool = False) -> list[Prediction]:
    """CSV: id, source, one column per target (and ``<target>_true``), error_reason, error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    with atomic_write(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        header = ["id", "source"] + list(target_names)
        if with_labels:
            header += [f"{t}_true" for t in target_names]
        writer.writerow(header + ["error_reason", "error"])
        for row in rows:
            values = row.values if row.values is not None else [""] * len(target_names)
            line = [row.id, row.source] + [f"{v:.6g}" if v != "" else "" for v in values]
            if with_labels:
                line += [_fmt(row.labels.get(t)) for t in target_names]
            writer.writerow(line + [row.error_reason, row.error])
            kept.append(row)
    return kept


def _fmt(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.6g}"


def regression_metrics(rows: Sequence[Prediction], target_names: Sequence[str]) -> dict:
    """MAE, RMSE, R^2 and counts per target over rows with a prediction and a finite label."""
    out = {}
    for k, name in enumerate(target_names):
        pairs = [(r.values[k], r.labels[name]) for r in rows
                 if r.values is not None and name in r.labels and math.isfinite(r.labels[name])]
        if not pairs:
            out[name] = {"n": 0, "mae": None, "rmse": None, "r2": None}
            continue
        pred, true = np.array(pairs).T
        err = pred - true
        ss_tot = float(((true - true.mean()) ** 2).sum())
        out[name] = {"n": len(pairs), "mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err ** 2).mean())),
                     "r2": 1.0 - float((err ** 2).sum()) / ss_tot if ss_tot > 0 else None}
    return out


def parity_plot(rows: Sequence[Prediction], target_names: Sequence[str], metrics: dict, path: str | Path,
                panels: Sequence[tuple[str, str]] | None = None) -> Path:
    """One parity panel (predicted vs true) per ``(column of target_names, metrics key)`` of
    ``panels`` (default: every target with its own metrics) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(panels) if panels is not None else [(name, name) for name in target_names]
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.0), squeeze=False)
    for ax, (name, key) in zip(axes[0], panels):
        k = list(target_names).index(name)
        pairs = [(r.labels[name], r.values[k]) for r in rows
                 if r.values is not None and name in r.labels and math.isfinite(r.labels[name])]
        m = metrics.get(key) or {}
        if pairs:
            true, pred = np.array(pairs).T
            lo, hi = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
            ax.plot([lo, hi], [lo, hi], color="0.6", lw=1)
            ax.scatter(true, pred, s=6, alpha=0.6)
        if m.get("mae") is not None:
            ax.set_title(f"{key}: MAE {m['mae']:.4g}, R² {m['r2']:.3f} (n={m['n']})" if m["r2"] is not None
                         else f"{key}: MAE {m['mae']:.4g} (n={m['n']})", fontsize=9)
        ax.set_xlabel(f"true {name}")
        ax.set_ylabel(f"predicted {name}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def evaluate(model, data: Sequence[str], out_dir: str | Path, split: str = "test", batch_size: int = 64,
             energy_label: str = "energy") -> dict:
    """Predict ``data`` (one shard directory, or raw inputs with labels) and write
    ``metrics.json``, ``predictions.csv`` and ``parity.png`` to ``out_dir``; returns the metrics (and
    :func:`row_counts` under ``counts``). Raw inputs that cannot be read give error rows (see
    :func:`iter_input_records` with ``on_error="row"``), listed under ``failed_inputs``.

    Metrics (``targets``) come from :func:`cfdist.run.evaluation.evaluate` (the module docstring:
    what is measured, in which units and names); an energy model's parity panel is energy per atom.
    ``energy_label``: the label of an energy model's total energy (eV; shard column
    ``y.<energy_label>``, the run's ``data.targets``), whose prediction is the ``energy`` column."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = output_names(model)
    if len(data) == 1 and storage.is_file(storage.join(data[0], "manifest.json")):  # also s3:// / gs://
        source = {"shards": storage.absolute(data[0]), "split": split}
        if _shard_labels_cover(model, data[0], split, energy_label):
            rows, metrics = _evaluate_shards(model, data[0], split, max(batch_size, 128), energy_label)
        else:  # the split lacks labels the shared objective needs: measured on the rows
            rows = list(predict_shards(model, data[0], split, batch_size=max(batch_size, 128)))
            metrics = regression_metrics(rows, names)
    else:
        records = iter_input_records(data, on_error="row")
        rows, metrics = _evaluate_records(model, records, batch_size, energy_label)
        source = {"inputs": [storage.absolute(d) for d in data]}
    rows = write_predictions(rows, out_dir / "predictions.csv", names, with_labels=True)
    counts = row_counts(rows)
    failed = [r for r in rows if r.values is None]
    result = {"targets": metrics, "n_structures": len(rows), "n_predicted": counts["predicted"],
              "n_failed": counts["failed"], "n_failed_files": counts["failed_files"],
              "n_failed_records": counts["failed_records"],
              "failed_by_reason": _count(r.error_reason for r in failed),
              "failed_inputs": [{"source": r.source, "reason": r.error_reason, "error": r.error}
                                for r in failed if r.scope == "file"],
              "data": source, "checkpoint": getattr(model, "checkpoint_info", {})}
    write_json_atomic(out_dir / "metrics.json", result)
    panels = [(name, name) for name in model.config.target_names]
    if model.config.energy:
        energy_key = "energy_mev_per_atom" if "energy_mev_per_atom" in metrics else "energy_per_atom"
        panels.insert(0, ("energy_per_atom", energy_key))
    parity_plot(rows, names, metrics, out_dir / "parity.png", panels)
    return {**result, "counts": counts}


def _label_names(model, energy_label: str) -> list[str]:
    """The label columns the shared evaluation reads: an energy model's total energy first, then
    the property targets."""
    targets = list(model.config.target_names)
    return [energy_label, *targets] if model.config.energy else targets


def _shard_labels_cover(model, shard_dir: str | Path, split: str, energy_label: str) -> bool:
    """Whether every label column of :func:`_label_names` is a column of ``split``."""
    files = ShardSet(shard_dir).files(split)
    return bool(files) and set(_label_names(model, energy_label)) <= set(target_columns(read_schema(files[0].path)))


def _objective(model, forces: bool, stress: bool):
    """The objective training measures ``model`` with (:func:`cfdist.run.objective.make_objective`);
    an energy model's forces / stress computed when asked (the loss weights only switch them on:
    no reported number depends on them)."""
    loss = LossSection(forces_weight=float(forces), stress_weight=float(stress), kind="l1")
    return make_objective(model.config, list(model.config.target_names), loss)


def _measure(model, batches: Iterable, objective, rows_of: deque) -> dict:
    """Run the shared evaluation over ``batches``, filling each batch's rows (``rows_of``: one list
    of :class:`Prediction` per batch, in order) with predictions and labels; returns the metrics."""
    names = output_names(model)

    def keep(batch, out) -> None:
        values = output_values(model, batch, out)
        labels = batch.labels.double().cpu()
        if model.config.energy:  # keyed by the output columns: energy, energy per atom, properties
            per_atom = labels[:, :1] / batch.n_atoms.cpu().double()[:, None]
            labels = torch.cat([labels[:, :1], per_atom, labels[:, 1:]], 1)
        for row, v, y in zip(rows_of.popleft(), values, labels.tolist()):
            row.values = v
            row.labels.update(zip(names, y))

    device = model.embedding.weight.device
    totals = evaluation.evaluate(model, batches, objective, device, on_output=keep)
    report = evaluation.target_report(objective, totals)
    if not model.config.energy:
        return report
    metrics = {objective.metric_name("energy"): report["energy"]}
    for name, on in (("forces", objective.forces), ("stress", objective.stress)):
        if on:
            metrics[objective.metric_name(name)] = report[name]
    return metrics


def _evaluate_shards(model, shard_dir: str | Path, split: str, batch_size: int,
                     energy_label: str) -> tuple[list[Prediction], dict]:
    """(prediction rows, metrics) of ``model`` on a shard split that holds its labels, through the
    shared evaluation (:mod:`cfdist.run.evaluation`; micro-batches of at most ``batch_size``
    structures within the default entry budget). An energy model's forces / stress are measured
    when the split has those columns."""
    shards = ShardSet(shard_dir)
    shards.verify([split], required_cutoff=model.cutoff, checksums=False)
    label_names = _label_names(model, energy_label)
    schema = read_schema(shards.files(split)[0].path)
    forces = bool(model.config.energy) and "forces" in schema.names
    stress = bool(model.config.energy) and "stress" in schema.names
    objective = _objective(model, forces, stress)
    columns = training_columns(schema, label_names, forces=forces, stress=stress)
    columns += ["source"] if "source" in schema.names else []
    budget = BatchBudget(max_structures=batch_size)
    rows: list[Prediction] = []
    rows_of: deque = deque()

    def batches():
        for table in pack_rows(evaluation.split_tables(shards, split, columns), budget):
            batch = collate_arrow(table, label_names, cutoff=shards.cutoff, forces=forces, stress=stress)
            sources = table["source"].to_pylist() if "source" in table.column_names else None
            mine = [Prediction(id=rid, source=src, values=None)
                    for rid, src in zip(batch.ids, sources or [str(shard_dir)] * table.num_rows)]
            rows.extend(mine)
            rows_of.append(mine)
            yield batch

    metrics = _measure(model, batches(), objective, rows_of)
    return rows, {**metrics, **_property_metrics(model, rows)}


def _evaluate_records(model, records: Iterable, batch_size: int,
                      energy_label: str) -> tuple[list[Prediction], dict]:
    """(rows, metrics) of raw input records through the shared evaluation: each record is
    validated and tabled as :func:`predict_records` does (failures become error rows, in input
    order), the valid ones collated up to ``batch_size`` rows at a time with their labels (NaN
    where a record lacks one) and, for an energy model, their force / stress labels (NaN where
    missing; always computed, since a stream's labels are unknown up front, and reported when some
    record has them)."""
    energy = bool(model.config.energy)
    label_names = _label_names(model, energy_label)
    objective = _objective(model, energy, energy)
    rows: list[Prediction] = []
    rows_of: deque = deque()

    def batches():
        pending: list[tuple] = []
        for row, crystal, table, record in _tabled(model, records):
            rows.append(row)
            if crystal is not None:
                pending.append((row, crystal, table, record))
            # a batch per batch_size input rows, error rows included (as predict_records batches)
            if len(rows) % batch_size == 0 and pending:
                rows_of.append([p[0] for p in pending])
                yield _record_batch(pending, label_names, energy)
                pending = []
        if pending:
            rows_of.append([p[0] for p in pending])
            yield _record_batch(pending, label_names, energy)

    metrics = _measure(model, batches(), objective, rows_of)
    for name in ("forces", "stress") if energy else ():
        if metrics[objective.metric_name(name)]["n"] == 0:
            del metrics[objective.metric_name(name)]
    return rows, {**metrics, **_property_metrics(model, rows)}


def _record_batch(pending: Sequence[tuple], label_names: Sequence[str], energy: bool):
    """Host :class:`cfdist.batch.CrystalBatch` of ``pending`` (row, crystal, table, record) with
    ``labels`` (B, len(label_names)) and, for an energy model, ``forces`` (N, 3) / ``stress``
    (B, 3, 3) labels as :func:`cfdist.shards.collate_arrow` fills them (eV/A, eV/A^3; NaN where a
    record has none)."""
    batch = collate([p[1] for p in pending], [p[2] for p in pending], target_names=list(label_names))
    if energy:
        forces, stress = [], []
        for _, crystal, _, record in pending:
            f, s = record.forces, record.stress
            forces.append(np.full((crystal.n_atoms, 3), np.nan) if f is None else np.asarray(f, np.float64))
            stress.append(np.full((3, 3), np.nan) if s is None else np.asarray(s, np.float64))
        batch.forces = torch.from_numpy(np.concatenate(forces))
        batch.stress = torch.from_numpy(np.stack(stress))
    return batch


def _property_metrics(model, rows: Sequence[Prediction]) -> dict:
    """An energy model's property targets, measured on the rows (no training objective measures
    them); {} for a property model (its targets are the shared evaluation's)."""
    if not model.config.energy or not model.config.target_names:
        return {}
    metrics = regression_metrics(rows, output_names(model))
    return {name: metrics[name] for name in model.config.target_names}


def row_counts(rows: Sequence[Prediction]) -> dict:
    """Rows, predicted, failed (split into file rows and record rows) and the summary in words,
    e.g. ``20 predicted; 5 failed (2 files, 3 records)``."""
    failed_files = sum(r.values is None and r.scope == "file" for r in rows)
    failed = sum(r.values is None for r in rows)
    failed_records = failed - failed_files
    summary = (f"{len(rows) - failed} predicted; {failed} failed ({failed_files} file{'s' * (failed_files != 1)}, "
               f"{failed_records} record{'s' * (failed_records != 1)})")
    return {"rows": len(rows), "predicted": len(rows) - failed, "failed": failed, "failed_files": failed_files,
            "failed_records": failed_records, "summary": summary}


def exit_status(counts: dict, file_errors: Sequence[str], strict: bool = False) -> int:
    """Exit status of ``cfdist predict`` / ``evaluate``: 1 when nothing was predicted or, with ``strict``,
    when any file or record failed; else 0. Prints the file errors and the verdict to stderr."""
    import sys

    for error in file_errors:
        print(f"input failed: {error}", file=sys.stderr)
    if not counts["predicted"]:
        print("error: nothing could be predicted (see the error_reason and error columns)", file=sys.stderr)
        return 1
    if strict and counts["failed"]:
        print(f"error (--strict): {counts['failed']} of {counts['rows']} rows failed", file=sys.stderr)
        return 1
    return 0


def _count(items) -> dict:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out
