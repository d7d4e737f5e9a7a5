"""``compute.compile``: the compiled model equals the eager one on real batches, does not recompile per
batch, keeps checkpoints portable, trains under DeepSpeed and Ray Train, and the run configs refuse
what it cannot do (cfdist.compile).

Most tests compile with ``backend="aot_eager"``: the same Dynamo capture, graph breaks, guards and
AOTAutograd as inductor, without generating C++ (seconds instead of a minute per graph on 2
cores); one test runs inductor itself. The compiled-vs-eager ratios and the default model's
numbers are ``bench/step.py``'s.

The DeepSpeed runs are conftest's ``property_runs`` (the tests' one torchrun job, shared with
test_pretrain's ZeRO matrix, whose eager ZeRO-0 run is the reference here).
"""

from __future__ import annotations

import copy
import json

import pytest

from conftest import tiny_model

TINY = tiny_model()
# the training runs read conftest's shard_dir, whose tables reach 8.9095 A (the default model needs 8.9095 + 4e-5)
TRAIN_MODEL = {**TINY, "cutoff_sigmas": 4.49}
# (first crystal, crystals) of the real batches the numerics tests run: sizes differ in every dimension
BATCHES = [(0, 12), (12, 5), (17, 9), (26, 16), (42, 3), (45, 11), (56, 2), (58, 6)]


# ----------------------------------------------------------------------------- helpers
def real_batches(crystals, cutoff: float, spans=BATCHES, dtype=None):
    import torch

    from cfdist import collate, image_table

    out = []
    for first, n in spans:
        cs = crystals[first:first + n]
        batch = collate(cs, [image_table(c.lattice, c.positions, cutoff) for c in cs], ["e_form"])
        out.append(batch.to(dtype=dtype or torch.float64))
    return out


def step_outputs(model, batch, **kwargs):
    """(output, flat gradient) of one forward + backward with loss = mean of output^2."""
    import torch

    model.zero_grad(set_to_none=True)
    y = model(batch, **kwargs)
    (y.float() ** 2).mean().backward()
    grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    return y.detach(), torch.cat(grads)


def rel_err(got, want) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-300))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test compiles from scratch: code objects another test compiled (other backend, other
    mode) would count as recompilations here, and toward Dynamo's recompile limit."""
    import torch

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture()
def _one_thread():
    from cfdist.testing import single_threaded

    with single_threaded():
        yield


def new_tiny_model(dtype, fit_on=None, **overrides):
    """The tiny model in train mode; ``fit_on``: a batch its sigma statistics are fitted to (before compiling)."""
    import torch

    from cfdist import Crystalformer, CrystalformerConfig

    torch.manual_seed(0)
    model = Crystalformer(CrystalformerConfig(**{**TINY, **overrides})).to(dtype).train()
    if fit_on is not None:
        model.fit_sigma_statistics(fit_on)
    return model


# ----------------------------------------------------------------------------- numerics
@pytest.mark.slow  # Dynamo compiles: 20-60 s on 2 cores
@pytest.mark.usefixtures("_one_thread")
def test_compiled_model_equals_eager_on_real_batches_without_recompiling(megnet_crystals, tmp_path):
    """float64, train mode, sigma statistics fitted to the first batch before compiling: outputs and
    gradients equal eager to 1e-10 over 8 real batches of 2-16 crystals from the first step on, and no
    batch after the first compiles again. Dynamo specialises size 1: the first one-crystal batch compiles once more, later ones and
    many-crystal batches reuse what was compiled. Eval mode equals eager; the state dict keeps its
    keys, and a portable checkpoint of the compiled model loads as an eager model that predicts the
    same."""
    import torch

    from cfdist import load, save_portable
    from cfdist.compile import CompileLog, compile_model, is_compiled

    batches = real_batches(megnet_crystals, new_tiny_model(torch.float64).cutoff)
    eager = new_tiny_model(torch.float64, fit_on=batches[0])
    compiled = compile_model(copy.deepcopy(eager), backend="aot_eager")
    assert is_compiled(compiled) and list(compiled.state_dict()) == list(eager.state_dict())
    singles = real_batches(megnet_crystals, eager.cutoff, [(30, 1), (31, 1)])
    log = CompileLog().start()
    counts = []
    for k, batch in enumerate(batches[:-1] + singles[:1] + batches[-1:] + singles[1:]):
        (y0, g0), (y1, g1) = step_outputs(eager, batch), step_outputs(compiled, batch)
        assert rel_err(y1, y0) <= 1e-10 and rel_err(g1, g0) <= 1e-10, (k, rel_err(y1, y0), rel_err(g1, g0))
        counts.append(log.update().compiles)
    # batch 0 compiles (one graph: no graph breaks), 1-6 reuse it; 7 is the first single crystal
    assert 0 < counts[0] == counts[6] and log.events[counts[0] - 1].recompile_reason is None, (counts, log.reasons())
    assert counts[6] < counts[7] == counts[8] == counts[9] and log.recompiles == 1, (counts, log.reasons())
    assert log.graph_breaks == 0
    for a, b in zip(eager.buffers(), compiled.buffers()):
        assert torch.equal(a, b)  # no forward changes a buffer
    eager.eval(), compiled.eval()
    with torch.no_grad():
        for batch in batches[:3]:
            assert rel_err(compiled(batch), eager(batch)) <= 1e-10
    save_portable(tmp_path / "compiled.pt", compiled)
    loaded = load(tmp_path / "compiled.pt").double()
    assert not is_compiled(loaded)
    with torch.no_grad():
        assert rel_err(loaded(batches[0]), compiled(batches[0])) <= 1e-6  # float32 round trip of the weights


