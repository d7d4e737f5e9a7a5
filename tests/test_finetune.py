"""Fine-tuning: the paper recipe's pieces, transfer from a portable checkpoint (frozen layers stay
bit-identical), SWA, resume, Ray Train workers, and preprocess -> pretrain -> fine-tune -> predict."""

from __future__ import annotations

import csv
import json
import math
import sys

import numpy as np
import pytest
import torch

from conftest import build_shards, freeze_sigma_stats, ray_env, run, tiny_model

TINY = tiny_model()
TARGETS = ["e_form", "gap pbe"]


@pytest.fixture(scope="session")
def ft_shards(tmp_path_factory, megnet_records):
    """64 real crystals with both labels (band gap missing -> NaN): 40 train / 12 val / 12 test."""
    from cfdist.config import CrystalformerConfig

    root = tmp_path_factory.mktemp("ft")
    records = megnet_records[:64]
    (root / "raw.json").write_text(json.dumps(records))
    split = {"train": [r["id"] for r in records[:40]], "val": [r["id"] for r in records[40:52]],
             "test": [r["id"] for r in records[52:]]}
    (root / "split.json").write_text(json.dumps(split))
    return build_shards([root / "raw.json"], root / "shards", TARGETS, split_file=root / "split.json", shard_size=16,
                        allow_missing_labels=True, cutoff=CrystalformerConfig().cutoff)


def make_config(shards, tmp_path, **kw):
    from cfdist.finetune.config import finetune_config_from_dict

    data = {"shards": str(shards), "targets": ["e_form"], "batch_size": 8, **kw.pop("data", {})}
    base = {"run_name": "ft", "output_dir": str(tmp_path), "model": dict(TINY), "epochs": 3, "swa_epochs": 1,
            "log_every": 1, "seed": 7, "data": data}
    base.update(kw)
    return finetune_config_from_dict(base)


class Stop(Exception):
    """Raised by :func:`stopping_after` to interrupt a run (as a crash would)."""


def stopping_after(epoch: int):
    """A FinetuneTrainer that stops right after writing last.pt at the end of ``epoch``."""
    from cfdist.finetune.loop import FinetuneTrainer

    class StopAfter(FinetuneTrainer):
        def save_last(self):
            super().save_last()
            if self.epoch == epoch:
                raise Stop

    return StopAfter


def trainer_run(cfg, cls=None):
    from cfdist.finetune.loop import FinetuneTrainer

    trainer = (cls or FinetuneTrainer)(cfg)
    return trainer, trainer.run()


@pytest.fixture(scope="module")
def pretrained_ckpt(tmp_path_factory):
    """A portable checkpoint of a tiny e_form model with set sigma statistics."""
    from cfdist import Crystalformer, CrystalformerConfig
    from cfdist.checkpoint import save_portable

    torch.manual_seed(11)
    model = freeze_sigma_stats(Crystalformer(CrystalformerConfig(target_names=["e_form"], **TINY)), seed=4)
    model.target_mean.fill_(-1.5)
    model.target_std.fill_(0.8)
    return save_portable(tmp_path_factory.mktemp("pre") / "model.pt", model)


# ----------------------------------------------------------------------------- recipe pieces
def test_default_config_is_the_paper_recipe():
    from cfdist.finetune.config import FinetuneConfig

    cfg = FinetuneConfig()
    o = cfg.optim
    assert (o.lr, o.betas, o.weight_decay, o.grad_clip, o.schedule, o.inverse_sqrt_t) == \
        (5e-4, (0.9, 0.98), 1e-5, 1.0, "inverse_sqrt", 4000)
    assert (cfg.seed, cfg.epochs, cfg.swa_epochs, cfg.data.batch_size, cfg.data.drop_last) == (123, 500, 50, 128, True)


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    from cfdist.config import ConfigError
    from cfdist.finetune.config import load_finetune_config

    with pytest.raises(ConfigError, match="unknown"):
        load_finetune_config("megnet_slice_eform", ["transfer.freeze_block=2"])
    with pytest.raises(ConfigError, match="init_from"):
        load_finetune_config(None, ["init_from=finetune"])
    with pytest.raises(ConfigError, match="checkpoint"):
        load_finetune_config(None, ["init_from=pretrained"])
    with pytest.raises(ConfigError, match="swa_epochs"):
        load_finetune_config(None, ["epochs=10", "swa_epochs=11"])
    cfg = load_finetune_config("jarvis_mbj_bandgap", ["optim.lr=1e-4"])
    assert (cfg.epochs, cfg.data.batch_size, cfg.data.targets, cfg.optim.lr) == (1600, 256, ["mbj_bandgap"], 1e-4)


