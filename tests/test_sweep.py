"""Fine-tuning sweeps (cfdist.finetune.sweep): the space file's checks, and `cfdist tune` with ASHA
running 4 trials of the tiny model on the session Ray cluster, a table and the best checkpoint; then
2 trials with the shards and output_dir on object storage (moto's S3 server on loopback)."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import ray_env, run, tiny_model
from storage_servers import patched_env
from test_finetune import ft_shards  # noqa: F401 - the session fixture


def write_space(path, space: dict, **tune) -> str:
    import yaml

    path.write_text(yaml.safe_dump({"tune": tune, "space": space}))
    return str(path)


def test_space_files_are_checked_against_the_fine_tuning_config(tmp_path):
    from cfdist.config import ConfigError
    from cfdist.finetune.config import FinetuneConfig
    from cfdist.finetune.sweep import load_space, search_space

    base = FinetuneConfig(swa_epochs=0)
    spec = load_space(write_space(tmp_path / "ok.yaml", {"optim.lr": {"loguniform": [1e-4, 1e-3]},
                                                         "transfer.head": {"choice": ["keep", "replace"]},
                                                         "epochs": 3}, num_samples=4), base)
    assert spec.tune.num_samples == 4 and set(search_space(spec.space)) == {"optim.lr", "transfer.head", "epochs"}
    for space, message in [({"optim.lrr": {"choice": [1e-3]}}, "unknown"),
                           ({"optim.lr": {"normal": [0, 1]}}, "must be one of"),
                           ({"optim.lr": {"uniform": [1e-3]}}, "takes \\[low, high\\]"),
                           ({"scaling.num_workers": 2}, "the sweep sets it"),
                           ({"transfer.head": {"choice": ["side/ways"]}}, "head")]:
        with pytest.raises(ConfigError, match=message):
            load_space(write_space(tmp_path / "bad.yaml", space), base)
    with pytest.raises(ConfigError, match="unknown"):
        load_space(write_space(tmp_path / "bad.yaml", {"epochs": 2}, samples=3), base)


@pytest.mark.slow
def test_cfdist_tune_runs_asha_trials_prints_a_table_and_exports_the_best(ft_shards, tmp_path,  # noqa: F811
                                                                         ray_cluster):
    space = write_space(tmp_path / "space.yaml", {"optim.lr": {"loguniform": [1e-4, 3e-3]},
                                                  "epochs": {"choice": [1, 2]},
                                                  "transfer.freeze_blocks": {"choice": [0, 1]}},
                        num_samples=4, max_concurrent_trials=2, grace_period=1, reduction_factor=2)
    res = run([sys.executable, "-m", "cfdist.cli", "tune", "--config", "megnet_slice_eform", "--space", space,
               f"data.shards={ft_shards}", f"output_dir={tmp_path}", "run_name=sweep",
               "model=" + json.dumps(tiny_model()), "data.batch_size=8", "swa_epochs=0", "data.targets=[e_form]",
               "data.verify_checksums=false"], timeout=600, env=ray_env(ray_cluster))
    output = res.stdout + res.stderr
    (tmp_path / "tune.log").write_text(output)
    assert res.returncode == 0, output[-4000:]
    out = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert len(out["trials"]) == 4 and not any(t["error"] for t in out["trials"]), out["trials"]
    assert all(1 <= t["epochs"] <= 2 and set(t["params"]) == {"optim.lr", "epochs", "transfer.freeze_blocks"}
               for t in out["trials"])
    best = out["best"]
    assert best["best_val_loss"] == min(t["best_val_loss"] for t in out["trials"])
    assert "| trial | epochs | optim.lr | transfer.freeze_blocks | epochs run | best val_loss |" in output
    assert f"best trial {best['trial']}" in output
    import cfdist

    model = cfdist.load(tmp_path / "sweep" / "best.pt")  # the best trial's best.pt, a portable checkpoint
    assert model.checkpoint_info["extra"]["run_name"] == best["trial"]
    assert (tmp_path / "sweep" / "best_config.yaml").is_file()
    assert len(list((tmp_path / "sweep" / "trials").iterdir())) == 4

    # the same on object storage (extends this test: the session cluster's Tune start is paid already)
    from storage_servers import s3_server

    from cfdist import storage
    from cfdist.manifest import VERIFY_CACHE

    work = tmp_path / "s3-work"
    work.mkdir()
    with s3_server() as s3:
        bucket = s3.make_bucket("cfdist-tune")
        storage.StorageSection().apply()  # new endpoint: drop cached filesystems
        storage.upload_tree(ft_shards, f"{bucket}/shards", skip=(VERIFY_CACHE,))
        space = write_space(tmp_path / "space2.yaml", {"optim.lr": {"loguniform": [1e-4, 3e-3]}, "epochs": 1},
                            num_samples=2, max_concurrent_trials=2, grace_period=1)
        res = run([sys.executable, "-m", "cfdist.cli", "tune", "--config", "megnet_slice_eform", "--space", space,
                   f"data.shards={bucket}/shards", f"output_dir={bucket}/sweeps", "run_name=sweep",
                   "model=" + json.dumps(tiny_model()), "data.batch_size=8", "swa_epochs=0", "data.targets=[e_form]",
                   "data.verify_checksums=false"], timeout=600, cwd=work,
                  env={**ray_env(ray_cluster), **s3.env, "CFDIST_CACHE_DIR": str(tmp_path / "s3-cache")})
        output = res.stdout + res.stderr
        (tmp_path / "tune-s3.log").write_text(output)
        assert res.returncode == 0, output[-4000:]
        out = json.loads(storage.read_text(f"{bucket}/sweeps/sweep/sweep.json"))
        assert len(out["trials"]) == 2 and not any(t["error"] for t in out["trials"]), out["trials"]
        best = out["best"]
        assert out["best_checkpoint"] == f"{bucket}/sweeps/sweep/best.pt" and best["run_dir"].startswith(bucket)
        stored = {rel for rel, _ in storage.list_files(f"{bucket}/sweeps/sweep")}
        assert {"best.pt", "best_config.yaml", "sweep.json"} <= stored
        for trial in out["trials"]:  # every trial's run, as a fine-tuning run writes it after each epoch
            for name in ("config.yaml", "metrics.jsonl", "checkpoints/best.pt", "checkpoints/last.pt"):
                assert f"trials/{trial['trial']}/{name}" in stored, sorted(stored)
        # results.json is written when a run ends: ASHA may stop a worse trial right after its epoch's
        # report (before that), never the best one
        assert f"trials/{best['trial']}/results.json" in stored, sorted(stored)
        assert any(rel.startswith("tune/") for rel in stored)  # Tune's experiment state
        with patched_env({"CFDIST_CACHE_DIR": str(tmp_path / "s3-cache")}):
            model = cfdist.load(out["best_checkpoint"])
        assert model.checkpoint_info["extra"]["run_name"] == best["trial"]
    assert not list(work.iterdir())  # nothing in the working directory but what was asked for
