"""The paper's nine benchmark tasks: where the data comes from, the exact split rules, and
``cfdist prepare-task`` (download -> split file -> shards).

    cfdist prepare-task megnet_eform --out data/megnet_eform            # downloads (needs internet)
    cfdist prepare-task megnet_eform --out data/megnet_eform --source megnet.json.zip   # a local copy
    cfdist finetune --config megnet_eform

Split rules (as the reference, Matformer and PotNet use them, so results compare like with like):

- ``jarvis__megnet`` (e_form, band gap): ``random.seed(123)``, shuffle ``list(range(n))`` of the
  69,239 records in file order; train = first 60,000, val = ids[-9,239:-4,239], test = last 4,239.
  Records whose label is missing are then skipped (rejected as ``missing_label``), as the
  reference skips None values.
- ``dft_3d_2021`` (ALIGNN rule): keep the rows whose task labels are finite floats (formation, total
  and OPT gap tasks require all three), then seed 123, n_train = int(0.8 n), n_val = n_test =
  int(0.1 n), val = ids[-(n_val + n_test):-n_test], test = last n_test.
- bulk / shear moduli: fixed by Matformer's pre-split files; pass them with ``--source-split
  train=FILE val=FILE test=FILE`` (any format the preprocessor reads).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import random
import sys
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from cfdist.config import CrystalformerConfig
from cfdist.fileio import atomic_write
from cfdist.io import iter_input_records
from cfdist.preprocess.job import Settings, build

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Dataset:
    name: str
    url: str | None          # None: no public download we can name; the user supplies the files
    member: str | None        # JSON file inside the downloaded zip
    id_key: str


DATASETS = {
    # jarvis-tools figshare table (jarvis.db.figshare.get_db_info): MP 2018.6.1 snapshot used by MEGNet
    "megnet": Dataset("megnet", "https://ndownloader.figshare.com/files/26724977", "megnet.json", "id"),
    "dft_3d_2021": Dataset("dft_3d_2021", "https://ndownloader.figshare.com/files/29204826",
                           "jdft_3d-8-18-2021.json", "jid"),
    "matformer_elastic": Dataset("matformer_elastic", None, None, "id"),
}

_DFT3D_COMMON = ("formation_energy_peratom", "optb88vdw_total_energy", "optb88vdw_bandgap")


@dataclass(frozen=True)
class Task:
    """One benchmark task: the label column, the dataset, the split rule and the paper's schedule."""

    name: str
    dataset: str
    target: str
    rule: str                     # "megnet" | "alignn" | "files"
    require_finite: tuple[str, ...] = ()
    sizes: tuple[int, int, int] | None = None   # published train/val/test sizes
    epochs: int = 500
    batch_size: int = 128
    unit: str = ""
    paper_mae: float | None = None


TASKS = {t.name: t for t in [
    Task("megnet_eform", "megnet", "e_form", "megnet", sizes=(60000, 5000, 4239), unit="eV/atom", paper_mae=0.0186),
    Task("megnet_bandgap", "megnet", "gap pbe", "megnet", sizes=(60000, 5000, 4239), unit="eV", paper_mae=0.198),
    Task("megnet_bulk", "matformer_elastic", "bulk_modulus", "files", sizes=(4664, 393, 393), unit="log GPa",
         paper_mae=0.0377),
    Task("megnet_shear", "matformer_elastic", "shear_modulus", "files", sizes=(4664, 392, 393), unit="log GPa",
         paper_mae=0.0689),
    Task("jarvis_formation", "dft_3d_2021", "formation_energy_peratom", "alignn", _DFT3D_COMMON,
         (44578, 5572, 5572), 800, 256, "eV/atom", 0.0306),
    Task("jarvis_total", "dft_3d_2021", "optb88vdw_total_energy", "alignn", _DFT3D_COMMON,
         (44578, 5572, 5572), 800, 256, "eV/atom", 0.0320),
    Task("jarvis_opt_bandgap", "dft_3d_2021", "optb88vdw_bandgap", "alignn", _DFT3D_COMMON,
         (44578, 5572, 5572), 800, 256, "eV", 0.128),
    Task("jarvis_mbj_bandgap", "dft_3d_2021", "mbj_bandgap", "alignn", ("mbj_bandgap",),
         (14537, 1817, 1817), 1600, 256, "eV", 0.274),
    Task("jarvis_ehull", "dft_3d_2021", "ehull", "alignn", ("ehull",), (44296, 5537, 5537), 800, 256, "eV", 0.0463),
]}


# ----------------------------------------------------------------------------- split rules
def shuffled_indices(n: int, seed: int = 123) -> list[int]:
    """``random.seed(seed); random.shuffle(list(range(n)))``: the reference's (and ALIGNN's) order."""
    ids = list(range(n))
    random.seed(seed)
    random.shuffle(ids)
    return ids


def megnet_split(n: int, sizes: Sequence[int] = (60000, 5000, 4239), seed: int = 123) -> dict[str, list[int]]:
    """Indices of the jarvis__megnet split: train = first n_train, val = ids[-(n_val+n_test):-n_test],
    test = last n_test of the seeded shuffle."""
    n_train, n_val, n_test = sizes
    if n < n_train + n_val + n_test:
        raise ValueError(f"megnet split needs at least {n_train + n_val + n_test} records, got {n}; "
                         f"pass sizes for a smaller file")
    ids = shuffled_indices(n, seed)
    return {"train": ids[:n_train], "val": ids[-(n_val + n_test):-n_test], "test": ids[-n_test:]}


