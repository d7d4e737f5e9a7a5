"""A throwaway Ray cluster for tests: started with ``ray start``, ended by killing exactly its own processes.

The Ray CLI's own stop command ends every Ray process on the machine (a user's cluster, another test
run), so tests never call it. Instead::

    with local_cluster(nodes=2, env=ENV) as cluster:
        subprocess.run([ray, "job", "submit", "--address", cluster.dashboard_url, ...])
    # every process of that cluster is gone here (checked), nothing else was touched

How the cluster's processes are recognised (Linux ``/proc``; Ray 2.60):

- Every node is started with the cluster's own ``--temp-dir`` (a short fresh directory, by default
  ``/tmp/cfray-<pid>-<random>``: Unix socket paths under it must stay below 108 characters). A
  worker node would inherit the head's temp dir anyway (Ray looks it up in the GCS) but gets it
  explicitly too. gcs_server, raylet, the monitor, the log monitor and the dashboard carry that
  path on their command line.
- Ray renames or starts other processes without it: ``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``,
  ``ray::IDLE`` / actor workers, the Ray client server, the dashboard's multiprocessing helpers, a
  submitted job's driver. They all inherit the environment of ``ray start``, which carries
  ``CFRAY_TEST_CLUSTER=<temp dir>``; the test process itself never has it.
- Descendants of any such process (a worker's own subprocess with a scrubbed environment) count too.

Teardown: SIGTERM to all of them (re-scanning every 0.2 s for processes started meanwhile), SIGKILL
to whatever is left after 2 s, then a check that none remains (zombies awaiting their reaper count
as gone). The raylets, agents and workers exit within about a second of SIGTERM; Ray 2.60's
gcs_server and the autoscaler monitor never do in time (the gcs_server flushes its event recorder to
an agent that is already gone; it sat out a 10 s grace every time), and a test cluster has nothing a
graceful end would keep (its temp dir is removed next), so a longer grace only cost ~8 s per cluster.

Ports: the GCS, dashboard and every agent port are chosen free in 20000-32000, outside Ray's
worker-port range (10002-19999) and below the kernel's ephemeral range. Nodes bind to 127.0.0.2,
127.0.0.3, ... so the cluster stays on loopback (Ray rewrites 127.0.0.1 to the eth0 address), and
``RAY_AUTH_MODE=disabled`` is always set (see docs: the token-auth trap).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

MARKER_VAR = "CFRAY_TEST_CLUSTER"
PORT_RANGE = (20000, 32000)  # Ray's workers use 10002-19999; the kernel's ephemeral ports start at 32768
# <temp>/session_2026-12-02_02-55-51_400116_1234567/sockets/plasma_store.99: the session part is
# at most ~70 characters, and AF_UNIX paths must stay below 108
MAX_TEMP_DIR_LEN = 107 - 72
_handed_out: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now, outside Ray's worker-port range, not handed out before here."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(*PORT_RANGE)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {PORT_RANGE}")


# ---- finding and ending processes

def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # gone, or not ours to read
        return b""


def _proc_table() -> dict[int, tuple[int, str, bytes, bytes]]:
    """pid -> (ppid, state, cmdline, environ) of every live process we can see (zombies left out)."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        stat = _read(f"/proc/{name}/stat").decode(errors="replace")
        if not stat:
            continue
        # "pid (comm) state ppid ...": comm may contain spaces and parentheses
        fields = stat[stat.rfind(")") + 2:].split()
        state, ppid = fields[0], int(fields[1])
        if state in ("Z", "X"):
            continue  # already dead, only waiting to be reaped
        table[int(name)] = (ppid, state, _read(f"/proc/{name}/cmdline"), _read(f"/proc/{name}/environ"))
    return table


def descendants(root: int, cmdline_contains: bytes = b"") -> set[int]:
    """Live processes below ``root`` in the process tree (whose command line contains ``cmdline_contains``)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_rest) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.add(child)
            todo.append(child)
    return {pid for pid in found if cmdline_contains in table[pid][2]}


def cluster_pids(temp_dir: str | Path) -> set[int]:
    """The live processes of the cluster whose ``--temp-dir`` is ``temp_dir`` (see the module docstring)."""
    temp_dir = str(temp_dir).encode()
    on_cmdline = re.compile(re.escape(temp_dir) + rb"(?![\w.-])")  # not a longer name sharing the prefix
    mark = f"{MARKER_VAR}=".encode() + temp_dir
    table = _proc_table()
    own = set()
    pid = os.getpid()
    while pid > 1 and pid in table:  # this process and its ancestors, whatever their environment says
        own.add(pid)
        pid = table[pid][0]
    found = {pid for pid, (_, _, cmd, env) in table.items()
             if pid not in own and (on_cmdline.search(cmd) or mark in env.split(b"\0"))}
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_rest) in table.items():
        children.setdefault(ppid, []).append(pid)
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found and child not in own:
                found.add(child)
                todo.append(child)
    return found


def describe(pids) -> str:
    lines = []
    for pid in sorted(pids):
        cmd = _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode(errors="replace").strip()
        lines.append(f"  {pid}: {cmd[:200]}")
    return "\n".join(lines)


def _signal(pids, sig) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), None once it is gone or a zombie."""
    stat = _read(f"/proc/{pid}/stat").decode(errors="replace")
    if not stat:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def kill_cluster(temp_dir: str | Path, grace_s: float = 2.0, kill_wait_s: float = 10.0) -> set[int]:
    """SIGTERM every process of the cluster (re-scanning for ones started meanwhile), SIGKILL what is
    left after ``grace_s``; returns the processes still alive after that (empty when all went).

    A process counts as gone only once it has exited: every process ever found is followed by
    (pid, start time) until it dies, even after its command line and environment stop being
    readable (a process that is exiting) or it has been reparented."""
    seen: set[tuple[int, int]] = set()

    def live() -> set[tuple[int, int]]:
        for pid in cluster_pids(temp_dir):
            start = _start_time(pid)
            if start is not None:
                seen.add((pid, start))
        return {(pid, start) for pid, start in seen if _start_time(pid) == start}

    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, kill_wait_s)):
        deadline = time.monotonic() + wait_s
        signalled: set[tuple[int, int]] = set()
        while True:
            procs = live()
            if not procs:
                return set()
            _signal({pid for pid, _ in procs - signalled}, sig)
            signalled |= procs
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
    return {pid for pid, _ in live()}


