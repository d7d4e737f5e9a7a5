"""The shard check before training (cfdist.manifest.ShardSet.verify): parallel hashing, the
verification records (``DIR/.verified.json``) that spare unchanged files a re-hash, the ``full`` and
``off`` modes, read-only directories, and the ``data.verify_checksums`` config values.

Which files a check really reads is observed with a Python audit hook on ``open`` (hashing opens the
file from Python; Parquet footers are read by Arrow's C++ reader, which the hook does not see).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

from cfdist.config import ConfigError
from cfdist.manifest import VERIFY_CACHE, ShardSet, checksum_mode
from cfdist.shards import ShardError

N_FILES = 6  # the conftest shard_dir: 4 train + 2 val files
BOTH = ["train", "val"]

_opened: list[str] = []
_recording = [False]


def _audit(event, args):
    if _recording[0] and event == "open" and str(args[0]).endswith(".parquet"):
        _opened.append(os.path.basename(str(args[0])))


sys.addaudithook(_audit)  # cannot be removed; records only inside hashed_files()


def hashed_files(sset: ShardSet, **kwargs) -> tuple[object, list[str]]:
    """(the verify report, names of the shard files opened from Python, i.e. hashed, during the check)."""
    _opened.clear()
    _recording[0] = True
    try:
        report = sset.verify(BOTH, **kwargs)
    finally:
        _recording[0] = False
    return report, sorted(_opened)


@pytest.fixture()
def shards(shard_dir, tmp_path):
    """A private copy of the conftest shard directory (without any records a test left in the original)."""
    dst = tmp_path / "shards"
    shutil.copytree(shard_dir, dst, ignore=shutil.ignore_patterns(VERIFY_CACHE))
    return dst


@pytest.fixture()
def fallback(tmp_path):
    return tmp_path / "user-cache"


def _flip_a_byte(path, restore_mtime: bool = False) -> None:
    """Same size, different content (what only a checksum sees); optionally put the old mtime back."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    if restore_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size


# ----------------------------------------------------------------------------- the cache
def test_second_check_hashes_nothing(shards, fallback):
    report, opened = hashed_files(ShardSet(shards), cache_fallback=fallback)
    assert (report.files, report.hashed, report.cached) == (N_FILES, N_FILES, 0) and len(opened) == N_FILES
    assert report.cache == shards / VERIFY_CACHE and report.summary().startswith(
        f"checked {N_FILES} shards ({N_FILES} hashed, 0 cached) in ")
    records = json.loads((shards / VERIFY_CACHE).read_text())["files"]
    manifest = json.loads((shards / "manifest.json").read_text())
    assert records == {e["file"]: {**records[e["file"]], "sha256": e["sha256"]} for e in manifest["shards"]}
    assert set(records["train/part-000000.parquet"]) == {"size", "mtime_ns", "ctime_ns", "inode", "sha256"}

    report, opened = hashed_files(ShardSet(shards), cache_fallback=fallback)  # e.g. a restarted run
    assert (report.hashed, report.cached, opened) == (0, N_FILES, [])
    assert f"({0} hashed, {N_FILES} cached)" in report.summary()
    assert not fallback.exists()  # the shard directory was writable


def test_changed_files_are_hashed_again(shards, fallback):
    ShardSet(shards).verify(BOTH, cache_fallback=fallback)
    touched = shards / "train/part-000001.parquet"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))  # same bytes, new mtime
    report, opened = hashed_files(ShardSet(shards), cache_fallback=fallback)
    assert (report.hashed, report.cached, opened) == (1, N_FILES - 1, ["part-000001.parquet"])

    _flip_a_byte(shards / "val/part-000005.parquet")
    with pytest.raises(ShardError, match=r"part-000005\.parquet: sha256 .* does not match .*corrupted"):
        ShardSet(shards).verify(BOTH, cache_fallback=fallback)


def test_files_that_passed_are_recorded_when_another_fails(shards, fallback):
    _flip_a_byte(shards / "val/part-000005.parquet")  # hashed last (manifest order, one thread)
    with pytest.raises(ShardError, match=r"part-000005\.parquet: sha256"):
        ShardSet(shards).verify(BOTH, workers=1, cache_fallback=fallback)
    records = json.loads((shards / VERIFY_CACHE).read_text())["files"]
    assert len(records) == N_FILES - 1 and "val/part-000005.parquet" not in records


