"""Pretraining on a mixture of datasets (``data.datasets``): real MPtrj frames with energies, forces and
stress beside real MEGNet crystals with formation energy and band gap, one encoder, a head per dataset.

Checked here: the config's errors; the mixture stream (each dataset read once per its own epoch, an
exact resume from any position); per-dataset heads that compute what a single-dataset model with the
same weights computes, and a backward that reaches every head on every rank; a run that logs per-dataset
metrics, draws what the sampler says and resumes exactly; fine-tuning from a dataset's head with no
loss of accuracy at step 0; and a Ray Train run of the two-dataset mixture with ZeRO-2.

The shards (built once per session in this process): 64 MPtrj frames (48 train / 8 val / 8 test) and
64 MEGNet crystals (44 / 10 / 10), both with the tiny model's cutoff (5.94 A).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import build_shards, ray_env, run, tiny_model
from paths import EXAMPLE_DATA, FIXTURES, require
from test_energy_training import CUTOFF, extxyz_frames

MODEL = tiny_model(cutoff_sigmas=3.0)  # cutoff 5.94 A, as the shards
DATASETS = [{"name": "mptrj", "shards": None, "targets": ["energy"], "energy": True},
            {"name": "megnet", "shards": None, "targets": ["e_form", "gap pbe"], "transforms": {"gap pbe": "softplus"}}]


@pytest.fixture(scope="session")
def mixture_shards(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mixture")
    frames = extxyz_frames(require(EXAMPLE_DATA / "mptrj" / "mptrj-random-1k.extxyz.gz"), 64)
    (root / "frames.extxyz").write_text("".join(frames))
    split = {f"frames.extxyz:{k}": ("val" if k % 8 == 6 else "test" if k % 8 == 7 else "train") for k in range(64)}
    (root / "frames_split.json").write_text(json.dumps(split))
    records = json.loads(require(FIXTURES / "megnet_64.json").read_text())
    (root / "megnet.json").write_text(json.dumps(records))
    names = ["train", "train", "train", "train", "val", "test"]
    split = {n: [r["id"] for k, r in enumerate(records) if names[k % 6] == n] for n in ("train", "val", "test")}
    (root / "megnet_split.json").write_text(json.dumps(split))
    return {"mptrj": build_shards([root / "frames.extxyz"], root / "mptrj", ["energy"], with_forces=True,
                                  with_stress=True, split_file=root / "frames_split.json", shard_size=16,
                                  cutoff=CUTOFF),
            "megnet": build_shards([root / "megnet.json"], root / "megnet", ["e_form", "gap pbe"],
                                   split_file=root / "megnet_split.json", shard_size=8, cutoff=CUTOFF)}


def datasets(shards: dict[str, Path], **extra) -> list[dict]:
    return [{**d, "shards": str(shards[d["name"]]), **extra.get(d["name"], {})} for d in DATASETS]


def mixture_config(shards, tmp_path, **kw):
    from cfdist.train.config import build, PretrainConfig

    data = {"datasets": datasets(shards), "temperature": 2.0, "max_structures": 8, "verify_checksums": False,
            **kw.pop("data", {})}
    return build(PretrainConfig, {"model": dict(MODEL), "output_dir": str(tmp_path), "data": data, **kw}, "test")


# ----------------------------------------------------------------------------- config
def test_the_mixture_config_is_checked(mixture_shards, tmp_path):
    from cfdist.config import ConfigError

    cfg = mixture_config(mixture_shards, tmp_path)
    model = cfg.model_config()
    assert [(h.name, h.energy, h.targets) for h in model.heads] == [("mptrj", True, ["energy"]),
                                                                    ("megnet", False, ["e_form", "gap pbe"])]
    assert model.envelope and not model.energy and model.target_names == []  # no head of its own
    bad = [({"data": {"shards": "x"}}, "both set"),
           ({"data": {"datasets": datasets(mixture_shards, megnet={"name": "mptrj"})}}, "unique"),
           ({"data": {"datasets": datasets(mixture_shards, megnet={"weight": 2.0})}}, "weight or none"),
           ({"data": {"datasets": datasets(mixture_shards, megnet={"shards": ""})}}, "shards is not set"),
           ({"data": {"datasets": datasets(mixture_shards, mptrj={"targets": ["energy", "x"]})}}, "one target"),
           ({"data": {"temperature": 0}}, "temperature"),
           ({"data": {"datasets": datasets(mixture_shards, megnet={"name": "a/b"})}}, "without '/'"),
           ({"data": {"datasets": datasets(mixture_shards, megnet={"lossy": 1})}}, "unknown key")]
    for change, message in bad:
        with pytest.raises(ConfigError, match=message):
            mixture_config(mixture_shards, tmp_path, **change)
    with pytest.raises(ConfigError, match="per dataset"):
        mixture_config(mixture_shards, tmp_path, model={**MODEL, "energy": True}).model_config()


def test_the_pre_flight_check_names_the_dataset(mixture_shards, tmp_path):
    from cfdist.shards import ShardError
    from cfdist.train.datasets import check_mixture

    cfg = mixture_config(mixture_shards, tmp_path)
    model = cfg.model_config()
    assert [s.name for s in check_mixture(cfg, model.n_elements, model.cutoff)] == ["mptrj", "megnet"]
    with pytest.raises(ShardError, match="dataset 'mptrj'.*cutoff"):
        check_mixture(cfg, model.n_elements, model.cutoff + 1.0)
    with pytest.raises(ShardError, match="dataset 'mptrj'.*Z="):
        check_mixture(cfg, 10, model.cutoff)  # the elements' union must fit the embedding
    with pytest.raises(ShardError, match="dataset 'megnet'.*not in the shards"):
        check_mixture(mixture_config(mixture_shards, tmp_path, data={"datasets": datasets(
            mixture_shards, megnet={"targets": ["bulk"], "transforms": {}})}), model.n_elements, model.cutoff)
    with pytest.raises(ShardError, match="dataset 'megnet'.*no 'forces' column"):  # E/F/S loss on scalar data
        check_mixture(mixture_config(mixture_shards, tmp_path, data={"datasets": datasets(
            mixture_shards, megnet={"energy": True, "targets": ["e_form"], "transforms": {}})}),
            model.n_elements, model.cutoff)


# ----------------------------------------------------------------------------- stream
def test_the_mixture_stream_reads_every_dataset_once_per_epoch_and_resumes_exactly(mixture_shards, tmp_path):
    from cfdist.data import BatchBudget
    from cfdist.mixture import MixtureDraws, MixturePosition, mixture_batches
    from cfdist.stream import EpochPlan, RowGroupReader
    from cfdist.train.datasets import mixture_sources, mixture_weights

    cfg = mixture_config(mixture_shards, tmp_path)
    sources = mixture_sources(cfg)
    p = mixture_weights(cfg, sources)
    assert p == pytest.approx(np.sqrt([48, 44]) / np.sqrt([48, 44]).sum())  # temperature 2 over the train sizes
    files = [[(e.path, e.rows) for e in s.shards.files("train")] for s in sources]

    def stream(start=MixturePosition(), rank=0):
        readers = [RowGroupReader(["id", "n_atoms", "n_entries"], cache=4) for _ in sources]
        plan = lambda d, e: EpochPlan(files[d], seed=d, epoch=e, rank=rank, world_size=2, window=16, lanes=2)
        return mixture_batches(plan, readers, p, [BatchBudget(10**9, 10**9, 5)] * 2, seed=3, rank=rank,
                               start=start, names=["mptrj", "megnet"])

    items = []
    for item in stream():
        items.append((item[0].dataset, item[0].table.column("id").to_pylist(), item[1]))
        if len(items) == 60:
            break
    assert [d for d, _, _ in items] == MixtureDraws(p, seed=3, epoch=0, rank=0).block(0, 60).tolist()
    # each dataset's own epochs: rank r of 2 reads a disjoint half of its train split per epoch (the
    # halves change with the per-epoch file order), every row once, reshuffled every epoch
    per_rank = [items, [(i[0].dataset, i[0].table.column("id").to_pylist(), i[1])
                        for i, _ in zip(stream(rank=1), range(60))]]
    for d, n_half in ((0, 24), (1, 22)):
        train_ids = {i for e in sources[d].shards.files("train") for i in
                     pq.read_table(e.path, columns=["id"]).column("id").to_pylist()}
        epochs = []
        for rank_items in per_rank:
            ids = [i for k, rows, _ in rank_items if k == d for i in rows]
            epochs.append([ids[k:k + n_half] for k in range(0, len(ids) - n_half + 1, n_half)])
        assert min(len(epochs[0]), len(epochs[1])) >= 2, d
        for e in range(2):
            a, b = set(epochs[0][e]), set(epochs[1][e])
            assert len(a) == len(b) == n_half and not a & b and a | b == train_ids, (d, e)
        assert epochs[0][0] != epochs[0][1]
    assert [d for d, _, _ in per_rank[0]] != [d for d, _, _ in per_rank[1]]  # ranks draw their own datasets
    for k in (1, 17, 41):  # resume after item k: the rest is identical
        rest = stream(items[k - 1][2])
        for d, rows, position in items[k:]:
            table = next(rest)
            assert (table[0].dataset, table[0].table.column("id").to_pylist(), table[1]) == (d, rows, position)


# ----------------------------------------------------------------------------- model
def test_dataset_heads_compute_what_single_models_compute_and_every_head_gets_a_gradient(megnet_crystals):
    from cfdist import Crystalformer, CrystalformerConfig
    from cfdist.batch import collate
    from cfdist.geometry import image_table
    from cfdist.run.objective import EnergyObjective, MixtureObjective, PropertyObjective
    from cfdist.train.config import LossSection
    from conftest import freeze_sigma_stats

    torch.manual_seed(0)
    heads = [{"name": "frames", "energy": True, "targets": ["energy"]},
             {"name": "props", "targets": ["e_form", "gap"], "transforms": {"gap": "softplus"}}]
    mixture = freeze_sigma_stats(Crystalformer(CrystalformerConfig(**MODEL, target_names=[], heads=heads)).double())
    with torch.no_grad():
        mixture.heads["props"].target_mean.copy_(torch.tensor([-1.0, 1.2]))
        mixture.heads["frames"].element_energy.uniform_(-5, -1)
    prop = Crystalformer(CrystalformerConfig(**MODEL, target_names=["e_form", "gap"],
                                             target_transforms={"gap": "softplus"}, envelope=True)).double()
    energy = Crystalformer(CrystalformerConfig(**MODEL, target_names=[], energy=True)).double()
    state = mixture.state_dict()
    for single, name in ((prop, "props"), (energy, "frames")):
        own = {k: v for k, v in state.items() if not k.startswith("heads.")}
        own.update({k[len(f"heads.{name}."):]: v for k, v in state.items() if k.startswith(f"heads.{name}.")})
        missing, unexpected = single.load_state_dict(own, strict=False)
        assert not unexpected and not [k for k in missing if "mask" not in k], (missing, unexpected)
    crystals = megnet_crystals[:4]
    batch = collate(crystals, [image_table(c.lattice, c.positions, mixture.cutoff) for c in crystals])
    mixture.eval(), prop.eval(), energy.eval()
    torch.testing.assert_close(mixture(batch, dataset="props"), prop(batch), rtol=0, atol=0)
    a = mixture.energy_forward(batch, forces=True, stress=True, dataset="frames")
    b = energy.energy_forward(batch, forces=True, stress=True)
    for x, y in ((a.energy, b.energy), (a.forces, b.forces), (a.stress, b.stress)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert mixture.predict(crystals, dataset="props").shape == (4, 2)
    # the head as a single model (cfdist predict / evaluate --head): the same numbers
    torch.testing.assert_close(mixture.for_dataset("props")(batch), prop(batch), rtol=0, atol=0)
    torch.testing.assert_close(mixture.for_dataset("frames").energy_forward(batch).energy, b.energy, rtol=0, atol=0)
    from cfdist.calculator import CrystalformerCalculator  # an ASE calculator of the mixture's energy head

    with pytest.raises(ValueError, match="pass head= one of its energy heads \\['frames'\\]"):
        CrystalformerCalculator(mixture)
    calc = CrystalformerCalculator(mixture, head="frames", skin=0.0)
    assert calc.model.config.energy and calc.model.heads is None
    with pytest.raises(ValueError, match="needs the dataset"):
        mixture(batch)
    with pytest.raises(ValueError, match="no head for dataset 'x'"):
        mixture(batch, dataset="x")
    # training on one dataset's batch: the other head's parameters get exact-zero gradients (so DDP /
    # DeepSpeed reduce the same tensors on ranks that drew different datasets)
    mixture.train()
    objective = MixtureObjective({"frames": EnergyObjective(LossSection(), dataset="frames"),
                                  "props": PropertyObjective(["e_form", "gap"], {"gap": "softplus"}, dataset="props")})
    assert objective.components == ("frames/energy", "frames/forces", "frames/stress", "props/e_form", "props/gap")
    assert objective.metric_name("frames/forces") == "frames/forces_mev_per_A"
    batch.labels = torch.tensor([[-1.0, 0.5], [float("nan"), 2.0], [-2.0, 0.0], [0.3, float("nan")]],
                                dtype=torch.float64)
    batch.dataset = "props"
    counts = objective.label_counts(batch)
    assert counts == [0.0, 0.0, 0.0, 3.0, 3.0]
    out = objective.forward(mixture, batch)
    stats, loss_sums = objective.sums(mixture, out, batch, torch.float64)
    assert (stats[:, :3] == 0).all() and (stats[2, 3:] == 3).all()
    alone = PropertyObjective(["e_form", "gap"], {"gap": "softplus"}, dataset="props")
    _, alone_sums = alone.sums(mixture, out, batch, torch.float64)
    loss = objective.loss(loss_sums, counts, world=1)
    torch.testing.assert_close(loss, alone.loss(alone_sums, counts[3:], world=1).float())
    loss.backward()
    grads = {n: p.grad for n, p in mixture.named_parameters()}
    assert all(g is not None for g in grads.values())
    assert all((g == 0).all() for n, g in grads.items() if n.startswith("heads.frames."))
    assert all(g.abs().sum() > 0 for n, g in grads.items() if n.startswith("heads.props.head."))


def test_a_fresh_head_from_a_mixture_checkpoint_copies_the_encoder_only(tmp_path):
    """transfer.head=replace (or auto when no dataset head predicts the targets) from a mixture
    checkpoint: a new head for the run's targets, the encoder copied, every dataset head left behind
    (it crashed on the missing head's transforms)."""
    from cfdist import Crystalformer, CrystalformerConfig
    from cfdist.checkpoint import save_portable
    from cfdist.run.transfer import model_from_pretrained
    from conftest import freeze_sigma_stats

    torch.manual_seed(0)
    heads = [{"name": "frames", "energy": True, "targets": ["energy"]},
             {"name": "props", "targets": ["gap"], "transforms": {"gap": "softplus"}}]
    source = freeze_sigma_stats(Crystalformer(CrystalformerConfig(**MODEL, target_names=[], heads=heads)))
    path = save_portable(tmp_path / "mixture.pt", source)
    for head in ("replace", "auto"):
        model, report = model_from_pretrained(path, ["e_form"], head, {"e_form": (-1.0, 0.5)})
        assert report["head"] == "replace" and report["new_targets"] == ["e_form"] and not report["copied_targets"]
        assert "pretrained_head" not in report and not model.config.heads
        state = source.state_dict()
        for name, value in model.state_dict().items():
            if name.startswith("blocks.") or name.startswith("embedding"):
                assert torch.equal(value, state[name]), name
        assert float(model.target_mean[0]) == -1.0 and float(model.target_std[0]) == 0.5
    # a named dataset head still copies its hidden layer (and no row: e_form is new to it)
    model, report = model_from_pretrained(path, ["e_form"], "props", {"e_form": (-1.0, 0.5)})
    assert report["pretrained_head"] == "props" and report["new_targets"] == ["e_form"]
    assert torch.equal(model.head[0].weight, source.heads["props"].head[0].weight)


def test_init_from_a_mixture_checkpoint_takes_the_named_head(tmp_path):
    """Pretraining's init_from + init_head: a single-dataset energy (or property) model starts from a
    mixture checkpoint's encoder and the named dataset's head; no head named: the encoder only."""
    from cfdist import Crystalformer, CrystalformerConfig
    from cfdist.checkpoint import save_portable
    from cfdist.config import ConfigError
    from cfdist.run.transfer import init_from_checkpoint
    from conftest import freeze_sigma_stats

    heads = [{"name": "frames", "energy": True, "targets": ["energy"]}, {"name": "props", "targets": ["e_form"]}]
    source = freeze_sigma_stats(Crystalformer(CrystalformerConfig(**MODEL, target_names=[], heads=heads)))
    with torch.no_grad():
        source.heads["frames"].element_energy.uniform_(-5, -1)
        source.heads["props"].target_mean.fill_(-1.25)
    path = save_portable(tmp_path / "mixture.pt", source)
    energy = Crystalformer(CrystalformerConfig(**MODEL, target_names=[], energy=True))
    report, buffers = init_from_checkpoint(energy, path, "frames")
    assert report["energy_head"] == "kept" and report["init_head"] == "frames" and report["checkpoint_kind"] == "mixture"
    assert torch.equal(energy.energy_head[0].weight, source.heads["frames"].energy_head[0].weight)
    assert torch.equal(energy.element_energy, source.heads["frames"].element_energy)
    assert torch.equal(energy.blocks[1].ffn[0].weight, source.blocks[1].ffn[0].weight)
    prop = Crystalformer(CrystalformerConfig(**MODEL, target_names=["e_form"], envelope=True))
    report, _ = init_from_checkpoint(prop, path, "props")
    assert report["property_head"] == "kept" and float(prop.target_mean[0]) == -1.25
    bare = Crystalformer(CrystalformerConfig(**MODEL, target_names=[], energy=True))
    report, _ = init_from_checkpoint(bare, path)
    assert report["energy_head"] == "fresh" and report["init_head"] is None
    with pytest.raises(ConfigError, match="no head of that name"):
        init_from_checkpoint(bare, path, "x")


# ----------------------------------------------------------------------------- runs
def pretrain(shards, out, run_name, *overrides, launcher=("launch/pretrain.py", "--no-ray"), env=None, timeout=400):
    return run([sys.executable, *launcher, "--config", "mptrj", f"output_dir={out}", f"run_name={run_name}",
                "data.shards=", "data.datasets=" + json.dumps(datasets(shards)), "data.temperature=2",
                "model=" + json.dumps(MODEL), "data.verify_checksums=false", "data.max_structures=8",
                "deepspeed=zero0", *overrides], timeout=timeout, env=env)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_mixture_logs_per_dataset_draws_what_the_sampler_says_and_resumes_exactly(mixture_shards, tmp_path):
    """One process: 6 steps with checkpoints at 3 and 6; the run restarted from its step-3 checkpoint
    logs steps 4-6 exactly as the uninterrupted run did."""
    from cfdist.mixture import MixtureDraws, mixture_probabilities

    common = ("max_steps=6", "checkpoint_every=3", "log_every=1", "val_every=6", "keep_checkpoints=2")
    res = pretrain(mixture_shards, tmp_path, "full", *common)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    out = res.stdout
    assert "dataset mptrj:" in out and "drawn with p = 0.511 (temperature 2)" in out
    assert "dataset 'mptrj': reference energies: least squares on 48 train structures" in out
    full = records(tmp_path / "full")
    train = [r for r in full if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    # every micro-batch went to the dataset the sampler drew, with all its labels
    p = mixture_probabilities([48, 44], temperature=2.0)
    drawn = MixtureDraws(p, seed=0, epoch=0, rank=0).block(0, 6).tolist()
    assert [0 if r["batches/mptrj"] else 1 for r in train] == drawn
    for r, d in zip(train, drawn):
        name, keys = (("mptrj", ("energy_mev_per_atom", "forces_mev_per_A", "stress_gpa")) if d == 0
                      else ("megnet", ("e_form", "gap pbe")))
        assert r[f"structures/{name}"] == 8 and all(np.isfinite(r[f"mae/{name}/{k}"]) for k in keys)
    val = [r for r in full if "val_loss" in r][-1]
    assert {"val_mae/mptrj/forces_mev_per_A", "val_mae/megnet/e_form", "val_mae/megnet/gap pbe"} <= set(val)
    # resume: the run directory as it was at step 3 (its checkpoint and its first three records)
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_000000006")
    (tmp_path / "resumed" / "model.pt").unlink()
    (tmp_path / "resumed" / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in full if r["step"] <= 3))
    res = pretrain(mixture_shards, tmp_path, "resumed", *common)
    assert res.returncode == 0 and "resumed from" in res.stdout and "(mixture: 3 micro-batches drawn" in res.stdout, \
        (res.stdout + res.stderr)[-4000:]
    again = [r for r in records(tmp_path / "resumed") if "loss" in r]
    assert [r["step"] for r in again] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(train[3:], again[3:]):
        assert a["loss"] == b["loss"] and a["batches/mptrj"] == b["batches/mptrj"]
        for key in (k for k in a if k.startswith("mae/")):
            assert b[key] == pytest.approx(a[key], rel=1e-9), key
    import cfdist

    model = cfdist.load(tmp_path / "full" / "model.pt")
    assert list(model.heads) == ["mptrj", "megnet"] and model.heads["mptrj"].element_energy.dtype == torch.float64
    # a single-dataset energy run from the mixture's mptrj head: its reference energies re-fitted on
    # this run's data (init_references=refit, the default), its head weights kept
    res = run([sys.executable, "launch/pretrain.py", "--no-ray", "--config", "mptrj", f"output_dir={tmp_path}",
               "run_name=from_head", f"data.shards={mixture_shards['mptrj']}", "model=" + json.dumps(
                   {**MODEL, "energy": True}), f"init_from={tmp_path / 'full' / 'model.pt'}", "init_head=mptrj",
               "data.verify_checksums=false", "data.max_structures=8", "deepspeed=zero0", "max_steps=1",
               "--no-export"], timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "'init_head': 'mptrj'" in res.stdout and "'energy_head': 'kept'" in res.stdout
    assert "reference energies: least squares on 48 train structures" in res.stdout
    # cfdist predict with a mixture checkpoint: --head picks the dataset's head
    cif = tmp_path / "x.cif"
    from pymatgen.core import Lattice, Structure

    Structure(Lattice.cubic(4.2), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]).to(filename=str(cif))
    res = run([sys.executable, "-m", "cfdist.cli", "predict", "--checkpoint", str(tmp_path / "full" / "model.pt"),
               str(cif), "--out", str(tmp_path / "p.csv")], timeout=120)
    assert res.returncode != 0 and "choose the head with --head (mptrj, megnet)" in res.stderr
    res = run([sys.executable, "-m", "cfdist.cli", "predict", "--checkpoint", str(tmp_path / "full" / "model.pt"),
               str(cif), "--out", str(tmp_path / "p.csv"), "--head", "megnet"], timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    header, row = (tmp_path / "p.csv").read_text().splitlines()[:2]
    expected = model.predict([cif_structure := Structure.from_file(str(cif))], dataset="megnet")[0]
    assert header.split(",")[2:4] == ["e_form", "gap pbe"] and float(row.split(",")[3]) >= 0  # softplus gap
    assert [float(v) for v in row.split(",")[2:4]] == pytest.approx(expected.tolist(), rel=1e-5)


@pytest.mark.slow
def test_a_two_dataset_mixture_pretrains_on_ray_with_zero2_and_fine_tunes_from_a_dataset_head(
        mixture_shards, tmp_path, ray_cluster):
    """2 Ray Train workers, ZeRO-2, E/F/S frames + scalar properties; then fine-tuning on the MEGNet band
    gap from the mixture's megnet head: at step 0 it scores what the pretrained head scores (no fresh
    head, no re-standardisation), and it trains."""
    from cfdist.checkpoint import load
    from cfdist.finetune.config import finetune_config_from_dict
    from cfdist.finetune.loop import FinetuneTrainer
    from cfdist.run.evaluation import evaluate, split_batches
    from cfdist.run.objective import PropertyObjective

    res = pretrain(mixture_shards, tmp_path, "ray", "max_steps=6", "checkpoint_every=6", "val_every=6",
                   "log_every=2", "deepspeed.zero_stage=2", "scaling.num_workers=2",
                   launcher=("launch/pretrain.py",), env=ray_env(ray_cluster))
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    train = [r for r in records(tmp_path / "ray") if "loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6] and all(np.isfinite(r["loss"]) for r in train)
    # two ranks, 6 steps: 12 micro-batches drawn over both datasets
    assert sum(r["batches/mptrj"] + r["batches/megnet"] for r in train) == 12
    assert sum(r["batches/mptrj"] for r in train) > 0 and sum(r["batches/megnet"] for r in train) > 0
    checkpoint = tmp_path / "ray" / "model.pt"
    pretrained = load(checkpoint)
    cfg = finetune_config_from_dict({
        "run_name": "ft", "output_dir": str(tmp_path), "init_from": "pretrained", "checkpoint": str(checkpoint),
        "transfer": {"head": "megnet"}, "epochs": 2, "swa_epochs": 0, "log_every": 1,
        "data": {"shards": str(mixture_shards["megnet"]), "targets": ["gap pbe"], "batch_size": 8,
                 "transforms": {"gap pbe": "softplus"}}})
    trainer = FinetuneTrainer(cfg)
    trainer.build()
    assert trainer.transfer_report["pretrained_head"] == "megnet"
    assert trainer.transfer_report["copied_targets"] == ["gap pbe"]
    at_step_0 = trainer.validate(trainer.model)["val_mae/gap pbe"]
    head = pretrained.heads["megnet"]
    objective = PropertyObjective(["e_form", "gap pbe"], {"gap pbe": "softplus"}, dataset="megnet")
    from cfdist.data import BatchBudget

    totals = evaluate(pretrained, (b for b in split_batches(trainer.shards, "val", ["e_form", "gap pbe"],
                                                          BatchBudget(10**9, 10**9, 64))), objective, "cpu")
    assert at_step_0 == pytest.approx(float(totals[0, 1] / totals[2, 1]), rel=1e-6)
    assert float(trainer.model.target_mean[0]) == float(head.target_mean[1])  # the head's standardisation
    with pytest.raises(Exception, match="predicts energies"):
        FinetuneTrainer(finetune_config_from_dict({**cfg.to_dict(), "transfer": {"head": "mptrj"}})).build()
    results = trainer.run()
    assert results["steps"] > 0 and np.isfinite(results["test"]["final"]["gap pbe"]["mae"])


# ----------------------------------------------------------------------------- replay
def test_fine_tuning_with_replay_trains_both_heads_and_saves_the_task_model(mixture_shards, tmp_path):
    """finetune.replay: every step also trains the mixture checkpoint's mptrj energy head on MPtrj frames
    (energies, forces, stress) through the shared encoder; validation, the test split and the saved
    checkpoints are the band-gap task's single model."""
    from cfdist import Crystalformer, CrystalformerConfig
    from cfdist.checkpoint import load, load_checkpoint_file, save_portable
    from cfdist.config import ConfigError
    from cfdist.finetune.config import finetune_config_from_dict
    from cfdist.finetune.loop import FinetuneTrainer
    from conftest import freeze_sigma_stats

    torch.manual_seed(3)
    heads = [{"name": "mptrj", "energy": True, "targets": ["energy"]},
             {"name": "megnet", "targets": ["e_form", "gap pbe"], "transforms": {"gap pbe": "softplus"}}]
    pretrained = freeze_sigma_stats(Crystalformer(CrystalformerConfig(**MODEL, target_names=[], heads=heads)))
    with torch.no_grad():
        pretrained.heads["mptrj"].element_energy.fill_(-4.0)
    checkpoint = save_portable(tmp_path / "mixture.pt", pretrained)

    def config(name, **kw):
        return finetune_config_from_dict({
            "run_name": name, "output_dir": str(tmp_path), "init_from": "pretrained", "checkpoint": str(checkpoint),
            "transfer": {"head": "megnet"}, "epochs": 1, "swa_epochs": 1, "log_every": 1, "seed": 5,
            "data": {"shards": str(mixture_shards["megnet"]), "targets": ["gap pbe"], "batch_size": 8,
                     "transforms": {"gap pbe": "softplus"}}, **kw})

    replay = {"shards": str(mixture_shards["mptrj"]), "head": "mptrj", "fraction": 0.5}
    with_replay = FinetuneTrainer(config("replay", replay=replay)).run()
    assert with_replay["transfer"]["replay"] == {"shards": replay["shards"], "head": "mptrj", "targets": ["energy"],
                                                 "fraction": 0.5}
    train = [r for r in records(tmp_path / "replay") if "loss" in r]
    assert len(train) == 5 and all(r["structures_per_step"] == 12 for r in train)  # 8 task + 4 replay
    assert all(np.isfinite(r["mae/task/gap pbe"]) and np.isfinite(r["mae/mptrj/forces_mev_per_A"]) for r in train)
    assert set(with_replay["test"]["final"]) == {"gap pbe"} and np.isfinite(with_replay["test"]["swa"]["gap pbe"]["mae"])
    for kind in ("final", "swa", "best"):  # portable checkpoints: the task's single model
        model = load(tmp_path / "replay" / "checkpoints" / f"{kind}.pt")
        assert model.heads is None and model.config.target_names == ["gap pbe"], kind
    last = load_checkpoint_file(tmp_path / "replay" / "checkpoints" / "last.pt")
    before = pretrained.state_dict()
    assert not torch.equal(last["model"]["heads.mptrj.energy_head.0.weight"], before["heads.mptrj.energy_head.0.weight"])
    assert torch.equal(last["model"]["heads.mptrj.element_energy"], before["heads.mptrj.element_energy"])
    with pytest.raises(ConfigError, match="name one of the checkpoint's dataset heads"):
        FinetuneTrainer(config("bad", replay={**replay, "head": "x"})).build()
    with pytest.raises(ConfigError, match="replay needs a pretrained head"):
        finetune_config_from_dict({"init_from": "scratch", "replay": replay})