def test_parameter_groups_no_decay_on_biases_frozen_left_out_scaled_lr():
    from cfdist import Crystalformer, CrystalformerConfig
    from cfdist.run.transfer import freeze
    from cfdist.run.optim import parameter_groups

    model = Crystalformer(CrystalformerConfig(**TINY))
    frozen = freeze(model, embedding=True, blocks=1)
    assert frozen and all(n.startswith(("embedding.", "blocks.0.")) for n in frozen)
    groups = {g["name"]: g for g in parameter_groups(model, 1e-5, scaled_blocks=2, lr_scale=0.1)}
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups.values():
        for p in g["params"]:
            name = names[id(p)]
            assert p.requires_grad and name not in frozen
            assert (g["weight_decay"] == 0.0) == name.endswith(".bias")
            assert (g["lr_scale"] == 0.1) == name.startswith("blocks.1.")
    in_groups = {id(p) for g in groups.values() for p in g["params"]}
    assert in_groups == {id(p) for p in model.parameters() if p.requires_grad}
    assert set(groups) == {"decay", "no_decay", "decay_scaled", "no_decay_scaled"}


def test_steps_are_seeded_streams_cut_into_batch_size(ft_shards):
    """An epoch is the train split's stream for (seed, epoch) cut into steps of batch_size rows: the
    same for the same (seed, epoch), another order for another epoch, every row at most once, and
    ranks take disjoint contiguous shares of each step whose union is the one-process step."""
    from cfdist.finetune.loop import epoch_steps, rank_share, steps_per_epoch
    from cfdist.manifest import ShardSet
    from cfdist.stream import EpochPlan, RowGroupReader

    files = [(e.path, e.rows) for e in ShardSet(ft_shards).files("train")]
    assert sum(rows for _, rows in files) == 40

    def steps(epoch, batch_size, n_steps, rank=0, world=1, seed=1):
        plan = EpochPlan(files, seed=seed, epoch=epoch, window=16, lanes=2)
        return [t["id"].to_pylist() for t, _ in epoch_steps(plan, RowGroupReader(["id"]), batch_size, n_steps,
                                                             rank, world)]

    assert steps_per_epoch(40, 8, drop_last=True) == 5 and steps_per_epoch(40, 6, drop_last=True) == 6
    assert steps_per_epoch(40, 6, drop_last=False) == 7
    # a last step with fewer rows than data-parallel ranks is dropped even without drop_last
    assert steps_per_epoch(41, 8, drop_last=False, world=2) == 5 and steps_per_epoch(42, 8, False, world=2) == 6
    a = steps(3, 6, 6)
    assert len(a) == 6 and all(len(s) == 6 for s in a) and len(set(sum(a, []))) == 36
    assert a == steps(3, 6, 6) and a != steps(4, 6, 6) and a != steps(3, 6, 6, seed=2)
    last = steps(3, 6, 7)
    assert last[:6] == a and len(last[6]) == 4 and len(set(sum(last, []))) == 40  # the partial step kept
    for world in (2, 3):
        shares = [steps(3, 6, 6, rank=r, world=world) for r in range(world)]
        for k in range(6):
            assert sum((shares[r][k] for r in range(world)), []) == a[k]
            assert [len(shares[r][k]) for r in range(world)] == [hi - lo for lo, hi in
                                                                  (rank_share(6, r, world) for r in range(world))]