def test_content_replaced_under_the_old_mtime_is_still_caught(shards, fallback):
    """Size and mtime restored (os.utime) after a rewrite: the ctime in the record still differs."""
    ShardSet(shards).verify(BOTH, cache_fallback=fallback)
    _flip_a_byte(shards / "val/part-000004.parquet", restore_mtime=True)
    with pytest.raises(ShardError, match=r"part-000004\.parquet: sha256 .* does not match"):
        ShardSet(shards).verify(BOTH, cache_fallback=fallback)
    with pytest.raises(ShardError, match=r"part-000004\.parquet: sha256 .* does not match"):
        ShardSet(shards).verify(BOTH, checksums="full", cache_fallback=fallback)


def test_full_rehashes_and_off_hashes_nothing(shards, fallback):
    report, opened = hashed_files(ShardSet(shards), checksums=False, cache_fallback=fallback)
    assert (report.files, report.hashed, report.cached, opened, report.cache) == (N_FILES, 0, 0, [], None)
    assert "checksums off" in report.summary() and not (shards / VERIFY_CACHE).exists()  # nothing vouched for
    ShardSet(shards).verify(BOTH, cache_fallback=fallback)
    report, opened = hashed_files(ShardSet(shards), checksums="full", cache_fallback=fallback)
    assert (report.hashed, report.cached, len(opened)) == (N_FILES, 0, N_FILES)
    assert "(6 hashed, 0 cached; full re-hash)" in report.summary()


def test_records_of_another_build_or_a_torn_file_are_ignored(shards, fallback):
    (shards / VERIFY_CACHE).write_text('{"version": 1, "files": {"train/part-0')  # torn
    assert ShardSet(shards).verify(BOTH, cache_fallback=fallback).hashed == N_FILES
    records = json.loads((shards / VERIFY_CACHE).read_text())
    # the same file name with another build's sha256, and a file the manifest no longer lists
    records["files"]["train/part-000000.parquet"]["sha256"] = "0" * 64
    records["files"]["train/part-999999.parquet"] = dict(records["files"]["train/part-000001.parquet"])
    (shards / VERIFY_CACHE).write_text(json.dumps(records))
    report, opened = hashed_files(ShardSet(shards), cache_fallback=fallback)
    assert (report.hashed, opened) == (1, ["part-000000.parquet"])
    assert "train/part-999999.parquet" not in json.loads((shards / VERIFY_CACHE).read_text())["files"]


def test_one_split_keeps_the_other_splits_records(shards, fallback):
    ShardSet(shards).verify(["val"], cache_fallback=fallback)
    ShardSet(shards).verify(["train"], cache_fallback=fallback)
    assert hashed_files(ShardSet(shards), cache_fallback=fallback)[0].cached == N_FILES


# ----------------------------------------------------------------------------- unwritable directories
def test_records_go_to_the_fallback_when_the_directory_cannot_hold_them(shards, fallback, capsys):
    (shards / VERIFY_CACHE).mkdir()  # the record file's name is taken: writing it fails like a read-only dir
    report = ShardSet(shards).verify(BOTH, cache_fallback=fallback)
    assert report.hashed == N_FILES and report.cache is not None and report.cache.parent == fallback
    assert report.warning is None and capsys.readouterr().err == ""
    report, opened = hashed_files(ShardSet(shards), cache_fallback=fallback)
    assert (report.cached, opened) == (N_FILES, [])  # read back from the fallback

    blocked = shards.parent / "not-a-directory"
    blocked.write_text("a file where the fallback directory would go")
    report = ShardSet(shards).verify(BOTH, cache_fallback=blocked)
    assert report.hashed == N_FILES and report.cache is None  # the check itself passes
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: shard verification records not saved")
    assert report.warning == err.strip()


def test_read_only_shard_directory(shards, fallback):
    for path in [shards, *shards.rglob("*")]:
        if path.is_dir():
            path.chmod(0o555)
    try:
        if os.access(shards, os.W_OK):
            pytest.skip("this user (root?) can write to a 0555 directory; the test above covers an unwritable "
                        "record file")
        report = ShardSet(shards).verify(BOTH, cache_fallback=fallback)
        assert report.cache is not None and report.cache.parent == fallback
        assert ShardSet(shards).verify(BOTH, cache_fallback=fallback).cached == N_FILES
    finally:
        for path in [shards, *shards.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)


