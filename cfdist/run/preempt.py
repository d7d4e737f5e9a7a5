"""Preemption: SIGTERM / SIGINT become a request to checkpoint at the next step boundary and stop.

Spot reclaims and node drains send SIGTERM (Kubernetes, the Ray autoscaler, Slurm), Ctrl-C sends
SIGINT. Either one sets a process-wide :class:`StopRequest`; the training loops read it once per
micro-step and all-reduce it with the step's existing collective, so every rank stops after the
same optimiser step, saves a checkpoint there and returns. A second signal restores the default
action and re-delivers it (quit now, as a user pressing Ctrl-C twice expects).

Where the signal lands:

- a torchrun rank or a single process: :func:`install_handlers` in its main thread;
- a Ray Train worker: the training function runs in a thread of the worker actor, where Python
  cannot install handlers, and Ray's own SIGTERM handler would end the actor (the group would then
  restart from the last *periodic* checkpoint). :class:`PreemptibleTorchConfig` runs
  :func:`install_handlers` on every worker's main thread (an actor call) when the group starts;
- the Ray driver: :func:`driver_stop` installs handlers there and forwards a request to the workers
  through a small named actor (:class:`StopBoard`) that each worker polls from a daemon thread, so
  it reaches workers on every node without shared storage.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
POLL_S = 1.0  # how often a Ray worker asks the driver's board (one tiny actor call)


class StopRequest:
    """The process-wide stop request: the number of the first signal received, 0 if none."""

    _signum = 0
    _lock = threading.Lock()

    @classmethod
    def set(cls, signum: int) -> None:
        with cls._lock:
            if not cls._signum:
                cls._signum = int(signum)

    @classmethod
    def get(cls) -> int:
        return cls._signum

    @classmethod
    def clear(cls) -> None:
        with cls._lock:
            cls._signum = 0


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _handler(signum, frame) -> None:
    if StopRequest.get():  # the second signal: give the user back the default behaviour, now
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    StopRequest.set(signum)
    print(f"[pid {os.getpid()}] received {signal_name(signum)}: saving a checkpoint at the next step "
          f"boundary, then stopping (send it again to quit at once)", file=sys.stderr, flush=True)


def install_handlers() -> bool:
    """SIGTERM and SIGINT -> :class:`StopRequest` in this process; False off the main thread (Python
    only lets the main thread install handlers: the caller then needs another route)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for signum in STOP_SIGNALS:
        signal.signal(signum, _handler)
    return True


@contextmanager
def stop_on_signals() -> Iterator[bool]:
    """:func:`install_handlers` for the length of a run; the previous handlers come back on exit, so
    a run called in-process (a notebook, a test, a sweep) leaves no handler behind: a process forked
    later would otherwise inherit one and ignore the SIGTERM meant to end it. Yields whether the
    handlers were installed (False off the main thread)."""
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    installed = install_handlers()
    try:
        yield installed
    finally:
        if installed:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        StopRequest.clear()  # answered by this run; the next run in this process starts fresh


def _install_on_worker() -> bool:
    # runs as an actor call, i.e. on the Ray worker's main thread
    return install_handlers()


def preemptible_torch_config(backend: str):
    """A Ray Train ``TorchConfig`` whose workers turn SIGTERM / SIGINT into a stop request."""
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    class _PreemptibleBackend(_TorchBackend):
        def on_training_start(self, worker_group, backend_config):
            super().on_training_start(worker_group, backend_config)
            worker_group.execute(_install_on_worker)

    class PreemptibleTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return _PreemptibleBackend

    return PreemptibleTorchConfig(backend=backend)


def stop_board_class():
    """The :class:`StopBoard` actor class (Ray imported only when a Ray run needs it)."""
    import ray

    @ray.remote(num_cpus=0)
    class StopBoard:
        """Holds the driver's stop request for the run's workers to poll."""

        def __init__(self):
            self.signum = 0

        def request(self, signum: int) -> None:
            self.signum = self.signum or int(signum)

        def requested(self) -> int:
            return self.signum

    return StopBoard


@contextmanager
def driver_stop() -> Iterator[str]:
    """In a Ray driver (after ``ray.init``): handlers for SIGTERM / SIGINT and a named board actor
    whose name goes to the workers (:func:`watch_board`). Yields the board's name; the previous
    handlers come back on exit."""
    import ray

    name = f"cfdist-stop-{uuid.uuid4().hex[:12]}"
    board = stop_board_class().options(name=name, lifetime=None).remote()
    ray.get(board.requested.remote())  # created before any worker looks for it
    done = threading.Event()

    def forward():  # a signal handler must not block on Ray: a thread passes the request on
        while not done.wait(0.2):
            if StopRequest.get():
                board.request.remote(StopRequest.get())
                return

    thread = threading.Thread(target=forward, name="cfdist-stop-forward", daemon=True)
    try:
        with stop_on_signals():
            thread.start()
            yield name
    finally:
        done.set()
        if thread.is_alive():
            thread.join(timeout=5)
        try:
            ray.kill(board)
        except Exception:  # noqa: BLE001 - the cluster may already be gone; nothing to clean up then
            pass


def watch_board(name: str) -> None:
    """In a Ray worker: a daemon thread that copies the driver's stop request (board ``name``) into
    this process's :class:`StopRequest` every :data:`POLL_S` seconds."""
    if not name:
        return
    import ray

    def poll():
        try:
            board = ray.get_actor(name)
        except ValueError:
            return  # the driver is gone (or not ours): only signals to this worker count then
        while not StopRequest.get():
            try:
                signum = ray.get(board.requested.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - the board ends with the driver; stop polling then
                return
            if signum:
                StopRequest.set(signum)
                return
            time.sleep(POLL_S)

    threading.Thread(target=poll, name="cfdist-stop-watch", daemon=True).start()