def test_schedule_swa_and_best_checkpoint(ft_shards, tmp_path):
    """lr * sqrt(T / (T + t)) per step, held during SWA; the SWA model is the equal-weight mean of the
    weights after every SWA step; best.pt is the lowest validation loss; test metrics are de-normalised."""
    from cfdist.checkpoint import load
    from cfdist.finetune.loop import FinetuneTrainer

    snapshots = []

    class Recording(FinetuneTrainer):
        def optimiser_step(self, micro_batches, window, components):
            out = super().optimiser_step(micro_batches, window, components)
            snapshots.append((self.epoch, self.optimizer.param_groups[0]["lr"],
                              {k: v.detach().clone() for k, v in self.model.named_parameters()}))
            return out

    cfg = make_config(ft_shards, tmp_path, epochs=4, swa_epochs=2, optim={"inverse_sqrt_t": 10})
    trainer, results = trainer_run(cfg, Recording)
    steps_per_epoch = 40 // 8
    assert trainer.steps_per_epoch == steps_per_epoch and len(snapshots) == 4 * steps_per_epoch
    # the lr used by step t (0-based) is lr * sqrt(T / (T + t)) until SWA starts, then held
    swa_start = 2 * steps_per_epoch
    for t, (_, lr, _) in enumerate(snapshots):
        expected = 5e-4 * math.sqrt(10 / (10 + min(t, swa_start)))
        assert lr == pytest.approx(expected, rel=1e-12), t
    swa = load(tmp_path / "ft" / "checkpoints" / "swa.pt")
    averaged = [s for e, _, s in snapshots if e >= 2]
    for name, param in swa.named_parameters():
        mean = torch.stack([s[name] for s in averaged]).mean(0)
        torch.testing.assert_close(param, mean, rtol=1e-5, atol=1e-6)
    assert swa.sigma_stats_ready and torch.equal(swa.target_mean, trainer.model.target_mean)

    log = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in log if "val_loss" in r]
    assert len(val) == 4
    best = min(val, key=lambda r: r["val_loss"])
    assert results["best_epoch"] == best["epoch"]
    best_model = load(tmp_path / "ft" / "checkpoints" / "best.pt")
    assert best_model.checkpoint_info["extra"]["epoch"] == best["epoch"]
    assert trainer.validate(best_model)["val_loss"] == pytest.approx(best["val_loss"], rel=1e-6)

    # test metrics: de-normalised predictions against the raw labels; cfdist evaluate on the
    # saved SWA checkpoint gives the same numbers (one evaluation module)
    from cfdist.predict import evaluate

    evaluated = evaluate(swa, [str(ft_shards)], tmp_path / "eval_swa", split="test")
    rows = list(csv.DictReader(open(tmp_path / "eval_swa" / "predictions.csv")))
    err = [abs(float(r["e_form"]) - float(r["e_form_true"])) for r in rows]
    assert results["test"]["swa"]["e_form"]["n"] == 12
    assert results["test"]["swa"]["e_form"]["mae"] == pytest.approx(np.mean(err), rel=1e-4)
    for key in ("n", "mae", "rmse", "r2"):
        assert results["test"]["swa"]["e_form"][key] == pytest.approx(evaluated["targets"]["e_form"][key], rel=1e-9)
    labels = [float(r["e_form_true"]) for r in rows]
    assert np.mean(labels) < -0.3  # labels in eV/atom, not standardised units
    assert {"final", "best", "swa", "train_mean"} <= set(results["test"])


def test_missing_labels_are_masked_in_multi_target_training(ft_shards, tmp_path):
    from cfdist.manifest import ShardSet

    gaps = ShardSet(ft_shards)
    cfg = make_config(ft_shards, tmp_path, epochs=1, swa_epochs=0, data={"targets": TARGETS})
    trainer, results = trainer_run(cfg)
    assert torch.isfinite(trainer.model.head[2].weight).all()
    assert math.isfinite(results["val"]["final"]["val_loss"])
    mean, std = gaps.target_stats("gap pbe", "train")
    assert trainer.model.target_mean[1].item() == pytest.approx(mean) and trainer.model.target_std[1].item() == \
        pytest.approx(std)


# ----------------------------------------------------------------------------- transfer
def test_model_from_pretrained_head_modes(pretrained_ckpt):
    from cfdist.checkpoint import load
    from cfdist.config import ConfigError
    from cfdist.run.transfer import model_from_pretrained

    source = load(pretrained_ckpt)
    stats = {"gap pbe": (1.0, 2.0)}
    model, report = model_from_pretrained(pretrained_ckpt, ["gap pbe", "e_form"], "auto", stats)
    assert report["copied_targets"] == ["e_form"] and report["new_targets"] == ["gap pbe"]
    torch.testing.assert_close(model.head[2].weight[1], source.head[2].weight[0], rtol=0, atol=0)
    torch.testing.assert_close(model.head[0].weight, source.head[0].weight, rtol=0, atol=0)
    assert model.target_mean.tolist() == [1.0, -1.5] and model.target_std.tolist() == [2.0, pytest.approx(0.8)]
    for name, value in source.state_dict().items():
        if not name.startswith("head.") and name not in ("target_mean", "target_std"):
            assert torch.equal(model.state_dict()[name], value), name
    assert model.sigma_stats_ready

    fresh, report = model_from_pretrained(pretrained_ckpt, ["e_form"], "replace", {"e_form": (0.0, 1.0)})
    assert report["copied_targets"] == [] and not torch.equal(fresh.head[0].weight, source.head[0].weight)
    kept, _ = model_from_pretrained(pretrained_ckpt, ["e_form"], "keep")
    assert torch.equal(kept.head[2].weight, source.head[2].weight)
    with pytest.raises(ConfigError, match="keep"):
        model_from_pretrained(pretrained_ckpt, ["gap pbe"], "keep", stats)