@pytest.mark.slow  # Dynamo compiles: 20-60 s on 2 cores
@pytest.mark.usefixtures("_one_thread")
def test_training_step_compiles_to_one_graph_without_host_syncs(megnet_crystals):
    """The batch's data-dependent index work is done by the collate (cfdist.batch.pair_blocks), so
    Dynamo captures a whole training step (property model; energy model on energies) as one graph: no graph break, which an op with a value-dependent output shape or a
    host read (.item(), nonzero, repeat_interleave without output_size) would cause. (Before issue
    17: 7 graph breaks, 10 graphs.)"""
    import torch
    from conftest import energy_model

    batch = real_batches(megnet_crystals, new_tiny_model(torch.float64).cutoff, [(0, 6)])[0]
    model = new_tiny_model(torch.float64, fit_on=batch)

    def step(b):
        (model(b).float() ** 2).mean().backward()

    explained = torch._dynamo.explain(step)(batch)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    energy = energy_model(n_blocks=1).train()
    explained = torch._dynamo.explain(lambda b: energy(b).energy.sum())(batch)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    # forces / stress: Dynamo breaks the graph around the geometry made a leaf inside the forward
    # (requires_grad_) and autograd.grad, never at index work
    explained = torch._dynamo.explain(lambda b: energy(b, forces=True, stress=True).forces.sum())(batch)
    reasons = " ".join(r.reason for r in explained.break_reasons)
    assert not any(word in reasons for word in ("nonzero", "item", "data-dependent", "repeat_interleave")), reasons


@pytest.mark.usefixtures("_one_thread")
def test_activation_checkpointing_still_fails_to_compile(megnet_crystals):
    """Why the run configs refuse compute.compile with activation checkpointing: Dynamo fails on the
    second checkpointed block (torch 2.13). If this test fails because it compiles, lift that refusal
    (cfdist.compile.compile_refusal) and test the numerics instead."""
    import torch

    from cfdist.compile import compile_model

    batches = real_batches(megnet_crystals, new_tiny_model(torch.float64).cutoff, [(0, 4)])
    model = compile_model(new_tiny_model(torch.float64, fit_on=batches[0]), backend="aot_eager")
    model.activation_checkpointing = True
    with pytest.raises(Exception, match="lift_tracked_freevar_to_input"):
        step_outputs(model, batches[0])


@pytest.mark.slow
@pytest.mark.usefixtures("_one_thread")
def test_inductor_float32_matches_eager(megnet_crystals):
    """The real backend (inductor, generated C++): float32 outputs and gradients equal eager to 1e-5
    relative on real batches; a second batch shape runs the same kernels (no recompilation)."""
    import torch

    from cfdist.compile import CompileLog, compile_model

    eager = new_tiny_model(torch.float32, n_blocks=1, d_model=16, n_heads=2, d_ff=32, n_basis=8, head_hidden=16)
    compiled = compile_model(copy.deepcopy(eager), backend="inductor")
    batches = real_batches(megnet_crystals, eager.cutoff, [(0, 8), (8, 4), (12, 10), (22, 5)], dtype=torch.float32)
    log = CompileLog().start()
    for k, batch in enumerate(batches):
        (y0, g0), (y1, g1) = step_outputs(eager, batch), step_outputs(compiled, batch)
        assert rel_err(y1, y0) <= 1e-5 and rel_err(g1, g0) <= 1e-5, (k, rel_err(y1, y0), rel_err(g1, g0))
        if k == 2:
            first = log.update().compiles
    assert first > 0 and log.update().compiles == first and log.recompiles == 0, log.reasons()


