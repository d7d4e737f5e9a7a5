"""cfdist.storage against real servers on loopback: moto's S3 server and the fake GCS server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from storage_servers import gcs_server, patched_env, s3_server

from cfdist import storage


@pytest.fixture(scope="module", params=["s3", "gs"])
def bucket(request):
    """``s3://cfdist-unit`` or ``gs://cfdist-unit`` on a fresh server (stopped after the module)."""
    server = s3_server() if request.param == "s3" else gcs_server()
    with server as srv:
        yield srv.make_bucket("cfdist-unit")


def test_uris_never_go_through_pathlib(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.is_uri("s3://bucket/runs") and storage.is_uri("gs://b/x") and not storage.is_uri("runs")
    assert not storage.is_uri(Path("s3://bucket/runs"))  # a Path is local by construction
    assert storage.absolute("s3://bucket/runs/") == "s3://bucket/runs"
    assert storage.absolute("runs") == str(tmp_path / "runs")
    assert storage.join("s3://bucket/runs/", "a", "/b.pt") == "s3://bucket/runs/a/b.pt"
    assert storage.join("runs", "a") == "runs/a"
    assert storage.basename("gs://b/x/model.pt") == "model.pt"
    with pytest.raises(storage.StorageError, match="unsupported storage scheme 'http'"):
        storage.absolute("http://example.org/shards")
    assert not list(tmp_path.iterdir())  # nothing named s3: appeared


def test_storage_section_sets_endpoints_not_over_explicit_variables():
    with patched_env({"AWS_ENDPOINT_URL_S3": "", "AWS_DEFAULT_REGION": "eu-west-1"}):
        storage.StorageSection(endpoint="http://10.1.2.3:9000", region="us-east-1").apply()
        assert os.environ["AWS_ENDPOINT_URL_S3"] == "http://10.1.2.3:9000"
        assert os.environ["AWS_DEFAULT_REGION"] == "eu-west-1"  # the variable wins
        env = storage.worker_env()
        assert env["AWS_ENDPOINT_URL_S3"] == "http://10.1.2.3:9000" and env["AWS_EC2_METADATA_DISABLED"] == "true"


def test_write_read_list_and_identity(bucket, tmp_path):
    root = storage.join(bucket, "t1")
    assert not storage.exists(root) and storage.list_files(root) == []
    storage.write_text(storage.join(root, "a.json"), '{"x": 1}')
    storage.write_bytes(storage.join(root, "sub", "b.bin"), b"\x00" * 1000)
    assert storage.read_text(storage.join(root, "a.json")) == '{"x": 1}'
    assert storage.is_file(storage.join(root, "a.json")) and not storage.is_file(storage.join(root, "zz"))
    assert storage.list_files(root) == [("a.json", 8), ("sub/b.bin", 1000)]
    assert storage.size(storage.join(root, "sub", "b.bin")) == 1000
    first = storage.identity(storage.join(root, "sub", "b.bin"))
    assert first["size"] == 1000 and first["etag"]
    storage.write_bytes(storage.join(root, "sub", "b.bin"), b"\x01" * 1000)  # same size, new content
    assert storage.identity(storage.join(root, "sub", "b.bin")) != first
    with pytest.raises(FileNotFoundError):
        storage.identity(storage.join(root, "missing.pt"))
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "missing.pt"))


def test_upload_tree_download_tree_roundtrip(bucket, tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "x.txt").write_text("x")
    (src / "y.txt").write_text("yy")
    (src / "skipme").mkdir()
    (src / "skipme" / "z").write_text("z")
    assert storage.upload_tree(src, storage.join(bucket, "tree"), skip=("skipme",)) == ["d/x.txt", "y.txt"]
    out = storage.download_tree(storage.join(bucket, "tree"), tmp_path / "dst")
    assert (out / "d" / "x.txt").read_text() == "x" and (out / "y.txt").read_text() == "yy"
    assert not (out / "skipme").exists()