def test_finetune_from_checkpoint_changes_only_what_it_should(ft_shards, pretrained_ckpt, tmp_path):
    """Frozen embedding and block 0 stay bit-identical (weights and sigma statistics); block 1 and
    the head train; a new target gets the train split's normalisation."""
    from cfdist.checkpoint import load

    source = load(pretrained_ckpt)
    cfg = make_config(ft_shards, tmp_path, init_from="pretrained", checkpoint=str(pretrained_ckpt), epochs=2,
                      swa_epochs=1, data={"targets": ["gap pbe"]},
                      transfer={"freeze_embedding": True, "freeze_blocks": 1})
    trainer, results = trainer_run(cfg)
    assert results["transfer"]["new_targets"] == ["gap pbe"]
    for kind in ("final", "swa", "best"):
        tuned = load(tmp_path / "ft" / "checkpoints" / f"{kind}.pt")
        after, before = tuned.state_dict(), source.state_dict()
        for name, value in before.items():
            if name.startswith(("embedding.", "blocks.0.")) or name.endswith(("sigma_mean", "sigma_std", "sigma_ready")):
                assert torch.equal(after[name], value), (kind, name)
        if kind == "final":
            assert not torch.equal(after["blocks.1.attention.q_proj.weight"], before["blocks.1.attention.q_proj.weight"])
            assert not torch.equal(after["head.0.weight"], before["head.0.weight"])
        assert tuned.config.target_names == ["gap pbe"]


def test_resume_continues_exactly(ft_shards, tmp_path):
    """Stopped after epoch 2 of 3 (inside the SWA phase) and resumed = uninterrupted, bit for bit
    (one intra-op thread: multi-threaded CPU scatter-adds sum in a varying order)."""
    from cfdist.checkpoint import load

    kw = dict(epochs=3, swa_epochs=2, scaling={"threads": 1})
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        trainer_run(make_config(ft_shards, tmp_path / "a", **kw))
        with pytest.raises(Stop):
            trainer_run(make_config(ft_shards, tmp_path / "b", **kw), stopping_after(2))
        _, results = trainer_run(make_config(ft_shards, tmp_path / "b", init_from="resume", **kw))
    finally:
        torch.set_num_threads(threads)
    assert results["epochs"] == 3
    for kind in ("final", "swa", "best"):
        a = load(tmp_path / "a" / "ft" / "checkpoints" / f"{kind}.pt").state_dict()
        b = load(tmp_path / "b" / "ft" / "checkpoints" / f"{kind}.pt").state_dict()
        for name in a:
            assert torch.equal(a[name], b[name]), (kind, name)


def test_resume_keeps_the_runs_own_settings(ft_shards, pretrained_ckpt, tmp_path):
    """init_from=resume with a bare config continues a pretrained, partly frozen run as it started:
    same architecture source, same frozen layers, provenance kept."""
    from cfdist.checkpoint import load

    source = load(pretrained_ckpt)
    with pytest.raises(Stop):
        trainer_run(make_config(ft_shards, tmp_path, init_from="pretrained", checkpoint=str(pretrained_ckpt),
                                epochs=2, swa_epochs=1, model={"n_blocks": 1}, transfer={"freeze_blocks": 1}),
                    stopping_after(1))
    trainer, results = trainer_run(make_config(ft_shards, tmp_path, init_from="resume", epochs=5, model={"n_blocks": 1}))
    assert results["epochs"] == 2 and results["transfer"]["init_from"] == "pretrained"
    assert trainer.cfg.transfer.freeze_blocks == 1 and len(trainer.model.blocks) == 2
    swa = load(tmp_path / "ft" / "checkpoints" / "swa.pt")
    assert swa.checkpoint_info["extra"]["init_from"] == "pretrained"
    assert swa.checkpoint_info["extra"]["pretrained_from"] == str(pretrained_ckpt)
    for name, value in source.state_dict().items():
        if name.startswith("blocks.0."):
            assert torch.equal(swa.state_dict()[name], value), name


