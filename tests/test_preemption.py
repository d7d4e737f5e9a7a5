"""Preemption (cfdist.run.preempt): a real SIGTERM to one training worker, under torchrun and under Ray
Train, makes every rank stop at the same step boundary with a checkpoint there; the same command then
resumes from it, repeating no step. Tiny model, a few steps; the Ray test runs on the session cluster."""

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
import torch

from conftest import ENV, ray_env, run, tiny_model, torchrun_launcher
from paths import ROOT as REPO
from ray_cluster_fixture import descendants
from test_finetune import ft_shards, make_config  # noqa: F401 - ft_shards: the session fixture
from test_pretrain import pretrain_popen

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
    assert logged_steps(tmp_path / run_name)[-1] == step  # (model.pt absent: it stopped before max_steps)
    return step


def assert_each_step_once(run_dir: Path, last: int) -> None:
    """Each step logged once: every resumed run started at the step after its checkpoint."""
    steps = logged_steps(run_dir)
    assert steps == list(range(1, last + 1)), steps


@pytest.mark.slow
def test_sigterm_to_a_torchrun_rank_checkpoints_and_the_next_run_resumes(tiny_shards, tmp_path):
    launcher = [sys.executable, *torchrun_launcher(2)]
    common = ["launch/pretrain.py", "--config", "megnet_slice", "--no-ray", f"data.shards={tiny_shards}",
              f"output_dir={tmp_path}", "run_name=tr", "model=" + json.dumps(tiny_model()), "data.shuffle_rows=16",
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
    res = run(launcher + common + [f"max_steps={step + 3}"], timeout=300)
    output = res.stdout + res.stderr
    assert res.returncode == 0 and f"resumed from {tmp_path / 'tr'}" in output and f"at step {step}" in output, \
        output[-4000:]
    assert_each_step_once(tmp_path / "tr", step + 3)
    assert (tmp_path / "tr" / "model.pt").is_file()


@pytest.mark.slow
def test_sigterm_to_a_ray_worker_then_to_the_driver_each_stop_at_a_checkpoint(tiny_shards, tmp_path, ray_cluster):
    """SIGTERM to one Ray Train worker: stopped with a checkpoint. The same command resumes from it;
    SIGTERM to that run's driver reaches the workers (through the stop board): stopped again."""
    # max_steps far beyond where the signals land: on an idle machine the tiny model runs ~25 steps/s,
    # and the driver's request reaches the workers at their next poll (POLL_S), after dozens of
    # steps; a run that finished first would hide whether the stop works (flaky at max_steps=40)
    common = ("data.max_structures=4", "max_steps=4000", "scaling.num_workers=2", "scaling.max_failures=0",
              "checkpoint_every=10000", "val_every=10000")
    earlier = ray_cluster.pids_running(b"RayTrainWorker")  # other runs' workers: never signal those
    steps = []
    for k, (after, find) in enumerate([(3, lambda pid: sorted(ray_cluster.pids_running(b"RayTrainWorker") - earlier)),
                                       (None, lambda pid: [pid])]):
        proc = pretrain_popen(tiny_shards, tmp_path, "ray", *common, env=ray_env(ray_cluster))
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


# ----------------------------------------------------------------------------- fine-tuning
def signal_self_at_step(run_dir: Path, step: int, timeout: float = 120) -> None:
    """From a thread: SIGTERM to this process once ``run_dir`` has logged ``step``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if max(logged_steps(run_dir), default=0) >= step:
            os.kill(os.getpid(), signal.SIGTERM)
            return
        time.sleep(0.02)


def test_sigterm_to_a_fine_tuning_saves_last_pt_mid_epoch_and_resume_equals_the_uninterrupted_run(
        ft_shards, tmp_path):
    """A real SIGTERM to the fine-tuning process: last.pt at the next step boundary (mid-epoch), a
    message naming it; init_from=resume then ends with bit-identical final / SWA weights, and each
    step is logged once."""
    import threading

    from cfdist.checkpoint import load, load_checkpoint_file
    from cfdist.finetune.loop import local_finetune
    from cfdist.run.preempt import STOP_SIGNALS, StopRequest

    kw = dict(epochs=3, swa_epochs=1)  # 40 train rows in steps of 8: 5 steps an epoch, 15 in all
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    threads = torch_threads(1)
    try:
        local_finetune(make_config(ft_shards, tmp_path / "a", **kw))
        sender = threading.Thread(target=signal_self_at_step, args=(tmp_path / "b" / "ft", 2), daemon=True)
        sender.start()
        stopped = local_finetune(make_config(ft_shards, tmp_path / "b", **kw))
        sender.join()
        assert stopped.get("preempted_by") == "SIGTERM", stopped
        last = tmp_path / "b" / "ft" / "checkpoints" / "last.pt"
        assert stopped["checkpoint"] == str(last)
        state = load_checkpoint_file(last)
        assert state["step"] == stopped["step"] < 15 and state["epoch"] * 5 + state["epoch_step"] == state["step"]
        assert not (tmp_path / "b" / "ft" / "results.json").exists()
        # the run put back the handlers it found and answered its request: a process forked now
        # (a multiprocessing pool) must die on SIGTERM, and the next run must not stop at once
        assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == previous
        assert StopRequest.get() == 0
        results = local_finetune(make_config(ft_shards, tmp_path / "b", init_from="resume", **kw))
    finally:
        StopRequest.clear()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        torch_threads(threads)
    assert results["steps"] == 15
    assert logged_steps(tmp_path / "b" / "ft") == list(range(1, 16))
    for kind in ("final", "swa"):
        a = load(tmp_path / "a" / "ft" / "checkpoints" / f"{kind}.pt").state_dict()
        b = load(tmp_path / "b" / "ft" / "checkpoints" / f"{kind}.pt").state_dict()
        for name in a:
            assert torch.equal(a[name], b[name]), (kind, name)


def torch_threads(n: int) -> int:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    return before
