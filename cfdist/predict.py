"""Prediction and evaluation with a portable checkpoint.

    cfdist predict  --checkpoint model.pt INPUT... [--out predictions.csv]
    cfdist evaluate --checkpoint model.pt --data SHARDS_OR_INPUTS [--split test] [--out DIR]

Inputs are anything the preprocessor reads (CIF files or directories, JARVIS / pymatgen JSON,
extxyz, ASE db). Tables are built with the checkpoint's cutoff. A structure that cannot be read
or fails validation gets a row with the reason instead of stopping the batch; so does an input
file that cannot be found, opened or recognised (one row naming the file, reason in
:data:`FILE_REASONS`), and a JSON list or JSON-lines file cut short gives its complete records and
one ``truncated`` row for the rest. Evaluation also reads shard directories (their image tables are
reused when their cutoff covers the model's).
"""

from __future__ import annotations

import csv
import glob
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from cfdist.fileio import atomic_write, write_json_atomic
from cfdist.io import readers
from cfdist.io.readers import RawRecord


@dataclass
class Prediction:
    """One output row: predictions (de-normalised) or the reason there are none.

    ``scope`` is ``"record"`` for a structure, ``"file"`` for an input that could not be read (at all,
    or past a cut: ``error_reason`` one of :data:`FILE_REASONS`; ``source`` is the path).
    """

    id: str
    source: str
    values: list[float] | None
    labels: dict[str, float] = field(default_factory=dict)
    error_reason: str = ""
    error: str = ""
    scope: str = "record"


# Why a whole input (or the rest of one) gave no records.
FILE_REASONS = ("not_found", "permission_denied", "unknown_format", "unreadable_file", "truncated", "empty")


@dataclass
class FileError(RawRecord):
    """An input (or the rest of one) that yields no records: ``source`` is its path, ``id`` its file
    name, ``index`` -1, ``error_reason`` one of :data:`FILE_REASONS`."""


def file_error(path: str, reason: str, detail: str) -> FileError:
    """The error record for an input that cannot be read; the message starts with the path and reason."""
    name = os.path.basename(os.path.normpath(path)) or path
    return FileError(source=path, index=-1, id=name, crystal=None, labels={}, error_reason=reason,
                     error=f"{path}: {reason}: {detail}")


def iter_input_records(inputs: Sequence[str], fmt: str | None = None, chunk_size: int = 1024,
                       on_error: str = "raise"):
    """Raw records of every input, in order (see :mod:`cfdist.io.readers`), each with an id.

    A record that cannot be read is an error record either way. An input that cannot be found,
    opened, recognised or planned: ``on_error="raise"`` raises (as the preprocessor does);
    ``on_error="row"`` yields one file error record for it instead (``error_reason`` in
    :data:`FILE_REASONS`, ``source`` the path, ``id`` the file name) and goes on with the other
    inputs. With ``"row"`` a JSON list or JSON-lines input that is cut short yields its complete
    records and then one ``truncated`` file error for the rest.
    """
    if on_error not in ("raise", "row"):
        raise ValueError(f"on_error must be 'raise' or 'row', got {on_error!r}")
    if on_error == "raise":
        paths = readers.expand_inputs(list(inputs))
        if not paths:
            raise FileNotFoundError(f"no input structures found in {list(inputs)}")
        for path in paths:
            for chunk in readers.plan_chunks(path, fmt or readers.infer_format(path), chunk_size):
                yield from _with_ids(chunk.path, readers.read_chunk(chunk))
        return
    for path, problem in _expand_each(inputs):
        if problem is not None:
            yield problem
        else:
            yield from _read_input(path, fmt, chunk_size)


def _with_ids(path: str, records: Iterable[RawRecord]) -> Iterator[RawRecord]:
    """Records without an id get the one the preprocessor gives them (split files match)."""
    import dataclasses

    for record in records:
        yield record if record.id else dataclasses.replace(record, id=readers.default_id(path, record.index))


def _expand_each(inputs: Sequence[str]) -> list[tuple[str, FileError | None]]:
    """(path, None) for every input found, (the pattern's path, file error) for a pattern that gives
    none; sorted by path as :func:`cfdist.io.readers.expand_inputs` sorts."""
    found: dict[str, FileError | None] = {}
    for pattern in inputs:
        try:
            for path in readers.expand_inputs([pattern]):
                found[path] = None
        except FileNotFoundError as exc:
            path = os.path.abspath(os.path.expanduser(os.fspath(pattern)))
            found.setdefault(path, _pattern_error(path, exc, glob.has_magic(path) and bool(glob.glob(path))))
    return sorted(found.items())


def _pattern_error(path: str, exc: Exception, matched: bool) -> FileError:
    """Why an input pattern gave no input: a broken link, an unreadable or empty directory, a glob
    matching no file of a known format (``matched``), nothing there."""
    if os.path.islink(path) and not os.path.exists(path):
        return file_error(path, "not_found", f"broken symbolic link (to {os.readlink(path)!r})")
    if os.path.isdir(path):
        if not os.access(path, os.R_OK | os.X_OK):
            return file_error(path, "permission_denied", "directory cannot be listed (permission denied)")
        files = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, names in os.walk(path)
                       for f in names if not f.startswith("."))
        known = f"{readers.ID_PROP} or files ending in {', '.join(readers.KNOWN_SUFFIXES)}"
        if not files:
            return file_error(path, "empty", f"directory holds no files (looked for {known})")
        return file_error(path, "unknown_format", f"directory holds no structure files: {len(files)} file(s) "
                          f"({', '.join(files[:5])}{', ...' if len(files) > 5 else ''}), none is {known}")
    return file_error(path, "unknown_format" if matched else "not_found", str(exc))