def test_resume_through_the_driver_runs_with_the_saved_settings_and_reads_last_pt_once(ft_shards, tmp_path,
                                                                                    monkeypatch):
    """Regression: with init_from=resume the driver used to dispatch on the command line's scaling
    (threads, workers, device) instead of the run's saved settings, so the documented exact resume
    (threads=1) was silently lost, and last.pt was read twice."""
    from cfdist.finetune import driver, loop

    with pytest.raises(Stop):
        trainer_run(make_config(ft_shards, tmp_path, epochs=2, swa_epochs=1, scaling={"threads": 1}), stopping_after(1))
    reads = []
    real = loop.load_checkpoint_file
    monkeypatch.setattr(loop, "load_checkpoint_file", lambda path, *a, **k: reads.append(path) or real(path, *a, **k))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        given = make_config(ft_shards, tmp_path, init_from="resume", epochs=9, scaling={"threads": 2})
        results = driver.run(given)
        assert torch.get_num_threads() == 1  # the run's own setting decided how it ran
    finally:
        torch.set_num_threads(threads)
    assert results["epochs"] == 2
    assert [p.name for p in reads] == ["last.pt"]


def test_micro_batches_give_the_same_step(ft_shards, pretrained_ckpt, tmp_path):
    """Packing a step into entry-budget micro-batches accumulates to the same update (sigma
    statistics already set, as after pretraining; from scratch they come from the first micro-batch)."""
    from cfdist.checkpoint import load

    kw = dict(epochs=1, swa_epochs=0, init_from="pretrained", checkpoint=str(pretrained_ckpt))
    _, whole = trainer_run(make_config(ft_shards, tmp_path / "whole", **kw))
    _, split = trainer_run(make_config(ft_shards, tmp_path / "split", data={"max_entries": 3000}, **kw))
    assert whole["micro_batches"] == whole["steps"] == 5 and split["micro_batches"] > 2 * split["steps"]
    a = load(tmp_path / "whole" / "ft" / "checkpoints" / "final.pt").state_dict()
    b = load(tmp_path / "split" / "ft" / "checkpoints" / "final.pt").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- command line and Ray
def finetune_cli(shards, out, *overrides, timeout=600, env=None):
    return run([sys.executable, "-m", "cfdist.cli", "finetune", "--config", "megnet_slice_eform",
                f"data.shards={shards}", f"output_dir={out}", "model=" + json.dumps(TINY), "data.batch_size=8",
                "log_every=1", *overrides], timeout=timeout, env=env)


def cli_here(*args) -> int:
    """``cfdist ARGS`` in this process (cfdist.cli.main, what the console script runs), single-threaded
    as under :data:`conftest.ENV` (OMP_NUM_THREADS=1): where a command needs no process of its own,
    this skips the start-up of a second Python with torch (a few seconds on 2 cores)."""
    from cfdist.cli import main
    from cfdist.testing import single_threaded

    with single_threaded():  # (also undoes a run's scaling.threads, which sets it for the whole process)
        return main([str(a) for a in args])


def finetune_here(shards, out, *overrides) -> int:
    """:func:`finetune_cli`'s command in this process (:func:`cli_here`)."""
    return cli_here("finetune", "--config", "megnet_slice_eform", f"data.shards={shards}", f"output_dir={out}",
                    "model=" + json.dumps(TINY), "data.batch_size=8", "log_every=1", *overrides)


