"""The built wheel stands on its own: installed into a fresh venv outside the checkout, ``cfdist`` runs,
finds its packaged configs by name, predicts from a portable checkpoint and fine-tunes.

The wheel is built from a copy of the repository's files (so no build/ or egg-info lands in the
checkout). The new venv downloads nothing: a ``.pth`` line appends this environment's site-packages
(torch, ray, ... ) to its ``sys.path``; ``.pth`` files in a directory added that way are not
processed, so this environment's editable cfdist install stays invisible there, and ``import
cfdist`` can only find the installed wheel.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

from conftest import tiny_model

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TINY = tiny_model(n_blocks=1, d_model=16, n_heads=2, d_ff=16, n_basis=8, head_hidden=8)
# conftest.shard_dir's tables reach 8.9095 A, a hair short of the default model's 8.90954 A (4.5 sigma_max)
SHARD_MODEL = {**TINY, "cutoff_sigmas": 4.4}
COMMANDS = ("preprocess", "pretrain", "finetune", "prepare-task", "export", "evaluate", "predict", "configs")
# what the fallback copy (no git) leaves out: top-level run/data folders, and caches anywhere
_SKIP_TOP = {".git", ".venv", "venv", "build", "dist", "outputs", "runs", "data", "shared"}
_SKIP_ANY = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
PARENT_SITE = list(dict.fromkeys(sysconfig.get_path(k) for k in ("purelib", "platlib")))  # this env's site-packages


def _timed(label: str, cmd, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    t0 = time.perf_counter()
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    print(f"[packaging] {label}: {time.perf_counter() - t0:.1f} s (rc {res.returncode})")
    return res


def _repo_files(root: Path) -> list[str]:
    """Tracked and untracked-but-not-ignored files (what a clone plus local edits holds); a symlink
    (``cfdist/configs -> ../configs``) is listed as itself, not followed."""
    try:
        if not (root / ".git").exists():  # not a checkout (e.g. the copy .ci/run tests): walk it instead
            raise FileNotFoundError(root / ".git")
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-co", "--exclude-standard", "-z"],
                             capture_output=True, check=True, timeout=60).stdout.decode()
        names = [n for n in out.split("\0") if n]
    except (OSError, subprocess.SubprocessError):
        names = []
        for dirpath, dirnames, filenames in os.walk(root):
            rel = Path(dirpath).relative_to(root)
            dirnames[:] = [d for d in dirnames if d not in _SKIP_ANY and not d.endswith(".egg-info")
                           and not (rel == Path(".") and d in _SKIP_TOP)]
            names += [str(rel / d) for d in dirnames if (Path(dirpath) / d).is_symlink()]  # os.walk does not enter them
            names += [str(rel / f) for f in filenames if not f.endswith((".pyc", ".pyo"))]
    # a deleted tracked file is still listed
    return sorted(n for n in names if (root / n).is_symlink() or (root / n).is_file())


def _copy(src: Path, dst: Path) -> None:
    """One listed file, a symlink copied as a symlink (what a clone holds)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_symlink():
        dst.symlink_to(os.readlink(src))
    else:
        shutil.copy2(src, dst)