def _read_input(path: str, fmt: str | None, chunk_size: int) -> Iterator[RawRecord]:
    """Records of one input; whatever stops the input becomes one file error (after the records before it)."""
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        yield file_error(path, "empty", "the file is empty (0 bytes)")
        return
    is_json = readers.is_json_input(path) and fmt in (None, "jarvis", "pymatgen")
    if is_json and readers.json_lines_cut(path):  # read_chunk would reject the cut line as a record
        yield from _read_cut_json(path, fmt, chunk_size, None)
        return
    try:
        chunks = readers.plan_chunks(path, fmt or readers.infer_format(path), chunk_size)
    except Exception as exc:  # noqa: BLE001 - one input must not stop the others
        if is_json and not isinstance(exc, (FileNotFoundError, PermissionError)):
            yield from _read_cut_json(path, fmt, chunk_size, exc)  # a cut list still holds records; "[]" is empty
        else:
            yield file_error(path, _file_reason(exc), _message(exc, path))
        return
    if not chunks:
        yield file_error(path, "empty", "the input holds no structures")
        return
    n = 0
    try:
        for chunk in chunks:
            for record in _with_ids(chunk.path, readers.read_chunk(chunk)):
                yield record
                n += 1
    except Exception as exc:  # noqa: BLE001 - read_chunk raises only when the input cannot be opened
        yield file_error(path, _file_reason(exc), _message(exc, path) + (f" (after {n} record(s))" if n else ""))


def _read_cut_json(path: str, fmt: str | None, chunk_size: int,
                   planning_error: Exception | None) -> Iterator[RawRecord]:
    """Records of a JSON input planning refused, up to where its data stops; then one file error."""
    n = 0
    try:
        for record in _with_ids(path, readers.read_json_prefix(path, fmt, chunk_size)):
            yield record
            n += 1
    except readers.TruncatedInputError as exc:
        yield file_error(path, "truncated", exc.detail)
    except Exception as exc:  # noqa: BLE001
        # not a cut list: planning's message is the familiar one unless records came first
        shown = planning_error if planning_error is not None and not n and not isinstance(
            exc, (readers.UnknownFormatError, PermissionError)) else exc
        yield file_error(path, _file_reason(shown), _message(shown, path))
    else:
        if not n:
            yield file_error(path, "empty", "the input holds no structures")


def _file_reason(exc: Exception) -> str:
    if isinstance(exc, PermissionError) or isinstance(exc.__cause__, PermissionError):
        return "permission_denied"
    if isinstance(exc, FileNotFoundError):
        return "not_found"
    if isinstance(exc, readers.UnknownFormatError):
        return "unknown_format"
    if isinstance(exc, readers.TruncatedInputError):
        return "truncated"
    return "unreadable_file"


def _message(exc: Exception, path: str) -> str:
    """The exception's message, without a leading copy of the path (the row's message starts with it)."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror and exc.filename else str(exc)
    for prefix in (f"{path}: ", f"{path!r}: ", f"{path}:"):
        if text.startswith(prefix):
            text = text[len(prefix):].lstrip()
    return text if isinstance(exc, (OSError, ValueError)) else f"{type(exc).__name__}: {text}"


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
    from cfdist.data import iter_local_shards
    from cfdist.manifest import ShardSet
    from cfdist.shards import collate_arrow, target_columns

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
    if len(data) == 1 and (Path(data[0]) / "manifest.json").is_file():
        source = {"shards": str(Path(data[0]).resolve()), "split": split}
        if _shard_targets_cover(model, data[0], split):
            rows, shared = _evaluate_shards(model, data[0], split, batch_size=max(batch_size, 128))
        else:
            rows = predict_shards(model, data[0], split, batch_size=max(batch_size, 128))
    else:
        rows = predict_records(model, iter_input_records(data, on_error="row"), batch_size=batch_size)
        source = {"inputs": [str(Path(d).resolve()) for d in data]}
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
    import pyarrow.parquet as pq

    from cfdist.manifest import ShardSet
    from cfdist.shards import target_columns

    files = ShardSet(shard_dir).files(split)
    if model.config.energy or not files:
        return False
    return set(model.config.target_names) <= set(target_columns(pq.read_schema(files[0].path)))


def _evaluate_shards(model, shard_dir: str | Path, split: str, batch_size: int) -> tuple[list[Prediction], dict]:
    """(prediction rows, per-target metrics) of a property model on a shard split, through the
    shared evaluation (:mod:`cfdist.run.evaluation`; micro-batches of at most ``batch_size``
    structures within the default entry budget)."""
    from collections import deque

    from cfdist.data import BatchBudget, pack_rows, training_columns
    from cfdist.manifest import ShardSet
    from cfdist.run import evaluation
    from cfdist.run.objective import PropertyObjective
    from cfdist.shards import collate_arrow

    import pyarrow.parquet as pq

    shards = ShardSet(shard_dir)
    shards.verify([split], required_cutoff=model.cutoff, checksums=False)
    targets = list(model.config.target_names)
    objective = PropertyObjective(targets)
    schema = pq.read_schema(shards.files(split)[0].path)
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
