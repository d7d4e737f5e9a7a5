"""`ray start --head` + `ray job submit` of the preprocessing job (a real cluster on this machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run
from paths import ROOT as REPO  # noqa: E402
from ray_cluster_fixture import local_cluster


@pytest.fixture()
def slice_file(tmp_path, megnet_records):
    path = tmp_path / "slice.json"
    path.write_text(json.dumps(megnet_records[:60]))
    return path


@pytest.mark.slow
def test_ray_job_submit_against_a_running_cluster(slice_file, tmp_path, ray_cluster):
    """`ray job submit` of preprocess/build_shards.py to the session's running cluster (conftest)."""
    out = tmp_path / "job-out"
    submit = run(
        [ray_cluster.ray_bin, "job", "submit", "--address", ray_cluster.dashboard_url, "--working-dir", str(REPO),
         "--runtime-env-json", json.dumps({"excludes": [".venv", "outputs", "*.parquet", ".git"]}), "--",
         # The job driver runs with the cluster's PATH, not this process's venv: name the
         # interpreter explicitly, as a cluster user would use their environment's python.
         sys.executable, "preprocess/build_shards.py", str(slice_file), "--out", str(out), "--targets", "e_form",
         "--shard-size", "20"], timeout=300)
    assert submit.returncode == 0, (submit.stdout + submit.stderr)[-3000:]
    assert "succeeded" in submit.stdout.lower()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["n_written"] == 60


# a detached actor that starts a grandchild with a scrubbed environment in its own session: the
# teardown must find both (the actor by its environment, the grandchild as a descendant)
_DRIVER = """
import os, subprocess, sys, ray
ray.init(address=sys.argv[1])

@ray.remote(num_cpus=0)
class Holder:
    def start(self):
        self.child = subprocess.Popen(["sleep", "600"], env={}, start_new_session=True)
        return os.getpid(), self.child.pid

holder = Holder.options(name="holder", lifetime="detached").remote()
print("PIDS", *ray.get(holder.start.remote()), flush=True)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_local_cluster_ends_only_its_own_processes():
    """Two helper clusters and a bystander that looks like Ray: ending one cluster leaves the other and
    the bystander running; ending the second leaves nothing of either; the bystander survives both."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "ray", "start", "--head",
                                  "--temp-dir", "/tmp/ray", "raylet", "gcs_server"], env=env)
    try:
        with local_cluster(nodes=1, num_cpus=1, dashboard=False, env=env) as first:
            with local_cluster(nodes=1, num_cpus=1, dashboard=False, env=env, first_ip=4) as second:
                driver = subprocess.run([sys.executable, "-c", _DRIVER, first.gcs_address], capture_output=True,
                                        text=True, timeout=180, env=env)
                assert driver.returncode == 0, (driver.stdout + driver.stderr)[-3000:]
                actor, grandchild = map(int, next(line for line in driver.stdout.splitlines()
                                                  if line.startswith("PIDS ")).split()[1:])
                first_pids, second_pids = first.pids(), second.pids()
                names = {p: _cmdline(p) for p in first_pids | second_pids}
                # idle pool workers may come and go on their own; everything else must stay up
                first_core = {p for p in first_pids if names[p] != "ray::IDLE"}
                assert first_pids and second_pids and not first_pids & second_pids
                assert {actor, grandchild} <= first_pids
                assert bystander.pid not in first_pids | second_pids
                for pids, cluster in ((first_pids, first), (second_pids, second)):
                    text = " ".join(names[p] for p in pids)
                    assert "gcs_server" in text and "raylet" in text and "ray::DashboardAgent" in text
                    assert any(str(cluster.temp_dir) in names[p] for p in pids)
            # the second cluster is gone, entirely
            assert not second.pids()
            assert [(p, names[p]) for p in second_pids if _alive(p)] == []
            # ... and nothing of the first was touched
            assert [(p, names[p]) for p in first_core if not _alive(p)] == []
            assert first.pids() >= first_core
            assert _alive(bystander.pid)
        assert not first.pids()
        assert [(p, names[p]) for p in first_pids | second_pids if _alive(p)] == []
        assert not _alive(actor) and not _alive(grandchild)
        assert bystander.poll() is None  # the look-alike was never signalled
        assert not first.temp_dir.exists() and not second.temp_dir.exists()
    finally:
        bystander.kill()
        bystander.wait()