def _env(venv: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(RAY_AUTH_MODE="disabled", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", VIRTUAL_ENV=str(venv),
               PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """cfdist-*.whl built (no build isolation, nothing downloaded) from a copy of the repository's files."""
    tmp = tmp_path_factory.mktemp("wheel")
    src, dist = tmp / "src", tmp / "dist"
    t0 = time.perf_counter()
    files = _repo_files(ROOT)
    assert "pyproject.toml" in files and "cfdist/__init__.py" in files, files[:20]
    assert (ROOT / "cfdist" / "configs").is_symlink() and "cfdist/configs" in files, "cfdist/configs -> ../configs"
    for name in files:
        _copy(ROOT / name, src / name)
    print(f"[packaging] copy {len(files)} files: {time.perf_counter() - t0:.1f} s")
    res = _timed("pip wheel", [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                               "--no-index", "-w", dist, src], env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    wheels = list(dist.glob("cfdist-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv (outside the checkout) with the wheel installed and this environment's dependencies visible."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    res = _timed("python -m venv", [sys.executable, "-m", "venv", venv])
    assert res.returncode == 0, res.stderr[-3000:]
    res = _timed("pip install wheel", [venv / "bin" / "pip", "install", "--no-deps", "--no-index", wheel],
                 env=_env(venv), cwd=venv.parent)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # only now (so that pip never sees, let alone touches, this environment's own cfdist install)
    site = subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True, env=_env(venv)).stdout.strip()
    (Path(site) / "_cfdist_test_parent_env.pth").write_text("".join(f"{p}\n" for p in PARENT_SITE))
    return venv


def _run(venv: Path, label: str, *args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return _timed(label, args, timeout=timeout, env=_env(venv), cwd=cwd)


def _ok(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 0, f"rc {res.returncode}\nstdout:\n{res.stdout[-3000:]}\nstderr:\n{res.stderr[-5000:]}"
    return res.stdout


def test_wheel_holds_the_package_and_its_configs_only(wheel):
    """Every module, and every YAML of the top-level ``configs/`` as ``cfdist/configs/...`` (the wheel
    holds the files themselves, reached through the ``cfdist/configs`` symlink at build time)."""
    archive = zipfile.ZipFile(wheel)
    names = set(archive.namelist())
    top = {n.split("/", 1)[0] for n in names}
    assert top == {"cfdist", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, sorted(top)
    files = _repo_files(ROOT)
    modules = {n for n in files if n.startswith("cfdist/") and n.endswith(".py")}
    configs = {"cfdist/" + n for n in files if n.startswith("configs/") and n.endswith(".yaml")}
    assert {"model", "pretrain", "finetune", "deepspeed"} <= {Path(n).parent.name for n in configs}
    assert modules - names == set(), "modules missing from the wheel"
    assert configs - names == set(), "packaged configs missing from the wheel"
    for name in sorted(configs):  # the file's text, not a link to it
        assert archive.read(name).decode() == (ROOT / name.removeprefix("cfdist/")).read_text(), name


def test_cli_runs_from_the_installed_wheel(venv, tmp_path):
    out = _ok(_run(venv, "cfdist --help", venv / "bin" / "cfdist", "--help", cwd=tmp_path))
    assert all(f"cfdist {c}" in out for c in COMMANDS), out
    probe = ("import cfdist, importlib.resources, importlib.util, json, sys; print(json.dumps({'cfdist': cfdist.__file__, "
             "'configs': [str(importlib.resources.files('cfdist') / 'configs')], 'scripts': [importlib.util.find_spec(m) "
             "is not None for m in ('launch', 'preprocess')], 'path': sys.path}))")
    info = json.loads(_ok(_run(venv, "import cfdist", venv / "bin" / "python", "-c", probe, cwd=tmp_path)))
    site = venv.resolve()
    assert Path(info["cfdist"]).resolve().is_relative_to(site), info["cfdist"]
    assert all(Path(p).resolve().is_relative_to(site) and Path(p).is_dir() and not Path(p).is_symlink()
               for p in info["configs"]), info["configs"]
    assert info["scripts"] == [False, False], "launch/ or preprocess/ importable from the installed wheel"
    # nothing of the checkout on sys.path (this environment's site-packages may itself lie inside it)
    assert not [p for p in info["path"] if p and p not in PARENT_SITE and Path(p).resolve().is_relative_to(ROOT)], \
        info["path"]


def test_packaged_configs_are_listed_and_found_by_name(venv, tmp_path):
    out = _ok(_run(venv, "cfdist configs", venv / "bin" / "cfdist", "configs", cwd=tmp_path))
    for kind, name in [("model", "crystalformer"), ("pretrain", "megnet_slice"), ("finetune", "megnet_slice_eform"),
                       ("deepspeed", "zero2")]:
        assert f"{kind}:" in out and f"  {name} " in out, out
    out = _ok(_run(venv, "cfdist configs finetune NAME", venv / "bin" / "cfdist", "configs", "finetune",
                   "megnet_slice_eform", cwd=tmp_path))
    assert out == (ROOT / "configs" / "finetune" / "megnet_slice_eform.yaml").read_text()


def test_predict_from_a_portable_checkpoint(venv, tmp_path, megnet_records):
    import torch

    from cfdist import Crystalformer, CrystalformerConfig, save_portable
    from conftest import freeze_sigma_stats

    torch.manual_seed(0)
    ckpt = save_portable(tmp_path / "model.pt", freeze_sigma_stats(
        Crystalformer(CrystalformerConfig(target_names=["e_form"], **TINY))))
    records = megnet_records[:5]
    (tmp_path / "structures.json").write_text(json.dumps(records))
    _ok(_run(venv, "cfdist predict", venv / "bin" / "cfdist", "predict", "--checkpoint", ckpt,
             "structures.json", "--out", "preds.csv", cwd=tmp_path))
    with open(tmp_path / "preds.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    assert all(r["e_form"] and not r["error"] for r in rows), rows
    assert all(abs(float(r["e_form"])) < 1e3 for r in rows), rows


def test_finetune_with_a_packaged_config_by_name(venv, tmp_path, shard_dir):
    out_dir = tmp_path / "runs"
    tiny = "{" + ", ".join(f"{k}: {v}" for k, v in SHARD_MODEL.items()) + "}"
    _ok(_run(venv, "cfdist finetune", venv / "bin" / "cfdist", "finetune", "--config", "megnet_slice_eform",
             f"data.shards={shard_dir}", f"output_dir={out_dir}", "epochs=1", "swa_epochs=0", "data.batch_size=8",
             "data.test_split=", f"model={tiny}", cwd=tmp_path, timeout=600))
    run_dir = out_dir / "megnet_slice_eform"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["epochs"] == 1 and results["n_train"] == 48 and "final" in results["val"], results
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "final.pt").is_file()
