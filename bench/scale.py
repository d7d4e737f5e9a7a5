"""The pretraining path at 10k / 100k / 1M structures: preprocessing, the shard check, streaming
training with 2 Ray workers, the loader alone, resume cost and shuffle quality, in one table.

    python bench/scale.py                                   # 10k, 100k, 1M (~1.5 h on 2 cores)
    python bench/scale.py --sizes 10000,100000 --sections preprocess,train
    python bench/scale.py --sizes 1000000 --sections kill   # kill -9 the 1M preprocessing at ~50 %, rerun
    python bench/scale.py --sizes 10000,200000,1000000 --sections driver   # finalize's per-record memory
    python bench/scale.py --sizes 10000,100000,1000000 --sections mixture --work /tmp/cfdist-scale-mixture

Sections (each size in turn; every stage reuses what an earlier run left in ``--work``):

* ``generate``: ``bench/make_corpus.py`` writes N structures (JSON lines, scalar ``e_form``);
* ``preprocess``: ``cfdist preprocess`` (2 Ray workers): wall, structures/s per core, bytes per
  structure, peak RSS of the driver, the Ray workers and the Ray daemons (per process, sampled
  from /proc every 0.2 s: VmHWM, the kernel's high-water mark);
* ``kill``: the same job into a fresh directory, kill -9 of its whole process tree when half the
  chunks are written, the same command again: the manifest must equal the uninterrupted run's and
  every input must be written or rejected once (counted);
* ``verify``: the shard check before training, cold (full sha256) and cached;
* ``train``: ``cfdist pretrain`` with 2 Ray workers, ZeRO-2, the paper model, ``--steps`` steps
  with ``--batch`` structures per worker and step: time from launch to the first step, steps/s,
  data wait, peak RSS of the driver, each train worker and the Ray daemons; at 10k the epoch ends
  inside the run, so the data wait across the boundary is shown;
* ``loader``: rank 0's stream alone (read, shuffle, pack, collate; no model) in this process:
  structures/s, to compare with what a train worker consumes (headroom); time to the first batch
  when resuming at 10 % and 90 % of the epoch by position (cfdist.stream); shuffle quality of the
  stream with and without lanes.
* ``mixture`` (not in the default sections; issue 19): launch to the first logged step of
  ``cfdist pretrain`` on a two-dataset mixture, the N-structure energy set (``energy: true``,
  reference energies per element) + the real MEGNet slice's formation energies (3,418 train
  crystals, preprocessed once with the same cutoff), the paper model, ZeRO-2, ``--batch`` structures
  per micro-batch; by default one process (``--no-ray``; ``--mixture-launch ray`` for 2 Ray workers).
  The energy sets are not preprocessed here: N = the size of a real shard set of
  ``--mixture-sources`` (copied) or a multiple K of one (``bench/replicate_shards.py``: K hard-linked
  copies of its files under new names, manifest and statistics those of the K copies; **1M = 10
  copies of the 100k set's real rows**: the same number of files, footers and bytes as a real 1M
  build, every row 10 times). Per N: the energy set's shard check (train + val) in a fresh process,
  full sha256 / cached / checksums off; then the run (cached check, as a restart or a second run
  gets), stopped by SIGTERM after its first logged step, with the time of each start-up stage from
  its timestamped output (shard check done, reference energies and their solve time, first step)
  and the peak RSS of its processes.
* ``driver`` (not in the default sections): the preprocessing driver's per-record work alone, i.e.
  what its final pass (``cfdist.preprocess.job.finalize``) does for every record (the duplicate-id
  check and the distinct split groups, ``meta:mp_id``-style group keys), on N synthetic completion
  records (4096 MPtrj-like frame ids each, one duplicate) in a fresh process: peak RSS (VmHWM) after
  the imports and at the end, so bytes per record = (end - start) / N; fast enough for 1M on 2 cores.

Everything big goes under ``--work`` (default /tmp/cfdist-scale; ~2.5 GB at 1M). The header
prints the load average: on a shared machine, re-run when it is low.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
       "PYTHONUNBUFFERED": "1"}
CFDIST = str(Path(sys.executable).parent / "cfdist")  # the console script of this environment
SECTIONS = ("generate", "preprocess", "kill", "verify", "train", "loader", "driver", "mixture")
DEFAULT_SECTIONS = ("generate", "preprocess", "verify", "train", "loader", "driver")
MIXTURE_SOURCES = "/tmp/cfdist-reference-fit/shards-10000,/tmp/cfdist-reference-fit/shards-100000"


# ----------------------------------------------------------------------------- process-tree memory
def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _kind(pid: int, root: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "gone"
    if pid == root:
        return "driver"
    for needle, name in (("RayTrainWorker", "train worker"), ("ray::", "ray worker"), ("raylet", "ray daemons"),
                         ("gcs_server", "ray daemons"), ("torch.distributed.run", "launcher")):
        if needle in cmd:
            return name
    return "ray daemons" if "ray" in cmd else "other"


def _hwm_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def kill_tree(memory: "TreeMemory") -> None:
    """SIGKILL every process of the watched tree, children first (kill -9 of a whole job)."""
    for pid in reversed(memory.pids()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class TreeMemory:
    """Peak RSS (VmHWM) of every process below ``root``, sampled every ``period`` s, by kind.

    Ray renames a worker's process title when it takes a task (``ray::RayTrainWorker``), so a
    process keeps the last kind seen.
    """

    def __init__(self, root: int, period: float = 0.2):
        self.root, self.period = root, period
        self.peak: dict[int, float] = {}
        self.kind: dict[int, str] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def pids(self) -> list[int]:
        seen, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            seen.append(pid)
            todo += _children(pid)
        return seen

    def _run(self):
        while not self.stop.is_set():
            for pid in self.pids():
                hwm = _hwm_mb(pid)
                if hwm:
                    self.peak[pid] = max(self.peak.get(pid, 0.0), hwm)
                    kind = _kind(pid, self.root)
                    if kind != "gone":
                        self.kind[pid] = kind
            self.stop.wait(self.period)

    def close(self) -> dict[str, list[float]]:
        self.stop.set()
        self.thread.join()
        out: dict[str, list[float]] = {}
        for pid, mb in self.peak.items():
            out.setdefault(self.kind.get(pid, "other"), []).append(mb)
        return {k: sorted(v, reverse=True) for k, v in out.items()}


def run_watched(cmd: list[str], log: Path, *, kill_when=None) -> dict:
    """Run ``cmd`` in its own session with a memory watcher; ``kill_when()`` -> True kills the whole
    tree with SIGKILL. Returns wall, return code and peak RSS by process kind."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT, env=ENV, cwd=REPO,
                                start_new_session=True)
        memory = TreeMemory(proc.pid)
        killed = False
        while proc.poll() is None:
            if kill_when is not None and not killed and kill_when():
                kill_tree(memory)
                killed = True
            time.sleep(0.2)
        peaks = memory.close()
    if killed:  # daemons that left the tree (re-parented) die with their session
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return {"wall_s": time.perf_counter() - t0, "returncode": proc.returncode, "killed": killed, "rss_mb": peaks}