def alignn_split(n: int, seed: int = 123, val_ratio: float = 0.1, test_ratio: float = 0.1) -> dict[str, list[int]]:
    """ALIGNN's rule: n_train = int(0.8 n), n_val = int(0.1 n), n_test = int(0.1 n) of the seeded shuffle."""
    n_train, n_val, n_test = int((1 - val_ratio - test_ratio) * n), int(val_ratio * n), int(test_ratio * n)
    ids = shuffled_indices(n, seed)
    return {"train": ids[:n_train], "val": ids[-(n_val + n_test):-n_test], "test": ids[-n_test:]}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def task_split(task: Task, records: Sequence[dict], sizes: Sequence[int] | None = None) -> dict[str, list[str]]:
    """ids per split for ``records`` (the dataset's JSON list, in file order)."""
    id_key = DATASETS[task.dataset].id_key
    if task.rule == "megnet":
        split = megnet_split(len(records), sizes or task.sizes)
        kept = records
    elif task.rule == "alignn":
        kept = [r for r in records if all(_finite(r.get(k)) for k in task.require_finite)]
        split = alignn_split(len(kept))
    else:
        raise ValueError(f"task {task.name}: split fixed by source files (use --source-split)")
    return {name: [str(kept[i][id_key]) for i in idx] for name, idx in split.items()}


# ----------------------------------------------------------------------------- data files
def download(url: str, dest: Path) -> Path:
    """Download ``url`` to ``dest`` (atomic; skipped when ``dest`` exists) with a progress bar."""
    from tqdm import tqdm

    if dest.is_file():
        return dest
    request = urllib.request.Request(url, headers={"User-Agent": "cfdist"})
    try:
        with atomic_write(dest) as tmp, urllib.request.urlopen(request, timeout=60) as response, \
                open(tmp, "wb") as fh:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}", file=sys.stderr) as bar:
                while chunk := response.read(1 << 20):
                    fh.write(chunk)
                    bar.update(len(chunk))
    except OSError as exc:
        raise RuntimeError(f"download of {url} failed ({exc}); on a machine without internet, fetch the file "
                           f"elsewhere and pass it with --source") from exc
    return dest


def load_records(path: Path, member: str | None = None) -> list[dict]:
    """A JSON list of records from ``.json``, ``.json.gz`` or a ``.zip`` holding one JSON file."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith(".json")]
            name = member if member in names else (names[0] if len(names) == 1 else None)
            if name is None:
                raise ValueError(f"{path}: expected one JSON file in the zip (or {member!r}), found {names}")
            with zf.open(name) as fh:
                data = json.load(io.TextIOWrapper(fh, encoding="utf-8"))
    elif path.suffix == ".gz":
        with gzip.open(path, "rt") as fh:
            data = json.load(fh)
    else:
        data = json.loads(path.read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def prepare_task(name: str, out: str | Path, *, source: str | Path | None = None,
                 source_split: dict[str, str] | None = None, sizes: Sequence[int] | None = None,
                 cutoff: float | None = None, shard_size: int = 4096, workers: int | None = None) -> dict:
    """Download (or read ``source``), write ``out/split.json`` with the task's rule, and preprocess
    into ``out/`` (shards + manifest + rejects). Returns the manifest."""

    if name not in TASKS:
        raise SystemExit(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    task, out = TASKS[name], Path(out)
    dataset = DATASETS[task.dataset]
    cutoff = cutoff or CrystalformerConfig.from_yaml("crystalformer").cutoff
    raw = out.parent / f"{out.name}_raw"
    raw.mkdir(parents=True, exist_ok=True)
    if task.rule == "files":
        if not source_split or set(source_split) != set(SPLITS):
            raise SystemExit(f"task {name}: the split is fixed by Matformer's pre-split files; pass "
                             f"--source-split train=FILE val=FILE test=FILE")
        split_ids, inputs = {}, []

        for split in SPLITS:
            split_ids[split] = [record.id for record in iter_input_records([source_split[split]])]
            inputs.append(source_split[split])
    else:
        if source is None:
            if dataset.url is None:
                raise SystemExit(f"task {name}: no download URL known; pass --source FILE")
            source = download(dataset.url, raw / f"{dataset.name}.zip")
        if sizes is not None and task.rule != "megnet":
            raise SystemExit(f"task {name}: --sizes applies to the MEGNet rule only ({task.rule} rule here)")
        source = Path(source)
        records = load_records(source, dataset.member)
        split_ids = task_split(task, records, sizes)
        # the reader streams plain JSON, so a zip is unpacked once, keyed by the archive's identity
        stat = source.stat()
        key = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        flat = raw / f"{dataset.name}-{key}.json.gz"
        if zipfile.is_zipfile(source):
            if not flat.is_file():
                with atomic_write(flat) as tmp, gzip.open(tmp, "wt") as fh:
                    json.dump(records, fh)
            inputs = [str(flat)]
        else:
            inputs = [str(source)]
    split_file = raw / "split.json"
    split_file.write_text(json.dumps(split_ids))
    print(f"{name}: split {', '.join(f'{s} {len(v):,}' for s, v in split_ids.items())}"
          + (f" (published: {'/'.join(map(str, task.sizes))})" if task.sizes else ""), flush=True)
    settings = Settings(cutoff=cutoff, targets=[task.target], split_file=str(split_file.resolve()),
                        shard_size=shard_size)
    return build(inputs, out, settings, workers=workers)
