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
from cfdist.run.objective import PropertyObjective
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

    for index, record in enumerate(records):
        row = Prediction(id=record.id, source=record.source, values=None, labels=dict(record.labels),
                         scope="file" if isinstance(record, FileError) else "record")
        if record.crystal is None:
            row.error_reason, row.error = record.error_reason or "unparseable", record.error or "unreadable"
            pending.append((row, None, None))
        else:
            try:
                crystal = validate(record.crystal)
                table = image_table(crystal.lattice, crystal.positions, model.cutoff)
                pending.append((row, crystal, table))
            except InvalidCrystalError as exc:
                row.error_reason, row.error = exc.reason, exc.detail
                pending.append((row, None, None))
        if len(pending) >= batch_size:
            yield from flush()
    yield from flush()


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
    if not model.config.energy:
        return model.denormalize(model(batch)).double().cpu().tolist()
    out = model(batch)
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


def parity_plot(rows: Sequence[Prediction], target_names: Sequence[str], metrics: dict, path: str | Path) -> Path:
    """One parity panel per target (predicted vs true) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(target_names)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.0), squeeze=False)
    for k, name in enumerate(target_names):
        ax = axes[0][k]
        pairs = [(r.labels[name], r.values[k]) for r in rows
                 if r.values is not None and name in r.labels and math.isfinite(r.labels[name])]
        if pairs:
            true, pred = np.array(pairs).T
            lo, hi = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
            ax.plot([lo, hi], [lo, hi], color="0.6", lw=1)
            ax.scatter(true, pred, s=6, alpha=0.6)
            m = metrics[name]
            ax.set_title(f"{name}: MAE {m['mae']:.4g}, R² {m['r2']:.3f} (n={m['n']})" if m["r2"] is not None
                         else f"{name}: MAE {m['mae']:.4g} (n={m['n']})", fontsize=9)
        ax.set_xlabel(f"true {name}")
        ax.set_ylabel(f"predicted {name}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def evaluate(model, data: Sequence[str], out_dir: str | Path, split: str = "test", batch_size: int = 64) -> dict:
    """Predict ``data`` (one shard directory, or raw inputs with labels) and write
    ``metrics.json``, ``predictions.csv`` and ``parity.png`` to ``out_dir``; returns the metrics (and
    :func:`row_counts` under ``counts``). Raw inputs that cannot be read give error rows (see
    :func:`iter_input_records` with ``on_error="row"``), listed under ``failed_inputs``.

    A property model on a shard split that holds its targets is measured by
    :func:`cfdist.run.evaluation.evaluate`, the evaluation of the training loops' validation and
    fine-tuning's test split, so the numbers agree with theirs; raw inputs (rows with error
    reasons) and energy models' output columns are measured on the written rows."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = output_names(model)
    shared: dict | None = None
    if len(data) == 1 and storage.is_file(storage.join(data[0], "manifest.json")):  # also s3:// / gs://
        source = {"shards": storage.absolute(data[0]), "split": split}
        if _shard_targets_cover(model, data[0], split):
            rows, shared = _evaluate_shards(model, data[0], split, batch_size=max(batch_size, 128))
        else:
            rows = predict_shards(model, data[0], split, batch_size=max(batch_size, 128))
    else:
        rows = predict_records(model, iter_input_records(data, on_error="row"), batch_size=batch_size)
        source = {"inputs": [storage.absolute(d) for d in data]}
    rows = write_predictions(rows, out_dir / "predictions.csv", names, with_labels=True)
    metrics = shared if shared is not None else regression_metrics(rows, names)
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
    parity_plot(rows, names, metrics, out_dir / "parity.png")
    return {**result, "counts": counts}


def _shard_targets_cover(model, shard_dir: str | Path, split: str) -> bool:
    """Whether ``model`` is a property model whose every target is a label column of ``split``."""
    files = ShardSet(shard_dir).files(split)
    if model.config.energy or not files:
        return False
    return set(model.config.target_names) <= set(target_columns(read_schema(files[0].path)))


def _evaluate_shards(model, shard_dir: str | Path, split: str, batch_size: int) -> tuple[list[Prediction], dict]:
    """(prediction rows, per-target metrics) of a property model on a shard split, through the
    shared evaluation (:mod:`cfdist.run.evaluation`; micro-batches of at most ``batch_size``
    structures within the default entry budget)."""
    shards = ShardSet(shard_dir)
    shards.verify([split], required_cutoff=model.cutoff, checksums=False)
    targets = list(model.config.target_names)
    objective = PropertyObjective(targets)
    schema = read_schema(shards.files(split)[0].path)
    columns = training_columns(schema, targets) + (["source"] if "source" in schema.names else [])
    budget = BatchBudget(max_structures=batch_size)
    sources: deque = deque()
    rows: list[Prediction] = []

    def batches():
        for table in pack_rows(evaluation.split_tables(shards, split, columns), budget):
            names = table["source"].to_pylist() if "source" in table.column_names else None
            sources.append(names or [str(shard_dir)] * table.num_rows)
            yield collate_arrow(table, targets, cutoff=shards.cutoff)

    def keep(batch, out) -> None:
        values = model.denormalize(out).double().cpu().tolist()
        labels = batch.labels.double().cpu().tolist()
        for rid, src, v, y in zip(batch.ids, sources.popleft(), values, labels):
            rows.append(Prediction(id=rid, source=src, values=v, labels=dict(zip(targets, y))))

    device = model.embedding.weight.device
    totals = evaluation.evaluate(model, batches(), objective, device, on_output=keep)
    return rows, evaluation.target_report(objective, totals)


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