# ----------------------------------------------------------------------------- parallel
def test_parallel_check_equals_serial(shard_dir, tmp_path, fallback):
    copies = {}
    for workers in (1, 4):
        copies[workers] = dst = tmp_path / f"w{workers}"
        shutil.copytree(shard_dir, dst, ignore=shutil.ignore_patterns(VERIFY_CACHE))
        report = ShardSet(dst).verify(BOTH, workers=workers, cache_fallback=fallback)
        assert (report.files, report.hashed, report.cached) == (N_FILES, N_FILES, 0)
    records = [json.loads((copies[w] / VERIFY_CACHE).read_text())["files"] for w in (1, 4)]
    assert [{k: v["sha256"] for k, v in r.items()} for r in records][0] == \
        [{k: v["sha256"] for k, v in r.items()} for r in records][1]
    for workers, dst in copies.items():
        # two bad files: a checksum failure early in the list and a truncated file late in it; the
        # sizes and footers of all files are checked before any hashing, so the truncation is named
        _flip_a_byte(dst / "train/part-000000.parquet")
        late = dst / "val/part-000005.parquet"
        late.write_bytes(late.read_bytes()[:-10])
        with pytest.raises(ShardError, match=r"part-000005\.parquet: .* bytes, the manifest says .*truncated"):
            ShardSet(dst).verify(BOTH, workers=workers, checksums="full", cache_fallback=fallback)
        late.unlink()
        with pytest.raises(ShardError, match=r"part-000005\.parquet: listed in the manifest but missing"):
            ShardSet(dst).verify(BOTH, workers=workers, cache_fallback=fallback)
        with pytest.raises(ShardError, match=r"part-000000\.parquet: sha256 .* does not match"):
            ShardSet(dst).verify(["train"], workers=workers, cache_fallback=fallback)


def test_progress_bar_for_many_files(shards, fallback, capsys):
    ShardSet(shards).verify(BOTH, cache_fallback=fallback, progress=True)
    err = capsys.readouterr().err
    assert "shard footers" in err and "shard sha256" in err and f"{N_FILES}/{N_FILES}" in err
    ShardSet(shards).verify(BOTH, cache_fallback=fallback)  # 6 files: below the threshold, no bar
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- drivers and configs
def test_pretrain_driver_prints_the_cost(shards, fallback, monkeypatch, capsys):
    from cfdist.train.config import load_pretrain_config
    from cfdist.train.driver import check_shards

    monkeypatch.setenv("CFDIST_CACHE_DIR", str(fallback))
    # the conftest shards' cutoff (8.9095 A) is a hair below the default model's: a model with a smaller reach
    model = "model=" + json.dumps({"n_blocks": 1, "d_model": 16, "n_heads": 2, "cutoff_sigmas": 4.0})
    cfg = load_pretrain_config("megnet_slice", [f"data.shards={shards}", model])
    check_shards(cfg)
    check_shards(cfg)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("shards ok:")]
    assert len(lines) == 2
    assert f"checked {N_FILES} shards ({N_FILES} hashed, 0 cached) in " in lines[0]
    assert f"checked {N_FILES} shards (0 hashed, {N_FILES} cached) in " in lines[1]
    check_shards(load_pretrain_config("megnet_slice", [f"data.shards={shards}", model, "data.verify_checksums=full"]))
    assert "(6 hashed, 0 cached; full re-hash)" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_verify_checksums_config_values(kind, tmp_path):
    from cfdist.finetune.config import load_finetune_config
    from cfdist.train.config import load_pretrain_config

    def load(value):
        if kind == "pretrain":
            return load_pretrain_config("megnet_slice", [f"data.verify_checksums={value}"]).data
        return load_finetune_config(None, [f"data.verify_checksums={value}"]).data

    assert load("true").verify_checksums is True and load("false").verify_checksums is False
    assert load("full").verify_checksums == "full"
    for bad in ("cached", "FULL", "1", "yes-please", "[true]"):
        with pytest.raises(ConfigError, match=r"data\.verify_checksums must be true .*, \"full\" .* or false"):
            load(bad)
    # a YAML file (old configs hold booleans) reads the same way
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("data:\n  verify_checksums: full\n")
    loader = load_pretrain_config if kind == "pretrain" else load_finetune_config
    assert loader(str(yaml_file)).data.verify_checksums == "full"


def test_checksum_mode_values():
    assert [checksum_mode(v) for v in (True, "full", False)] == ["cached", "full", "off"]
    for bad in (1, 0, None, "true", "Full"):
        with pytest.raises(ValueError, match="verify_checksums must be"):
            checksum_mode(bad)