def rss_cell(peaks: dict, kind: str) -> str:
    values = peaks.get(kind, [])
    if not values:
        return "-"
    return f"{values[0]:.0f}" if len(values) == 1 else f"{values[0]:.0f} (max of {len(values)})"


# ----------------------------------------------------------------------------- stages
def label(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else f"{n // 1000}k"


def generate(n: int, work: Path) -> dict:
    out = work / f"corpus-{label(n)}"
    if (out / "corpus.yaml").is_file():
        return {"note": "reused"}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "bench/make_corpus.py", "--out", str(out), "--n", str(n), "--format", "jsonl",
                          "--no-progress", "--overwrite"], cwd=REPO, env=ENV, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"make_corpus failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return {"wall_s": time.perf_counter() - t0}


def preprocess_cmd(n: int, work: Path, out: Path) -> list[str]:
    return [CFDIST, "preprocess", str(work / f"corpus-{label(n)}"), "--out", str(out),
            "--targets", "e_form", "--workers", "2"]


def manifest_summary(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    files = list(out.rglob("*.parquet"))
    return {"content_hash": manifest.get("content_hash"), "n_input": manifest.get("n_input"),
            "n_written": manifest.get("n_written"), "n_rejected": manifest.get("n_rejected"),
            "bytes": sum(f.stat().st_size for f in files), "files": len(files)}


def preprocess(n: int, work: Path) -> dict:
    out = work / f"shards-{label(n)}"
    if (out / "manifest.json").is_file():
        return {"note": "reused", **manifest_summary(out)}
    result = run_watched(preprocess_cmd(n, work, out), work / f"preprocess-{label(n)}.log")
    if result["returncode"]:
        raise SystemExit(f"preprocess {label(n)} failed: see {work / f'preprocess-{label(n)}.log'}")
    return {**result, **manifest_summary(out)}


def kill_and_resume(n: int, work: Path) -> dict:
    reference = work / f"shards-{label(n)}"
    out = work / f"shards-{label(n)}-killed"
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)])
    total = manifest_summary(reference)["files"]

    def half_written() -> bool:
        return sum(1 for _ in out.rglob("*.parquet")) >= total // 2

    first = run_watched(preprocess_cmd(n, work, out), work / f"kill-{label(n)}.log", kill_when=half_written)
    written_at_kill = sum(1 for _ in out.rglob("*.parquet"))
    second = run_watched(preprocess_cmd(n, work, out), work / f"resume-{label(n)}.log")
    got, want = manifest_summary(out), manifest_summary(reference)
    ids = count_ids(out)
    return {"killed_after_s": first["wall_s"], "killed": first["killed"], "files_at_kill": written_at_kill,
            "files_total": total, "resume_wall_s": second["wall_s"], "resume_rc": second["returncode"],
            "same_manifest": got["content_hash"] == want["content_hash"] and got["bytes"] == want["bytes"],
            "n_input": got["n_input"], "n_written": got["n_written"], "n_rejected": got["n_rejected"], **ids}


def count_ids(out: Path) -> dict:
    import pyarrow.parquet as pq

    ids = [i for f in sorted(out.rglob("*.parquet")) for i in pq.read_table(f, columns=["id"])["id"].to_pylist()]
    rejects = out / "rejects.jsonl"
    n_rejected = sum(1 for _ in rejects.open()) if rejects.is_file() else 0
    return {"rows": len(ids), "unique_ids": len(set(ids)), "rejected": n_rejected}


