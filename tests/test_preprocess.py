"""The Ray preprocessing stage: shards, manifest accounting, rejects, splits, resume, stale cache, job submit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cfdist.geometry import image_table
from cfdist.shards import arrow_to_crystals, collate_arrow, read_shard

from conftest import ENV, build_shards, ray_env, run
from paths import EXAMPLE_DATA, require
from paths import ROOT as REPO  # noqa: E402
SCRIPT = REPO / "preprocess" / "build_shards.py"


@pytest.fixture(scope="module")
def ray_session():
    import ray

    # address="local": a new instance of this process's own, never the session's Ray cluster (conftest)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
             object_store_memory=256 * 1024**2)
    yield ray
    ray.shutdown()


def run_build(ray_session, inputs, out, **overrides):
    from cfdist.preprocess.job import Settings, build

    settings = Settings(**{"cutoff": 8.9095, "targets": ["e_form"], "shard_size": 16, **overrides})
    return build([str(p) for p in inputs], out, settings, workers=2)


def cli(*args, timeout=240, **kwargs):
    """``preprocess/build_shards.py ARGS`` (a Ray Data job on a Ray instance of its own)."""
    return run([sys.executable, SCRIPT, *args], timeout, **kwargs)


@pytest.fixture(scope="module")
def slice_file(tmp_path_factory, megnet_records):
    path = tmp_path_factory.mktemp("raw") / "slice.json"
    path.write_text(json.dumps(megnet_records[:60]))
    return path


def test_round_trip_tables_and_manifest(ray_session, slice_file, megnet_records, tmp_path):
    split = {"train": [r["id"] for r in megnet_records[:40]], "val": [r["id"] for r in megnet_records[40:50]],
             "test": [r["id"] for r in megnet_records[50:60]]}
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps(split))
    out = tmp_path / "shards"
    manifest = run_build(ray_session, [slice_file], out, split_file=str(split_file))
    assert manifest["n_input"] == 60 and manifest["n_written"] == 60 and manifest["n_rejected"] == 0
    # regression: the manifest's content hash is the build's (it was once the last shard's sha256)
    plan = json.loads((out / ".progress" / "plan.json").read_text())
    assert manifest["content_hash"] == plan["content_hash"]
    assert manifest["content_hash"] not in {s["sha256"] for s in manifest["shards"]}
    assert manifest["splits"] == {"train": 40, "val": 10, "test": 10}
    by_id = {r["id"]: r for r in megnet_records[:60]}
    seen = []
    for shard in manifest["shards"]:
        path = out / shard["file"]
        assert path.parent.name == shard["split"] and path.stat().st_size == shard["bytes"]
        table = read_shard(path)
        assert table.num_rows == shard["rows"]
        crystals, tables = arrow_to_crystals(table)
        for crystal, table_ in zip(crystals, tables):
            assert crystal.id in split[shard["split"]]
            direct = image_table(crystal.lattice, crystal.positions, manifest["cutoff"])
            np.testing.assert_array_equal(table_.i, direct.i)
            np.testing.assert_array_equal(table_.n, direct.n)
            assert crystal.labels["e_form"] == by_id[crystal.id]["e_form"]
            seen.append(crystal.id)
        batch = collate_arrow(table, ["e_form"])
        assert batch.n_crystals == table.num_rows
    assert sorted(seen) == sorted(by_id)
    stats = manifest["statistics"]
    train_y = np.array([by_id[i]["e_form"] for i in split["train"]])
    assert stats["targets"]["e_form"]["train"]["mean"] == pytest.approx(train_y.mean())
    assert stats["targets"]["e_form"]["train"]["std"] == pytest.approx(train_y.std())
    assert sum(stats["atoms_histogram"]["counts"]) == 60
    assert sum(stats["element_counts"].values()) == stats["total_atoms"]
    assert set(stats["reference_per_element"]["e_form"]) <= set(stats["element_counts"])
    assert (out / "rejects.jsonl").read_text() == ""


def bad_records(good):
    """One bad record per reason, each built from a real record."""
    def variant(i, **atoms_changes):
        rec = json.loads(json.dumps(good[i]))
        rec["id"] = f"bad-{i}"
        rec["atoms"].update(atoms_changes)
        return rec

    base = good[0]
    bad = {
        "unparseable": {"id": "bad-unparseable", "e_form": 1.0},
        "non_finite": variant(1, coords=[[float("nan"), 0, 0]] + good[1]["atoms"]["coords"][1:]),
        "small_volume": variant(2, lattice_mat=[[1, 0, 0], [2, 0, 0], [0, 0, 1]]),
        "overlapping_atoms": variant(3, coords=[good[3]["atoms"]["coords"][0]] * len(good[3]["atoms"]["coords"])),
        "bad_element": variant(4, elements=["Es"] * len(good[4]["atoms"]["elements"])),
        "empty": variant(5, coords=[], elements=[]),
        "missing_label": {**variant(6), "e_form": None},
        "non_finite_label": {**variant(7), "e_form": float("inf")},
        "duplicate_id": {**json.loads(json.dumps(base))},
    }
    bad["unknown_symbol"] = variant(8, elements=["Xx"] * len(good[8]["atoms"]["elements"]))
    return bad


def test_in_process_build_writes_what_the_ray_build_writes(ray_session, megnet_records, tmp_path):
    """``build(in_process=True)`` (what the test fixtures use: no Ray) plans, processes and finalizes
    two inputs into byte-identical shards and the same manifest as the Ray Data build."""
    from cfdist.preprocess.job import Settings, build

    inputs = [tmp_path / "a.json", tmp_path / "b.json"]
    inputs[0].write_text(json.dumps(megnet_records[:20]))
    inputs[1].write_text(json.dumps(megnet_records[20:40]))
    settings = Settings(cutoff=8.9095, targets=["e_form"], shard_size=8)
    ray_manifest = build([str(p) for p in inputs], tmp_path / "ray", settings, workers=2)
    here = build([str(p) for p in inputs], tmp_path / "here", settings, in_process=True)
    assert here["n_written"] == ray_manifest["n_written"] == 40
    strip = lambda m: {k: v for k, v in m.items() if k not in ("created", "inputs")}  # noqa: E731
    assert strip(here) == strip(ray_manifest)
    assert [s["sha256"] for s in here["shards"]] == [s["sha256"] for s in ray_manifest["shards"]]


def test_bad_records_are_accounted_with_reasons(ray_session, megnet_records, megnet_slice_records, tmp_path):
    good = megnet_records[:30]
    bad = bad_records(good)
    big = sorted(megnet_slice_records[:400], key=lambda r: len(r["atoms"]["elements"]))[-1]
    bad["table_too_large"] = {**json.loads(json.dumps(big)), "id": "bad-big"}
    records = good[:15] + list(bad.values()) + good[15:]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(records))  # NaN / Infinity as JSON extensions, like real dumps
    n_big_entries = len(image_table(np.array(big["atoms"]["lattice_mat"]),
                                    np.array(big["atoms"]["coords"]) @ np.array(big["atoms"]["lattice_mat"]), 8.9095))
    manifest = run_build(ray_session, [path], tmp_path / "out", max_entries=n_big_entries - 1, shard_size=7)
    assert manifest["n_input"] == len(records)
    assert manifest["n_input"] == manifest["n_written"] + manifest["n_rejected"]
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == manifest["n_rejected"] == len(bad)
    got = {r["id"]: r["reason"] for r in rejects}
    expected = {"bad-unparseable": "unparseable", "bad-1": "non_finite", "bad-2": "small_volume",
                "bad-3": "overlapping_atoms", "bad-4": "bad_element", "bad-5": "empty",
                "bad-6": "missing_label", "bad-7": "non_finite_label", good[0]["id"]: "duplicate_id",
                "bad-8": "bad_element", "bad-big": "table_too_large"}
    assert got == expected
    for r in rejects:
        assert r["source"].startswith(str(path)) and r["message"]
    dup = next(r for r in rejects if r["reason"] == "duplicate_id")
    assert dup["source"] == f"{path}:{15 + list(bad).index('duplicate_id')}"  # the later occurrence is rejected
    assert len(manifest["rejected_by_reason"]) == 10
    assert_manifest_matches_files(manifest, tmp_path / "out")


def assert_manifest_matches_files(manifest, out):
    """Checksums and statistics (summed per chunk by the workers, recomputed for chunks that lost
    duplicates) equal a fresh pass over the final shard files."""
    import hashlib

    import pyarrow.parquet as pq

    from cfdist.preprocess.statistics import StatsAccumulator

    fresh = StatsAccumulator(manifest["targets"])
    for shard in manifest["shards"]:
        path = out / shard["file"]
        assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert shard["bytes"] == path.stat().st_size and shard["rows"] == pq.read_metadata(path).num_rows
        fresh.add(shard["split"], pq.read_table(path))
    expected, got = fresh.summary(), manifest["statistics"]
    for key in ("element_counts", "atoms_histogram", "entries_histogram", "total_atoms", "total_entries"):
        assert got[key] == expected[key], key
    for split, moments in expected["targets"]["e_form"].items():
        assert got["targets"]["e_form"][split] == pytest.approx(moments, rel=1e-12)
    for z, value in expected["reference_per_element"]["e_form"].items():
        assert got["reference_per_element"]["e_form"][z] == pytest.approx(value, rel=1e-6, abs=1e-9)


def test_hash_splits_are_deterministic_and_follow_fractions(ray_session, slice_file, tmp_path):
    m1 = run_build(ray_session, [slice_file], tmp_path / "a", split_fractions=[0.5, 0.25, 0.25])
    m2 = run_build(ray_session, [slice_file], tmp_path / "b", split_fractions=[0.5, 0.25, 0.25], shard_size=50)
    ids = {}
    for m, root in ((m1, tmp_path / "a"), (m2, tmp_path / "b")):
        ids[root.name] = {s["split"]: set() for s in m["shards"]}
        for s in m["shards"]:
            ids[root.name][s["split"]] |= set(read_shard(root / s["file"], ["id"])["id"].to_pylist())
    assert ids["a"] == ids["b"]  # independent of chunking
    assert 15 <= m1["splits"]["train"] <= 45 and sum(m1["splits"].values()) == 60


def test_stale_output_is_refused_and_rerun_reuses_work(ray_session, slice_file, tmp_path):
    out = tmp_path / "shards"
    first = run_build(ray_session, [slice_file], out)
    mtimes = {s["file"]: (out / s["file"]).stat().st_mtime_ns for s in first["shards"]}
    again = run_build(ray_session, [slice_file], out)  # nothing to do: same manifest, no shard rewritten
    assert again == first
    assert mtimes == {s["file"]: (out / s["file"]).stat().st_mtime_ns for s in again["shards"]}
    from cfdist.preprocess.splits import BuildError

    with pytest.raises(BuildError, match="--overwrite"):
        run_build(ray_session, [slice_file], out, cutoff=6.0)
    from cfdist.preprocess.job import Settings, build

    manifest = build([str(slice_file)], out, Settings(cutoff=6.0, targets=["e_form"], shard_size=16), overwrite=True)
    assert manifest["cutoff"] == 6.0 and manifest["content_hash"] != first["content_hash"]
    assert all(read_shard(out / s["file"]).schema.metadata for s in manifest["shards"])


@pytest.mark.slow
def test_kill_minus_nine_then_resume_gives_the_same_manifest(megnet_slice_records, tmp_path, ray_cluster):
    """The job's driver killed with SIGKILL mid-way, then the same command again: it resumes from the
    chunks already written and ends with the manifest of an uninterrupted build. Both commands run on
    the session's Ray cluster (conftest; a Ray instance of their own cost each ~5-10 s of start-up
    on 2 cores): the driver's death ends the job's tasks there (at most the chunk in flight, one
    worker, still lands, hence the n_done + 1 below)."""
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps(megnet_slice_records[:240]))
    args = [raw, "--targets", "e_form", "--shard-size", "8", "--workers", "1", "--cutoff", "8.9095"]
    # the uninterrupted reference: the same build in this process (the same files: test_in_process_build_...)
    build_shards([raw], tmp_path / "full", ["e_form"], shard_size=8, cutoff=8.9095)

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args), "--out", str(out)],
                            env={**ENV, **ray_env(ray_cluster)}, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    progress = out / ".progress"
    while time.time() < deadline:
        done = list(progress.glob("chunk-*.json")) if progress.exists() else []
        if len(done) >= 4:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    n_done = len(list(progress.glob("chunk-*.json")))
    assert 4 <= n_done < 30, n_done  # killed mid-way
    assert not (out / "manifest.json").exists()

    resumed = cli(*args, "--out", out, env=ray_env(ray_cluster))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{n_done} already done" in resumed.stderr or f"{n_done + 1} already done" in resumed.stderr
    full = json.loads((tmp_path / "full" / "manifest.json").read_text())
    again = json.loads((out / "manifest.json").read_text())
    assert again == full
    assert (out / "rejects.jsonl").read_text() == (tmp_path / "full" / "rejects.jsonl").read_text()


def test_cli_errors_are_clear(tmp_path, slice_file):
    missing = cli(tmp_path / "nothing-*.json", "--out", tmp_path / "o")
    assert missing.returncode == 2 and "nothing-*.json" in missing.stderr
    bad_split = tmp_path / "split.json"
    bad_split.write_text(json.dumps({"training": ["mp-1"]}))
    res = cli(slice_file, "--out", tmp_path / "o2", "--split-file", bad_split)
    assert res.returncode == 2 and "unknown split name" in res.stderr
    res = cli(slice_file, "--out", tmp_path / "o3", "--split-fractions", "0.5", "0.5", "0.5")
    assert res.returncode == 2 and "summing to 1" in res.stderr
    good_split = tmp_path / "good_split.json"
    good_split.write_text(json.dumps({"train": ["mp-1"]}))
    res = cli(slice_file, "--out", tmp_path / "o4", "--split-file", good_split, "--split-group", "composition")
    assert res.returncode == 2 and "--split-group and --split-file cannot be combined" in res.stderr
    res = cli(slice_file, "--out", tmp_path / "o5", "--split-group", "traj")
    assert res.returncode == 2 and "expected meta:NAME" in res.stderr


@pytest.mark.parametrize("key,target,extra", [
    ("cif", "target", {}),
    ("extxyz", "energy", {"with_forces": True, "with_stress": True}),
    ("ase_db", "e_form", {"with_forces": True}),
    ("pmg_cse", "e_form", {}),
    ("pmg_wrapped_jsonl", "e_form", {}),
    ("jarvis_jsonl_gz", "e_form", {}),
])
def test_every_input_format_builds_shards(ray_session, megnet_records, tmp_path, key, target, extra):
    from raw_formats import write_all_formats

    files = write_all_formats(tmp_path, megnet_records[:12])
    out = tmp_path / "out"
    manifest = run_build(ray_session, [files[key]], out, targets=[target], shard_size=5, **extra)
    assert manifest["n_input"] == 12 and manifest["n_written"] == 12, manifest["rejected_by_reason"]
    table = read_shard(out / manifest["shards"][0]["file"])
    if extra.get("with_forces"):
        forces = table["forces"].to_pylist()
        assert all(f is not None and len(f) == 3 * n for f, n in zip(forces, table["n_atoms"].to_pylist()))
    if extra.get("with_stress"):
        assert all(s is not None and len(s) == 9 for s in table["stress"].to_pylist())
    assert np.isfinite(table[f"y.{target}"].to_numpy()).all()


def test_skewed_basis_is_stored_reduced_with_identical_predictions(ray_session, megnet_records, tmp_path):
    import torch

    from cfdist import Crystalformer
    from cfdist.crystal import from_jarvis

    rec = json.loads(json.dumps(megnet_records[3]))
    lattice = np.array(rec["atoms"]["lattice_mat"])
    skewed = np.array([[1, 0, 0], [60, 1, 0], [0, 0, 1]]) @ lattice  # same lattice, translations up to ~60
    cart = np.array(rec["atoms"]["coords"]) @ lattice
    rec["atoms"].update(lattice_mat=skewed.tolist(), coords=cart.tolist(), cartesian=True)
    path = tmp_path / "skewed.json"
    path.write_text(json.dumps([rec]))
    manifest = run_build(ray_session, [path], tmp_path / "out")
    assert manifest["n_written"] == 1
    (stored,), (table,) = arrow_to_crystals(read_shard(tmp_path / "out" / manifest["shards"][0]["file"]))
    assert np.abs(table.n).max() <= 31
    original = from_jarvis(rec["atoms"], id="x")
    direct = image_table(stored.lattice, stored.positions, manifest["cutoff"])
    np.testing.assert_array_equal(table.n, direct.n)
    torch.manual_seed(0)
    model = Crystalformer().double().eval()
    assert torch.allclose(model.predict([original]), model.predict([stored]), rtol=1e-9)


def test_compressed_inputs_are_planned_in_parallel_and_spilled_once(ray_session, megnet_records, tmp_path):
    """Several .json.gz / .jsonl.bz2 inputs: planned in Ray tasks, each decompressed once into the
    progress dir for the workers, cleaned up at the end; same shards as the plain files give."""
    import bz2
    import gzip

    parts = [megnet_records[:25], megnet_records[25:45], megnet_records[45:60]]
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    plain.mkdir()
    packed.mkdir()
    for k, part in enumerate(parts):
        (plain / f"part{k}.json").write_text(json.dumps(part))
    with gzip.open(packed / "part0.json.gz", "wt") as f:
        f.write(json.dumps(parts[0]))
    with gzip.open(packed / "part1.json.gz", "wt") as f:
        f.write(json.dumps({"@class": "dump", "entries": parts[1]}))  # Alexandria-style container
    with bz2.open(packed / "part2.json.bz2", "wt") as f:
        f.write(json.dumps(parts[2]))
    a = run_build(ray_session, sorted(plain.iterdir()), tmp_path / "a", shard_size=8)
    b = run_build(ray_session, sorted(packed.iterdir()), tmp_path / "b", shard_size=8)
    assert a["n_written"] == b["n_written"] == 60 and a["splits"] == b["splits"]
    plan = json.loads((tmp_path / "b" / ".progress" / "plan.json").read_text())
    assert all(c["data_path"] and c["byte_offset"] > 0 for c in plan["chunks"])
    assert not (tmp_path / "b" / ".progress" / "spill").exists()
    rows = {}
    for root, manifest in (("a", a), ("b", b)):
        for shard in manifest["shards"]:
            table = read_shard(tmp_path / root / shard["file"], ["id", "source"])
            for rid, source in zip(table["id"].to_pylist(), table["source"].to_pylist()):
                rows[root, rid] = (shard["split"], source.rsplit(":", 1)[1], source.rsplit(":", 1)[0])
    for rid in (r["id"] for r in megnet_records[:60]):
        (split_a, index_a, _), (split_b, index_b, file_b) = rows["a", rid], rows["b", rid]
        assert (split_a, index_a) == (split_b, index_b)
        assert file_b.startswith(str(packed))  # sources name the input, not the decompressed copy
    assert run_build(ray_session, sorted(packed.iterdir()), tmp_path / "b", shard_size=8) == b  # plan reused


def test_shipped_compressed_extxyz_builds_shards_directly(ray_session, tmp_path):
    """The repository's MPtrj-style frames are shipped as .extxyz.gz: built as they are (no manual
    gunzip), with forces and stress; the stream is decompressed once into the spill dir, removed at the end."""
    path = require(EXAMPLE_DATA / "mptrj" / "mpf-TP.extxyz.gz")
    out = tmp_path / "out"
    manifest = run_build(ray_session, [path], out, targets=["energy"], shard_size=256,
                         with_forces=True, with_stress=True)
    assert manifest["n_input"] == 1069 == manifest["n_written"] + manifest["n_rejected"]
    assert manifest["n_written"] > 1000, manifest["rejected_by_reason"]
    plan = json.loads((out / ".progress" / "plan.json").read_text())
    assert [c["count"] for c in plan["chunks"]] == [256] * 4 + [45]
    assert all(c["data_path"] for c in plan["chunks"]) and plan["chunks"][-1]["byte_offset"] > 0
    assert not (out / ".progress" / "spill").exists()
    table = read_shard(out / manifest["shards"][0]["file"])
    assert all(s.startswith(f"{path}:line ") for s in table["source"].to_pylist())
    assert all(len(f) == 3 * n for f, n in zip(table["forces"].to_pylist(), table["n_atoms"].to_pylist()))
    assert all(s is not None and len(s) == 9 for s in table["stress"].to_pylist())


# --------------------------------------------------------------------------------------------
# Group splits (--split-group): every member of a group lands in one split


def _xyz_frames(path):
    """The frames of a (gzipped) extxyz file as raw text, in file order."""
    import gzip

    with (gzip.open(path, "rt") if str(path).endswith(".gz") else open(path)) as f:
        lines = f.read().splitlines(keepends=True)
    frames, i = [], 0
    while i < len(lines):
        n = int(lines[i])
        frames.append("".join(lines[i:i + n + 2]))
        i += n + 2
    return frames


def _info(frame, key):
    import re

    found = re.search(rf"\b{key}=(\S+)", frame.split("\n", 2)[1])
    return found.group(1) if found else None


@pytest.fixture(scope="module")
def mptrj_groups(tmp_path_factory):
    """Real MPtrj frames where trajectories have several frames: every frame of the 42 multi-frame
    trajectories of mptrj-highest-stress-1k (103 frames, file order, so a trajectory's frames fall in
    different chunks), with 3 frames of random-TP (no mptrj_traj_id) among them.

    Returns (path, traj): traj[i] is frame i's mptrj_traj_id (None for the TP frames); the frames
    have no id of their own, so a frame's id is ``<file name>:<i>``."""
    from collections import Counter

    stress = _xyz_frames(require(EXAMPLE_DATA / "mptrj" / "mptrj-highest-stress-1k.extxyz.gz"))
    counts = Counter(_info(f, "mptrj_traj_id") for f in stress)
    frames = [f for f in stress if counts[_info(f, "mptrj_traj_id")] > 1]
    tp = _xyz_frames(require(EXAMPLE_DATA / "mptrj" / "random-TP.extxyz.gz"))[:3]
    for k, frame in zip((10, 50, 90), tp):
        frames.insert(k, frame)
    path = tmp_path_factory.mktemp("mptrj") / "mptrj_groups.extxyz"
    path.write_text("".join(frames))
    return path, [_info(f, "mptrj_traj_id") for f in frames]


