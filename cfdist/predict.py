"""Prediction and evaluation with a portable checkpoint.

    cfdist predict  --checkpoint model.pt INPUT... [--out predictions.csv]
    cfdist evaluate --checkpoint model.pt --data SHARDS_OR_INPUTS [--split test] [--out DIR]

Inputs are anything the preprocessor reads (CIF files or directories, JARVIS / pymatgen JSON,
extxyz, ASE db). Tables are built with the checkpoint's cutoff. A structure that cannot be read
or fails validation gets a row with the reason instead of stopping the batch. Evaluation also
reads shard directories (their image tables are reused when their cutoff covers the model's).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from cfdist.fileio import atomic_write, write_json_atomic


@dataclass
class Prediction:
    """One output row: predictions (de-normalised) or the reason there are none."""

    id: str
    source: str
    values: list[float] | None
    labels: dict[str, float] = field(default_factory=dict)
    error_reason: str = ""
    error: str = ""


def iter_input_records(inputs: Sequence[str], fmt: str | None = None, chunk_size: int = 1024):
    """Raw records of every input, in order (see :mod:`cfdist.io.readers`), each with an id."""
    import dataclasses

    from cfdist.io.readers import default_id, expand_inputs, infer_format, plan_chunks, read_chunk

    paths = expand_inputs(list(inputs))
    if not paths:
        raise FileNotFoundError(f"no input structures found in {list(inputs)}")
    for path in paths:
        for chunk in plan_chunks(path, fmt or infer_format(path), chunk_size):
            for record in read_chunk(chunk):
                # records without an id get the one the preprocessor gives them (split files match)
                yield record if record.id else dataclasses.replace(record, id=default_id(chunk.path, record.index))


def predict_records(model, records: Iterable, batch_size: int = 64) -> Iterator[Prediction]:
    """Validate, build tables, batch and predict; failures become error rows (order kept)."""
    from cfdist.batch import collate
    from cfdist.crystal import InvalidCrystalError, validate
    from cfdist.geometry import image_table

    model.eval()
    device = model.embedding.weight.device
    pending: list[tuple[Prediction, object, object]] = []

    def flush():
        ok = [(row, c, t) for row, c, t in pending if c is not None]
        if ok:
            batch = collate([c for _, c, _ in ok], [t for _, _, t in ok]).to(device)
            with torch.no_grad():
                values = model.denormalize(model(batch)).double().cpu().tolist()
            for (row, _, _), v in zip(ok, values):
                row.values = v
        out = [row for row, _, _ in pending]
        pending.clear()
        return out

    for index, record in enumerate(records):
        row = Prediction(id=record.id, source=record.source, values=None, labels=dict(record.labels))
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
    from cfdist.data import iter_local_shards
    from cfdist.manifest import ShardSet
    from cfdist.shards import collate_arrow, target_columns

    shards = ShardSet(shard_dir)
    shards.verify([split], required_cutoff=model.cutoff, checksums=False)
    names = model.config.target_names
    device = model.embedding.weight.device
    model.eval()
    for table in iter_local_shards([e.path for e in shards.files(split)], rows_per_read=batch_size):
        have = set(target_columns(table.schema))
        labelled = [n for n in names if n in have]
        batch = collate_arrow(table, labelled or None, cutoff=shards.cutoff).to(device)
        with torch.no_grad():
            values = model.denormalize(model(batch)).double().cpu().tolist()
        labels = batch.labels.tolist() if batch.labels is not None else [[] for _ in values]
        sources = table["source"].to_pylist() if "source" in table.column_names else [str(shard_dir)] * len(values)
        for rid, src, v, y in zip(batch.ids, sources, values, labels):
            yield Prediction(id=rid, source=src, values=v, labels=dict(zip(labelled, y)))


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
    ``metrics.json``, ``predictions.csv`` and ``parity.png`` to ``out_dir``; returns the metrics."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(model.config.target_names)
    if len(data) == 1 and (Path(data[0]) / "manifest.json").is_file():
        rows = predict_shards(model, data[0], split, batch_size=max(batch_size, 128))
        source = {"shards": str(Path(data[0]).resolve()), "split": split}
    else:
        rows = predict_records(model, iter_input_records(data), batch_size=batch_size)
        source = {"inputs": [str(Path(d).resolve()) for d in data]}
    rows = write_predictions(rows, out_dir / "predictions.csv", names, with_labels=True)
    metrics = regression_metrics(rows, names)
    failed = [r for r in rows if r.values is None]
    result = {"targets": metrics, "n_structures": len(rows), "n_failed": len(failed),
              "failed_by_reason": _count(r.error_reason for r in failed), "data": source,
              "checkpoint": getattr(model, "checkpoint_info", {})}
    write_json_atomic(out_dir / "metrics.json", result)
    parity_plot(rows, names, metrics, out_dir / "parity.png")
    return result


def _count(items) -> dict:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out
