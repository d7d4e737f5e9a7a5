"""What every run writes next to its checkpoints: resolved config, package versions, git SHA."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path



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


def write_run_files(run_dir: Path, config: dict, **info) -> Path:
    """``config.yaml`` (resolved config) and one ``run_info.jsonl`` line per (re)start of the run."""
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(config)), sort_keys=False))
    record = {"versions": versions(), "git_sha": git_sha(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "argv": sys.argv, **info}
    with open(run_dir / "run_info.jsonl", "a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")
    return run_dir