# ---- the cluster

@dataclass
class LocalCluster:
    temp_dir: Path
    gcs_address: str  # 127.0.0.2:PORT, for `ray start --address` / ray.init(address=...)
    dashboard_url: str | None  # http://127.0.0.1:PORT, for `ray job submit --address`; None without a dashboard
    node_ips: list[str]
    env: dict[str, str] = field(repr=False)  # the environment the nodes were started with
    ray_bin: str = field(default=str(Path(sys.executable).with_name("ray")), repr=False)

    def pids(self) -> set[int]:
        """The live processes of this cluster now."""
        return cluster_pids(self.temp_dir)

    def pids_running(self, cmdline_contains: bytes) -> set[int]:
        """The live processes of this cluster whose command line contains ``cmdline_contains``
        (Ray renames actor workers: ``ray::RayTrainWorker...``)."""
        return {pid for pid in self.pids() if cmdline_contains in _read(f"/proc/{pid}/cmdline")}

    def ray_start(self, *args, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [self.ray_bin, "start", "--temp-dir", str(self.temp_dir), "--disable-usage-stats", *map(str, args)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env, check=False)


def _agent_ports(node_ip: str) -> list[str]:
    return ["--node-ip-address", node_ip, "--node-manager-port", str(free_port()),
            "--object-manager-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
            "--dashboard-agent-grpc-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
            "--metrics-export-port", str(free_port())]


def _failure(what: str, res: subprocess.CompletedProcess, temp_dir: Path) -> str:
    logs = []
    for log in sorted(temp_dir.glob("session_*/logs/*.err")) + sorted(temp_dir.glob("session_*/logs/*.out")):
        text = log.read_text(errors="replace").strip()
        if text:
            logs.append(f"--- {log.name}\n{text[-800:]}")
    return f"{what} failed (rc {res.returncode}):\n{(res.stdout + res.stderr)[-3000:]}\n" + "\n".join(logs)[-4000:]


@contextlib.contextmanager
def local_cluster(root: str | Path = "/tmp", nodes: int = 1, *, num_cpus: int = 2, dashboard: bool = True,
                  env: dict[str, str] | None = None, resources: list[dict] | None = None,
                  object_store_memory: int | None = None, first_ip: int = 2,
                  keep_temp_dir: bool = False) -> Iterator[LocalCluster]:
    """A Ray cluster of ``nodes`` raylets on this machine (head 127.0.0.<first_ip>, then .<first_ip+1>, ...).

    ``env``: the environment of the nodes (and so of every worker and job driver); default
    ``os.environ``. ``resources``: custom resources per node. On exit every process of the cluster is
    ended (and checked gone) and the temp dir removed; only this cluster's processes are signalled.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    temp_dir = Path(tempfile.mkdtemp(prefix=f"cfray-{os.getpid()}-", dir=root))
    if len(str(temp_dir)) > MAX_TEMP_DIR_LEN:
        temp_dir.rmdir()
        raise ValueError(f"temp dir {temp_dir} is too long for Ray's socket paths (at most {MAX_TEMP_DIR_LEN} "
                         f"characters); use a shorter root such as /tmp")
    node_env = {**(os.environ if env is None else env), "RAY_AUTH_MODE": "disabled", MARKER_VAR: str(temp_dir)}
    ips = [f"127.0.0.{first_ip + k}" for k in range(nodes)]
    gcs_port = free_port()
    dash_port = free_port() if dashboard else None
    cluster = LocalCluster(temp_dir=temp_dir, gcs_address=f"{ips[0]}:{gcs_port}",
                           dashboard_url=f"http://127.0.0.1:{dash_port}" if dashboard else None,
                           node_ips=ips, env=node_env)
    ok = False
    try:
        for k, ip in enumerate(ips):
            args = ["--num-cpus", num_cpus, *_agent_ports(ip)]
            if resources and resources[k]:
                args += ["--resources", json.dumps(resources[k])]
            if object_store_memory:
                args += ["--object-store-memory", object_store_memory]
            if k == 0:
                args += ["--head", "--port", gcs_port, "--ray-client-server-port", free_port(),
                         "--include-dashboard", "true" if dashboard else "false"]
                if dashboard:
                    args += ["--dashboard-host", "127.0.0.1", "--dashboard-port", dash_port]
            else:
                args += ["--address", cluster.gcs_address]
            res = cluster.ray_start(*args)
            if res.returncode != 0:
                raise RuntimeError(_failure(f"ray start ({'head' if k == 0 else 'node'} {ip})", res, temp_dir))
        yield cluster
        ok = True
    finally:
        left = kill_cluster(temp_dir)
        if keep_temp_dir or not ok or left:
            print(f"Ray cluster logs kept in {temp_dir}", file=sys.stderr)
        else:
            shutil.rmtree(temp_dir, ignore_errors=True)
        if left:
            message = f"processes of the Ray cluster in {temp_dir} survived SIGKILL:\n{describe(left)}"
            if ok:
                raise RuntimeError(message)
            print(message, file=sys.stderr)  # don't hide the error that ended the test
