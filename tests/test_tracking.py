"""Experiment tracking (cfdist.run.tracking): the tracking section, and MLflow on a local sqlite store
(offline, telemetry off): the resolved config, every metric, the checkpoints as artifacts, and one
tracked run across a preemption and its resume."""

from __future__ import annotations

import json
import os
import signal
import threading

import pytest

from test_finetune import ft_shards, make_config  # noqa: F401 - ft_shards: the session fixture
from test_preemption import logged_steps, signal_self_at_step


def test_tracking_section_defaults_and_unknown_backends():
    from cfdist.config import ConfigError
    from cfdist.finetune.config import finetune_config_from_dict
    from cfdist.train.config import load_pretrain_config

    assert load_pretrain_config("megnet_slice").tracking.backend == "tensorboard"
    with pytest.raises(ConfigError, match="tracking.backend must be one of tensorboard, mlflow, wandb"):
        finetune_config_from_dict({"tracking": {"backend": "neptune"}})
    with pytest.raises(ConfigError, match="unknown"):
        finetune_config_from_dict({"tracking": {"backend": "mlflow", "url": "x"}})


def preempted_then_resumed(ft_shards, out, kw) -> tuple[str, dict]:
    """A tiny in-process fine-tuning in ``out`` stopped by a real SIGTERM at step 2, then resumed
    (``init_from=resume``): (the tracked run id the first start recorded, the resumed run's results)."""
    from cfdist.finetune.loop import local_finetune
    from cfdist.run.preempt import STOP_SIGNALS, StopRequest

    run_dir = out / "ft"
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        sender = threading.Thread(target=signal_self_at_step, args=(run_dir, 2), daemon=True)
        sender.start()
        stopped = local_finetune(make_config(ft_shards, out, **kw))
        sender.join()
        assert stopped.get("preempted")
        first_id = json.loads((run_dir / "tracking.json").read_text())["run_id"]
        results = local_finetune(make_config(ft_shards, out, init_from="resume", **kw))
    finally:
        StopRequest.clear()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return first_id, results


@pytest.mark.slow  # ~70 s on 2 cores, most of it MLflow creating its sqlite store (Alembic migrations)
def test_mlflow_run_gets_config_metrics_and_model_and_survives_a_preemption(ft_shards, tmp_path,  # noqa: F811
                                                                           monkeypatch):
    from cfdist.run.tracking import TrackingSection, log_artifacts

    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    monkeypatch.delenv("DO_NOT_TRACK", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory (./mlruns)
    kw = dict(epochs=3, swa_epochs=1, tracking={"backend": "mlflow", "experiment": "ft-test"})
    run_dir = tmp_path / "runs" / "ft"
    first_id, results = preempted_then_resumed(ft_shards, tmp_path / "runs", kw)
    assert os.environ.get("MLFLOW_DISABLE_TELEMETRY") == "true"
    record = json.loads((run_dir / "tracking.json").read_text())
    assert record["backend"] == "mlflow" and record["run_id"] == first_id  # the resume continued it
    # the driver's path for pretraining's model.pt: attach a file to the run by its recorded id
    extra = tmp_path / "model.pt"
    extra.write_bytes(b"not a model, just bytes")
    log_artifacts(TrackingSection(backend="mlflow", experiment="ft-test"), run_dir, [extra])

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ft-test")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [first_id]  # one tracked run for the preempted + resumed training
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.0005" and run.data.params["data.batch_size"] == "8"
    assert json.loads(run.data.params["data.targets"]) == ["e_form"]
    history = client.get_metric_history(first_id, "loss")
    assert sorted(m.step for m in history) == logged_steps(run_dir) == list(range(1, 16))
    assert client.get_metric_history(first_id, "val_loss")  # epoch records too
    artifacts = {a.path for a in client.list_artifacts(first_id)}
    assert {"final.pt", "swa.pt", "results.json", "model.pt"} <= artifacts, artifacts
    assert experiment.artifact_location == (tmp_path / "runs" / "mlflow-artifacts").as_uri()
    assert not (tmp_path / "mlruns").exists()
    assert results["steps"] == 15


def wandb_records(path) -> list:
    """The records of an offline W&B run file (``run-<id>.wandb``: a LevelDB log of protobuf
    ``Record`` messages after a 7-byte header; 32 KiB blocks, records split FIRST / MIDDLE / LAST)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, records, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's trailer: too short for a record header
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL / LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
        elif kind == 0:  # zero padding at a block's end
            pending = b""
    return records


@pytest.mark.slow  # ~15 s on 2 cores: W&B starts its service process
def test_wandb_offline_run_gets_config_metrics_and_model_and_survives_a_preemption(ft_shards, tmp_path,  # noqa: F811
                                                                                 monkeypatch):
    """tracking.backend=wandb with WANDB_MODE=offline on a tiny in-process fine-tuning, preempted by a
    real SIGTERM and resumed: one W&B run id across both starts (and the driver's model.pt
    artifact), the resolved config, every logged step and the checkpoints in the offline run files."""
    from cfdist.run.tracking import TrackingSection, log_artifacts

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory (./wandb)
    kw = dict(epochs=2, swa_epochs=1, tracking={"backend": "wandb", "experiment": "ft-test"})
    run_dir = tmp_path / "runs" / "ft"
    first_id, results = preempted_then_resumed(ft_shards, tmp_path / "runs", kw)
    record = json.loads((run_dir / "tracking.json").read_text())
    assert record["backend"] == "wandb" and record["run_id"] == first_id  # the resume continued it
    model = tmp_path / "model.pt"  # the driver's path for pretraining's model.pt
    model.write_bytes(b"not a model, just bytes")
    log_artifacts(TrackingSection(backend="wandb", experiment="ft-test"), run_dir, [model])
    import wandb

    wandb.teardown()  # the W&B service process writes the run files: let it finish them

    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 3 and all(f.name == f"run-{first_id}.wandb" for f in files), files  # one id, 3 starts
    records = [r for f in files for r in wandb_records(f)]
    config = {item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "run"
              for item in r.run.config.update}
    assert config["optim"]["lr"] == 0.0005 and config["data"]["targets"] == ["e_form"], config.keys()
    steps = sorted(int(next(i.value_json for i in r.history.item if i.nested_key == ["_step"]))
                   for r in records if r.WhichOneof("record_type") == "history"
                   and any(i.nested_key == ["loss"] for i in r.history.item))
    assert steps == logged_steps(run_dir) == list(range(1, 11))  # 5 steps an epoch, each logged once
    artifacts = {m.path for r in records if r.WhichOneof("record_type") == "artifact"
                 for m in r.artifact.manifest.contents}
    assert {"final.pt", "swa.pt", "best.pt", "results.json", "model.pt"} <= artifacts, artifacts
    assert not (tmp_path / "wandb").exists()
    assert results["steps"] == 10
