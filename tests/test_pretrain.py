"""Pretraining with real DeepSpeed (gloo) and real Ray Train on tiny shards of the MEGNet slice."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ENV, MATRIX_SPECS, ray_env, run, tiny_model, torchrun_launcher
from paths import ROOT as REPO  # noqa: E402

TINY_MODEL = tiny_model()


def pretrain_cli(shards, out, run_name, *overrides, timeout=420, extra_args=(), launcher=(), env=None):
    """``launch/pretrain.py`` on the tiny shards; ``launcher``: e.g. ``torchrun_launcher(2)``; ``env``:
    e.g. ``ray_env(ray_cluster)``."""
    return run([sys.executable, *launcher, "launch/pretrain.py", "--config", "megnet_slice", *extra_args,
                f"data.shards={shards}", f"output_dir={out}", f"run_name={run_name}",
                "model=" + json.dumps(TINY_MODEL), "data.max_structures=8", "data.shuffle_rows=16",
                "data.verify_checksums=false", "log_every=1", *overrides], timeout=timeout, env=env)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_zero_stages_and_precisions_train_and_export(property_runs):
    """ZeRO 0-3 x {fp32, bf16}, 2 ranks (torchrun, gloo): loss finite and falling on a fixed batch;
    activation checkpointing reproduces the fp32 trajectory; every run exports a loadable model."""
    results = {name: r for name, r in property_runs.items() if "compiled" not in name and name in MATRIX_SPECS}
    assert sorted(results) == sorted(n for n in MATRIX_SPECS if "compiled" not in n)
    for spec, r in results.items():
        losses = r["losses"]
        assert len(losses) == 6 and all(math.isfinite(x) for x in losses + r["grad_norms"]), (spec, r)
        assert losses[-1] < 0.9 * losses[0], (spec, losses)  # the same batch every step: the loss must drop
        accum = MATRIX_SPECS[spec].get("gradient_accumulation_steps", 1)
        assert r["structures_per_step"][0] == 32 * accum  # whole train split (16 per rank) per micro-batch
        assert r["sigma_stats_equal_across_ranks"] and all(s != 1.0 for s in r["sigma_std"]), r
        assert all(math.isfinite(x) for x in r["exported_prediction"][0]), spec
    plain, ckpt = results["z0-fp32"], results["z0-fp32-ckpt"]
    for a, b in zip(plain["losses"] + plain["grad_norms"], ckpt["losses"] + ckpt["grad_norms"]):
        assert a == pytest.approx(b, rel=1e-5), (plain, ckpt)
    # the ZeRO stages are the same optimiser sharded differently: fp32 trajectories agree
    for stage in (1, 2, 3):
        for a, b in zip(plain["losses"], results[f"z{stage}-fp32"]["losses"]):
            assert a == pytest.approx(b, rel=1e-4), stage


def test_bad_shards_fail_before_training(tiny_shards, tmp_path):
    """Truncated file, checksum mismatch, too-small cutoff: clear error, no training started."""
    def broken_copy(name):
        dst = tmp_path / name
        shutil.copytree(tiny_shards, dst)
        return dst

    truncated = broken_copy("truncated")
    victim = sorted((truncated / "train").glob("*.parquet"))[0]
    victim.write_bytes(victim.read_bytes()[:-100])
    corrupted = broken_copy("corrupted")
    victim2 = sorted((corrupted / "train").glob("*.parquet"))[1]
    data = bytearray(victim2.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim2.write_bytes(bytes(data))
    cases = {truncated: (victim.name, "truncated"), corrupted: (victim2.name, "sha256")}
    for shards, (file_name, word) in cases.items():
        res = run([sys.executable, "launch/pretrain.py", "--config", "megnet_slice", "--no-ray",
                   f"data.shards={shards}", f"output_dir={tmp_path / 'runs'}", "max_steps=1"], timeout=120)
        assert res.returncode != 0
        assert "ShardError" in res.stderr and file_name in res.stderr and word in res.stderr, res.stderr[-2000:]
        assert not (tmp_path / "runs").exists()  # nothing started
    # the model needs a larger cutoff than the shards hold (6 sigma instead of 4.5)
    res = run([sys.executable, "launch/pretrain.py", "--config", "megnet_slice", "--no-ray",
               f"data.shards={tiny_shards}", f"output_dir={tmp_path / 'runs'}", "max_steps=1",
               "model=" + json.dumps({**TINY_MODEL, "cutoff_sigmas": 6.0})], timeout=120)
    assert res.returncode != 0 and "cutoff 8.9095 A but the model needs 11.8794 A" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "runs").exists()


# the settings of the Ray Train resume test's runs and of their uninterrupted torchrun reference: 16
# structures per rank at 4 per batch: 4 steps per epoch, so step 3 is mid-epoch (the cursor skips 3
# batches on resume) and steps 5-9 cross into epochs 1 and 2
RESUME_COMMON = ("scaling.num_workers=2", "checkpoint_every=3", "val_every=6", "deepspeed=zero2",
                 "data.max_structures=4")


@pytest.fixture(scope="module")
def torchrun_run(tiny_shards, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """``launch/pretrain.py --no-ray`` under 2 torchrun ranks, 9 steps of :data:`RESUME_COMMON` with
    checksums verified: (its output_dir, the finished process). One run serves two tests: the rank-0
    regression below and, as the uninterrupted reference, the Ray Train resume test (Ray Train's
    workers follow the same trajectory as torchrun's ranks, bit for bit; a Ray Train run of its own
    cost ~30 s of start-up on 2 cores)."""
    out = tmp_path_factory.mktemp("torchrun")
    res = pretrain_cli(tiny_shards, out, "full", "max_steps=9", "data.verify_checksums=true", *RESUME_COMMON,
                       extra_args=("--no-ray",), launcher=torchrun_launcher(2), timeout=300)
    (out / "torchrun.log").write_text(res.stdout + res.stderr)
    return out, res


@pytest.mark.slow
def test_torchrun_no_ray_checks_and_records_the_run_once(torchrun_run):
    """Regression: `--no-ray` under torchrun made every rank verify (hash) all shards and append to
    config.yaml / run_info.jsonl (one line per rank per start). Only rank 0 may do that."""
    out, res = torchrun_run
    output = res.stdout + res.stderr
    assert res.returncode == 0, output[-4000:]
    assert len((out / "full" / "run_info.jsonl").read_text().splitlines()) == 1
    assert output.count("shards ok:") == 1, output[-4000:]
    import cfdist

    cfdist.load(out / "full" / "model.pt")


def pretrain_popen(shards, out, run_name, *overrides, env=None) -> subprocess.Popen:
    """:func:`pretrain_cli` started in the background, stdout and stderr merged into ``proc.stdout``."""
    cmd = [sys.executable, "launch/pretrain.py", "--config", "megnet_slice", f"data.shards={shards}",
           f"output_dir={out}", f"run_name={run_name}", "model=" + json.dumps(TINY_MODEL), "data.max_structures=8",
           "data.shuffle_rows=16", "data.verify_checksums=false", "log_every=1", *overrides]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**ENV, **(env or {})}, cwd=REPO)


def kill_a_worker_at_step(proc: subprocess.Popen, cluster, metrics_file: Path, step: int, earlier: set[int],
                          timeout: float = 300) -> int | None:
    """Once ``metrics_file`` shows ``step``, SIGKILL one Ray Train worker of ``cluster`` that is not in
    ``earlier`` (an earlier run's); returns its pid, or None if ``proc`` ended first."""
    import signal
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        steps = [json.loads(x).get("step", 0) for x in metrics_file.read_text().splitlines()] \
            if metrics_file.exists() else []
        if steps and max(steps) >= step:
            pids = sorted(cluster.pids_running(b"RayTrainWorker") - earlier)
            if pids:
                os.kill(pids[-1], signal.SIGKILL)
                return pids[-1]
        time.sleep(0.2)
    return None


@pytest.mark.slow
def test_ray_train_resume_and_killed_worker_match_uninterrupted_run(torchrun_run, tiny_shards, tmp_path,
                                                                     ray_cluster):
    """Ray TorchTrainer, 2 workers: 3 steps, then the same command resumes to 9 (a CLI restart), and
    in that run one worker is killed with SIGKILL after step 5: the group restarts from the last
    checkpoint and finishes. Every step's loss equals the 9-step uninterrupted run's (2 torchrun
    ranks: the same trajectory as 2 Ray Train workers), and so does the exported model. (One test for
    both: the CLI resume and the failure restart restore through the same ray.train checkpoint, and
    each Ray Train run costs ~30 s of start-up on 2 cores.)"""
    full_dir, full = torchrun_run
    assert full.returncode == 0, (full.stdout + full.stderr)[-4000:]
    full_dir = full_dir / "full"
    common = RESUME_COMMON
    env = ray_env(ray_cluster)
    first = pretrain_cli(tiny_shards, tmp_path, "resumed", "max_steps=3", "scaling.max_failures=0", *common,
                         extra_args=("--no-export",), env=env)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    earlier = ray_cluster.pids_running(b"RayTrainWorker")  # none of this run's; never kill those
    proc = pretrain_popen(tiny_shards, tmp_path, "resumed", "max_steps=9", "scaling.max_failures=2", *common, env=env)
    try:
        killed = kill_a_worker_at_step(proc, ray_cluster, tmp_path / "resumed" / "metrics.jsonl", 5, earlier)
        output, _ = proc.communicate(timeout=420)
    finally:
        if proc.poll() is None:
            proc.kill()
    (tmp_path / "driver.log").write_text(output)
    assert killed is not None, "the run ended before a worker could be killed"
    assert proc.returncode == 0, output[-4000:]
    # resumed twice: from the first command's step 3, and after the kill from the last checkpoint
    assert output.count("resumed from") >= 2, output[-4000:]
    ref = {r["step"]: r for r in metrics(full_dir) if "loss" in r}
    records = [r for r in metrics(tmp_path / "resumed") if "loss" in r]
    got = {r["step"]: r for r in records}  # the last record of each step
    assert sorted(ref) == sorted(got) == list(range(1, 10))
    assert len(records) > 9  # some steps after the last checkpoint were run twice
    for step in ref:
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5, abs=1e-7), step
        assert got[step]["structures_per_step"] == ref[step]["structures_per_step"]
    import torch

    import cfdist
    from cfdist.export import main as export_main

    a, b = cfdist.load(full_dir / "model.pt"), cfdist.load(tmp_path / "resumed" / "model.pt")
    assert b.checkpoint_info["extra"]["step"] == 9
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)
    # the on-demand export (python -m cfdist.export; in this process: no second DeepSpeed start-up)
    # gives the same portable model as the end-of-run export, from a Ray Train run's directory
    assert export_main([str(tmp_path / "resumed"), str(tmp_path / "again.pt")]) == 0
    again = cfdist.load(tmp_path / "again.pt")
    for (name, x), (_, y) in zip(b.state_dict().items(), again.state_dict().items()):
        assert torch.equal(x, y), name
    info = [json.loads(line) for line in (tmp_path / "resumed" / "run_info.jsonl").read_text().splitlines()]
    assert len(info) == 2 and all(i["versions"]["torch"] and i["git_sha"] for i in info)
    for run_dir in (full_dir, tmp_path / "resumed"):
        assert (run_dir / "config.yaml").is_file()
        assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_a_rank_without_training_rows_fails_with_a_clear_error(tiny_shards, tmp_path):
    """Regression (the loop's end-of-epoch check tested a counter it had just reset): ranks split the
    train rows into blocks, so with a one-row train split one of 2 torchrun ranks has no rows; the
    run must stop with a message saying so, not spin or hang."""
    import pyarrow.parquet as pq

    from cfdist.manifest import shard_record

    shards = tmp_path / "one_train_row"
    shutil.copytree(tiny_shards, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    train = [e for e in manifest["shards"] if e["split"] == "train"][0]
    path = shards / train["file"]
    pq.write_table(pq.read_table(path).slice(0, 1), path)
    manifest["shards"] = ([e for e in manifest["shards"] if e["split"] != "train"]
                          + [shard_record(shards, train["file"], "train", 1)])
    (shards / "manifest.json").write_text(json.dumps(manifest))
    launcher = torchrun_launcher(2)
    res = pretrain_cli(shards, tmp_path, "empty_rank", "max_steps=3", "data.val_split=", timeout=300,
                       extra_args=("--no-ray",), launcher=launcher)
    assert res.returncode != 0
    assert re.search(r"rank \d: the train split yielded no batches in epoch 0", res.stdout + res.stderr), \
        res.stderr[-3000:]


@pytest.mark.slow
def test_two_node_cluster_job_submit_zero3_bf16(tiny_shards, tmp_path, ray_cluster):
    """Two raylets (127.0.0.2 / .3), one worker per node (STRICT_SPREAD), ZeRO-3 + bf16 + activation
    checkpointing, submitted with `ray job submit`: the job succeeds, the loss falls, the export loads."""
    job = run([ray_cluster.ray_bin, "job", "submit", "--address", ray_cluster.dashboard_url, "--working-dir", REPO,
               "--runtime-env-json", json.dumps({"excludes": [".venv", "outputs", "*.parquet", ".git"]}), "--",
               sys.executable, "launch/pretrain.py", "--config", "megnet_slice",
               f"data.shards={tiny_shards}", f"output_dir={tmp_path}", "run_name=multinode",
               "model=" + json.dumps(TINY_MODEL), "max_steps=4", "log_every=1", "val_every=4",
               "checkpoint_every=4", "data.max_structures=64", "data.shuffle_rows=0", "optim.lr=2e-3",
               "optim.schedule=constant", "deepspeed.zero_stage=3", "deepspeed.precision=bf16",
               "deepspeed.activation_checkpointing=true", "scaling.num_workers=2",
               "scaling.placement_strategy=STRICT_SPREAD"], timeout=480)
    log = job.stdout + job.stderr
    assert job.returncode == 0 and "succeeded" in log.lower(), log[-4000:]
    # one worker per node: two worker processes, one of them on the second raylet (127.0.0.3)
    import re

    assert len(set(re.findall(r"RayTrainWorker pid=(\d+)", log))) == 2, log[-4000:]
    assert re.search(r"RayTrainWorker pid=\d+, ip=127\.0\.0\.3", log), log[-4000:]
    losses = [r["loss"] for r in metrics(tmp_path / "multinode") if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    import cfdist
    from ase.build import bulk

    model = cfdist.load(tmp_path / "multinode" / "model.pt")
    assert torch_finite(model.predict([bulk("Si", "diamond", a=5.43)]))


def torch_finite(t) -> bool:
    import torch

    return bool(torch.isfinite(t).all())