def test_cached_copy_downloads_once_and_again_after_a_change(bucket, tmp_path):
    loc = storage.join(bucket, "ckpt", "model.pt")
    storage.write_bytes(loc, b"version one")
    with patched_env({"CFDIST_CACHE_DIR": str(tmp_path / "cache")}):
        first = storage.cached_copy(loc, "checkpoints")
        assert first.read_bytes() == b"version one" and str(first).startswith(str(tmp_path / "cache"))
        first.write_bytes(b"version 0ne")  # same size: a second call trusts the cache (no download)
        assert storage.cached_copy(loc, "checkpoints").read_bytes() == b"version 0ne"
        storage.write_bytes(loc, b"version two!")  # the object changed: a new key, a fresh copy
        second = storage.cached_copy(loc, "checkpoints")
        assert second != first and second.read_bytes() == b"version two!"


def test_parquet_row_group_is_a_range_read(bucket, tmp_path):
    """Reading one row group of ten pulls a fraction of the object, not the file."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    local = tmp_path / "t.parquet"
    rng = np.random.default_rng(0)
    pq.write_table(pa.table({"x": rng.random(100_000)}), local, row_group_size=10_000, compression="none")
    loc = storage.join(bucket, "pq", "t.parquet")
    storage.upload_file(local, loc)
    with storage.open_input_file(loc) as raw:
        counted = _CountingFile(raw)
        table = pq.ParquetFile(counted).read_row_group(3)
    assert table.num_rows == 10_000
    assert counted.bytes_read < 0.2 * local.stat().st_size


class _CountingFile:
    """A file-like wrapper counting the bytes read through it (positional reads on the raw file:
    a GCS input file answers a seek to its end with HTTP 416)."""

    def __init__(self, raw):
        self.raw, self.bytes_read, self.pos, self.n = raw, 0, 0, raw.size()
        self.closed = False

    def read(self, n=-1):
        n = self.n - self.pos if n is None or n < 0 else min(n, self.n - self.pos)
        if n <= 0:
            return b""
        data = self.raw.read_at(n, self.pos)
        self.pos += len(data)
        self.bytes_read += len(data)
        return data

    def seek(self, pos, whence=0):
        self.pos = {0: 0, 1: self.pos, 2: self.n}[whence] + pos
        return self.pos

    def tell(self):
        return self.pos

    def size(self):
        return self.n

    def seekable(self):
        return True

    def readable(self):
        return True


# ----------------------------------------------------------------------------- shards on object storage
def test_shard_check_and_stream_read_through_the_bucket(bucket, shard_dir, tmp_path):
    """ShardSet on a URI: sizes, footers and sha256 checked through the filesystem; the records of
    verified objects live in the local cache keyed by size + ETag, so a replaced object is re-hashed
    (and caught); the training stream reads row groups from the objects."""
    from cfdist.data import BatchBudget
    from cfdist.manifest import VERIFY_CACHE, ShardSet
    from cfdist.shards import ShardError
    from cfdist.stream import EpochPlan, RowGroupReader, epoch_batches

    uri = storage.join(bucket, "shards")
    storage.upload_tree(shard_dir, uri, skip=(VERIFY_CACHE,))
    with patched_env({"CFDIST_CACHE_DIR": str(tmp_path / "cache")}):
        shards = ShardSet(uri + "/")
        assert shards.remote and shards.root == uri
        first = shards.verify(["train", "val"])
        assert (first.files, first.hashed, first.cached) == (6, 6, 0)
        assert str(first.cache).startswith(str(tmp_path / "cache"))  # local disk, not the bucket
        again = shards.verify(["train", "val"])
        assert (again.hashed, again.cached) == (0, 6)
        assert not storage.exists(storage.join(uri, VERIFY_CACHE))

        # same size, other bytes: the ETag changes, the record no longer matches, the hash fails
        victim = shards.files("train")[1]
        data = bytearray(storage.read_bytes(victim.path))
        data[len(data) // 2] ^= 0xFF
        storage.write_bytes(victim.path, bytes(data))
        with pytest.raises(ShardError, match=r"part-000001\.parquet: sha256 .* does not match"):
            shards.verify(["train"])
        storage.upload_file(shard_dir / "train" / "part-000001.parquet", victim.path)

        plan = EpochPlan([(e.path, e.rows) for e in shards.files("train")], seed=0, epoch=0, rank=0, world_size=1,
                         window=8, lanes=2, shuffle_files=True, shuffle_rows=True)
        reader = RowGroupReader(cache=64)  # every row group decoded once: at most the files are fetched
        rows = sum(t.num_rows for t, _ in epoch_batches(plan, reader, BatchBudget(max_structures=8)))
    assert rows == shards.n_rows("train") == 48
    assert 0 < reader.bytes_read <= sum(e.bytes for e in shards.files("train"))


def test_publish_uploads_the_manifest_last_and_resumes(bucket, shard_dir, tmp_path):
    """A publish killed after some shards leaves no manifest (readers see no build); the re-run
    uploads only what is missing and commits with the manifest."""
    import json
    import shutil

    from cfdist.manifest import ShardSet
    from cfdist.preprocess.publish import check_target, publish
    from cfdist.preprocess.splits import BuildError
    from cfdist.shards import ShardError

    uri = storage.join(bucket, "published")
    local = tmp_path / "build"
    shutil.copytree(shard_dir, local)
    manifest = json.loads((local / "manifest.json").read_text())
    manifest["content_hash"] = "a" * 64
    (local / "manifest.json").write_text(json.dumps(manifest))
    first = manifest["shards"][0]
    storage.upload_file(local / first["file"], storage.join(uri, first["file"]))  # "killed" after one shard
    with pytest.raises(ShardError, match="no manifest.json"):
        ShardSet(uri)
    assert check_target(uri, manifest["content_hash"], overwrite=False) is False
    report = publish(local, uri, manifest)
    assert (report["uploaded"], report["skipped"]) == (5, 1)
    assert ShardSet(uri).verify(["train", "val"], checksums="full").files == 6
    with pytest.raises(BuildError, match="holds shards with content hash"):
        check_target(uri, "b" * 64, overwrite=False)


def test_storage_config_section_is_typed_and_holds_no_secrets():
    from cfdist.config import ConfigError
    from cfdist.train.config import load_pretrain_config

    cfg = load_pretrain_config("megnet_slice", ["storage.endpoint=http://10.0.0.5:9000", "storage.region=eu-west-1"])
    assert (cfg.storage.endpoint, cfg.storage.region) == ("http://10.0.0.5:9000", "eu-west-1")
    with pytest.raises(ConfigError, match="secret_key"):
        load_pretrain_config("megnet_slice", ["storage.secret_key=abc"])  # secrets: environment only


# ----------------------------------------------------------------------------- fine-tuning runs on object storage
FT_TINY = {"n_blocks": 1, "d_model": 16, "n_heads": 2, "d_ff": 32, "n_basis": 8, "head_hidden": 16,
           "cutoff_sigmas": 4.4}  # the shard_dir tables hold 8.9095 A


@pytest.fixture(scope="module", params=["s3", "gs"])
def ft_bucket(request):
    """``s3://cfdist-ft`` on a moto server / ``gs://cfdist-ft`` on a fake GCS server of its own."""
    with (s3_server() if request.param == "s3" else gcs_server()) as srv:
        yield srv.make_bucket("cfdist-ft")