@pytest.mark.slow  # Dynamo compiles: 20-60 s on 2 cores
@pytest.mark.usefixtures("_one_thread")
def test_energy_model_compiled_forces_equal_eager_and_force_training_is_refused_by_torch(megnet_crystals):
    """Energy model, float64: energies, forces and stress (autograd.grad, no create_graph: evaluation)
    and an energy-only training gradient equal eager to 1e-10 compiled. Training on forces needs the
    gradient of a compiled gradient, which torch refuses with an error (not silently zero forces);
    if this test starts failing because torch supports it, lift compile_refusal's energy rule."""
    import torch
    from conftest import energy_model

    from cfdist.compile import compile_model

    eager = energy_model(n_blocks=1)
    compiled = compile_model(copy.deepcopy(eager), backend="aot_eager")
    batches = real_batches(megnet_crystals, eager.cutoff, [(0, 6), (6, 3)])
    for batch in batches:
        want = eager(batch, forces=True, stress=True)
        got = compiled(batch, forces=True, stress=True)
        for name in ("energy", "forces", "stress"):
            assert rel_err(getattr(got, name).detach(), getattr(want, name).detach()) <= 1e-10, name
    eager.train(), compiled.train()
    for batch in batches + batches:
        grads = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            model(batch).energy.sum().backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        assert rel_err(grads[1], grads[0]) <= 1e-10
    with pytest.raises(RuntimeError, match="double backward|donated buffer"):
        out = compiled(batches[0], forces=True)  # train mode: forces keep their graph (create_graph)
        (out.forces ** 2).sum().backward()


# ----------------------------------------------------------------------------- configs
def test_compute_section_parses_and_old_model_keys_move_there():
    """``compute.compile`` / ``compute.entry_chunk`` are run settings of both run configs; older run
    configs' ``model.compile`` / ``model.entry_chunk`` move there with a warning, and a saved model
    config holding them (cfdist 0.1.0 checkpoints) still loads."""
    from cfdist.config import ConfigError, CrystalformerConfig
    from cfdist.finetune.config import load_finetune_config
    from cfdist.train.config import load_pretrain_config

    assert load_pretrain_config("megnet_slice").compute.compile is False
    cfg = load_pretrain_config("megnet_slice", ["model=crystalformer_simplified", "compute.compile=true",
                                                "compute.entry_chunk=8"])
    assert cfg.compute.compile is True and cfg.compute.entry_chunk == 8 and cfg.model_config().n_basis == 0
    assert load_finetune_config("megnet_slice_eform", ["compute.compile=true"]).compute.compile is True
    with pytest.warns(UserWarning, match="moved to compute.compile"):
        old = load_pretrain_config("megnet_slice", ["model=crystalformer_simplified", "model.compile=true"])
    assert old.compute.compile is True and old.model_config().n_basis == 0  # the named file, edited
    with pytest.warns(UserWarning, match="moved to compute"):
        assert load_finetune_config("megnet_slice_eform", ["model.entry_chunk=4"]).compute.entry_chunk == 4
    with pytest.raises(ConfigError, match="did you mean 'compile'"):
        load_pretrain_config("megnet_slice", ["compute.compil=true"])
    with pytest.raises(ConfigError, match="compile must be true or false"):
        load_pretrain_config("megnet_slice", ["compute.compile=sometimes"])
    with pytest.raises(ConfigError, match="entry_chunk must be an integer >= 1"):
        load_pretrain_config("megnet_slice", ["compute.entry_chunk=0"])
    saved = {**CrystalformerConfig().to_dict(), "compile": False, "entry_chunk": 32}  # as 0.1.0 saved it
    assert CrystalformerConfig.from_dict(saved) == CrystalformerConfig()
    with pytest.warns(UserWarning, match="run settings now"):
        CrystalformerConfig.from_dict({**saved, "entry_chunk": 16})


