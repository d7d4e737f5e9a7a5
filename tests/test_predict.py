"""Prediction and evaluation with a portable checkpoint: Python API, CLI, error rows, metrics files."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CUTOFF, freeze_sigma_stats

from paths import ROOT as REPO  # noqa: E402
TINY = dict(n_blocks=1, d_model=32, n_heads=4, d_ff=64, n_basis=16, head_hidden=32)


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
    return subprocess.run([sys.executable, "-m", "cfdist.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


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
    from cfdist.predict import Prediction, iter_input_records, predict_records

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
    assert "6 structures" in run.stdout and "2 with an error row" in run.stdout
    csv_rows = {r["id"]: r for r in _read_csv(out)}
    assert csv_rows["overlap"]["e_form"] == "" and "closer than" in csv_rows["overlap"]["error"]


def test_records_without_ids_get_the_preprocessors_ids(megnet_records, tmp_path):
    from cfdist.predict import iter_input_records

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


def test_evaluate_on_shards_writes_metrics_csv_and_plot(shard_dir, tmp_path):
    """``cfdist evaluate`` on a shard split: files written, metrics equal to a direct computation."""
    from cfdist import Crystalformer, CrystalformerConfig
    from cfdist.checkpoint import save_portable
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
    run = _cli("evaluate", "--checkpoint", ckpt, "--data", shard_dir, "--split", "val", "--out", out)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| e_form | 12 |" in run.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_structures"] == 12 and metrics["n_failed"] == 0
    assert (out / "parity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = _read_csv(out / "predictions.csv")
    assert len(rows) == 12 and set(rows[0]) >= {"id", "e_form", "e_form_true"}

    crystals = [c for e in ShardSet(shard_dir).files("val") for c in arrow_to_crystals(read_shard(e.path))[0]]
    y = model.predict(crystals).squeeze(1).double().numpy()
    true = np.array([c.labels["e_form"] for c in crystals])
    assert metrics["targets"]["e_form"]["mae"] == pytest.approx(np.abs(y - true).mean(), rel=1e-5)
    np.testing.assert_allclose([float(r["e_form"]) for r in rows], y, rtol=1e-5, atol=1e-5)


def test_cli_help_lists_every_stage():
    run = _cli("--help")
    assert run.returncode == 0
    for command in ("preprocess", "pretrain", "finetune", "export", "evaluate", "predict"):
        assert f"cfdist {command}" in run.stdout
    bad = _cli("predict", "--checkpoint", "/nonexistent/model.pt", str(REPO))
    assert bad.returncode != 0 and "no portable checkpoint" in bad.stderr