def _split_of_ids(manifest, out):
    """id -> split of every written row (read back from the shards)."""
    got = {}
    for shard in manifest["shards"]:
        for rid in read_shard(out / shard["file"], ["id"])["id"].to_pylist():
            assert rid not in got
            got[rid] = shard["split"]
    return got


def _splits_per_group(split_of, group_of):
    """group -> set of splits its written members are in."""
    out = {}
    for rid, split in split_of.items():
        out.setdefault(group_of[rid], set()).add(split)
    return out


def test_group_split_keeps_each_trajectory_in_one_split(ray_session, mptrj_groups, tmp_path):
    path, traj = mptrj_groups
    ids = [f"{path.name}:{i}" for i in range(len(traj))]
    traj_of = dict(zip(ids, traj))
    n_traj = len(set(traj) - {None})
    assert n_traj == 42 and len(traj) == 106
    group = {"targets": ["energy"], "split_group": "meta:mptrj_traj_id"}
    a = run_build(ray_session, [path], tmp_path / "a", shard_size=16, **group)
    assert a["settings"]["split_group"] == "meta:mptrj_traj_id"
    # the 3 frames without a trajectory id are rejected, never silently dropped or grouped by id
    assert a["n_written"] == 103 and a["rejected_by_reason"] == {"missing_group": 3}
    rejects = [json.loads(line) for line in (tmp_path / "a" / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rejects) == sorted(rid for rid in ids if traj_of[rid] is None)
    assert all(r["reason"] == "missing_group" and "mptrj_traj_id" in r["message"] for r in rejects)

    split_of = _split_of_ids(a, tmp_path / "a")
    per_traj = _splits_per_group(split_of, traj_of)
    assert len(per_traj) == n_traj and None not in per_traj
    assert all(len(splits) == 1 for splits in per_traj.values()), \
        {t: s for t, s in per_traj.items() if len(s) > 1}
    counts = {split: sum(1 for s in per_traj.values() if s == {split}) for split in ("train", "val", "test")}
    assert all(counts.values()), counts  # no split is empty
    assert a["split_groups"] == {"key": "meta:mptrj_traj_id", "groups": counts, "grouped_by_id": 0}

    # a rebuild (other chunking, other directory) assigns every frame the same split
    b = run_build(ray_session, [path], tmp_path / "b", shard_size=50, **group)
    assert _split_of_ids(b, tmp_path / "b") == split_of and b["split_groups"] == a["split_groups"]

    # the same frames split by id DO straddle trajectories (what the group split is for)
    by_id = run_build(ray_session, [path], tmp_path / "by_id", shard_size=16, targets=["energy"])
    assert "split_groups" not in by_id and by_id["n_written"] == 106
    straddling = [t for t, s in _splits_per_group(_split_of_ids(by_id, tmp_path / "by_id"), traj_of).items()
                  if t is not None and len(s) > 1]
    assert len(straddling) >= 5, straddling
    assert by_id["content_hash"] != a["content_hash"]

    # --split-group-missing id: the frames without the key are kept, each its own group
    c = run_build(ray_session, [path], tmp_path / "c", shard_size=16, split_group_missing="id", **group)
    assert c["n_written"] == 106 and c["n_rejected"] == 0
    assert c["split_groups"]["grouped_by_id"] == 3
    assert sum(c["split_groups"]["groups"].values()) == n_traj + 3
    split_c = _split_of_ids(c, tmp_path / "c")
    assert {rid: s for rid, s in split_c.items() if traj_of[rid] is not None} == split_of
    assert all(split_c[rid] == by_id_split for rid, by_id_split in _split_of_ids(by_id, tmp_path / "by_id").items()
               if traj_of[rid] is None)  # grouped by its id = where the by-id split puts it


@pytest.mark.filterwarnings("ignore:No Pauling electronegativity")  # pymatgen, noble-gas frames
def test_composition_group_split_keeps_each_formula_in_one_split(ray_session, mptrj_groups, tmp_path):
    import io

    import ase.io
    from pymatgen.core import Composition

    path, _ = mptrj_groups
    frames = _xyz_frames(path)
    formula_of = {f"{path.name}:{i}": Composition(ase.io.read(io.StringIO(f), format="extxyz").get_chemical_formula())
                  .reduced_formula for i, f in enumerate(frames)}
    n_formulas = len(set(formula_of.values()))
    m = run_build(ray_session, [path], tmp_path / "out", shard_size=16, targets=["energy"], split_group="composition")
    assert m["n_written"] == 106 and m["n_rejected"] == 0
    per_formula = _splits_per_group(_split_of_ids(m, tmp_path / "out"), formula_of)
    assert len(per_formula) == n_formulas < 106
    assert all(len(s) == 1 for s in per_formula.values()), {f: s for f, s in per_formula.items() if len(s) > 1}
    assert sum(m["split_groups"]["groups"].values()) == n_formulas
    assert sum(1 for v in m["split_groups"]["groups"].values() if v) >= 2


def test_group_spec_parsing_and_keys(megnet_crystals):
    from cfdist.preprocess.splits import BuildError, group_key, parse_group_spec, reduced_formula

    meta = {"mptrj_traj_id": "mp-1080834"}
    rid = "mp-1080834-0-1"
    assert group_key(parse_group_spec("meta:mptrj_traj_id"), rid, meta, None) == "mp-1080834"
    assert group_key(parse_group_spec("meta:internal_id"), rid, meta, None) is None
    assert group_key(parse_group_spec("id-prefix:-:2"), rid, {}, None) == "mp-1080834"
    assert group_key(parse_group_spec("id-prefix:-"), rid, {}, None) == "mp-1080834-0"
    assert group_key(parse_group_spec("id-prefix:-:5"), rid, {}, None) is None  # too few fields
    assert group_key(parse_group_spec("id-prefix:_"), rid, {}, None) is None  # no separator
    assert group_key(parse_group_spec("id-prefix:::1"), "a.xyz:3", {}, None) == "a.xyz"
    for bad in ("", "meta:", "traj", "composition:x", "id-prefix", "id-prefix:-:0"):
        with pytest.raises(BuildError):
            parse_group_spec(bad)
    from pymatgen.core import Composition

    from cfdist.crystal import to_pymatgen

    for crystal in megnet_crystals[:20]:
        key = group_key(parse_group_spec("composition"), crystal.id, {}, crystal)
        assert key == reduced_formula(crystal)
        assert Composition(key).reduced_formula == to_pymatgen(crystal).composition.reduced_formula


def test_duplicates_across_chunks_keep_the_first_occurrence_in_input_order(tmp_path):
    """find_duplicates (hashes, then exact ids) on completion records: across chunks and splits, a
    triple keeps its first occurrence, and different ids are never dropped."""
    from cfdist.preprocess.job import PROGRESS_DIR, find_duplicates

    chunks = [{"train": ["a", "b", "c"], "val": ["d"]},
              {"train": ["e", "a"], "test": ["b", "f"]},
              {"val": ["a", "g"], "train": []}]
    (tmp_path / PROGRESS_DIR).mkdir()
    for index, splits in enumerate(chunks):
        record = {"shards": {split: {"ids": ids} for split, ids in splits.items()}}
        (tmp_path / PROGRESS_DIR / f"chunk-{index:06d}.json").write_text(json.dumps(record))
    assert find_duplicates(tmp_path, 3) == {1: {"train": [1], "test": [0]}, 2: {"val": [0]}}
    assert find_duplicates(tmp_path, 1) == {}
