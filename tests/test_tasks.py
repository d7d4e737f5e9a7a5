"""Paper benchmark tasks: split rules, dataset download (offline, file:// URL), prepare-task on
local files in the published formats, and one config per task."""

from __future__ import annotations

import json
import math
import random
import sys
import zipfile

import pytest

from conftest import ray_env, run


def test_megnet_split_is_the_reference_rule():
    from cfdist.finetune.tasks import megnet_split

    split = megnet_split(69239)
    assert [len(split[s]) for s in ("train", "val", "test")] == [60000, 5000, 4239]
    ids = list(range(69239))
    random.seed(123)
    random.shuffle(ids)
    assert split["train"] == ids[:60000] and split["val"] == ids[-9239:-4239] and split["test"] == ids[-4239:]
    assert len(set().union(*map(set, split.values()))) == 69239
    with pytest.raises(ValueError, match="at least 69239"):
        megnet_split(1000)


@pytest.mark.parametrize("n, sizes", [(55723, (44578, 5572, 5572)), (18172, (14537, 1817, 1817)),
                                      (55370, (44296, 5537, 5537))])
def test_alignn_split_sizes_and_disjointness(n, sizes):
    from cfdist.finetune.tasks import alignn_split

    split = alignn_split(n)
    assert tuple(len(split[s]) for s in ("train", "val", "test")) == sizes
    assert not (set(split["train"]) & set(split["val"])) and not (set(split["val"]) & set(split["test"]))
    assert split == alignn_split(n)  # deterministic


def _dft3d_records(megnet_records, n):
    """Records in the dft_3d_2021 format built from real structures (some labels 'na')."""
    out = []
    for k, r in enumerate(megnet_records[:n]):
        rec = {"jid": f"JVASP-{k}", "atoms": r["atoms"], "formation_energy_peratom": r["e_form"],
               "optb88vdw_total_energy": r["e_form"] - 3.0, "optb88vdw_bandgap": r["gap pbe"] or 0.0,
               "mbj_bandgap": "na" if k % 3 else 1.0, "ehull": 0.01 * k}
        if k % 10 == 7:
            rec["optb88vdw_total_energy"] = "na"
        out.append(rec)
    return out


def test_task_split_filters_rows_without_finite_labels(megnet_slice_records):
    from cfdist.finetune.tasks import TASKS, alignn_split, task_split

    records = _dft3d_records(megnet_slice_records, 100)
    split = task_split(TASKS["jarvis_formation"], records)
    kept = [r["jid"] for r in records if r["optb88vdw_total_energy"] != "na"]
    assert len(kept) == 90
    expected = alignn_split(90)
    assert split == {s: [kept[i] for i in idx] for s, idx in expected.items()}
    mbj = task_split(TASKS["jarvis_mbj_bandgap"], records)
    assert sum(map(len, mbj.values())) == int(0.8 * 34) + 2 * int(0.1 * 34)


def test_download_over_a_url(tmp_path):
    from cfdist.finetune.tasks import download, load_records

    src = tmp_path / "src.zip"
    with zipfile.ZipFile(src, "w") as zf:
        zf.writestr("megnet.json", json.dumps([{"id": "a"}, {"id": "b"}]))
    dest = download(src.resolve().as_uri(), tmp_path / "raw" / "megnet.zip")
    assert dest.read_bytes() == src.read_bytes() and not list((tmp_path / "raw").glob("*.part"))
    assert load_records(dest, "megnet.json") == [{"id": "a"}, {"id": "b"}]
    assert download("file:///nonexistent/file.zip", dest) == dest  # present: not fetched again
    with pytest.raises(RuntimeError, match="--source"):
        download("file:///nonexistent/file.zip", tmp_path / "other.zip")


def test_every_task_has_a_config():
    from cfdist.finetune.config import load_finetune_config
    from cfdist.finetune.tasks import TASKS

    assert len(TASKS) == 9
    for name, task in TASKS.items():
        cfg = load_finetune_config(name)
        assert (cfg.data.targets, cfg.epochs, cfg.data.batch_size, cfg.task) == \
            ([task.target], task.epochs, task.batch_size, name)
        assert cfg.data.shards == f"data/{name}" and cfg.swa_epochs == 50


def _prepare(cluster, *args):
    """``cfdist prepare-task ARGS`` (its Ray Data preprocessing job runs on ``cluster``)."""
    return run([sys.executable, "-m", "cfdist.cli", "prepare-task", *args, "--workers", "1"], timeout=400,
               env=ray_env(cluster))


@pytest.mark.slow
def test_prepare_task_megnet_and_jarvis_from_local_files(megnet_records, tmp_path, ray_cluster):
    """The downloaded formats (megnet.json in a zip; dft_3d JSON) -> split file -> shards; every
    record is written or rejected with a reason (rows outside the split: not_in_split_file)."""
    from cfdist.manifest import ShardSet

    archive = tmp_path / "megnet.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("megnet.json", json.dumps(megnet_records[:60]))
    res = _prepare(ray_cluster, "megnet_bandgap", "--out", tmp_path / "mb", "--source", archive, "--sizes", 40, 10, 10)
    assert res.returncode == 0, res.stderr[-3000:]
    shards = ShardSet(tmp_path / "mb")
    assert shards.targets == ["gap pbe"]
    missing = sum(1 for r in megnet_records[:60] if r["gap pbe"] is None or not math.isfinite(r["gap pbe"]))
    assert sum(shards.n_rows(s) for s in ("train", "val", "test")) == 60 - missing
    split = json.loads((tmp_path / "mb_raw" / "split.json").read_text())
    assert [len(split[s]) for s in ("train", "val", "test")] == [40, 10, 10]

    records = _dft3d_records(megnet_records, 50)
    (tmp_path / "dft3d.json").write_text(json.dumps(records))
    res = _prepare(ray_cluster, "jarvis_formation", "--out", tmp_path / "jf", "--source", tmp_path / "dft3d.json")
    assert res.returncode == 0, res.stderr[-3000:]
    shards = ShardSet(tmp_path / "jf")
    assert [shards.n_rows(s) for s in ("train", "val", "test")] == [36, 4, 4]  # 45 finite rows, ALIGNN rule
    rejects = [json.loads(line) for line in (tmp_path / "jf" / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["reason"] for r in rejects) == ["not_in_split_file"] * 6  # 5 'na' rows + 1 unused by the rule