def test_pretraining_finetuning_and_evaluate_give_one_mae(ft_shards, pretrained_ckpt, tmp_path):
    """One model, one split, one number: pretraining's validation, fine-tuning's validation and
    ``cfdist evaluate`` all measure through cfdist.run.evaluation. The checkpoint starts both runs
    with lr 0 (weights unchanged) and the 12 val crystals form one batch everywhere, so the three
    MAEs agree to the last bits."""
    from cfdist.finetune.loop import FinetuneTrainer

    pre = run([sys.executable, "launch/pretrain.py", "--no-ray", "--no-export", "--config", "megnet_slice",
               f"data.shards={ft_shards}", f"output_dir={tmp_path}", "run_name=pre", "model=" + json.dumps(TINY),
               f"init_from={pretrained_ckpt}", "data.targets=[e_form]", "optim.lr=0", "max_steps=1",
               "val_every=1", "checkpoint_every=1", "deepspeed.zero_stage=0", "data.verify_checksums=false"],
              timeout=600)
    assert pre.returncode == 0, (pre.stdout + pre.stderr)[-4000:]
    records = [json.loads(line) for line in (tmp_path / "pre" / "metrics.jsonl").read_text().splitlines()]
    pretrain_mae = [r["val_mae/e_form"] for r in records if "val_mae/e_form" in r][-1]

    cfg = make_config(ft_shards, tmp_path, init_from="pretrained", checkpoint=str(pretrained_ckpt), epochs=1,
                      swa_epochs=0, optim={"lr": 0.0}, transfer={"head": "keep"}, data={"max_structures": 128})
    _, results = trainer_run(cfg, FinetuneTrainer)
    finetune_mae = results["val"]["final"]["val_mae/e_form"]

    assert cli_here("evaluate", "--checkpoint", pretrained_ckpt, "--data", ft_shards, "--split", "val",
                    "--out", tmp_path / "eval") == 0
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())["targets"]["e_form"]
    assert evaluated["n"] == 12 and math.isfinite(evaluated["mae"]) and evaluated["mae"] > 0
    assert pretrain_mae == pytest.approx(evaluated["mae"], rel=1e-12, abs=0)
    assert finetune_mae == pytest.approx(evaluated["mae"], rel=1e-12, abs=0)


def test_cli_refuses_to_clobber_a_run_and_resume_needs_one(ft_shards, tmp_path, capsys):
    """(In this process: the refusals are SystemExit(message), which the interpreter prints to stderr
    with exit status 1.)"""
    assert finetune_here(ft_shards, tmp_path, "epochs=1", "swa_epochs=0") == 0
    first = capsys.readouterr().out
    assert "| swa |" not in first and "| final | e_form | 12 |" in first
    run_dir = tmp_path / "megnet_slice_eform"
    assert (run_dir / "config.yaml").is_file() and json.loads((run_dir / "run_info.jsonl").read_text())["git_sha"]
    with pytest.raises(SystemExit, match="already holds a run") as again:
        finetune_here(ft_shards, tmp_path, "epochs=1", "swa_epochs=0")
    assert isinstance(again.value.code, str)  # a message, not status 0
    with pytest.raises(SystemExit, match="does not exist") as missing:
        finetune_here(ft_shards, tmp_path, "init_from=resume", "run_name=nothing")
    assert isinstance(missing.value.code, str)


@pytest.mark.slow
def test_ray_train_workers_match_one_process(ft_shards, tmp_path, ray_cluster):
    """scaling.num_workers=2 (Ray Train, DDP over gloo, each rank half of every batch) follows the
    single-process run: same sigma statistics, same weights up to float32 reduction order."""
    from cfdist.checkpoint import load

    assert finetune_here(ft_shards, tmp_path / "local", "epochs=2", "swa_epochs=1") == 0
    ray = finetune_cli(ft_shards, tmp_path / "ray", "epochs=2", "swa_epochs=1", "scaling.num_workers=2",
                       env=ray_env(ray_cluster))
    assert ray.returncode == 0, (ray.stdout + ray.stderr)[-4000:]
    for kind in ("final", "swa"):
        a = load(tmp_path / "local" / "megnet_slice_eform" / "checkpoints" / f"{kind}.pt").state_dict()
        b = load(tmp_path / "ray" / "megnet_slice_eform" / "checkpoints" / f"{kind}.pt").state_dict()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=2e-5, msg=f"{kind} {name}")


