"""`ray start --head` + `ray job submit` of the preprocessing job (a real cluster on this machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from paths import ROOT as REPO  # noqa: E402


@pytest.fixture()
def slice_file(tmp_path, megnet_records):
    path = tmp_path / "slice.json"
    path.write_text(json.dumps(megnet_records[:60]))
    return path


@pytest.mark.slow
def test_ray_job_submit_against_a_running_cluster(slice_file, tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    port = 8265 + os.getpid() % 200
    gcs_port = 6379 + os.getpid() % 200 + 300
    ray_bin = str(Path(sys.executable).with_name("ray"))
    start = subprocess.run([ray_bin, "start", "--head", "--num-cpus", "2", "--port", str(gcs_port),
                            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(port),
                            "--include-dashboard", "true", "--disable-usage-stats"],
                           capture_output=True, text=True, timeout=120, env=env)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        out = tmp_path / "job-out"
        submit = subprocess.run(
            [ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{port}", "--working-dir", str(REPO),
             "--runtime-env-json", json.dumps({"excludes": [".venv", "outputs", "*.parquet"]}), "--",
             # The job driver runs with the cluster's PATH, not this process's venv: name the
             # interpreter explicitly, as a cluster user would use their environment's python.
             sys.executable, "preprocess/build_shards.py", str(slice_file), "--out", str(out), "--targets", "e_form",
             "--shard-size", "20"],
            capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
        assert submit.returncode == 0, (submit.stdout + submit.stderr)[-3000:]
        assert "succeeded" in submit.stdout.lower()
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["n_written"] == 60
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, timeout=120, env=env)
