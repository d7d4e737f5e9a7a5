"""What every run writes next to its checkpoints: resolved config, package versions, git SHA."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from cfdist import storage



def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("cfdist", "torch", "deepspeed", "ray", "pyarrow", "numpy", "pymatgen"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def git_sha() -> str:
    # the checkout cfdist runs from (an editable install, or a job's working dir), then the cwd
    for cwd in (Path(__file__).resolve().parent, Path.cwd()):
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
            if out.returncode == 0:
                dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                       capture_output=True, text=True, timeout=10).stdout.strip()
                return out.stdout.strip() + ("-dirty" if dirty else "")
        except (OSError, subprocess.TimeoutExpired):
            pass
    return os.environ.get("CFDIST_GIT_SHA", "unknown (no git checkout in the working dir; set CFDIST_GIT_SHA)")


# the run files that live beside the checkpoints (uploaded for a run on object storage)
RUN_FILES = ("config.yaml", "run_info.jsonl", "metrics.jsonl", "model.pt", "tracking.json")


# appended to by every (re)start of a run; tracking.json: the tracked run a resumed run continues
CONTINUED_FILES = ("run_info.jsonl", "metrics.jsonl", "tracking.json")


def pull_run_files(run_dir: Path, location: str, names=CONTINUED_FILES) -> None:
    """Before a (re)start of a run on object storage: its appendable files (run_info.jsonl,
    metrics.jsonl, tracking.json; ``names``, relative paths) from ``location`` into the local
    staging directory, unless already there."""
    if not storage.is_uri(location):
        return
    for name in names:
        remote = storage.join(location, name)
        if not (run_dir / name).exists() and storage.is_file(remote):
            storage.download_file(remote, run_dir / name)


def push_run_files(run_dir: Path, location: str, names=RUN_FILES, tensorboard: bool = True) -> None:
    """Upload the run files of the staging directory to ``location`` (whole files, after they were
    written locally); TensorBoard event files too."""
    if not storage.is_uri(location):
        return
    for name in names:
        if (run_dir / name).is_file():
            storage.upload_file(run_dir / name, storage.join(location, name))
    if tensorboard and (run_dir / "tensorboard").is_dir():
        storage.upload_tree(run_dir / "tensorboard", storage.join(location, "tensorboard"))


def write_run_files(run_dir: Path, config: dict, location: str | None = None, **info) -> Path:
    """``config.yaml`` (resolved config) and one ``run_info.jsonl`` line per (re)start of the run;
    with ``location`` on object storage, both are uploaded there. No environment variables are
    recorded (credentials live there)."""
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(config)), sort_keys=False))
    record = {"versions": versions(), "git_sha": git_sha(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "argv": sys.argv, **info}
    with open(run_dir / "run_info.jsonl", "a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")
    if location is not None and storage.is_uri(location):
        push_run_files(run_dir, location, ("config.yaml", "run_info.jsonl"), tensorboard=False)
    return run_dir