def verify(n: int, work: Path) -> dict:
    code = ("import sys, time; from cfdist.manifest import ShardSet; s = ShardSet(sys.argv[1]); t = time.perf_counter(); "
            "r = s.verify(['train', 'val'], checksums=sys.argv[2] if sys.argv[2] == 'full' else True); "
            "print(time.perf_counter() - t)")
    shards = work / f"shards-{label(n)}"
    out = {}
    for mode in ("full", "cached"):
        res = subprocess.run([sys.executable, "-c", code, str(shards), mode], cwd=REPO, env=ENV, capture_output=True,
                             text=True)
        if res.returncode:
            raise SystemExit(res.stderr[-2000:])
        out[mode + "_s"] = float(res.stdout.split()[-1])
    return out


def train(n: int, work: Path, steps: int, batch: int) -> dict:
    run_name = f"train-{label(n)}"
    runs = work / "runs"
    if (runs / run_name).exists():
        subprocess.run(["rm", "-rf", str(runs / run_name)])
    cmd = [CFDIST, "pretrain", "--config", "megnet_slice",
           f"data.shards={work / f'shards-{label(n)}'}", f"output_dir={runs}", f"run_name={run_name}",
           "scaling.num_workers=2", "deepspeed=zero2", f"max_steps={steps}", "log_every=10",
           f"data.max_structures={batch}", "data.val_split=", f"checkpoint_every={steps}", "--no-export"]
    launched = time.time()
    result = run_watched(cmd, work / f"{run_name}.log")
    if result["returncode"]:
        raise SystemExit(f"pretrain {label(n)} failed: see {work / f'{run_name}.log'}")
    records = [json.loads(line) for line in (runs / run_name / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "data_wait_pct" in r]
    log = (work / f"{run_name}.log").read_text()
    check = re.search(r"shards ok: .*?\((.*?)\)\s*$", log, re.M)
    waits = [r["data_wait_pct"] for r in train_records[1:]]  # the first window holds start-up
    boundary = [r for a, r in zip(train_records, train_records[1:]) if r.get("epoch", 0) != a.get("epoch", 0)]
    per_worker = np.mean([r["structures_per_s_per_worker"] for r in train_records[1:]])
    return {**result, "first_step_s": train_records[0]["time"] - launched if train_records else float("nan"),
            "shard_check": check.group(1) if check else "?", "data_wait_pct": float(np.mean(waits)),
            "data_wait_max_pct": float(np.max(waits)),
            "boundary_wait_pct": boundary[0]["data_wait_pct"] if boundary else None,
            "epochs": train_records[-1].get("epoch", 0), "structures_per_s_per_worker": float(per_worker),
            "step_time_s": float(np.mean([r["step_time_s"] for r in train_records[1:]]))}


# ----------------------------------------------------------------------------- loader alone
class Rank0Stream:
    """Rank 0 of 2's training stream over the train split of ``shards-<N>``, with the pretraining
    config's window (2,048 rows, 8 lanes) and an entry budget of ``batch`` structures per batch."""

    def __init__(self, n: int, work: Path, batch: int):
        from cfdist.data import BatchBudget, training_columns
        from cfdist.manifest import ShardSet

        import pyarrow.parquet as pq

        self.shards = ShardSet(work / f"shards-{label(n)}")
        entries = self.shards.files("train")
        self.files = [(e.path, e.rows) for e in entries]
        self.columns = training_columns(pq.read_schema(entries[0].path), ["e_form"])
        self.budget = BatchBudget(400_000, 4096, batch)

    def plan(self, epoch: int):
        from cfdist.stream import EpochPlan

        return EpochPlan(self.files, seed=0, epoch=epoch, rank=0, world_size=2, window=2048, lanes=8)

    def batches(self, epoch, start, reader=None):
        """Packed tables and positions of ``epoch`` from ``start`` (a fresh reader unless given)."""
        from cfdist.stream import RowGroupReader, epoch_batches

        return epoch_batches(self.plan(epoch), reader or RowGroupReader(self.columns, cache=10), self.budget, start)


def loader(n: int, work: Path, batch: int, structures: int) -> dict:
    """Rank 0 of 2's stream with the pretraining config's budget: throughput, resume, shuffle."""
    from cfdist.stream import Position

    # throughput and memory in a fresh process (this one has read other things)
    res = subprocess.run([sys.executable, __file__, "--child-loader", str(n), "--work", str(work), "--batch", str(batch),
                          "--loader-structures", str(structures)], cwd=REPO, env=ENV, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    out = json.loads(res.stdout.strip().splitlines()[-1])

    stream = Rank0Stream(n, work, batch)
    plan = stream.plan(0)
    for frac in (0.1, 0.9):
        window = int(frac * plan.n_windows)
        t0 = time.perf_counter()
        next(stream.batches(0, Position(window, 0)))
        out[f"resume_{int(frac * 100)}pct_position_s"] = time.perf_counter() - t0
    return out


def loader_child(n: int, work: Path, batch: int, structures: int) -> dict:
    """Rank 0 of 2's prefetched stream for ``structures`` structures: rate and this process's peak RSS."""
    from cfdist.shards import collate_arrow
    from cfdist.stream import Prefetcher, RowGroupReader

    stream = Rank0Stream(n, work, batch)
    reader = RowGroupReader(stream.columns, cache=10)

    def make(epoch, start):
        return stream.batches(epoch, start, reader)

    cutoff = stream.shards.cutoff
    base = _hwm_mb(os.getpid())
    fetch = Prefetcher(make, lambda t: collate_arrow(t, ["e_form"], cutoff=cutoff), first_epoch=0, depth=4)
    t0, seen = time.perf_counter(), 0
    while seen < structures:
        item = fetch.next()
        if item.batch is None:
            break
        seen += item.rows
    rate = seen / (time.perf_counter() - t0)
    fetch.close()
    return {"loader_structures_per_s": rate, "loader_rss_mb": _hwm_mb(os.getpid()), "loader_rss_base_mb": base}


def shuffle_quality(n: int, work: Path, batch: int) -> list[dict]:
    """Per stream order: how many distinct files a batch holds, the share of a batch's rows whose
    file was also in the previous batch, and the lag-1 correlation of batch-mean e_form."""
    from cfdist.manifest import ShardSet
    from cfdist.stream import EpochPlan, RowGroupReader

    import pyarrow.parquet as pq

    entries = ShardSet(work / f"shards-{label(n)}").files("train")
    files = [(e.path, e.rows) for e in entries]
    file_of, label_of = {}, {}
    for k, (path, _) in enumerate(files):
        t = pq.read_table(path, columns=["id", "y.e_form"])
        for i, y in zip(t["id"].to_pylist(), t["y.e_form"].to_pylist()):
            file_of[i], label_of[i] = k, y

    def new_order(lanes):
        plan = EpochPlan(files, seed=0, epoch=0, rank=0, world_size=2, window=2048, lanes=lanes)
        reader = RowGroupReader(["id"], cache=lanes + 2)
        return [i for j in range(plan.n_windows) for i in reader.window(plan, j)["id"].to_pylist()]

    rows = []
    for name, order in (("per-epoch file shuffle + window 2048, 1 lane", new_order(1)),
                        ("per-epoch file shuffle + window 2048, 8 lanes (default)", new_order(8))):
        batches = [order[k:k + batch] for k in range(0, len(order) - batch + 1, batch)]
        fsets = [{file_of[i] for i in b} for b in batches]
        shared = [np.mean([file_of[i] in prev for i in b]) for prev, b in zip(fsets, batches[1:])]
        means = np.array([np.mean([label_of[i] for i in b]) for b in batches])
        rows.append({"order": name, "files_per_batch": float(np.mean([len(f) for f in fsets])),
                     "rows_from_previous_batch_files": float(np.mean(shared)),
                     "label_lag1_corr": float(np.corrcoef(means[:-1], means[1:])[0, 1])})
    return rows


# ----------------------------------------------------------------------------- mixture start-up (issue 19)
MEGNET_SLICE = REPO / "examples" / "data" / "megnet_slice.json.gz"
MEGNET_SPLIT = REPO / "examples" / "data" / "megnet_slice_split.json"


def mixture_energy_shards(n: int, work: Path, sources: list[str]) -> Path:
    """``work/mixture-energy-<N>``: a copy of the real source set of N structures, or K hard-linked
    copies of the copy of the largest source whose size divides N (``bench/replicate_shards.py``)."""
    out = work / f"mixture-energy-{label(n)}"
    if (out / "manifest.json").is_file():
        return out
    sys.path.insert(0, str(REPO / "bench"))
    from replicate_shards import replicate

    sizes = {int(json.loads((Path(src) / "manifest.json").read_text())["n_written"]): Path(src) for src in sources}
    fits = sorted(size for size in sizes if n % size == 0)
    if not fits:
        raise SystemExit(f"mixture: N={n:,} is no multiple of a source's size ({', '.join(f'{k:,}' for k in sizes)}: "
                         f"{', '.join(map(str, sizes.values()))}); pass --mixture-sources")
    size = fits[-1]
    if size == n:  # a byte copy: verification records and file identities of our own
        replicate(sizes[size], out, 1, link=False)
    else:
        replicate(mixture_energy_shards(size, work, sources), out, n // size, link=True)
    return out


def mixture_megnet_shards(work: Path, cutoff: float) -> Path:
    """``work/mixture-megnet_slice``: the real MEGNet slice with its published split, at ``cutoff``."""
    out = work / "mixture-megnet_slice"
    if not (out / "manifest.json").is_file():
        res = subprocess.run([CFDIST, "preprocess", str(MEGNET_SLICE), "--out", str(out), "--targets", "e_form",
                              "gap pbe", "--split-file", str(MEGNET_SPLIT), "--cutoff", repr(cutoff), "--workers", "2"],
                             cwd=REPO, env=ENV, capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"preprocess of the MEGNet slice failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    got = json.loads((out / "manifest.json").read_text())["cutoff"]
    if abs(got - cutoff) > 1e-9:
        raise SystemExit(f"{out}: cutoff {got} A, the energy set's is {cutoff} A; remove it to rebuild")
    return out


def mixture_check(shards: Path) -> dict:
    """The shard check of train + val in a fresh process per mode: full sha256, cached records, off."""
    code = ("import sys, time; from cfdist.manifest import ShardSet; s = ShardSet(sys.argv[1]); t = time.perf_counter(); "
            "m = {'full': 'full', 'cached': True, 'off': False}[sys.argv[2]]; "
            "r = s.verify(['train', 'val'], checksums=m, progress=False); "
            "print(time.perf_counter() - t, r.files, r.hashed, sum(e.bytes for e in s.entries if e.split != 'test'))")
    out = {}
    for mode in ("full", "cached", "off"):
        res = subprocess.run([sys.executable, "-c", code, str(shards), mode], cwd=REPO, env=ENV, capture_output=True,
                             text=True)
        if res.returncode:
            raise SystemExit(res.stderr[-2000:])
        seconds, files, hashed, size = res.stdout.split()[-4:]
        out[f"{mode}_s"] = float(seconds)
        out.update(files=int(files), bytes=int(size))
        out[f"{mode}_hashed"] = int(hashed)
    return out


def mixture_config(n: int, work: Path, energy: Path, megnet: Path, batch: int) -> Path:
    """The run's YAML: configs/pretrain/mixture.yaml's recipe on these two datasets (the energy set has
    no forces or stress: energy loss only); many steps, so the run is stopped, not finished."""
    import yaml

    cfg = {"run_name": f"mixture-{label(n)}", "output_dir": str(work / "runs"), "seed": 0, "max_steps": 1000,
           "log_every": 1, "val_every": 1000, "checkpoint_every": 1000, "model": "crystalformer",
           "data": {"datasets": [
               {"name": "energy", "shards": str(energy), "energy": True, "targets": ["energy"],
                "loss": {"energy_weight": 1.0, "forces_weight": 0.0, "stress_weight": 0.0, "kind": "huber",
                         "huber_delta": 0.1}},
               {"name": "megnet_slice", "shards": str(megnet), "targets": ["e_form"]}],
               "temperature": 2.0, "max_atoms": 4096, "max_structures": batch, "shuffle_rows": 2048},
           "optim": {"lr": 5.0e-4, "schedule": "warmup_cosine", "warmup_steps": 100, "min_lr_ratio": 0.01},
           "deepspeed": "zero2",
           "scaling": {"num_workers": 2, "use_gpu": False, "cpus_per_worker": 1, "max_failures": 0}}
    path = work / f"mixture-{label(n)}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_to_first_step(cmd: list[str], log: Path, metrics: Path, limit_s: float = 1200) -> dict:
    """Run ``cmd`` with every output line timestamped (seconds since launch) into ``log``; SIGTERM to
    the driver once ``metrics`` has its first record (the run checkpoints and stops; SIGKILL of the
    process tree if it has not ended 180 s later). Returns the lines, the first record's time and
    peak RSS by process kind."""
    launched = time.time()
    lines: list[tuple[float, str]] = []
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV, cwd=REPO,
                            start_new_session=True, text=True, bufsize=1)
    memory = TreeMemory(proc.pid)

    def pump():
        with open(log, "w") as fh:
            for line in proc.stdout:
                lines.append((time.time() - launched, line.rstrip("\n")))
                fh.write(f"[{lines[-1][0]:8.2f}] {line}")
                fh.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    first, stopped, killed = None, None, False
    while proc.poll() is None:
        if first is None and metrics.is_file():
            records = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
            steps = [r for r in records if "step_time_s" in r]
            if steps:
                first = steps[0]
                proc.send_signal(signal.SIGTERM)
                stopped = time.time()
        if stopped is not None and not killed and time.time() - stopped > 180:
            kill_tree(memory)
            killed = True
        if first is None and time.time() - launched > limit_s:
            proc.send_signal(signal.SIGTERM)
            stopped, first = time.time(), {}
        time.sleep(0.1)
    reader.join(timeout=10)
    peaks = memory.close()
    if killed:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # daemons that left the tree die with their session
        except (ProcessLookupError, PermissionError):
            pass
    if not first:
        raise SystemExit(f"{' '.join(map(str, cmd))}: no logged step (rc {proc.returncode}); see {log}")
    return {"first_step_s": first["time"] - launched, "first_record": first, "lines": lines,
            "returncode": proc.returncode, "killed": killed, "rss_mb": peaks}


def _first(lines: list[tuple[float, str]], pattern: str) -> tuple[float, re.Match] | tuple[None, None]:
    for t, line in lines:
        m = re.search(pattern, line)
        if m:
            return t, m
    return None, None


def mixture_stages_child(config: Path, with_pass: bool) -> dict:
    """In a fresh process: the start-up steps of a mixture run that touch the data, timed one by one
    as rank 0 of 2 does them (after the driver's shard check): the datasets' shard sets and columns
    (``mixture_sources``), the sampling probabilities, the reference energies from the manifest, and
    the mixture stream's first micro-batch (read, shuffle, pack; no collation). With ``with_pass``
    also what the reference energies cost by a pass over the energy set's train split (the fallback
    for shards without ``statistics.element_fit``, and what start-up did before issue 19)."""
    from cfdist.preprocess.element_fit import ElementFitSums, solve
    from cfdist.run.objective import fit_element_energies
    from cfdist.train.config import load_pretrain_config
    from cfdist.train.datasets import mixture_sources, mixture_weights
    from cfdist.train.loop import LocalContext
    from cfdist.mixture import MixturePosition

    cfg = load_pretrain_config(str(config), [])
    out, t0 = {}, time.perf_counter()
    sources = mixture_sources(cfg)
    out["sources_s"], t0 = time.perf_counter() - t0, time.perf_counter()
    probabilities = mixture_weights(cfg, sources)
    out["weights_s"], t0 = time.perf_counter() - t0, time.perf_counter()
    energy = next(s for s in sources if s.entry.energy)
    fit = solve(ElementFitSums.from_dict(energy.shards.element_fit(energy.targets[0])), cfg.model_config().n_elements)
    out["reference_s"], t0 = time.perf_counter() - t0, time.perf_counter()
    ctx = LocalContext(cfg, None, sources)
    ctx.rank, ctx.world_size = 0, 2  # rank 0 of the 2-worker run
    stream = ctx.mixture_stream(sources, probabilities, lambda rows: rows, MixturePosition())
    item = stream.next()
    out["first_batch_s"], out["first_batch_rows"] = time.perf_counter() - t0, item.rows
    stream.close()
    if with_pass:
        t0 = time.perf_counter()
        by_pass = fit_element_energies([e.path for e in energy.shards.files(cfg.data.train_split)], energy.targets[0],
                                       cfg.model_config().n_elements)
        out["pass_s"] = time.perf_counter() - t0
        out["pass_max_diff_ev"] = float(np.abs(by_pass["element_energy"] - fit["element_energy"]).max())
    out["rss_mb"] = _hwm_mb(os.getpid())
    return out


def mixture_stages(config: Path, with_pass: bool) -> dict:
    res = subprocess.run([sys.executable, __file__, "--child-mixture", str(config)] + (["--with-pass"] if with_pass else []),
                         cwd=REPO, env=ENV, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"mixture stages child failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def mixture(n: int, work: Path, batch: int, sources: list[str], launches: list[str], repeats: int = 1,
            with_pass: bool = True) -> dict:
    """Launch -> first logged step of the two-dataset mixture at N (module docstring, ``mixture``),
    ``repeats`` times per launch (``local``: --no-ray, ``ray``: 2 Ray Train workers); before them the
    data stages alone (:func:`mixture_stages_child`)."""
    if set(launches) - {"local", "ray"}:
        raise SystemExit(f"--mixture-launch: local and/or ray, got {','.join(launches)}")
    energy = mixture_energy_shards(n, work, sources)
    manifest = json.loads((energy / "manifest.json").read_text())
    megnet = mixture_megnet_shards(work, float(manifest["cutoff"]))
    out = {"structures": manifest["n_written"], "train": manifest["splits"]["train"], "files": len(manifest["shards"]),
           "replicated_from": manifest.get("replicated_from", {}).get("source"),
           "copies": manifest.get("replicated_from", {}).get("copies", 1), "check": mixture_check(energy)}
    config = mixture_config(n, work, energy, megnet, batch)
    out["stages"] = [mixture_stages(config, with_pass and k == 0) for k in range(repeats)]
    out["runs"] = [mixture_run(n, work, config, launch) for launch in launches for _ in range(repeats)]
    return out


def mixture_run(n: int, work: Path, config: Path, launch: str) -> dict:
    """One ``cfdist pretrain`` of the mixture, stopped after its first logged step."""
    run_dir = work / "runs" / f"mixture-{label(n)}"
    if run_dir.exists():
        subprocess.run(["rm", "-rf", str(run_dir)])
    cmd = [CFDIST, "pretrain", "--config", config, "--no-export"] + (["--no-ray"] if launch == "local" else [])
    log = work / f"mixture-{label(n)}-{launch}.log"
    run = run_to_first_step(cmd, log, run_dir / "metrics.jsonl")
    lines = run.pop("lines")
    checked_t, _ = _first(lines, r"^run directory: ")  # printed right after the shard check
    energy_t, energy_m = _first(lines, r"^dataset energy: .*?; (checked .*)$")
    megnet_t, megnet_m = _first(lines, r"^dataset megnet_slice: .*?; (checked .*)$")
    ref_t, ref_m = _first(lines, r"dataset 'energy': reference energies: least squares on ([\d,]+) train structures.*"
                                 r"from (.*?); .*\((\d+\.\d+) s\)")
    return {"launch": launch, "run_check_energy": energy_m.group(1) if energy_m else "?",
            "run_check_megnet": megnet_m.group(1) if megnet_m else "?",
            "checked_at_s": checked_t, "reference_at_s": ref_t,
            "reference_structures": int(ref_m.group(1).replace(",", "")) if ref_m else None,
            "reference_from": ref_m.group(2) if ref_m else "?",
            "reference_s": float(ref_m.group(3)) if ref_m else None,
            "first_step_s": run["first_step_s"], "first_step_time_s": run["first_record"].get("step_time_s"),
            "stopped_rc": run["returncode"], "killed": run["killed"], "rss_mb": run["rss_mb"],
            "log": str(log)}


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                        help=f"any of {','.join(SECTIONS)} (kill runs at the largest size only)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cfdist-scale"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32, help="structures per worker and step (data.max_structures)")
    parser.add_argument("--loader-structures", type=int, default=20_000)
    parser.add_argument("--mixture-sources", default=MIXTURE_SOURCES,
                        help="mixture: real energy shard sets (target 'energy', with statistics.element_fit); "
                             "each N is one of their sizes or a multiple of one")
    parser.add_argument("--mixture-launch", default="local",
                        help="mixture: local (one process, --no-ray), ray (2 Ray Train workers) or local,ray")
    parser.add_argument("--mixture-repeats", type=int, default=1, help="mixture: runs per launch and N")
    parser.add_argument("--mixture-no-pass", action="store_true",
                        help="mixture: skip timing the reference energies by a pass over the train split")
    parser.add_argument("--json", type=Path, default=None, help="also write every number as JSON")
    parser.add_argument("--child-mixture", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--with-pass", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-loader", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-driver", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_loader:
        print(json.dumps(loader_child(args.child_loader, args.work, args.batch, args.loader_structures)))
        return 0
    if args.child_mixture:
        print(json.dumps(mixture_stages_child(args.child_mixture, args.with_pass)))
        return 0
    if args.child_driver:
        print(json.dumps(driver_child(args.child_driver, args.work)))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    sections = args.sections.split(",")
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"# bench/scale.py {' '.join(sys.argv[1:])}\n# load average {os.getloadavg()}, {os.cpu_count()} cores, "
          f"work dir {args.work}", flush=True)
    results: dict = {}
    for n in sizes:
        r = results.setdefault(label(n), {})
        if "generate" in sections:
            r["generate"] = generate(n, args.work)
            print(f"{label(n)} generate: {r['generate']}", flush=True)
        if "preprocess" in sections:
            r["preprocess"] = preprocess(n, args.work)
            print(f"{label(n)} preprocess: {r['preprocess']}", flush=True)
        if "kill" in sections and n == max(sizes):
            r["kill"] = kill_and_resume(n, args.work)
            print(f"{label(n)} kill -9 at ~50 % and rerun: {r['kill']}", flush=True)
        if "verify" in sections:
            r["verify"] = verify(n, args.work)
            print(f"{label(n)} shard check: {r['verify']}", flush=True)
        if "train" in sections:
            r["train"] = train(n, args.work, args.steps, args.batch)
            print(f"{label(n)} train: {r['train']}", flush=True)
        if "loader" in sections:
            r["loader"] = loader(n, args.work, args.batch, args.loader_structures)
            r["shuffle"] = shuffle_quality(n, args.work, args.batch)
            print(f"{label(n)} loader: {r['loader']}\n{label(n)} shuffle: {r['shuffle']}", flush=True)
        if "driver" in sections:
            r["driver"] = driver_memory(n, args.work)
            print(f"{label(n)} driver: {r['driver']}", flush=True)
        if "mixture" in sections:
            r["mixture"] = mixture(n, args.work, args.batch, args.mixture_sources.split(","),
                                   args.mixture_launch.split(","), args.mixture_repeats, not args.mixture_no_pass)
            print(f"{label(n)} mixture: {r['mixture']}", flush=True)
    print_tables(results, sections)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


DRIVER_CHUNK = 4096  # ids per synthetic completion record (the default --shard-size)


def _driver_records(n: int, work: Path) -> Path:
    """N synthetic completion records' ids and group keys (``mp-<m>-<k>`` frames of ``mp-<m>``, eight per
    material, plus one repeated id), written once per size."""
    out = work / f"driver-{label(n)}"
    progress = out / ".progress"
    done = progress / "done"
    if done.exists():
        return out
    progress.mkdir(parents=True, exist_ok=True)
    ids = [f"mp-{k // 8}-{k % 8}" for k in range(n)] + ["mp-0-0"]
    for index, start in enumerate(range(0, len(ids), DRIVER_CHUNK)):
        part = ids[start:start + DRIVER_CHUNK]
        record = {"shards": {"train": {"ids": part, "groups": [i.rsplit("-", 1)[0] for i in part]}}}
        (progress / f"chunk-{index:06d}.json").write_text(json.dumps(record))
    done.write_text(str(len(ids)))
    return out


def driver_memory(n: int, work: Path) -> dict:
    out = _driver_records(n, work)
    res = subprocess.run([sys.executable, __file__, "--child-driver", str(n), "--work", str(work)], cwd=REPO,
                         env=ENV, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"driver child failed:\n{res.stderr[-3000:]}")
    result = json.loads(res.stdout.strip().splitlines()[-1])
    result["bytes_per_record"] = (result["hwm_end_mb"] - result["hwm_start_mb"]) * 2**20 / n
    result["records"] = str(out)
    return result


def driver_child(n: int, work: Path) -> dict:
    """In a fresh process: finalize's per-record checks over the synthetic completion records."""
    from cfdist.preprocess.dedupe import PartitionedPairs, distinct_per_split, key_hashes
    from cfdist.preprocess.job import find_duplicates

    out = work / f"driver-{label(n)}"
    n_chunks = len(list((out / ".progress").glob("chunk-*.json")))
    start_mb = _hwm_mb(os.getpid())
    t0 = time.perf_counter()
    dropped = find_duplicates(out, n_chunks)
    with PartitionedPairs(out / ".progress" / "groups") as pairs:
        for index in range(n_chunks):
            shard = json.loads((out / ".progress" / f"chunk-{index:06d}.json").read_text())["shards"]["train"]
            hashes = key_hashes(shard["groups"])
            pairs.add(hashes, (hashes % np.uint64(3)).astype(np.int64))  # a split per group
        groups = distinct_per_split(pairs, 3).tolist()
    return {"wall_s": time.perf_counter() - t0, "hwm_start_mb": start_mb, "hwm_end_mb": _hwm_mb(os.getpid()),
            "duplicates": sum(len(rows) for splits in dropped.values() for rows in splits.values()),
            "groups": groups}


def print_tables(results: dict, sections: list[str]) -> None:
    if "driver" in sections:
        print("\n| N | finalize checks wall (s) | peak RSS after imports (MB) | peak RSS at the end (MB) | "
              "growth per record (bytes) |\n|---|---|---|---|---|")
        for size, r in results.items():
            d = r.get("driver")
            if d:
                print(f"| {size} | {d['wall_s']:.1f} | {d['hwm_start_mb']:.0f} | {d['hwm_end_mb']:.0f} | "
                      f"{d['bytes_per_record']:.1f} |")
    if "mixture" in sections:
        print_mixture(results)
    if "preprocess" in sections:
        print("\n| N | preprocess wall (s) | structures/s/core | bytes/structure | peak RSS driver (MB) | "
              "peak RSS per Ray worker (MB) | peak RSS Ray daemons (MB) |\n|---|---|---|---|---|---|---|")
        for size, r in results.items():
            p = r.get("preprocess", {})
            if "wall_s" not in p:
                continue
            print(f"| {size} | {p['wall_s']:.0f} | {p['n_input'] / p['wall_s'] / 2:.0f} | "
                  f"{p['bytes'] / max(p['n_written'], 1):.0f} | {rss_cell(p['rss_mb'], 'driver')} | "
                  f"{rss_cell(p['rss_mb'], 'ray worker')} | {rss_cell(p['rss_mb'], 'ray daemons')} |")
    if "train" in sections:
        print("\n| N | launch -> first step (s) | shard check | structures/s/worker | data wait % (mean / max) | "
              "wait over epoch end % | peak RSS driver (MB) | peak RSS per train worker (MB) |\n"
              "|---|---|---|---|---|---|---|---|")
        for size, r in results.items():
            t = r.get("train")
            if not t:
                continue
            boundary = "-" if t["boundary_wait_pct"] is None else f"{t['boundary_wait_pct']:.1f}"
            print(f"| {size} | {t['first_step_s']:.0f} | {t['shard_check']} | {t['structures_per_s_per_worker']:.0f} | "
                  f"{t['data_wait_pct']:.1f} / {t['data_wait_max_pct']:.1f} | {boundary} | "
                  f"{rss_cell(t['rss_mb'], 'driver')} | {rss_cell(t['rss_mb'], 'train worker')} |")
    if "loader" in sections:
        print("\n| N | loader alone (structures/s) | headroom vs a train worker | loader peak RSS (MB) | "
              "resume at 10 % (s) | resume at 90 % (s) |\n|---|---|---|---|---|---|")
        for size, r in results.items():
            lo = r.get("loader")
            if not lo:
                continue
            worker = r.get("train", {}).get("structures_per_s_per_worker")
            headroom = f"{lo['loader_structures_per_s'] / worker:.1f}x" if worker else "-"
            print(f"| {size} | {lo['loader_structures_per_s']:.0f} | {headroom} | {lo.get('loader_rss_mb', 0):.0f} | "
                  f"{lo['resume_10pct_position_s']:.2f} | {lo['resume_90pct_position_s']:.2f} |")
        print("\n| N | stream order | files per batch | rows whose file was in the previous batch | "
              "lag-1 corr. of batch-mean e_form |\n|---|---|---|---|---|")
        for size, r in results.items():
            for s in r.get("shuffle", []):
                print(f"| {size} | {s['order']} | {s['files_per_batch']:.1f} | "
                      f"{s['rows_from_previous_batch_files']:.2f} | {s['label_lag1_corr']:.2f} |")


def print_mixture(results: dict) -> None:
    rows = [(size, r["mixture"]) for size, r in results.items() if r.get("mixture")]
    if not rows:
        return

    def spread(values: list[float], digits: int = 1) -> str:
        values = sorted(values)
        if len(values) == 1:
            return f"{values[0]:.{digits}f}"
        return f"{np.median(values):.{digits}f} ({values[0]:.{digits}f}-{values[-1]:.{digits}f})"

    def size_name(size: str, m: dict) -> str:
        return size if m["copies"] == 1 else f"{size} = {m['copies']} x {label(m['structures'] // m['copies'])}"

    print("\nN > a real set's size: K hard-linked copies of its files (bench/replicate_shards.py); start-up reads the "
          "files, footers and bytes of a real set of that size, but every row occurs K times. Times: median "
          "(min-max) over the repeats.")
    print("\n| N (energy set) | files (all splits) | shard check, train + val: full sha256 / cached / checksums off (s) "
          "| reference energies: solve the manifest's sums (s) | same by a pass over the train split (s) | "
          "mixture stream's first micro-batch, rank 0 of 2 (s) |\n|---|---|---|---|---|---|")
    for size, m in rows:
        c, stages = m["check"], m["stages"]
        passes = [st["pass_s"] for st in stages if "pass_s" in st]
        print(f"| {size_name(size, m)} | {m['files']} | {c['full_s']:.1f} / {c['cached_s']:.2f} / {c['off_s']:.2f} "
              f"({c['files']} files, {c['bytes'] / 1e9:.2f} GB) | {spread([st['reference_s'] for st in stages], 3)} | "
              f"{spread(passes) if passes else '-'} | {spread([st['first_batch_s'] for st in stages])} |")
    print("\n| N (energy set) | launch | runs | launch -> first logged step (s) | shard check done at (s) | "
          "reference energies printed at (s), source | peak RSS driver / train worker (MB) |\n"
          "|---|---|---|---|---|---|---|")
    for size, m in rows:
        for launch in dict.fromkeys(run["launch"] for run in m["runs"]):
            runs = [run for run in m["runs"] if run["launch"] == launch]
            source = {("manifest" if "manifest" in run["reference_from"] else "pass") for run in runs}
            worker = max((run["rss_mb"].get("train worker", [0])[0] for run in runs), default=0)
            rss = f"{max(run['rss_mb'].get('driver', [0])[0] for run in runs):.0f}" + (f" / {worker:.0f}" if worker else "")
            print(f"| {size_name(size, m)} | {launch} | {len(runs)} | {spread([run['first_step_s'] for run in runs])} | "
                  f"{spread([run['checked_at_s'] for run in runs])} | "
                  f"{spread([run['reference_at_s'] for run in runs])}, {'/'.join(sorted(source))} | {rss} |")

if __name__ == "__main__":
    sys.exit(main())
