"""Bad steps (cfdist.run.badsteps): a step with a non-finite loss is skipped with weights and optimiser
state bit-identical, logged with its structure ids and counted; max_bad_steps in a row stop the run.

The injected fault is a corrupt row (one structure's positions NaN): a NaN *label* is a missing
label here (masked out of the loss, never a bad step), which the last test checks.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import corrupt_shards

TINY = {"n_blocks": 1, "d_model": 16, "n_heads": 2, "d_ff": 32, "n_basis": 8, "head_hidden": 16,
        "cutoff_sigmas": 4.4}  # the shard_dir tables hold 8.9095 A


def trainer(shards, out, stage, monkeypatch, **top):
    from cfdist.config import build
    from cfdist.manifest import ShardSet
    from cfdist.train.config import PretrainConfig
    from cfdist.train.loop import LocalContext, Trainer, training_columns_for

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)  # init_distributed sets them; restored after the test
    cfg = build(PretrainConfig, {
        "run_name": f"zero{stage}", "output_dir": str(out), "max_steps": 6, "log_every": 1, "val_every": 100,
        "checkpoint_every": 100, "model": TINY,
        "data": {"shards": str(shards), "targets": ["e_form"], "val_split": "", "max_structures": 12,
                 "shuffle_rows": 0, "shuffle_files": False, "verify_checksums": False},
        "optim": {"lr": 1e-2, "inverse_sqrt_t": 1},  # the lr moves every step
        "deepspeed": {"zero_stage": stage}, **top,
    }, source="test")
    shard_set = ShardSet(cfg.data.shards)
    return Trainer(cfg, LocalContext(cfg, training_columns_for(shard_set, cfg), shard_set), shard_set)


def snapshot(t):
    """(parameters, AdamW state per parameter, scheduler step) of a built trainer, cloned."""
    # ZeRO-3 partitions the weights: the module's parameters are then empty placeholders and each
    # rank's share lives in ``ds_tensor``
    params = {n: getattr(p, "ds_tensor", p).detach().clone() for n, p in t.model.named_parameters()}
    assert all(v.numel() for v in params.values())  # a real copy of the weights, never empty placeholders
    opt = t.engine.optimizer
    opt = getattr(opt, "optimizer", opt)  # ZeRO wraps the AdamW
    state = [{k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
             for g in opt.param_groups for p in g["params"]]
    return params, state, t.scheduler.last_epoch


def assert_same(a, b):
    assert a[0].keys() == b[0].keys() and len(a[1]) == len(b[1])
    for name, value in a[0].items():
        assert torch.equal(value, b[0][name]), name
    for x, y in zip(a[1], b[1]):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k], k
    assert a[2] == b[2]


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_bad_steps_are_skipped_bit_identically_and_stop_the_run_at_the_limit(shard_dir, tmp_path, stage,
                                                                             monkeypatch, capfd):
    from cfdist.run.badsteps import BadStepError

    shards, bad_id = corrupt_shards(shard_dir, tmp_path / "shards")
    # files in manifest order, rows in file order: the corrupt row is in the first step of every
    # epoch (48 train rows, 12 per step: 4 steps an epoch)
    t = trainer(shards, tmp_path / "runs", stage, monkeypatch, max_steps=4)
    t.build()
    t.build = lambda: None  # run() builds; keep this engine to continue it below
    result = t.run()  # step 1 bad, 2-4 good
    assert result["bad_steps"] == 1 and result["step"] == 4
    err = capfd.readouterr().err
    assert "rank 0: skipped step 1 (non-finite loss or gradient; no update)" in err and bad_id in err, err[-2000:]
    before = snapshot(t)
    assert all(before[1]) and before[2] == 3  # AdamW moments exist; 3 scheduler steps (the bad one skipped)
    t.cfg.max_steps = 5
    t.stream = None  # the first run closed the stream build() opened: read on from the cursor
    result = t.run()  # step 5: epoch 1's first step, bad again
    assert result["bad_steps"] == 2 and result["step"] == 5
    assert_same(before, snapshot(t))  # weights, moments, step counts and schedule bit-identical
    assert t.engine.skipped_steps == 2
    records = [json.loads(x) for x in (t.cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    assert [r["bad_steps"] for r in records] == [1, 1, 1, 1, 2]
    # a skipped step's NaN never reaches the logged loss (a window of skipped steps logs none)
    assert [r["step"] for r in records if "loss" in r] == [2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    assert all(torch.isfinite(p).all() for p in t.model.parameters())

    # every step bad (the whole split in one step): the run stops at max_bad_steps with the ids
    t = trainer(shards, tmp_path / "runs2", stage, monkeypatch, max_bad_steps=2,
                data={"shards": str(shards), "targets": ["e_form"], "val_split": "", "max_structures": 64,
                      "shuffle_rows": 0, "verify_checksums": False})
    with pytest.raises(BadStepError, match=r"2 consecutive steps .*max_bad_steps=2\), the last at step 2.*"
                                           + bad_id):
        t.run()


def test_a_nan_label_is_a_missing_label_not_a_bad_step(shard_dir, tmp_path, monkeypatch):
    shards, _ = corrupt_shards(shard_dir, tmp_path / "shards", column="y.e_form")
    t = trainer(shards, tmp_path / "runs", 0, monkeypatch, max_steps=2)
    result = t.run()
    assert result["bad_steps"] == 0 and math.isfinite(result["loss"])


def test_fine_tuning_skips_bad_steps_with_weights_adamw_and_schedule_bit_identical(shard_dir, tmp_path, capfd):
    import copy

    from cfdist.finetune.config import finetune_config_from_dict
    from cfdist.finetune.loop import FinetuneTrainer
    from cfdist.run.badsteps import BadStepError

    shards, bad_id = corrupt_shards(shard_dir, tmp_path / "shards")

    class Recording(FinetuneTrainer):
        """Records (outcome, state before the step) of every step."""

        seen: list = []

        def optimiser_step(self, *args):
            before = ({n: p.detach().clone() for n, p in self.model.named_parameters()},
                      copy.deepcopy(self.optimizer.state_dict()), copy.deepcopy(self.scheduler.state_dict()))
            outcome, norm = super().optimiser_step(*args)
            self.seen.append((outcome, before))
            return outcome, norm

    def config(name, **kw):
        # rows in file order: the corrupt row is in the first of the 4 steps (12 rows) of every epoch
        return finetune_config_from_dict({
            "run_name": name, "output_dir": str(tmp_path), "model": TINY, "epochs": 2, "swa_epochs": 0,
            "log_every": 1, "data": {"shards": str(shards), "targets": ["e_form"], "batch_size": 12,
                                     "shuffle_rows": 0, "shuffle_files": False, "val_split": "", "test_split": ""},
            **kw})

    trainer = Recording(config("ft"))
    trainer.run()
    assert [o for o, _ in trainer.seen] == ["bad", "ok", "ok", "ok", "bad", "ok", "ok", "ok"]
    (p0, o0, s0), (p1, o1, s1) = trainer.seen[4][1], trainer.seen[5][1]  # before / after step 5 (bad)
    assert o0["state"]  # AdamW moments exist (steps 2-4): they must not move
    for name in p0:
        assert torch.equal(p0[name], p1[name]), name
    assert s0 == s1
    for key, state in o0["state"].items():
        for k, v in state.items():
            assert torch.equal(v, o1["state"][key][k]), (key, k)
    records = [json.loads(x) for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["bad_steps"] for r in records if "bad_steps" in r] == [1, 1, 1, 1, 2, 2, 2, 2]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    assert bad_id in capfd.readouterr().err

    with pytest.raises(BadStepError, match=r"2 consecutive steps .*" + bad_id):  # every step holds the row
        FinetuneTrainer(config("all_bad", max_bad_steps=2, data={
            "shards": str(shards), "targets": ["e_form"], "batch_size": 48, "shuffle_rows": 0, "val_split": "",
            "test_split": ""})).run()


@pytest.mark.slow
def test_two_ranks_under_zero3_skip_the_same_steps_with_weights_and_optimiser_state_bit_identical(property_runs):
    """2 torchrun ranks, ZeRO-3 (partitioned weights, gradients and AdamW moments), one corrupt row:
    whichever rank holds it in a step, both ranks skip that step (one all-reduce of the flag), and the
    checkpoint written after it equals the one before it: exported weights, every rank's optimiser
    partition (fp32 master weights and moments) and the step counts of the optimiser and schedule."""
    import glob

    from cfdist.checkpoint import DEEPSPEED_TAG, export_deepspeed_checkpoint

    from conftest import BAD_STEP_RUN

    run = property_runs[BAD_STEP_RUN["name"]]
    totals = {int(k): v for k, v in run["bad_steps"].items()}
    bad = [step for step in sorted(totals) if totals[step] > totals.get(step - 1, 0)]
    # 32 train rows, 16 a rank, 8 a step: the corrupt row is in one step of each 2-step epoch
    assert len(bad) == 3 and all((b - 1) // 2 == k for k, b in enumerate(bad)), totals
    assert all(math.isfinite(x) for x in run["losses"]) and len(run["losses"]) == 3  # the good steps' losses
    checkpoints = {int(p.rsplit("_", 1)[1]): p for p in run["checkpoints"]}
    assert sorted(checkpoints) == [1, 2, 3, 4, 5, 6]

    def weights(step):
        model = export_deepspeed_checkpoint(checkpoints[step], f"{checkpoints[step]}/model.pt")
        return torch.load(model, weights_only=True)["state_dict"]

    def optimiser(step):
        files = sorted(glob.glob(f"{checkpoints[step]}/{DEEPSPEED_TAG}/*optim_states.pt"))
        assert len(files) == 2, files  # one partition per rank
        # weights_only, with the two DeepSpeed classes its optimiser files hold allowed by name
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum

        with torch.serialization.safe_globals([ZeroStageEnum, LossScaler]):
            return [torch.load(f, weights_only=True)["optimizer_state_dict"] for f in files]

    def schedule(step):
        files = sorted(glob.glob(f"{checkpoints[step]}/{DEEPSPEED_TAG}/*model_states.pt"))
        assert files, checkpoints[step]
        return [torch.load(f, weights_only=True)["lr_scheduler"] for f in files]

    def assert_equal(a, b, where=""):
        if torch.is_tensor(a):
            assert torch.equal(a, b), where
        elif isinstance(a, dict):
            assert a.keys() == b.keys(), where
            for k in a:
                if k != "overflow":  # ZeRO-3's record of whether the last step overflowed (the skipped one did)
                    assert_equal(a[k], b[k], f"{where}/{k}")
        elif isinstance(a, (list, tuple)):
            assert len(a) == len(b), where
            for k, (x, y) in enumerate(zip(a, b)):
                assert_equal(x, y, f"{where}[{k}]")
        elif hasattr(a, "__dict__"):  # DeepSpeed's loss scaler: compared by its fields
            assert type(a) is type(b), where
            assert_equal(vars(a), vars(b), where)
        else:
            assert a == b, where

    compared = 0
    for step in bad:
        if step == 1:
            continue  # nothing before the first step to compare with
        assert_equal(weights(step - 1), weights(step), f"weights, step {step}")
        assert_equal(optimiser(step - 1), optimiser(step), f"optimiser, step {step}")
        assert_equal(schedule(step - 1), schedule(step), f"schedule, step {step}")
        compared += 1
    assert compared >= 2
    good = next(s for s in range(2, 7) if s not in bad)
    with pytest.raises(AssertionError):  # a good step does move the weights (the comparison can fail)
        assert_equal(weights(good - 1), weights(good))
