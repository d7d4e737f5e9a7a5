"""Typed pretraining config (cfdist.train.config), optimiser groups and schedules (cfdist.run.optim)
and the rendered DeepSpeed config (cfdist.train.engine.deepspeed_config; deepspeed is not imported)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cfdist.config import ConfigError, CrystalformerConfig, apply_overrides
from cfdist.run.config import OptimSection
from cfdist.train.config import DeepSpeedSection, PretrainConfig, config_from_dict, load_pretrain_config
from cfdist.train.engine import deepspeed_config
from cfdist.run.optim import lr_factor, make_optimizer, make_scheduler, parameter_groups

SLICE = "megnet_slice"  # the packaged pretraining config


# ----------------------------------------------------------------------------- config files
def test_megnet_slice_config_is_parsed():
    cfg = load_pretrain_config(SLICE)
    assert cfg.run_name == "megnet_slice" and cfg.max_steps == 200 and cfg.val_every == 100
    assert cfg.data.shards == "data/megnet_slice" and cfg.data.targets == ["e_form"]
    assert (cfg.data.max_entries, cfg.data.max_atoms, cfg.data.max_structures) == (400_000, 4096, 128)
    assert cfg.data.train_split == "train" and cfg.data.verify_checksums is True  # defaults kept
    assert cfg.optim.lr == 5e-4 and cfg.optim.betas == (0.9, 0.98) and cfg.optim.weight_decay == 1e-5
    assert cfg.optim.schedule == "inverse_sqrt" and cfg.optim.inverse_sqrt_t == 4000
    # `deepspeed: zero2` names the packaged deepspeed config zero2
    assert cfg.deepspeed == DeepSpeedSection(zero_stage=2, precision="fp32")
    assert cfg.scaling.num_workers == 2 and cfg.scaling.max_failures == 1 and cfg.scaling.use_gpu is False
    assert cfg.run_dir() == Path("outputs/runs").resolve() / "megnet_slice"


def test_overrides_are_parsed_as_yaml():
    cfg = load_pretrain_config(SLICE, ["optim.lr=3e-4", "data.targets=[a, b]", "deepspeed.zero_stage=3",
                                       "scaling.use_gpu=true", "run_name=r1", "optim.schedule=warmup_cosine",
                                       "optim.warmup_steps=50"])
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 3e-4
    assert cfg.data.targets == ["a", "b"]
    # the override edits the named zero2 file's settings
    assert cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.precision == "fp32"
    assert cfg.scaling.use_gpu is True and cfg.run_name == "r1"
    assert cfg.optim.schedule == "warmup_cosine" and cfg.optim.warmup_steps == 50
    assert cfg.max_steps == 200  # untouched values stay


def test_deepspeed_by_name_path_or_mapping():
    assert load_pretrain_config(SLICE, ["deepspeed=zero3"]).deepspeed.zero_stage == 3
    assert load_pretrain_config(SLICE, ["deepspeed=zero1"]).deepspeed.zero_stage == 1
    # a named file, then an override of one of its fields
    cfg = load_pretrain_config(SLICE, ["deepspeed=zero1", "deepspeed.precision=bf16"])
    assert (cfg.deepspeed.zero_stage, cfg.deepspeed.precision) == (1, "bf16")
    cfg = load_pretrain_config(None, ["deepspeed.zero_stage=2", "deepspeed.extra={zero_optimization: {overlap_comm: true}}"])
    assert cfg.deepspeed.zero_stage == 2 and cfg.deepspeed.extra == {"zero_optimization": {"overlap_comm": True}}
    with pytest.raises(ConfigError, match=r"deepspeed config 'zero9': no such file, and no packaged deepspeed config of that name \(packaged: zero0, zero1, zero2, zero3\)"):
        load_pretrain_config(SLICE, ["deepspeed=zero9"])


def test_no_file_gives_defaults():
    cfg = load_pretrain_config(None)
    assert cfg == PretrainConfig()
    assert cfg.optim.lr == 5e-4 and cfg.optim.betas == (0.9, 0.98) and cfg.deepspeed.zero_stage == 0


def test_apply_overrides_does_not_touch_its_input():
    data = {"optim": {"lr": 1.0}}
    out = apply_overrides(data, ["optim.lr=1e-3", "optim.eps=2.5E-9", "seed=7"])
    assert data == {"optim": {"lr": 1.0}}
    assert out == {"optim": {"lr": 1e-3, "eps": 2.5e-9}, "seed": 7}
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides(data, ["optim.lr"])
    with pytest.raises(ConfigError, match="'seed' is not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


@pytest.mark.parametrize("override, hint", [
    ("max_stepz=5", r"unknown key\(s\) for PretrainConfig: 'max_stepz' \(did you mean 'max_steps'\?\)"),
    ("optim.lrr=1", r"optim: unknown key\(s\) for OptimSection: 'lrr' \(did you mean 'lr'\?\)"),
    ("data.max_entrie=5", r"data: unknown key\(s\) for PretrainData: 'max_entrie' \(did you mean 'max_entries'\?\)"),
    ("deepspeed.zero_stag=1", r"deepspeed: unknown key\(s\) .*did you mean 'zero_stage'"),
])
def test_unknown_keys_are_rejected_with_a_hint(override, hint):
    with pytest.raises(ConfigError, match=hint):
        load_pretrain_config(SLICE, [override])


@pytest.mark.parametrize("override, message", [
    ("deepspeed.zero_stage=4", "zero_stage must be 0, 1, 2 or 3, got 4"),
    ("deepspeed.precision=fp8", "precision must be fp32, bf16 or fp16, got 'fp8'"),
    ("deepspeed.gradient_accumulation_steps=0", "gradient_accumulation_steps must be >= 1"),
    ("optim.schedule=foo", "schedule must be inverse_sqrt, warmup_cosine or constant, got 'foo'"),
    ("max_steps=0", "max_steps must be >= 1, got 0"),
    ("checkpoint_every=-1", "checkpoint_every must be >= 1"),
    ("optim.lr=fast", "lr must be a number, got 'fast'"),
])
def test_invalid_values_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_pretrain_config(SLICE, [override])


def test_to_dict_round_trips():
    cfg = load_pretrain_config(SLICE, ["optim.lr=3e-4", "data.targets=[a, b]", "deepspeed.zero_stage=3",
                                       "deepspeed.extra={bf16: {immediate_grad_update: true}}",
                                       "model={n_blocks: 2, d_model: 64}"])
    data = cfg.to_dict()
    assert data["optim"]["lr"] == 3e-4 and data["deepspeed"]["zero_stage"] == 3
    back = config_from_dict(data)
    assert back == cfg
    assert isinstance(back.optim, OptimSection) and back.optim.betas == (0.9, 0.98)
    assert back.to_dict() == data


def test_model_config_takes_the_data_targets():
    cfg = load_pretrain_config(SLICE, ["data.targets=[e_form, band_gap]"])
    model_cfg = cfg.model_config()
    assert isinstance(model_cfg, CrystalformerConfig)
    assert model_cfg.target_names == ["e_form", "band_gap"] and model_cfg.n_targets == 2
    assert model_cfg.n_blocks == CrystalformerConfig().n_blocks  # from the packaged crystalformer config
    inline = load_pretrain_config(None, ["model={n_blocks: 2, target_names: [y]}", "data.targets=[t]"]).model_config()
    assert inline.n_blocks == 2 and inline.target_names == ["t"]


# ----------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("step", [0, 1, 10, 400, 4000, 12_000, 100_000])
def test_inverse_sqrt_is_the_paper_schedule(step):
    factor = lr_factor(OptimSection(), max_steps=1000)
    assert factor(step) == pytest.approx(math.sqrt(4000 / (4000 + step)), rel=1e-12)
    assert factor(4000) == pytest.approx(1 / math.sqrt(2))


def test_warmup_cosine():
    cfg = OptimSection(schedule="warmup_cosine", warmup_steps=10, min_lr_ratio=0.1)
    f = lr_factor(cfg, max_steps=110)
    warm = [f(t) for t in range(10)]
    assert warm == pytest.approx([(t + 1) / 10 for t in range(10)])  # linear rise to 1
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)  # floor at and after max_steps
    after = [f(t) for t in range(10, 111)]
    assert all(a > b for a, b in zip(after, after[1:]))  # strictly decreasing after warmup
    no_warmup = lr_factor(OptimSection(schedule="warmup_cosine"), max_steps=100)
    assert no_warmup(0) == pytest.approx(1.0) and no_warmup(100) == pytest.approx(0.0)


def test_constant_schedule():
    f = lr_factor(OptimSection(schedule="constant"), max_steps=10)
    assert [f(t) for t in (0, 5, 10, 1000)] == [1.0] * 4


# ----------------------------------------------------------------------------- optimiser
def test_parameter_groups_split_biases_from_weights():
    from cfdist import Crystalformer

    model = Crystalformer()
    groups = parameter_groups(model, weight_decay=0.05)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"decay", "no_decay"}
    assert by_name["decay"]["weight_decay"] == 0.05 and by_name["no_decay"]["weight_decay"] == 0.0
    decay_ids = {id(p) for p in by_name["decay"]["params"]}
    no_decay_ids = {id(p) for p in by_name["no_decay"]["params"]}
    named = dict(model.named_parameters())
    for name, param in named.items():
        if name.endswith(".bias"):
            assert id(param) in no_decay_ids and id(param) not in decay_ids, name
        else:
            assert id(param) in decay_ids and id(param) not in no_decay_ids, name
    all_grouped = [id(p) for g in groups for p in g["params"]]
    assert len(all_grouped) == len(set(all_grouped)) == len(named)
    assert len(no_decay_ids) > 0 and len(decay_ids) > len(no_decay_ids)
    assert "embedding.weight" in named and id(named["embedding.weight"]) in decay_ids

    # frozen parameters are left out
    named["embedding.weight"].requires_grad_(False)
    grouped = {id(p) for g in parameter_groups(model, 0.05) for p in g["params"]}
    assert id(named["embedding.weight"]) not in grouped and len(grouped) == len(named) - 1


@pytest.mark.parametrize("schedule", ["inverse_sqrt", "warmup_cosine"])
def test_optimizer_and_scheduler_follow_lr_factor(schedule):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    cfg = OptimSection(lr=1e-2, schedule=schedule, inverse_sqrt_t=5, warmup_steps=3, weight_decay=0.1)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, max_steps=20)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.9, 0.98) and optimizer.defaults["eps"] == 1e-8
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    factor = lr_factor(cfg, 20)
    before = [p.detach().clone() for p in model.parameters()]
    for step in range(8):
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(1e-2 * factor(step)), (schedule, step)
        model(torch.randn(5, 3)).square().mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * factor(8))


# ----------------------------------------------------------------------------- deepspeed config
def test_deepspeed_config_renders_the_settings():
    ds = DeepSpeedSection(zero_stage=2, precision="bf16", gradient_accumulation_steps=4)
    cfg = deepspeed_config(ds, OptimSection(grad_clip=0.5), micro_batch=8)
    assert cfg["train_micro_batch_size_per_gpu"] == 8 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["zero_optimization"] == {"stage": 2}
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    assert cfg["zero_force_ds_cpu_optimizer"] is False and cfg["zero_allow_untested_optimizer"] is True
    assert "optimizer" not in cfg and "scheduler" not in cfg  # client optimiser and schedule
    fp16 = deepspeed_config(DeepSpeedSection(precision="fp16"), OptimSection(), 1)
    assert fp16["fp16"] == {"enabled": True} and fp16["bf16"] == {"enabled": False}
    assert fp16["zero_optimization"] == {"stage": 0}
    fp32 = deepspeed_config(DeepSpeedSection(), OptimSection(), 1)
    assert not fp32["bf16"]["enabled"] and not fp32["fp16"]["enabled"] and fp32["gradient_clipping"] == 1.0


def test_deepspeed_config_merges_extra():
    extra = {"zero_optimization": {"overlap_comm": True, "stage": 3}, "bf16": {"immediate_grad_update": True},
             "steps_per_print": 50, "flops_profiler": {"enabled": False}}
    ds = DeepSpeedSection(zero_stage=1, precision="bf16", extra=extra)
    cfg = deepspeed_config(ds, OptimSection(), micro_batch=2)
    assert cfg["zero_optimization"] == {"stage": 3, "overlap_comm": True}  # nested dicts merged, extra wins
    assert cfg["bf16"] == {"enabled": True, "immediate_grad_update": True}
    assert cfg["steps_per_print"] == 50 and cfg["flops_profiler"] == {"enabled": False}
    assert cfg["gradient_accumulation_steps"] == 1 and cfg["fp16"] == {"enabled": False}
    assert ds.extra["zero_optimization"] == {"overlap_comm": True, "stage": 3}  # input not mutated


def test_one_data_section_for_pretraining_and_finetuning():
    """Pretraining and fine-tuning share one data section type and one max_entries default; the
    fields only one side uses live in its subclass (the other side rejects them); dead keys are gone."""
    import dataclasses

    from cfdist.data import DEFAULT_MAX_ENTRIES, BatchBudget
    from cfdist.finetune.config import FinetuneConfig, FinetuneData, load_finetune_config
    from cfdist.run.config import DataSection
    from cfdist.train.config import PretrainConfig, PretrainData

    pre, fine = PretrainConfig().data, FinetuneConfig().data
    assert isinstance(pre, PretrainData) and isinstance(fine, FinetuneData)
    assert isinstance(pre, DataSection) and isinstance(fine, DataSection)
    shared = {f.name for f in dataclasses.fields(DataSection)}
    assert {f: getattr(pre, f) for f in shared} == {f: getattr(fine, f) for f in shared}
    assert pre.max_entries == fine.max_entries == BatchBudget().max_entries == DEFAULT_MAX_ENTRIES
    assert "400k" in DataSection.__doc__ and "scaling.md" in DataSection.__doc__  # the reason for the value
    for name, config in (("megnet_slice", load_pretrain_config("megnet_slice")),
                         ("megnet_slice_eform", load_finetune_config("megnet_slice_eform"))):
        assert config.data.max_entries == DEFAULT_MAX_ENTRIES, name
    with pytest.raises(ConfigError, match="rows_per_read"):
        load_pretrain_config(SLICE, ["data.rows_per_read=256"])
    with pytest.raises(ConfigError, match="batch_size"):
        load_pretrain_config(SLICE, ["data.batch_size=8"])
    with pytest.raises(ConfigError, match="unknown key.*FinetuneData.*force_memory_factor"):
        load_finetune_config(None, ["data.force_memory_factor=2"])
    with pytest.raises(ConfigError, match="eval_batch_size"):
        load_finetune_config(None, ["data.eval_batch_size=16"])
    with pytest.raises(ConfigError, match="max_entries must be >= 1"):
        load_finetune_config(None, ["data.max_entries=0"])


def test_an_inlined_model_section_keeps_its_output_transforms():
    """Regression: ``cfdist finetune`` from scratch inlines the model section without its target
    names (cfdist.finetune.driver.prepare); its own target_transforms name the data's targets and
    must resolve again (they were checked against the default targets and refused)."""
    from cfdist.finetune.config import load_finetune_config

    cfg = load_finetune_config("megnet_slice_bandgap", [])
    inlined = cfg.model_config().to_dict()
    inlined.pop("target_names")
    cfg.model = inlined
    assert cfg.model_config().target_transforms == {"gap pbe": "softplus"}
    assert cfg.model_config().target_names == ["gap pbe"]
