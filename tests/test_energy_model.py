"""Energy model (CrystalformerConfig(energy=True)): forces and stress are the derivatives of the
energy, invariances and equivariances, continuity at the cutoff, predict, portable checkpoints.

Conventions under test (cfdist.model.EnergyOutput): energy in eV (float64), forces F = -dE/dr in
eV/A, stress sigma = (1/V) dE/d(eps) in eV/A^3 for a symmetric strain eps applied to positions and
lattice (r -> r (1 + eps)): ASE's convention, so a cell that wants to expand (positive pressure
P = -trace(sigma) / 3) has negative diagonal stress. 1 eV/A^3 = 160.21766 GPa.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cfdist
from cfdist import Crystalformer, CrystalformerConfig, collate, image_table
from cfdist.crystal import Crystal
from cfdist.testing import (
    assert_equivariant, morse_like_energy_model, random_crystal, single_threaded, standard_equivariances,
)

from conftest import TINY_ENERGY, energy_model, freeze_sigma_stats
from paths import FIXTURES, require


@pytest.fixture(autouse=True)
def _one_thread():
    with single_threaded():
        yield




def rattled(crystal: Crystal, rng, amplitude: float = 0.05) -> Crystal:
    return Crystal(crystal.id, crystal.numbers, crystal.lattice,
                   crystal.positions + amplitude * rng.normal(size=crystal.positions.shape))


def strained(crystal: Crystal, eps) -> Crystal:
    """Positions and lattice deformed by r -> r (1 + eps) (row vectors, eps symmetric)."""
    deform = np.eye(3) + np.asarray(eps, dtype=np.float64)
    return Crystal(crystal.id, crystal.numbers, crystal.lattice @ deform, crystal.positions @ deform)


def central_differences(model, crystal: Crystal, h: float = 1e-4, delta: float = 1e-5):
    """(N, 3) -dE/dr and (3, 3) (1/V) dE/d(eps) by central differences, all in one batch."""
    displaced = []
    for atom in range(crystal.n_atoms):
        for axis in range(3):
            for sign in (1, -1):
                positions = crystal.positions.copy()
                positions[atom, axis] += sign * h
                displaced.append(Crystal(crystal.id, crystal.numbers, crystal.lattice, positions))
    pairs = [(a, b) for a in range(3) for b in range(a, 3)]
    for a, b in pairs:
        for sign in (1, -1):
            eps = np.zeros((3, 3))
            eps[a, b] += sign * delta / (1 if a == b else 2)  # a symmetric strain with eps_ab + eps_ba = delta
            eps[b, a] += 0 if a == b else sign * delta / 2
            displaced.append(strained(crystal, eps))
    energy = model.predict(displaced, validate=False)["energy"].numpy()
    n_force = 6 * crystal.n_atoms
    forces = -(energy[0:n_force:2] - energy[1:n_force:2]).reshape(crystal.n_atoms, 3) / (2 * h)
    stress = np.zeros((3, 3))
    for k, (a, b) in enumerate(pairs):
        plus, minus = energy[n_force + 2 * k], energy[n_force + 2 * k + 1]
        stress[a, b] = stress[b, a] = (plus - minus) / (2 * delta) / crystal.volume
    return forces, stress


def predicted(model, crystal):
    out = model.predict([crystal], forces=True, stress=True)
    return out["energy"][0].item(), out["forces"][0].numpy(), out["stress"][0].numpy()


@pytest.mark.parametrize("which", ["real", "random triclinic"])
def test_forces_and_stress_equal_central_differences(which, megnet_crystals):
    rng = np.random.default_rng(3)
    crystal = rattled(megnet_crystals[3], rng) if which == "real" else random_crystal(rng, 3, skew=0.35)
    model = energy_model()
    _, forces, stress = predicted(model, crystal)
    fd_forces, fd_stress = central_differences(model, crystal)
    assert np.abs(forces).max() > 1e-3 and np.abs(stress).max() > 1e-5  # not trivially zero
    assert np.abs(forces - fd_forces).max() <= 1e-6 * np.abs(forces).max()
    assert np.abs(stress - fd_stress).max() <= 1e-6 * np.abs(stress).max()
    assert np.allclose(stress, stress.T, rtol=0, atol=1e-15)


def test_stress_sign_and_units():
    """sigma = (1/V) dE/d(eps): a uniform compression eps = -delta I changes the energy by
    3 delta V P to first order, P = -trace(sigma) / 3 (positive: the cell pushes outwards)."""
    model = energy_model(1)
    crystal = random_crystal(np.random.default_rng(5), 4, skew=0.3)
    energy, _, stress = predicted(model, crystal)
    pressure = -np.trace(stress) / 3
    for delta in (1e-4, -1e-4):  # compression and expansion
        changed = model.predict([strained(crystal, -delta * np.eye(3))], validate=False)["energy"][0].item()
        assert changed - energy == pytest.approx(3 * delta * crystal.volume * pressure, rel=1e-3)
    # A physical case: the Morse-like model's cells compressed below their minimum push outwards
    # (positive pressure, negative diagonal stress), stretched ones pull inwards.
    morse = morse_like_energy_model()
    bcc = Crystal("bcc", [26, 26], 3.0 * np.eye(3), [[0, 0, 0], [1.5, 1.5, 1.5]])  # nearest neighbours 2.6 A
    for scale, sign in ((0.9, 1), (1.15, -1)):
        _, _, s = predicted(morse, strained(bcc, (scale - 1) * np.eye(3)))
        assert sign * -np.trace(s) / 3 > 1e-3 and np.all(sign * np.diag(s) < 0)
    from ase import units
    assert 1 / units.GPa == pytest.approx(160.21766, rel=1e-6)  # eV/A^3 -> GPa in reports


@pytest.mark.parametrize("which", ["real", "random triclinic"])
def test_energy_invariant_forces_and_stress_equivariant(which, megnet_crystals):
    """Rotation, reflection, translation, wrapping, permutation, cell choice and supercells: the
    energy scales with the multiplicity, forces follow the atoms (tiled, permuted, rotated), the
    stress is rotated and otherwise unchanged."""
    rng = np.random.default_rng(11)
    crystal = rattled(megnet_crystals[20], rng) if which == "real" else random_crystal(rng, 3, skew=0.35)
    model = energy_model(2)
    assert_equivariant(lambda cs: model.predict(cs, forces=True, stress=True), crystal,
                       standard_equivariances(crystal, rng), rtol=1e-9)


def test_helper_detects_forces_that_do_not_rotate(megnet_crystals):
    model = energy_model()
    crystal = megnet_crystals[20]
    rng = np.random.default_rng(0)
    equivariances = standard_equivariances(crystal, rng)

    def frame_fixed_forces(crystals):  # right energy and stress, forces not rotated with the crystal
        out = model.predict(crystals, forces=True, stress=True)
        out["forces"] = [torch.as_tensor(np.tile(crystal.positions[:1] - crystal.positions.mean(0), (len(f), 1)))
                         for f in out["forces"]]
        return out

    with pytest.raises(AssertionError, match="forces changed under 'rotation"):
        assert_equivariant(frame_fixed_forces, crystal, {"rotation + translation": equivariances["rotation + translation"]})


def test_forces_of_each_crystal_sum_to_zero(megnet_crystals):
    model = energy_model(3)
    crystals = [rattled(c, np.random.default_rng(k)) for k, c in enumerate(megnet_crystals[:6])]
    out = model.predict(crystals, forces=True, batch_size=4)
    for crystal, forces in zip(crystals, out["forces"]):
        assert forces.shape == (crystal.n_atoms, 3)
        assert forces.sum(0).abs().max().item() < 1e-10


def test_energy_accumulates_element_references_in_float64(megnet_crystals):
    """A float32 model still sums references and per-atom energies in float64."""
    model = energy_model(dtype=torch.float32)
    with torch.no_grad():
        model.element_energy.copy_(-1.0 - torch.arange(model.config.n_elements, dtype=torch.float64) / 3.0)
        model.energy_scale.fill_(0.0)
    crystals = megnet_crystals[:8]
    energy = model.predict(crystals)["energy"]
    assert energy.dtype == torch.float64
    expected = [sum(-1.0 - (z - 1) / 3.0 for z in c.numbers.tolist()) for c in crystals]
    assert energy.tolist() == pytest.approx(expected, rel=1e-15, abs=0)


def test_predict_of_an_energy_model(megnet_crystals):
    model = energy_model(dtype=torch.float32)
    crystals = megnet_crystals[:5]
    out = model.predict(crystals, forces=True, stress=True, batch_size=2)
    assert set(out) == {"energy", "forces", "stress"}
    assert out["energy"].shape == (5,) and out["energy"].dtype == torch.float64
    assert [f.shape for f in out["forces"]] == [(c.n_atoms, 3) for c in crystals]
    assert out["stress"].shape == (5, 3, 3) and out["stress"].dtype == torch.float32
    assert torch.allclose(model.predict(crystals, batch_size=64)["energy"], out["energy"], rtol=1e-6, atol=0)
    assert set(model.predict(crystals[:1])) == {"energy"}
    empty = model.predict([], forces=True, stress=True)
    assert empty["energy"].shape == (0,) and empty["forces"] == [] and empty["stress"].shape == (0, 3, 3)
    with pytest.raises(ValueError, match="energy model"):
        Crystalformer(CrystalformerConfig(n_blocks=1, d_model=16, n_heads=2)).predict(crystals, forces=True)


# ---------------------------------------------------------------- continuity at the cutoff

SCAN_CELL = np.array([[4.0, 0.3, 0.1], [0.2, 4.5, 0.0], [0.1, -0.3, 5.0]])
SCAN_START = np.array([[0.0, 0.0, 0.0], [1.9, 2.1, 2.4]])
SCAN_DIRECTION = np.array([1.0, 0.4, 0.2]) / np.linalg.norm([1.0, 0.4, 0.2])


def first_crossing(cutoff: float):
    """The smallest t > 0 at which an image of atom 1, moved by t * SCAN_DIRECTION, is at exactly
    ``cutoff`` from atom 0; with its translation n."""
    best = None
    for n in np.stack(np.meshgrid(*[np.arange(-3, 4)] * 3, indexing="ij"), -1).reshape(-1, 3):
        v = SCAN_START[1] + n @ SCAN_CELL - SCAN_START[0]
        b, c = v @ SCAN_DIRECTION, v @ v - cutoff**2
        if b * b - c > 0:
            for t in (-b - np.sqrt(b * b - c), -b + np.sqrt(b * b - c)):
                if 0.02 < t and (best is None or t < best[0]):
                    best = (float(t), n)
    return best


def scan(model, ts):
    """Energies (T,) and forces (T, 2, 3) with atom 1 at SCAN_START[1] + t * SCAN_DIRECTION."""
    crystals, tables = [], []
    for t in ts:
        positions = SCAN_START.copy()
        positions[1] += t * SCAN_DIRECTION
        crystals.append(Crystal("scan", [11, 17], SCAN_CELL, positions))
        tables.append(image_table(SCAN_CELL, positions, model.cutoff))
    out = model.energy_forward(collate(crystals, tables), forces=True)
    return out.energy.detach().numpy(), out.forces.detach().numpy().reshape(len(ts), 2, 3)


def max_steps(model, crossing: float, step: float, points: int = 100):
    """Largest |E_k+1 - E_k| / |E| and |F_k+1 - F_k| / max|F| over ``points`` scan points
    ``step`` A apart, straddling the crossing."""
    energy, forces = scan(model, crossing + (np.arange(points) - (points - 1) / 2) * step)
    return (np.abs(np.diff(energy)).max() / np.abs(energy).max(),
            np.abs(np.diff(forces, axis=0)).max() / np.abs(forces).max())


@pytest.mark.parametrize("cutoff_sigmas", [2.5, 4.5])
def test_energy_and_forces_continuous_when_an_image_crosses_the_cutoff(cutoff_sigmas):
    """One atom moves so that one of its images passes through the cutoff sphere of the other atom.

    Scanned at 100 points 1e-10 A apart and 100 points 1e-8 A apart around the crossing. With the
    default envelope (width 1 A) the largest change between neighbouring points stays below 1e-9
    (relative) and shrinks in proportion to the step (no jump). Without the envelope the same scan
    jumps at the crossing and the jump does not shrink with the step: at the default cutoff
    (4.5 sigma_max, where a truncated image weighs exp(-10) of a nearest one) the forces jump by
    ~1e-7 relative and the energy by ~1e-11; at 2.5 sigma_max by ~1e-2 and ~1e-5.
    """
    smooth = energy_model(cutoff_sigmas=cutoff_sigmas)
    assert smooth.config.envelope and smooth.config.envelope_width == 1.0  # the default for energy models
    assert smooth.config.envelope_kind == "polynomial"
    crossing, n = first_crossing(smooth.cutoff)
    # the image (0, 1, n) is in the table just before the crossing and not after it (or the reverse)
    inside = []
    for t in (crossing - 1e-6, crossing + 1e-6):
        positions = SCAN_START.copy()
        positions[1] += t * SCAN_DIRECTION
        table = image_table(SCAN_CELL, positions, smooth.cutoff)
        inside.append(bool(((table.i == 0) & (table.j == 1) & (table.n == n).all(1)).any()))
    assert inside[0] != inside[1]

    fine_e, fine_f = max_steps(smooth, crossing, 1e-10)
    coarse_e, coarse_f = max_steps(smooth, crossing, 1e-8)
    assert fine_e < 1e-9 and fine_f < 1e-9
    assert 30 < coarse_e / fine_e < 300 and 30 < coarse_f / fine_f < 300  # ~100: steps scale with h

    jumpy = energy_model(cutoff_sigmas=cutoff_sigmas, envelope=False)
    fine_e, fine_f = max_steps(jumpy, crossing, 1e-10)
    coarse_e, coarse_f = max_steps(jumpy, crossing, 1e-8)
    assert fine_f > 1e-8 and coarse_f / fine_f < 3  # a jump: the same size whatever the step
    if cutoff_sigmas == 2.5:
        assert fine_e > 1e-7 and coarse_e / fine_e < 3


def test_force_derivatives_continuous_across_the_cutoff_with_the_polynomial_envelope():
    """Second differences of the forces, F(t + h) - 2 F(t) + F(t - h), over 21 scan points h apart
    straddling the crossing (cutoff 2.5 sigma_max, where an image at the cutoff weighs ~e^-3 of a
    nearest one). The default polynomial envelope (f, f', f'' vanish at the cutoff) gives forces
    with a continuous derivative: the second differences shrink as h^2 (x100 for 10x smaller h).
    The cubic envelope of cfdist 0.1.0 (f'' jumps at the cutoff) gives a jump in dF/dt: they
    shrink only as h (x10)."""
    ratios = {}
    for kind in ("polynomial", "cubic"):
        model = energy_model(cutoff_sigmas=2.5, **({} if kind == "polynomial" else {"envelope_kind": kind}))
        assert model.config.envelope_kind == kind
        crossing, _ = first_crossing(model.cutoff)
        second = []
        for h in (1e-4, 1e-3):
            _, forces = scan(model, crossing + (np.arange(21) - 10) * h)
            second.append(np.abs(forces[2:] - 2 * forces[1:-1] + forces[:-2]).max() / np.abs(forces).max())
        ratios[kind] = second[1] / second[0]
    assert 70 < ratios["polynomial"] < 130 and 5 < ratios["cubic"] < 20, ratios


@pytest.mark.parametrize("kind", ["polynomial", "cubic"])
def test_cutoff_envelope_equals_its_float64_reference_and_is_smooth_at_both_edges(kind):
    """The envelope against its polynomial written out in numpy (float64), in float32 and float64;
    f = 1 with vanishing derivatives at the shell's inner edge, f = 0 at the cutoff with f' = 0, and
    f'' = 0 there too for the polynomial kind (autograd, float64)."""
    from cfdist.graph import cutoff_envelope

    cutoff, width = 5.0, 1.0
    d = np.linspace(3.0, 6.0, 3001)
    x = np.clip((d - (cutoff - width)) / width, 0.0, 1.0)
    reference = 1 - 28 * x**6 + 48 * x**7 - 21 * x**8 if kind == "polynomial" else 1 - 3 * x**2 + 2 * x**3
    for dtype, tol in ((torch.float64, 1e-14), (torch.float32, 1e-6)):
        got = cutoff_envelope(torch.tensor(d, dtype=dtype), kind, cutoff, width).double().numpy()
        assert np.abs(got - reference).max() <= tol
    assert ((reference >= 0) & (reference <= 1)).all() and (np.diff(reference) <= 1e-15).all()

    def derivatives(at: float):
        t = torch.tensor(at, dtype=torch.float64, requires_grad=True)
        f = cutoff_envelope(t, kind, cutoff, width)
        (df,) = torch.autograd.grad(f, t, create_graph=True)
        (d2f,) = torch.autograd.grad(df, t)
        return float(f.detach()), float(df.detach()), float(d2f)

    for side in (-1e-7, 1e-7):  # approached from inside and outside the shell
        f, df, d2f = derivatives(cutoff + side)
        assert abs(f) < 1e-12 and abs(df) < 1e-6
        assert (abs(d2f) < 1e-4) if kind == "polynomial" or side > 0 else (abs(d2f - 6.0) < 1e-4)
        f, df, d2f = derivatives(cutoff - width + side)
        assert abs(f - 1) < 1e-12 and abs(df) < 1e-6
    with pytest.raises(ValueError, match="unknown kind"):
        cutoff_envelope(torch.zeros(1), "linear", cutoff, width)


def test_envelope_kind_recorded_and_old_energy_configs_keep_the_cubic_one():
    """New energy models get the polynomial envelope and record it; a saved config from before the
    kinds (envelope: true, no envelope_kind) keeps the cubic switch it was trained with."""
    from cfdist.config import ConfigError

    new = CrystalformerConfig(energy=True)
    assert new.envelope is True and new.envelope_kind == "polynomial"
    assert CrystalformerConfig.from_dict(new.to_dict()).envelope_kind == "polynomial"
    old = {k: v for k, v in new.to_dict().items() if k != "envelope_kind"}  # as cfdist 0.1.0 saved it
    assert CrystalformerConfig.from_dict(old).envelope_kind == "cubic"
    assert CrystalformerConfig.from_dict({**old, "envelope": None}).envelope_kind == "polynomial"
    with pytest.raises(ConfigError, match="envelope_kind must be one of"):
        CrystalformerConfig(energy=True, envelope_kind="linear")


# ---------------------------------------------------------------- property models and checkpoints


def test_property_model_is_unchanged_by_the_energy_model(megnet_crystals):
    """The default (property) config has no envelope: identical to envelope=False, and the
    envelope would change it."""
    assert CrystalformerConfig().envelope is False and CrystalformerConfig(energy=True).envelope is True
    crystals = megnet_crystals[:3]

    def predictions(**config):
        torch.manual_seed(0)
        model = freeze_sigma_stats(Crystalformer(CrystalformerConfig(**config))).double().eval()
        assert not hasattr(model, "energy_head")
        return model.predict(crystals)

    default = predictions()
    assert default.shape == (3, 1)
    assert torch.equal(default, predictions(envelope=False))
    assert not torch.equal(default, predictions(envelope=True))  # tiny (images near the cutoff weigh ~e^-8) but there


def test_multitask_model_returns_both_and_its_checkpoint_round_trips(tmp_path, megnet_crystals):
    torch.manual_seed(0)
    model = freeze_sigma_stats(Crystalformer(CrystalformerConfig(**{**TINY_ENERGY, "target_names": ["band_gap"]}))).eval()
    with torch.no_grad():
        # references with more digits than float32 holds: the checkpoint must keep them float64
        model.element_energy.copy_(-3.0 - torch.arange(model.config.n_elements, dtype=torch.float64) / 7.0)
        model.target_mean.fill_(1.5)
        model.target_std.fill_(0.7)
    crystals = megnet_crystals[:4]
    out = model.predict(crystals, forces=True, stress=True)
    assert set(out) == {"energy", "forces", "stress", "band_gap"} and out["band_gap"].shape == (4,)

    path = cfdist.save_portable(tmp_path / "model.pt", model)
    payload = torch.load(path, weights_only=True)
    assert payload["kind"] == "energy+property"
    assert payload["state_dict"]["element_energy"].dtype == torch.float64
    assert payload["state_dict"]["blocks.0.attention.q_proj.weight"].dtype == torch.float32
    loaded = cfdist.load(path)
    assert loaded.checkpoint_info["kind"] == "energy+property" and loaded.config.energy
    assert torch.equal(loaded.element_energy, model.element_energy)
    again = loaded.predict(crystals, forces=True, stress=True)
    assert torch.equal(again["energy"], out["energy"]) and torch.equal(again["band_gap"], out["band_gap"])
    assert all(torch.equal(a, b) for a, b in zip(again["forces"], out["forces"]))

    energy_only = energy_model(dtype=torch.float32)
    loaded = cfdist.load(cfdist.save_portable(tmp_path / "energy.pt", energy_only))
    assert loaded.checkpoint_info["kind"] == "energy" and loaded.config.target_names == []
    assert torch.equal(loaded.predict(crystals)["energy"], energy_only.predict(crystals)["energy"])

    # a checkpoint whose recorded kind contradicts its config is refused
    payload["kind"] = "property"
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="inconsistent"):
        cfdist.load(tmp_path / "bad.pt")


def test_property_checkpoints_old_and_new_load_as_property_models(tmp_path, megnet_crystals):
    old = cfdist.load(require(FIXTURES / "portable_cfdist-0.1.0_tiny.pt"))  # written before the energy model
    assert old.checkpoint_info["kind"] == "property" and not old.config.energy and not old.config.envelope
    assert old.predict(megnet_crystals[:2]).shape == (2, 1)
    path = cfdist.save_portable(tmp_path / "property.pt", old)
    assert torch.load(path, weights_only=True)["kind"] == "property"
    assert torch.equal(cfdist.load(path).predict(megnet_crystals[:2]), old.predict(megnet_crystals[:2]))


def test_cfdist_predict_writes_energies_of_an_energy_checkpoint(tmp_path, megnet_records, megnet_crystals):
    """`cfdist predict` with an energy(+property) checkpoint: energy (eV) and energy_per_atom columns
    first, then the properties, equal to the model's own predict (float32 portable weights)."""
    import csv
    import json

    from cfdist.cli import main

    model = energy_model(seed=3, target_names=["gap"])
    path = cfdist.save_portable(tmp_path / "energy.pt", model)
    (tmp_path / "in.json").write_text(json.dumps(megnet_records[:4]))
    assert main(["predict", "--checkpoint", str(path), str(tmp_path / "in.json"), "--out", str(tmp_path / "p.csv")]) == 0
    with open(tmp_path / "p.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[:5] == ["id", "source", "energy", "energy_per_atom", "gap"]
    expected = cfdist.load(path).predict(megnet_crystals[:4])
    for k, row in enumerate(rows):
        n_atoms = megnet_crystals[k].n_atoms
        assert float(row["energy"]) == pytest.approx(expected["energy"][k].item(), rel=1e-5)
        assert float(row["energy_per_atom"]) == pytest.approx(expected["energy"][k].item() / n_atoms, rel=1e-5)
        assert float(row["gap"]) == pytest.approx(expected["gap"][k].item(), rel=1e-5, abs=1e-6)
