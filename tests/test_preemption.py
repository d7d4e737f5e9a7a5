"""Preemption (cfdist.run.preempt): a real SIGTERM to one training worker, under torchrun and under Ray
Train, makes every rank stop at the same step boundary with a checkpoint there; the same command then
resumes from it, repeating no step. Tiny model, a few steps; the Ray test starts its own local
instance through the pretraining driver (as the other driver tests do)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from paths import ROOT as REPO
from ray_cluster_fixture import descendants, free_port
from test_pretrain import ENV, TINY_MODEL, tiny_shards  # noqa: F401 - the session fixture

STOP_WITHIN_S = 60


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line]


def signal_worker_when(proc, run_dir: Path, step: int, find_workers, signum=signal.SIGTERM, timeout=300):
    """Wait until ``run_dir`` has logged ``step``, then send ``signum`` to one worker; its pid."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if max(logged_steps(run_dir), default=0) >= step:
            pids = find_workers(proc.pid)
            if pids:
                os.kill(pids[-1], signum)
                return pids[-1]
        time.sleep(0.1)
    return None


def start(cmd):
    return subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=ENV, cwd=REPO)


def check_stopped(proc, tmp_path, run_name, signalled, t_signal, log_name) -> int:
    """The run stopped cleanly at a step boundary with a checkpoint there and no model.pt; the step."""
    output, _ = proc.communicate(timeout=300)
    (tmp_path / log_name).write_text(output)
    assert signalled is not None, "the run ended before it could be signalled:\n" + output[-3000:]
    assert time.time() - t_signal < STOP_WITHIN_S + 30  # (process exit included)
    assert proc.returncode == 0, output[-4000:]
    stopped = re.search(r"stopped by (.+?) at step (\d+): checkpoint (\S+);", output)
    assert stopped, output[-4000:]
    step = int(stopped.group(2))
    assert Path(stopped.group(3)).is_dir(), stopped.group(3)
    assert "run the same command again to resume" in output
    assert not (tmp_path / run_name / "model.pt").exists()  # stopped, not finished
    assert logged_steps(tmp_path / run_name)[-1] == step < 40
    return step


def assert_each_step_once(run_dir: Path, last: int) -> None:
    """Each step logged once: every resumed run started at the step after its checkpoint."""
    steps = logged_steps(run_dir)
    assert steps == list(range(1, last + 1)), steps


@pytest.mark.slow
def test_sigterm_to_a_torchrun_rank_checkpoints_and_the_next_run_resumes(tiny_shards, tmp_path):  # noqa: F811
    port = free_port()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    common = ["launch/pretrain.py", "--config", "megnet_slice", "--no-ray", f"data.shards={tiny_shards}",
              f"output_dir={tmp_path}", "run_name=tr", "model=" + json.dumps(TINY_MODEL), "data.shuffle_rows=16",
              "data.max_structures=4", "data.verify_checksums=false", "log_every=1", "checkpoint_every=100",
              "val_every=100"]
    proc = start(launcher + common + ["max_steps=40"])
    killed = None
    try:
        killed = signal_worker_when(proc, tmp_path / "tr", 3,
                                    lambda pid: sorted(descendants(pid, b"launch/pretrain.py")))
        t_signal = time.time()
    finally:
        if proc.poll() is None and killed is None:
            proc.kill()
    step = check_stopped(proc, tmp_path, "tr", killed, t_signal, "first.log")
    res = subprocess.run([str(c) for c in launcher + common + [f"max_steps={step + 3}"]], capture_output=True,
                         text=True, env=ENV, cwd=REPO, timeout=300)
    output = res.stdout + res.stderr
    assert res.returncode == 0 and f"resumed from {tmp_path / 'tr'}" in output and f"at step {step}" in output, \
        output[-4000:]
    assert_each_step_once(tmp_path / "tr", step + 3)
    assert (tmp_path / "tr" / "model.pt").is_file()


@pytest.mark.slow
def test_sigterm_to_a_ray_worker_then_to_the_driver_each_stop_at_a_checkpoint(tiny_shards, tmp_path):  # noqa: F811
    """SIGTERM to one Ray Train worker: stopped with a checkpoint. The same command resumes from it;
    SIGTERM to that run's driver reaches the workers (through the stop board): stopped again."""
    cmd = [sys.executable, "launch/pretrain.py", "--config", "megnet_slice", f"data.shards={tiny_shards}",
           f"output_dir={tmp_path}", "run_name=ray", "model=" + json.dumps(TINY_MODEL), "data.max_structures=4",
           "data.shuffle_rows=16", "data.verify_checksums=false", "log_every=1", "max_steps=40",
           "scaling.num_workers=2", "scaling.max_failures=0", "checkpoint_every=100", "val_every=100"]
    steps = []
    for k, (after, find) in enumerate([(3, lambda pid: sorted(descendants(pid, b"RayTrainWorker"))),
                                       (None, lambda pid: [pid])]):
        proc = start(cmd)
        signalled = None
        try:
            signalled = signal_worker_when(proc, tmp_path / "ray", after or steps[-1] + 2, find)
            t_signal = time.time()
        finally:
            if proc.poll() is None and signalled is None:
                proc.kill()
        steps.append(check_stopped(proc, tmp_path, "ray", signalled, t_signal, f"run{k}.log"))
    assert "resumed from" in (tmp_path / "run1.log").read_text()
    assert steps[1] > steps[0]
    assert_each_step_once(tmp_path / "ray", steps[1])
