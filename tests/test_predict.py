"""Prediction and evaluation with a portable checkpoint: Python API, CLI, error rows, metrics files."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CUTOFF, freeze_sigma_stats, run, tiny_model

from paths import ROOT as REPO  # noqa: E402
TINY = tiny_model(n_blocks=1)


@pytest.fixture(scope="module")
def portable(tmp_path_factory):
    """A tiny two-target model with frozen sigma stats and a target normalisation, saved portably."""
    from cfdist import Crystalformer, CrystalformerConfig
    from cfdist.checkpoint import save_portable

    torch.manual_seed(3)
    model = freeze_sigma_stats(Crystalformer(CrystalformerConfig(target_names=["e_form", "other"], **TINY)))
    model.target_mean.copy_(torch.tensor([-1.2, 3.0]))
    model.target_std.copy_(torch.tensor([0.9, 0.1]))
    path = save_portable(tmp_path_factory.mktemp("ckpt") / "model.pt", model)
    return path


def _cli(*args, cwd=REPO):
    return run([sys.executable, "-m", "cfdist.cli", *args], timeout=300, cwd=cwd)


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_portable_checkpoint_round_trip(portable):
    import cfdist

    model = cfdist.load(portable)
    assert not model.training and model.sigma_stats_ready
    assert model.config.target_names == ["e_form", "other"]
    assert torch.allclose(model.target_std, torch.tensor([0.9, 0.1]))
    assert model.checkpoint_info["cutoff"] == pytest.approx(model.cutoff)


def test_predict_agrees_across_structures_atoms_and_files(portable, megnet_records, tmp_path):
    """pymatgen Structures, ASE Atoms and CIF files on disk give the same predictions."""
    from pymatgen.io.ase import AseAtomsAdaptor

    import cfdist
    from cfdist.crystal import from_jarvis, to_pymatgen

    model = cfdist.load(portable)
    crystals = [from_jarvis(r["atoms"], id=r["id"]) for r in megnet_records[:7]]
    structures = [to_pymatgen(c) for c in crystals]
    atoms = [AseAtomsAdaptor.get_atoms(s) for s in structures]
    y_struct = model.predict(structures, batch_size=3)
    y_atoms = model.predict(atoms)
    assert y_struct.shape == (7, 2) and torch.isfinite(y_struct).all()
    torch.testing.assert_close(y_atoms, y_struct, rtol=1e-5, atol=1e-5)
    # the head's outputs are de-normalised: the second target lives near its mean 3.0 with std 0.1
    assert (y_struct[:, 1] - 3.0).abs().max() < 2.0

    cif_dir = tmp_path / "cifs"
    cif_dir.mkdir()
    for crystal, s in zip(crystals, structures):
        s.to(filename=str(cif_dir / f"{crystal.id}.cif"))
    out = tmp_path / "pred.csv"
    run = _cli("predict", "--checkpoint", portable, cif_dir, "--out", out, "--batch-size", 4)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {Path(r["source"]).stem: r for r in _read_csv(out)}
    assert len(rows) == 7
    for crystal, y in zip(crystals, y_struct.tolist()):
        row = rows[crystal.id]
        assert row["error_reason"] == ""
        # CIF files round coordinates; predictions agree to the CIF precision
        np.testing.assert_allclose([float(row["e_form"]), float(row["other"])], y, rtol=1e-3, atol=1e-3)


def test_bad_structures_get_error_rows_not_a_crash(portable, megnet_records, tmp_path):
    import cfdist
    from cfdist.crystal import from_jarvis
    from cfdist.io import iter_input_records
    from cfdist.predict import Prediction, predict_records

    good = [dict(r) for r in megnet_records[:4]]
    overlapping = json.loads(json.dumps(megnet_records[4]))
    overlapping["id"] = "overlap"
    overlapping["atoms"]["coords"][1] = list(overlapping["atoms"]["coords"][0])
    bad_element = json.loads(json.dumps(megnet_records[5]))
    bad_element["id"] = "bad-element"
    bad_element["atoms"]["elements"][0] = "Xx"
    records = [good[0], overlapping, good[1], bad_element, good[2], good[3]]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(records))

    model = cfdist.load(portable)
    rows = list(predict_records(model, iter_input_records([str(path)]), batch_size=2))
    assert [r.id for r in rows] == [r["id"] for r in records]  # order kept, nothing dropped
    by_id = {r.id: r for r in rows}
    assert by_id["overlap"].values is None and by_id["overlap"].error_reason == "overlapping_atoms"
    assert by_id["bad-element"].values is None and by_id["bad-element"].error_reason in ("bad_element", "unparseable")
    expected = model.predict([from_jarvis(r["atoms"], id=r["id"]) for r in good])
    got = torch.tensor([by_id[r["id"]].values for r in good], dtype=expected.dtype)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert all(isinstance(r, Prediction) for r in rows)

    out = tmp_path / "pred.csv"
    run = _cli("predict", "--checkpoint", portable, path, "--out", out)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"6 rows -> {out}: 4 predicted; 2 failed (0 files, 2 records)" in run.stdout
    csv_rows = {r["id"]: r for r in _read_csv(out)}
    assert csv_rows["overlap"]["e_form"] == "" and "closer than" in csv_rows["overlap"]["error"]


# ---- broken input files: one error row each, the other inputs predicted

# kind -> the reason of the broken file's row
BROKEN_KINDS = {
    "truncated_list": "truncated",       # a JSON list cut inside its 5th record (partial download)
    "truncated_lines": "truncated",      # JSON lines cut inside the 4th line
    "truncated_gz": "truncated",         # a .json.gz whose compressed stream breaks off
    "invalid_json": "unreadable_file",
    "garbage_extxyz": "unreadable_file",
    "dir_without_structures": "unknown_format",
    "empty_dir": "empty",
    "unreadable": "permission_denied",   # not_found for a dangling symlink when running as root
    "unknown_extension": "unknown_format",
    "empty_file": "empty",
}


def _write_broken(kind: str, where: Path, records: list[dict]) -> tuple[Path, str, list[str], bool]:
    """A broken input of ``kind`` under ``where``: (path, reason of its row, ids of the records before the
    cut, whether only a non-empty prefix of those ids is readable: a compressed stream's cut is not
    aligned with the records)."""
    import gzip

    where.mkdir()
    reason = BROKEN_KINDS[kind]
    parts = [json.dumps(r) for r in records]
    ids = [r["id"] for r in records]
    if kind == "truncated_list":
        path = where / "cut.json"
        path.write_text("[" + ", ".join(parts[:4]) + ", " + parts[4][: len(parts[4]) // 2])
        return path, reason, ids[:4], False
    if kind == "truncated_lines":
        path = where / "cut.jsonl"
        path.write_text("\n".join(parts[:3]) + "\n" + parts[3][: len(parts[3]) // 2])
        return path, reason, ids[:3], False
    if kind == "truncated_gz":
        path = where / "cut.json.gz"
        data = gzip.compress(("[" + ", ".join(parts) + "]").encode())
        path.write_bytes(data[: len(data) * 2 // 3])
        return path, reason, ids, True
    if kind == "invalid_json":
        path = where / "bad.json"
        path.write_text('{"id": "x", "atoms": {"lattice_mat": [[4, 0, 0], oops]}}')
    elif kind == "garbage_extxyz":
        path = where / "bad.xyz"
        path.write_text("this is not an extxyz file\n1.0 2.0 3.0\n")
    elif kind == "dir_without_structures":
        path = where / "notes"
        path.mkdir()
        (path / "readme.txt").write_text("no structures here\n")
    elif kind == "empty_dir":
        path = where / "nothing"
        path.mkdir()
    elif kind == "unreadable":
        if os.geteuid() != 0:
            path = where / "locked.cif"
            path.write_text("data_x\n")
            path.chmod(0)
        else:  # root reads any file whatever its mode: a link to nowhere is unreadable for everyone
            path = where / "gone.json"
            path.symlink_to(where / "deleted.json")
            reason = "not_found"
    elif kind == "unknown_extension":
        path = where / "POSCAR.vasp"
        path.write_text("Si\n1.0\n5.4 0 0\n0 5.4 0\n0 0 5.4\nSi\n1\nDirect\n0 0 0\n")
    else:
        path = where / "empty.json"
        path.write_bytes(b"")
    return path, reason, [], False


@pytest.mark.parametrize("kind", list(BROKEN_KINDS))
def test_broken_input_file_gets_one_error_row(kind, portable, megnet_records, tmp_path, capsys):
    """``cfdist predict good.json BROKEN``: the good structures (and any complete records before a cut)
    are predicted, the broken file gets one row naming it and the reason; exit 0, or 1 with --strict
    or when nothing could be predicted."""
    from cfdist.cli import main

    good = tmp_path / "good.json"
    good.write_text(json.dumps(megnet_records[:3]))
    broken, reason, cut_ids, prefix_only = _write_broken(kind, tmp_path / "in", megnet_records[10:16])
    out = tmp_path / "pred.csv"
    run = _cli("predict", "--checkpoint", portable, good, broken, "--out", out)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    rows = _read_csv(out)
    predicted = [r["id"] for r in rows if not r["error_reason"]]
    n_cut = len(predicted) - 3
    if prefix_only:
        assert 0 < n_cut < len(cut_ids)
        cut_ids = cut_ids[:n_cut]
    assert predicted == [r["id"] for r in megnet_records[:3]] + cut_ids  # inputs sorted by path
    assert all(np.isfinite(float(r[t])) for r in rows if not r["error_reason"] for t in ("e_form", "other"))
    failed = [r for r in rows if r["error_reason"]]
    assert len(failed) == 1, failed
    row = failed[0]
    assert row["error_reason"] == reason, row
    assert row["id"] == broken.name and row["source"] == str(broken)
    assert row["error"].startswith(f"{broken}: {reason}: ") and row["e_form"] == ""
    assert f"{len(rows)} rows -> {out}: {len(predicted)} predicted; 1 failed (1 file, 0 records)" in run.stdout
    assert f"input failed: {broken}: {reason}" in run.stderr
    if reason == "truncated":
        assert f"{len(cut_ids)} complete record(s) before the cut" in row["error"]

    # --strict: the same CSV, exit status 1
    out.unlink()
    assert main(["predict", "--checkpoint", str(portable), str(good), str(broken), "--out", str(out),
                 "--strict"]) == 1
    assert _read_csv(out) == rows
    # the broken file alone: exit 1 unless records before a cut were predicted
    alone = tmp_path / "alone.csv"
    assert main(["predict", "--checkpoint", str(portable), str(broken), "--out", str(alone)]) == (0 if cut_ids else 1)
    assert [r["error_reason"] for r in _read_csv(alone)] == [""] * len(cut_ids) + [reason]
    assert "nothing could be predicted" in capsys.readouterr().err or cut_ids


def test_evaluate_raw_inputs_with_a_truncated_file(portable, megnet_records, tmp_path, capsys):
    """``cfdist evaluate`` on labelled raw inputs: a cut JSON list gives its complete records (with their
    labels in the metrics) and one ``truncated`` row; --strict and nothing-predicted exit 1."""
    from cfdist.cli import main

    good = tmp_path / "good.json"
    good.write_text(json.dumps(megnet_records[:3]))
    cut, _, cut_ids, _ = _write_broken("truncated_list", tmp_path / "in", megnet_records[10:16])
    out = tmp_path / "eval"
    run = _cli("evaluate", "--checkpoint", portable, "--data", good, cut, "--out", out)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["n_structures"], metrics["n_predicted"], metrics["n_failed"]) == (8, 7, 1)
    assert (metrics["n_failed_files"], metrics["n_failed_records"]) == (1, 0)
    assert metrics["failed_by_reason"] == {"truncated": 1}
    assert [(f["source"], f["reason"]) for f in metrics["failed_inputs"]] == [(str(cut), "truncated")]
    assert metrics["targets"]["e_form"]["n"] == 7 and metrics["targets"]["other"]["n"] == 0
    rows = _read_csv(out / "predictions.csv")
    assert [r["id"] for r in rows if not r["error_reason"]] == [r["id"] for r in megnet_records[:3]] + cut_ids
    truth = {r["id"]: r["e_form"] for r in megnet_records}
    assert all(float(r["e_form_true"]) == pytest.approx(truth[r["id"]], rel=1e-5)
               for r in rows if not r["error_reason"])
    assert f"8 rows -> {out}/{{metrics.json, predictions.csv, parity.png}}: 7 predicted; 1 failed (1 file, " \
           f"0 records)" in run.stdout
    assert (out / "parity.png").is_file()

    args = ["evaluate", "--checkpoint", str(portable), "--out", str(tmp_path / "eval2"), "--data"]
    assert main(args + [str(good), str(cut), "--strict"]) == 1
    bad, *_ = _write_broken("invalid_json", tmp_path / "bad", [])
    assert main(args + [str(bad)]) == 1
    assert "nothing could be predicted" in capsys.readouterr().err


def test_input_errors_in_python(megnet_records, tmp_path, monkeypatch):
    """iter_input_records: on_error="raise" (the default, as the preprocessor) still raises; "row" turns
    permission errors, failures while reading and globs without usable matches into file rows."""
    from cfdist.io import FileError, inputs, iter_input_records, plan_chunks

    cut, _, cut_ids, _ = _write_broken("truncated_list", tmp_path / "in", megnet_records[10:16])
    with pytest.raises(ValueError, match="not closed"):  # preprocessing keeps refusing a cut file
        plan_chunks(str(cut), "jarvis", 4)
    with pytest.raises(ValueError, match="not closed"):
        list(iter_input_records([str(cut)]))
    rows = list(iter_input_records([str(cut)], on_error="row"))
    assert [r.id for r in rows] == cut_ids + ["cut.json"] and isinstance(rows[-1], FileError)

    good = tmp_path / "good.json"
    good.write_text(json.dumps(megnet_records[:5]))
    locked = tmp_path / "locked.cif"
    locked.write_text("data_x\n")
    (tmp_path / "notes.txt").write_text("x")
    real_plan, real_read = inputs.plan_chunks, inputs.read_chunk

    def plan(path, fmt, chunk_size):
        if path == str(locked):  # chmod does not stop root: refuse as the OS would
            raise PermissionError(13, "Permission denied", path)
        return real_plan(path, fmt, chunk_size)

    def read(chunk):  # the file goes away after its first 2 records
        for k, record in enumerate(real_read(chunk)):
            if k == 2:
                raise OSError(f"cannot read {chunk.path!r}: EOFError: gone")
            yield record

    monkeypatch.setattr(inputs, "plan_chunks", plan)
    monkeypatch.setattr(inputs, "read_chunk", read)
    rows = list(iter_input_records([str(good), str(locked), str(tmp_path / "*.txt")], on_error="row"))
    got = [(r.id, r.error_reason) for r in rows]
    assert got == [("*.txt", "unknown_format"),  # sorted by path, as expand_inputs sorts
                   (megnet_records[0]["id"], None), (megnet_records[1]["id"], None),
                   ("good.json", "unreadable_file"), ("locked.cif", "permission_denied")]
    assert "(after 2 record(s))" in rows[3].error and rows[4].error.endswith("permission_denied: Permission denied")


def test_records_without_ids_get_the_preprocessors_ids(megnet_records, tmp_path):
    from cfdist.io import iter_input_records

    path = tmp_path / "noid.json"
    path.write_text(json.dumps([{k: v for k, v in r.items() if k != "id"} for r in megnet_records[:3]]))
    assert [r.id for r in iter_input_records([str(path)])] == ["noid.json:0", "noid.json:1", "noid.json:2"]


def test_evaluate_shards_without_the_models_targets(portable, shard_dir, tmp_path):
    """A model whose targets are not in the shards still predicts them; metrics have n = 0."""
    import cfdist
    from cfdist.predict import predict_shards

    model = cfdist.load(portable)
    model.config.cutoff_sigmas = 4.4  # the fixture's tables stop just short of the default cutoff
    rows = list(predict_shards(model, shard_dir, "val"))
    assert len(rows) == 12 and all(len(r.values) == 2 and r.labels.keys() <= {"e_form"} for r in rows)


def test_regression_metrics_match_numpy():
    from cfdist.predict import Prediction, regression_metrics

    rng = np.random.default_rng(0)
    true, pred = rng.normal(size=50), rng.normal(size=50)
    rows = [Prediction(id=str(i), source="x", values=[float(p), 0.0], labels={"a": float(t)})
            for i, (t, p) in enumerate(zip(true, pred))]
    rows.append(Prediction(id="nan", source="x", values=[5.0, 0.0], labels={"a": float("nan")}))
    rows.append(Prediction(id="failed", source="x", values=None, labels={"a": 1.0}, error_reason="bad_element"))
    m = regression_metrics(rows, ["a", "b"])
    err = pred - true
    assert m["a"]["n"] == 50
    assert m["a"]["mae"] == pytest.approx(np.abs(err).mean())
    assert m["a"]["rmse"] == pytest.approx(np.sqrt((err ** 2).mean()))
    assert m["a"]["r2"] == pytest.approx(1 - (err ** 2).sum() / ((true - true.mean()) ** 2).sum())
    assert m["b"] == {"n": 0, "mae": None, "rmse": None, "r2": None}


def test_evaluate_on_shards_writes_metrics_csv_and_plot(shard_dir, tmp_path, capsys):
    """``cfdist evaluate`` on a shard split: files written, metrics equal to a direct computation."""
    from cfdist import Crystalformer, CrystalformerConfig
    from cfdist.checkpoint import save_portable
    from cfdist.cli import main
    from cfdist.manifest import ShardSet
    from cfdist.shards import arrow_to_crystals, read_shard

    torch.manual_seed(0)
    # the fixture's tables are cut at 8.9095 A, just under the default model's 8.90955 A
    config = CrystalformerConfig(target_names=["e_form"], cutoff_sigmas=4.4, **TINY)
    model = freeze_sigma_stats(Crystalformer(config)).eval()
    model.target_mean.fill_(-1.0)
    assert model.cutoff <= CUTOFF
    ckpt = save_portable(tmp_path / "model.pt", model)
    out = tmp_path / "eval"
    # the CLI's main in this process (test_evaluate_raw_inputs_with_a_truncated_file starts `python -m cfdist.cli`)
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(shard_dir), "--split", "val",
                 "--out", str(out)]) == 0
    assert "| e_form | 12 |" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_structures"] == 12 and metrics["n_failed"] == 0
    assert (out / "parity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = _read_csv(out / "predictions.csv")
    assert len(rows) == 12 and set(rows[0]) >= {"id", "e_form", "e_form_true"}

    crystals = [c for e in ShardSet(shard_dir).files("val") for c in arrow_to_crystals(read_shard(e.path))[0]]
    y = model.predict(crystals).squeeze(1).double().numpy()
    true = np.array([c.labels["e_form"] for c in crystals])
    assert metrics["targets"]["e_form"]["mae"] == pytest.approx(np.abs(y - true).mean(), rel=1e-5)
    # RMSE and R^2 come from the shared evaluation's sums (cfdist.run.evaluation.target_report)
    err = y - true
    assert metrics["targets"]["e_form"]["rmse"] == pytest.approx(np.sqrt((err ** 2).mean()), rel=1e-5)
    assert metrics["targets"]["e_form"]["r2"] == pytest.approx(
        1 - (err ** 2).sum() / ((true - true.mean()) ** 2).sum(), rel=1e-5)
    np.testing.assert_allclose([float(r["e_form"]) for r in rows], y, rtol=1e-5, atol=1e-5)


def test_cli_help_lists_every_stage():
    run = _cli("--help")
    assert run.returncode == 0
    for command in ("preprocess", "pretrain", "finetune", "export", "evaluate", "predict"):
        assert f"cfdist {command}" in run.stdout
    bad = _cli("predict", "--checkpoint", "/nonexistent/model.pt", str(REPO))
    assert bad.returncode != 0 and "no portable checkpoint" in bad.stderr