def test_finetuning_run_lives_in_the_bucket_and_resumes_from_it_on_another_machine(ft_bucket, shard_dir, tmp_path,
                                                                                  monkeypatch):
    """``output_dir=<bucket>/ft-runs``: a real SIGTERM mid-epoch stores last.pt (and the run files) on
    the bucket; with an empty cache (another machine) ``init_from=resume`` continues from the stored
    last.pt and the finished run's checkpoints, results and metrics are all on the bucket, each step
    logged once; nothing is written locally but the caches; a fresh start is refused, then
    ``overwrite=true`` clears the stored run."""
    import json
    import signal
    import threading

    from test_preemption import logged_steps, signal_self_at_step

    import cfdist
    from cfdist.finetune.config import finetune_config_from_dict
    from cfdist.finetune.driver import run
    from cfdist.manifest import VERIFY_CACHE
    from cfdist.run.preempt import STOP_SIGNALS, StopRequest

    bucket = ft_bucket
    storage.StorageSection().apply()  # this server's endpoint: drop cached filesystems
    shards, runs = storage.join(bucket, "ft-shards"), storage.join(bucket, "ft-runs")
    storage.upload_tree(shard_dir, shards, skip=(VERIFY_CACHE,))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)

    def config(**kw):
        # 48 train rows, 12 a step: 4 steps an epoch, 8 in all; SWA over the last epoch
        return finetune_config_from_dict({
            "run_name": "ft", "output_dir": runs + "/", "model": FT_TINY, "epochs": 2, "swa_epochs": 1,
            "log_every": 1, "seed": 3, **kw,
            "data": {"shards": shards, "targets": ["e_form"], "batch_size": 12, "verify_checksums": False}})

    secret = "cfdist-ft-secret-never-written-51c9"  # moto takes any key; none must ever be stored (gs:// too)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        with patched_env({"CFDIST_CACHE_DIR": str(tmp_path / "cache-a")}):
            staged = config().run_dir()
            assert str(staged).startswith(str(tmp_path / "cache-a"))
            sender = threading.Thread(target=signal_self_at_step, args=(staged, 2), daemon=True)
            sender.start()
            stopped = run(config())
            sender.join()
        assert stopped.get("preempted") and stopped["checkpoint"] == f"{runs}/ft/checkpoints/last.pt"
        stored = dict(storage.list_files(f"{runs}/ft"))
        assert {"checkpoints/last.pt", "config.yaml", "run_info.jsonl", "metrics.jsonl"} <= set(stored), stored
        StopRequest.clear()
        with patched_env({"CFDIST_CACHE_DIR": str(tmp_path / "cache-b")}):  # another machine: an empty cache
            results = run(config(init_from="resume"))
            with pytest.raises(SystemExit, match="already holds a run"):
                run(config())
    finally:
        StopRequest.clear()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    assert results["steps"] == 8 and set(results["val"]) == {"final", "swa", "best"}
    stored = dict(storage.list_files(f"{runs}/ft"))
    for name in ("config.yaml", "run_info.jsonl", "metrics.jsonl", "results.json", "checkpoints/last.pt",
                 "checkpoints/best.pt", "checkpoints/final.pt", "checkpoints/swa.pt"):
        assert name in stored, sorted(stored)
    assert any(name.startswith("tensorboard/") for name in stored) and not any(n.startswith("ray/") for n in stored)
    assert len(storage.read_text(f"{runs}/ft/run_info.jsonl").splitlines()) == 2  # one line per start
    assert json.loads(storage.read_text(f"{runs}/ft/results.json"))["steps"] == 8
    (tmp_path / "m").mkdir()
    storage.download_file(f"{runs}/ft/metrics.jsonl", tmp_path / "m" / "metrics.jsonl")
    assert logged_steps(tmp_path / "m") == list(range(1, 9))  # each step once: the stop came before step 4 ran
    with patched_env({"CFDIST_CACHE_DIR": str(tmp_path / "cache-b")}):
        model = cfdist.load(f"{runs}/ft/checkpoints/swa.pt")
    assert model.checkpoint_info["extra"]["step"] == 8
    assert not list(work.iterdir())  # nothing in the working directory (no local folder named s3: / gs:)
    for rel, _ in storage.list_files(f"{runs}/ft"):  # no credential in any run file
        assert secret.encode() not in storage.read_bytes(f"{runs}/ft/{rel}"), rel

    with patched_env({"CFDIST_CACHE_DIR": str(tmp_path / "cache-b")}):
        again = run(config(overwrite=True, epochs=1, swa_epochs=0))
    assert again["steps"] == 4
    stored = dict(storage.list_files(f"{runs}/ft"))
    assert "checkpoints/swa.pt" not in stored and len(storage.read_text(f"{runs}/ft/run_info.jsonl").splitlines()) == 1


def test_cluster_recipe_finetune_and_tune_commands_are_valid_runs_on_object_storage():
    """examples/cluster/ray-cluster-aws.yaml's fine-tuning and sweep jobs: every override a known
    fine-tuning config key, shards, output_dir and checkpoint on the bucket."""
    import re
    import shlex

    from paths import ROOT

    from cfdist.finetune.config import load_finetune_config

    text = (ROOT / "examples" / "cluster" / "ray-cluster-aws.yaml").read_text()
    found = 0
    for match in re.finditer(r"#\s+cfdist (finetune|tune)(?:.*\\\n)*.*", text):
        words = shlex.split(re.sub(r"\\\n#?", " ", match.group(0)).lstrip("# "))
        config = words[words.index("--config") + 1]
        overrides = [w for w in words[2:] if "=" in w and not w.startswith("--")]
        cfg = load_finetune_config(config, overrides)
        assert storage.is_uri(cfg.data.shards) and storage.is_uri(cfg.output_dir) and storage.is_uri(cfg.checkpoint)
        found += 1
    assert found == 2