@pytest.mark.slow
def test_end_to_end_preprocess_pretrain_finetune_predict(ft_shards, tmp_path, megnet_slice_records, ray_cluster,
                                                         capsys):
    """cfdist preprocess (a Ray Data job: the same shards as ft_shards' in-process build) -> cfdist
    pretrain (Ray Train + DeepSpeed, tiny) -> cfdist finetune init_from=pretrained on the other label
    -> cfdist evaluate and cfdist predict with the fine-tuned checkpoint (those three run in this
    process: cfdist.cli.main, without a Ray cluster or a process of their own).

    The pretraining is also test_compile's Ray Train run: 2 workers, ZeRO-2, compute.compile=true
    (the session cluster's workers compile with aot_eager) trains, validates (eval-mode graphs) and
    exports a model.pt that loads as an eager model."""
    from cfdist.config import CrystalformerConfig

    raw = ft_shards.parent
    shards = tmp_path / "shards"
    prep = run([sys.executable, "-m", "cfdist.cli", "preprocess", raw / "raw.json", "--out", shards, "--targets",
                *TARGETS, "--split-file", raw / "split.json", "--shard-size", "16", "--allow-missing-labels",
                "--cutoff", repr(CrystalformerConfig().cutoff), "--workers", "1"], timeout=300, env=ray_env(ray_cluster))
    assert prep.returncode == 0, prep.stderr[-3000:]
    manifest, reference = (json.loads((d / "manifest.json").read_text()) for d in (shards, ft_shards))
    assert manifest["content_hash"] == reference["content_hash"]
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in reference["shards"]]
    ft_shards = shards
    pre = run([sys.executable, "-m", "cfdist.cli", "pretrain", "--config", "megnet_slice",
               f"data.shards={ft_shards}", f"output_dir={tmp_path}", "run_name=pre",
               "model=" + json.dumps(TINY), "compute.compile=true", "data.targets=[e_form]", "max_steps=4",
               "data.max_structures=16", "scaling.num_workers=2", "scaling.max_failures=0", "deepspeed=zero2",
               "log_every=1", "val_every=4", "checkpoint_every=4"], timeout=600, env=ray_env(ray_cluster))
    out = pre.stdout + pre.stderr
    assert pre.returncode == 0, out[-4000:]
    assert "model compiled (torch.compile, backend aot_eager" in out, out[-4000:]
    records = [json.loads(line) for line in (tmp_path / "pre" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    assert any("val_mae/e_form" in r and math.isfinite(r["val_mae/e_form"]) for r in records)
    ckpt = tmp_path / "pre" / "model.pt"
    from cfdist.checkpoint import load
    from cfdist.compile import is_compiled

    pretrained = load(ckpt)
    assert not is_compiled(pretrained) and "compile" not in pretrained.config.to_dict()
    capsys.readouterr()
    assert cli_here("finetune", "--config", "megnet_slice_bandgap", f"data.shards={ft_shards}",
                    f"output_dir={tmp_path}", "run_name=ft", "init_from=pretrained", f"checkpoint={ckpt}",
                    "epochs=2", "swa_epochs=1", "data.batch_size=8") == 0
    assert "| swa | gap pbe | 12 |" in capsys.readouterr().out
    results = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert results["transfer"]["checkpoint_targets"] == ["e_form"] and results["transfer"]["new_targets"] == ["gap pbe"]

    swa = tmp_path / "ft" / "checkpoints" / "swa.pt"
    (tmp_path / "new.json").write_text(json.dumps(megnet_slice_records[100:105]))
    assert cli_here("predict", "--checkpoint", swa, tmp_path / "new.json", "--out", tmp_path / "pred.csv") == 0
    rows = list(csv.DictReader(open(tmp_path / "pred.csv")))
    assert [r["id"] for r in rows] == [r["id"] for r in megnet_slice_records[100:105]]
    assert all(math.isfinite(float(r["gap pbe"])) for r in rows)
    assert cli_here("evaluate", "--checkpoint", swa, "--data", ft_shards, "--split", "test",
                    "--out", tmp_path / "eval") == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["targets"]["gap pbe"]["n"] >= 1


def test_example_bandgap_config_never_predicts_negative_gaps(ft_shards, tmp_path):
    """configs/finetune/megnet_slice_bandgap.yaml declares ``gap pbe`` softplus: a short run from it
    predicts no negative gap on the test split, and its checkpoint keeps the transform even with the
    head pushed far below zero (where the identity head would predict about -30 eV)."""
    from cfdist.checkpoint import load
    from cfdist.finetune.config import load_finetune_config
    from cfdist.predict import evaluate

    cfg = load_finetune_config("megnet_slice_bandgap", [
        f"data.shards={ft_shards}", f"output_dir={tmp_path}", f"model={json.dumps(TINY)}", "epochs=1",
        "swa_epochs=0", "data.batch_size=8"])
    assert cfg.model_config().target_transforms == {"gap pbe": "softplus"}
    trainer, results = trainer_run(cfg)
    assert results["test"]["final"]["gap pbe"]["n"] > 0
    model = load(tmp_path / cfg.run_name / "checkpoints" / "best.pt")
    assert model.config.target_transforms == {"gap pbe": "softplus"}
    with torch.no_grad():
        model.head[2].bias.fill_(-30.0 / float(model.target_std[0]))
    evaluate(model, [str(ft_shards)], tmp_path / "eval", split="test")
    rows = list(csv.DictReader(open(tmp_path / "eval" / "predictions.csv")))
    gaps = [float(r["gap pbe"]) for r in rows]
    assert len(gaps) == 12 and min(gaps) >= 0.0


def test_layer_decay_scales_lr_per_depth(ft_shards, tmp_path):
    """optim.layer_decay: heads at lr, block i of n at lr * d ** (n - i), embedding at lr * d ** (n + 1),
    combined with transfer.lr_scale; the fine-tuning optimiser's groups carry exactly these lrs."""
    from cfdist import Crystalformer, CrystalformerConfig
    from cfdist.config import ConfigError
    from cfdist.run.config import OptimSection
    from cfdist.run.optim import make_optimizer, parameter_groups

    model = Crystalformer(CrystalformerConfig(**TINY))  # 2 blocks
    groups = parameter_groups(model, 1e-5, layer_decay=0.5, scaled_blocks=1, lr_scale=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    expected = {"embedding": 0.1 * 0.5 ** 3, "blocks.0": 0.1 * 0.5 ** 2, "blocks.1": 0.5, "head": 1.0}
    seen = set()
    for g in groups:
        for p in g["params"]:
            name = names[id(p)]
            prefix = next(k for k in expected if name.startswith(k + "."))
            assert g["lr_scale"] == pytest.approx(expected[prefix]), name
            assert (g["weight_decay"] == 0.0) == name.endswith(".bias")
            seen.add(id(p))
    assert seen == {id(p) for p in model.parameters()}
    optimizer = make_optimizer(model, OptimSection(lr=1e-3, layer_decay=0.5))
    lrs = {names[id(p)].split(".")[0]: g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lrs["embedding"] == pytest.approx(1e-3 * 0.125) and lrs["head"] == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match="layer_decay"):
        OptimSection(layer_decay=1.5)
    cfg = make_config(ft_shards, tmp_path, epochs=1, swa_epochs=0, optim={"layer_decay": 0.5})
    from cfdist.finetune.loop import FinetuneTrainer

    trainer = FinetuneTrainer(cfg)
    trainer.build()
    by_name = {names_: g["lr"] for g in trainer.optimizer.param_groups
               for names_ in [n for n, p in trainer.model.named_parameters() if any(p is q for q in g["params"])]}
    assert by_name["embedding.weight"] == pytest.approx(5e-4 * 0.125)
    assert by_name["blocks.1.ffn.0.weight"] == pytest.approx(5e-4 * 0.5) and by_name["head.2.bias"] == 5e-4


def test_a_kept_pretrained_head_loses_no_accuracy_at_step_0(ft_shards, pretrained_ckpt, tmp_path):
    """Fine-tuning from a checkpoint that already predicts the target (transfer.head keep / auto):
    before the first update the model scores exactly what the checkpoint scores on the same split (no
    fresh head, no re-standardisation with the new train split's statistics)."""
    from cfdist.checkpoint import load
    from cfdist.finetune.loop import FinetuneTrainer

    for head in ("keep", "auto"):
        cfg = make_config(ft_shards, tmp_path / head, init_from="pretrained", checkpoint=str(pretrained_ckpt),
                          transfer={"head": head})
        trainer = FinetuneTrainer(cfg)
        trainer.build()
        at_step_0 = trainer.validate(trainer.model)
        pretrained = trainer.validate(load(pretrained_ckpt).to(trainer.device))
        assert at_step_0["val_mae/e_form"] == pytest.approx(pretrained["val_mae/e_form"], rel=1e-6), head
        # the checkpoint's standardisation (mean -1.5), not this train split's (which would shift every prediction)
        mean, _ = trainer.shards.target_stats("e_form", "train")
        assert float(trainer.model.target_mean[0]) == -1.5 and abs(mean + 1.5) > 0.1
