"""cfdist.calculator.CrystalformerCalculator: agreement with the model and with ASE's numerical
derivatives, image tables with a skin (reused, rebuilt, never stale), relaxations and NVE dynamics.

Relaxations and MD use :func:`cfdist.testing.morse_like_energy_model`: a Crystalformer whose weights
are set by hand so that its energy is a smooth, bound many-body potential (an attention-weighted
mean of a Morse function over each atom's images, bond length 2.6 A). A randomly initialised model
has no reason to have minima (in trials its cells collapsed or expanded without bound), so it could
not show that a relaxation ends in one; the hand-set model relaxes every crystal tried to nearest
neighbour distances near 2.6 A, and the tests check that the end point is a minimum.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.filters import FrechetCellFilter
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress
from ase.md import velocitydistribution
from ase.md.velocitydistribution import Stationary
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS, FIRE
from ase.stress import voigt_6_to_full_3x3_stress

import cfdist
from cfdist import Crystalformer, CrystalformerConfig
from cfdist.calculator import CrystalformerCalculator
from cfdist.crystal import from_ase
from cfdist.testing import morse_like_energy_model, single_threaded

from conftest import energy_model



@pytest.fixture(autouse=True)
def _one_thread():
    with single_threaded():  # ASE's cell filter calls scipy on 3x3 matrices: idle BLAS threads cost 10x
        yield




def atoms_of(crystal) -> Atoms:
    return Atoms(numbers=crystal.numbers, cell=crystal.lattice, positions=crystal.positions, pbc=True)


def perturbed(atoms: Atoms, seed: int = 0, strain: float = 0.03, rattle: float = 0.1) -> Atoms:
    atoms = atoms.copy()
    rng = np.random.default_rng(seed)
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + strain * rng.normal(size=(3, 3))), scale_atoms=True)
    atoms.positions += rattle * rng.normal(size=atoms.positions.shape)
    return atoms


def results(calc, atoms):
    atoms.calc = calc
    return atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()


def test_calculator_equals_model_predict(megnet_crystals):
    model = energy_model()
    crystal = megnet_crystals[3]
    atoms = perturbed(atoms_of(crystal))
    calc = CrystalformerCalculator(model)
    assert calc.implemented_properties == ["energy", "free_energy", "forces", "stress"]
    energy, forces, stress = results(calc, atoms)
    expected = model.predict([from_ase(atoms)], forces=True, stress=True)
    assert energy == pytest.approx(expected["energy"][0].item(), rel=1e-13)
    assert atoms.get_potential_energy(force_consistent=True) == energy  # free_energy
    assert np.allclose(forces, expected["forces"][0].numpy(), rtol=0, atol=1e-12)
    assert stress.shape == (6,)  # Voigt xx yy zz yz xz xy, eV/A^3
    assert np.allclose(voigt_6_to_full_3x3_stress(stress), expected["stress"][0].numpy(), rtol=0, atol=1e-14)


def test_ase_numerical_forces_and_stress_agree(megnet_crystals):
    calc = CrystalformerCalculator(energy_model(1))
    atoms = perturbed(atoms_of(megnet_crystals[20]), seed=2)
    _, forces, stress = results(calc, atoms)
    numerical_forces = calculate_numerical_forces(atoms, eps=1e-4)
    numerical_stress = calculate_numerical_stress(atoms, eps=1e-5, voigt=True)
    assert np.abs(forces - numerical_forces).max() <= 1e-6 * np.abs(forces).max()
    assert np.abs(stress - numerical_stress).max() <= 1e-6 * np.abs(stress).max()


def test_tables_are_reused_within_half_the_skin_and_rebuilt_after(megnet_crystals):
    model = energy_model()
    atoms = atoms_of(megnet_crystals[20])
    calc = CrystalformerCalculator(model, skin=1.0)
    atoms.calc = calc

    def fresh(a):
        return CrystalformerCalculator(model).get_potential_energy(a)

    atoms.get_potential_energy()
    assert calc.n_table_builds == 1
    direction = np.array([0.6, 0.0, 0.8])

    atoms.positions[1] += 0.45 * direction  # 0.45 A < skin / 2
    assert atoms.get_potential_energy() == pytest.approx(fresh(atoms), rel=1e-13)
    assert calc.n_table_builds == 1
    atoms.positions[1] += 0.1 * direction  # 0.55 A since the build: rebuilt
    assert atoms.get_potential_energy() == pytest.approx(fresh(atoms), rel=1e-13)
    assert calc.n_table_builds == 2

    # wrapping atoms back into the cell is not a displacement
    atoms.positions[0] += atoms.cell[0] - 2 * atoms.cell[2]
    atoms.wrap()
    assert atoms.get_potential_energy() == pytest.approx(fresh(atoms), rel=1e-13)
    assert calc.n_table_builds == 2

    # cell changes: stretching never brings images inside, a 1% compression stays within the skin,
    # a 12% compression does not (s_min(F) (cutoff + skin) < cutoff)
    for scale, builds in ((1.05, 2), (1 / 1.05 * 0.99, 2), (0.88 / 0.99, 3)):
        atoms.set_cell(atoms.cell.array * scale, scale_atoms=True)
        assert atoms.get_potential_energy() == pytest.approx(fresh(atoms), rel=1e-13)
        assert calc.n_table_builds == builds, scale

    # other species: rebuilt
    atoms.numbers[0] = 14
    assert atoms.get_potential_energy() == pytest.approx(fresh(atoms), rel=1e-13)
    assert calc.n_table_builds == 4


def test_tables_are_never_stale_while_atoms_cross_the_cutoff(megnet_crystals):
    """Atom 0 walks 3 A in 0.1 A steps: images enter and leave the cutoff sphere all along. The
    calculator (skin 1 A, so rebuilt every ~5 steps) equals a fresh evaluation at every step; a
    calculator that never rebuilds its table goes wrong once atoms have moved beyond the skin.
    A short cutoff (2.5 sigma_max = 4.95 A) gives the images that a stale table misses weights large
    enough to see (at the default 8.9 A they shift this model's energy by ~1e-7 eV)."""
    model = energy_model(2, cutoff_sigmas=2.5)
    atoms = atoms_of(megnet_crystals[21])
    calc = CrystalformerCalculator(model, skin=1.0)

    class NeverRebuilds(CrystalformerCalculator):
        def _positions_for_table(self, numbers, lattice, positions):
            return None if self._table is None else positions

    stale = NeverRebuilds(model, skin=1.0)
    step = 0.1 * np.array([0.48, 0.6, 0.64])
    stale_error, entries_within = [], []
    for k in range(30):
        atoms.positions[0] += step
        energy, forces, stress = results(calc, atoms)
        expected = model.predict([from_ase(atoms)], forces=True, stress=True)
        assert energy == pytest.approx(expected["energy"][0].item(), rel=1e-13), k
        assert np.allclose(forces, expected["forces"][0].numpy(), rtol=0, atol=1e-12), k
        assert np.allclose(voigt_6_to_full_3x3_stress(stress), expected["stress"][0].numpy(), rtol=0, atol=1e-14), k
        stale_error.append(abs(results(stale, atoms)[0] - energy))
        entries_within.append(len(cfdist.image_table(atoms.cell.array, atoms.positions, model.cutoff)))
    assert len(set(entries_within)) > 5  # images did cross the cutoff
    assert 5 <= calc.n_table_builds <= 8 and stale.n_table_builds == 1
    assert max(stale_error[:4]) < 1e-12 and max(stale_error) > 1e-4  # stale once beyond the skin


def test_relaxation_with_cell_filter_reaches_a_minimum(megnet_crystals):
    """BFGS with FrechetCellFilter from a strained (3%) and rattled (0.1 A) cell: the energy drops,
    the largest force and cell force end below fmax = 0.01 eV/A, and the end point is a minimum."""
    model = morse_like_energy_model()
    atoms = perturbed(atoms_of(megnet_crystals[24]))  # mp-1020, 4 atoms
    calc = CrystalformerCalculator(model)
    atoms.calc = calc
    start = atoms.get_potential_energy()
    cell_filter = FrechetCellFilter(atoms)
    assert np.abs(cell_filter.get_forces()).max() > 0.3
    optimizer = BFGS(cell_filter, logfile=None)
    assert optimizer.run(fmax=0.01, steps=200)
    end = atoms.get_potential_energy()
    assert end < start - 0.05
    assert np.abs(cell_filter.get_forces()).max() < 0.01
    assert np.abs(atoms.get_stress()).max() < 1e-3
    distances = atoms.get_all_distances(mic=True)
    assert 2.3 < distances[distances > 0].min() < 2.9  # bonds near the Morse minimum (2.6 A)
    for seed in range(4):  # every nearby structure is higher
        other = perturbed(atoms, seed=seed + 10, strain=0.005, rattle=0.02)
        assert CrystalformerCalculator(model).get_potential_energy(other) > end
    # FIRE gets there too (positions and cell)
    atoms = perturbed(atoms_of(megnet_crystals[24]))
    atoms.calc = CrystalformerCalculator(model)
    assert FIRE(FrechetCellFilter(atoms), logfile=None).run(fmax=0.05, steps=300)
    assert atoms.get_potential_energy() == pytest.approx(end, abs=0.02)


def test_nve_dynamics_conserves_energy(megnet_crystals):
    """100 steps of 1 fs velocity Verlet from 300 K (2x2x2 supercell of a relaxed 4-atom cell). The
    skin is 0.2 A, so tables are rebuilt during the run. Bound tested: |E_total(t) - E_total(0)| <=
    2e-5 eV/atom at every step (measured: ~2e-6 eV/atom), while the potential energy moves by
    hundreds of times that."""
    model = morse_like_energy_model()
    atoms = perturbed(atoms_of(megnet_crystals[24]))
    atoms.calc = CrystalformerCalculator(model)
    BFGS(FrechetCellFilter(atoms), logfile=None).run(fmax=0.01, steps=200)
    atoms = atoms.repeat(2)
    calc = CrystalformerCalculator(model, skin=0.2)
    atoms.calc = calc
    if hasattr(velocitydistribution, "thermalize_momenta"):  # ASE >= 3.29
        velocitydistribution.thermalize_momenta(atoms, 300, rng=np.random.default_rng(0))
    else:
        velocitydistribution.MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    Stationary(atoms)
    dynamics = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    total, potential = [atoms.get_total_energy()], [atoms.get_potential_energy()]
    for _ in range(100):
        dynamics.run(1)
        total.append(atoms.get_total_energy())
        potential.append(atoms.get_potential_energy())
    n = len(atoms)
    drift = np.abs(np.array(total) - total[0]).max() / n
    assert drift < 2e-5, drift
    assert np.ptp(potential) / n > 100 * 2e-5
    assert calc.n_table_builds >= 2


def test_checkpoint_paths_dtypes_and_refusals(tmp_path, megnet_crystals):
    model = energy_model(dtype=torch.float32)
    path = cfdist.save_portable(tmp_path / "model.pt", model)
    atoms = perturbed(atoms_of(megnet_crystals[3]))
    from_path = results(CrystalformerCalculator(path), atoms.copy())
    from_model = results(CrystalformerCalculator(model), atoms.copy())
    for a, b in zip(from_path, from_model):
        assert np.array_equal(a, b)
    assert model.embedding.weight.dtype == torch.float32  # the caller's model was copied, not converted
    in_float32 = results(CrystalformerCalculator(model, dtype="float32"), atoms.copy())
    assert in_float32[0] == pytest.approx(from_model[0], rel=1e-6)
    assert np.allclose(in_float32[1], from_model[1], rtol=0, atol=1e-4 * np.abs(from_model[1]).max())

    property_model = Crystalformer(CrystalformerConfig(n_blocks=1, d_model=16, n_heads=2))
    with pytest.raises(ValueError, match="needs an energy model.*property-only"):
        CrystalformerCalculator(property_model)
    with pytest.raises(ValueError, match="needs an energy model"):
        CrystalformerCalculator(cfdist.save_portable(tmp_path / "property.pt", property_model))
    molecule = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], cell=10 * np.eye(3),
                     pbc=[True, True, False])
    molecule.calc = CrystalformerCalculator(model)
    with pytest.raises(ValueError, match="periodic along all three axes"):
        molecule.get_potential_energy()
    with pytest.warns(UserWarning, match="skin=0"):
        unsmooth = CrystalformerCalculator(energy_model(envelope=False))
    assert unsmooth.skin == 0.0