def test_run_configs_refuse_compile_with_zero3_checkpointing_and_force_training():
    from cfdist.config import ConfigError
    from cfdist.train.config import load_pretrain_config

    with pytest.raises(ConfigError, match="ZeRO-3"):
        load_pretrain_config("megnet_slice", ["compute.compile=true", "deepspeed=zero3"])
    with pytest.raises(ConfigError, match="double backward"):
        load_pretrain_config("mptrj", ["compute.compile=true"])  # energy model, forces and stress weighted
    with pytest.raises(ConfigError, match="double backward"):
        load_pretrain_config("mptrj", ["compute.compile=true", "loss.forces_weight=0"])  # stress still weighted
    ok = load_pretrain_config("mptrj", ["compute.compile=true", "loss.forces_weight=0", "loss.stress_weight=0"])
    assert ok.compute.compile and ok.model_config().energy
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        load_pretrain_config("megnet_slice", ["compute.compile=true", "deepspeed.activation_checkpointing=true"])
    eager = load_pretrain_config("megnet_slice", ["deepspeed=zero3", "deepspeed.activation_checkpointing=true"])
    assert eager.deepspeed.zero_stage == 3  # without compile: fine


# ----------------------------------------------------------------------------- training runs
@pytest.mark.slow
def test_deepspeed_training_compiled_equals_eager(property_runs):
    """2 torchrun ranks (gloo), the tiny model on a fixed batch of real crystals: compiled runs under
    ZeRO-2 (fp32) and ZeRO-1 (bf16) train, the fp32 one follows the eager ZeRO-0 trajectory (the
    ZeRO stages agree to 1e-4: test_pretrain), and every exported model.pt records no compile setting
    and loads as an eager model."""
    results = {name: property_runs[name] for name in ("z0-fp32", "z2-fp32-compiled", "z1-bf16-compiled")}
    eager = results["z0-fp32"]
    for spec, r in results.items():
        assert r["losses"][-1] < 0.9 * r["losses"][0], (spec, r["losses"])  # a fixed batch: the loss falls
        assert not r["exported_compiled"] and r["exported_compile_flag"] is False, (spec, r)
        assert r["exported_prediction_finite"], spec
        if "fp32" in spec:
            for a, b in zip(eager["losses"], r["losses"]):
                assert a == pytest.approx(b, rel=1e-4), (spec, eager["losses"], r["losses"])
        # rank 0 said so for each compiled run (Trainer.build), and only for those
        said = sum("model compiled (torch.compile, backend aot_eager" in line for line in r["stdout"])
        assert said == ("compiled" in spec), (spec, r["stdout"])


@pytest.mark.slow  # Dynamo compiles: 20-60 s on 2 cores
def test_finetuning_compiled_equals_eager(shard_dir, tmp_path, monkeypatch):
    """``cfdist finetune ... compute.compile=true`` (one process): the same validation losses as eager for
    the final, best and SWA models (the SWA average is a deep copy of the compiled model), and the
    saved checkpoints record no compile setting."""
    import torch

    from cfdist.checkpoint import load
    from cfdist.finetune.config import load_finetune_config
    from cfdist.finetune.loop import local_finetune

    monkeypatch.setenv("CFDIST_COMPILE_BACKEND", "aot_eager")
    results, threads = {}, torch.get_num_threads()
    try:
        for compiled in ("false", "true"):
            cfg = load_finetune_config("megnet_slice_eform", [
                f"data.shards={shard_dir}", f"output_dir={tmp_path}", f"run_name=compile-{compiled}",
                "model=" + json.dumps(TRAIN_MODEL), f"compute.compile={compiled}", "epochs=2", "swa_epochs=1",
                "data.batch_size=16", "data.test_split=", "scaling.threads=1"])
            results[compiled] = local_finetune(cfg)
    finally:
        torch.set_num_threads(threads)  # scaling.threads set it for the process
    for name in ("final", "best", "swa"):
        assert results["true"]["val"][name]["val_loss"] == pytest.approx(results["false"]["val"][name]["val_loss"],
                                                                         rel=1e-9), name
    assert "compile" not in load(tmp_path / "compile-true" / "checkpoints" / "swa.pt").config.to_dict()


# The compiled Ray Train run (cfdist pretrain, 2 workers, ZeRO-2, compute.compile=true: trains,
# validates, exports an eager model.pt) is the pretraining stage of
# test_finetune.py::test_end_to_end_preprocess_pretrain_finetune_predict: one Ray Train run for both.
