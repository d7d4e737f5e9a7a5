"""End to end on object storage (moto's S3 server and the fake GCS server, on loopback): preprocess
-> pretrain (2 Ray workers, one killed mid-run, resumed from the stored checkpoint; then a driver
restart) -> export -> predict, with every path an ``s3://`` / ``gs://`` URI and nothing written
locally but caches."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ENV, ray_env, tiny_model
from paths import ROOT as REPO
from storage_servers import gcs_server, patched_env, s3_server

TINY_MODEL = tiny_model(n_blocks=1, d_model=16, n_heads=2, d_ff=32, n_basis=8, head_hidden=16)
SECRET = "cfdist-test-secret-never-written-7f3a"  # moto accepts any key; this one must never leak


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_preprocess_pretrain_kill_resume_export_predict_on_object_storage(scheme, megnet_records, tmp_path,
                                                                          ray_cluster):
    from cfdist import storage
    from cfdist.config import CrystalformerConfig

    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    with (s3_server() if scheme == "s3" else gcs_server()) as server, patched_env({"AWS_SECRET_ACCESS_KEY": SECRET}):
        bucket = server.make_bucket("cfdist-e2e")
        # the session cluster's workers get the storage variables from the job's runtime_env (cfdist.cluster);
        # AWS_SECRET_ACCESS_KEY is set for gs:// too: forwarded to the workers, it must never be written
        env = {**ENV, **server.env, "AWS_SECRET_ACCESS_KEY": SECRET, "CFDIST_CACHE_DIR": str(cache),
               **ray_env(ray_cluster)}
        storage.StorageSection().apply()  # new credentials: drop cached filesystems

        def cfdist(*args, timeout=300):
            res = subprocess.run([sys.executable, "-m", "cfdist.cli", *map(str, args)], capture_output=True,
                                 text=True, timeout=timeout, env=env, cwd=work)
            assert SECRET not in res.stdout + res.stderr
            return res

        # inputs on the bucket too: 48 real crystals, 32 train / 8 val / 8 test
        records = megnet_records[:48]
        names = ["train", "train", "train", "train", "val", "test"]
        split = {n: [r["id"] for k, r in enumerate(records) if names[k % 6] == n] for n in ("train", "val", "test")}
        storage.write_text(f"{bucket}/raw/megnet48.json", json.dumps(records))
        storage.write_text(f"{bucket}/raw/split.json", json.dumps(split))  # a split file on the bucket too
        shards = f"{bucket}/shards"
        res = cfdist("preprocess", f"{bucket}/raw/megnet48.json", "--out", shards, "--targets", "e_form",
                     "--split-file", f"{bucket}/raw/split.json", "--shard-size", "8",
                     "--cutoff", repr(CrystalformerConfig().cutoff))
        assert res.returncode == 0, res.stderr[-3000:]
        files = dict(storage.list_files(shards))
        assert "manifest.json" in files and sum(f.endswith(".parquet") for f in files) >= 6

        runs = f"{bucket}/runs"
        cmd = ["pretrain", "--config", "megnet_slice", f"data.shards={shards}", f"output_dir={runs}", "run_name=cloudrun",
               "model=" + json.dumps(TINY_MODEL), "data.max_structures=4", "log_every=1", "checkpoint_every=2",
               "val_every=100", "scaling.num_workers=2", "scaling.max_failures=2"]
        proc = subprocess.Popen([sys.executable, "-m", "cfdist.cli", *cmd, "max_steps=10"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env, cwd=work)
        killed, earlier = None, ray_cluster.pids_running(b"RayTrainWorker")
        try:
            deadline = time.time() + 300
            staged = [p / "metrics.jsonl" for p in (cache / "runs").glob("*-cloudrun")]  # rank 0's local copy
            while time.time() < deadline and proc.poll() is None:
                staged = staged or [p / "metrics.jsonl" for p in (cache / "runs").glob("*-cloudrun")]
                steps = [json.loads(x)["step"] for x in staged[0].read_text().splitlines()] \
                    if staged and staged[0].exists() else []
                stored = {rel.split("/")[0] for rel, _ in storage.list_files(f"{runs}/cloudrun/ray")}
                # the step-2 and step-4 checkpoints are on the bucket; by step 5 the controller has the first
                if steps and max(steps) >= 5 and "checkpoint_000000004" in stored:
                    pids = sorted(ray_cluster.pids_running(b"RayTrainWorker") - earlier)
                    if pids:
                        killed = pids[-1]
                        os.kill(killed, signal.SIGKILL)
                        break
                time.sleep(0.3)
            output, _ = proc.communicate(timeout=420)
        finally:
            if proc.poll() is None:
                proc.kill()
        (tmp_path / "driver.log").write_text(output)
        assert killed is not None, "the run ended before a worker could be killed: " + output[-3000:]
        assert proc.returncode == 0, output[-4000:]
        assert re.search(r"resumed from \S+ at step [2468] ", output), output[-4000:]  # a stored checkpoint (later under load)
        assert SECRET not in output
        shard_check = re.search(r"checked \d+ shards .* in ([0-9.]+) s", output)
        print(f"\nshard check: {shard_check.group(0) if shard_check else '?'}")

        # the driver restarts: the same command with more steps resumes from the stored step-10 checkpoint
        # (on S3 only: a restarted driver's workers read the stored checkpoint through the same code as
        # the killed worker's replacement above, and each Ray Train start costs ~20 s of the suite)
        final = 12 if scheme == "s3" else 10
        if scheme == "s3":
            res = cfdist(*cmd, "max_steps=12", timeout=420)
            assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
            assert "at step 10" in res.stdout + res.stderr, (res.stdout + res.stderr)[-3000:]

        run_files = dict(storage.list_files(f"{runs}/cloudrun"))
        for name in ("config.yaml", "run_info.jsonl", "metrics.jsonl", "model.pt"):
            assert name in run_files, sorted(run_files)
        steps = [json.loads(x)["step"] for x in storage.read_text(f"{runs}/cloudrun/metrics.jsonl").splitlines()
                 if '"loss"' in x]
        # every step logged (those between the resumed checkpoint and the kill twice, if any ran)
        assert steps[-1] == final and sorted(set(steps)) == list(range(1, final + 1))
        starts = len(storage.read_text(f"{runs}/cloudrun/run_info.jsonl").splitlines())
        assert starts == (2 if scheme == "s3" else 1)  # one line per driver start

        # predict straight from the URI (downloaded once into the cache, weights_only=True)
        res = cfdist("predict", "--checkpoint", f"{runs}/cloudrun/model.pt", REPO / "tests/data/megnet_64.json",
                     "--out", work / "pred.csv")
        assert res.returncode == 0, res.stderr[-3000:]
        assert len((work / "pred.csv").read_text().splitlines()) == 65
        res = cfdist("evaluate", "--checkpoint", f"{runs}/cloudrun", "--data", shards, "--out", work / "eval")
        assert res.returncode == 0, res.stderr[-3000:]

        import cfdist as package

        model = package.load(f"{runs}/cloudrun/model.pt")
        assert model.checkpoint_info["extra"]["step"] == final
        assert str(model.checkpoint_info["extra"]["source_checkpoint"]).startswith(str(cache))

        # nothing local but caches and what was asked for; no credentials in any object or cached file
        assert sorted(p.name for p in work.iterdir()) == ["eval", "pred.csv"]
        for rel, _ in storage.list_files(bucket):
            assert SECRET.encode() not in storage.read_bytes(f"{bucket}/{rel}"), rel
        for path in cache.rglob("*"):
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path
