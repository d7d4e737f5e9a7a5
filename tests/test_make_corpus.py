"""bench/make_corpus.py: the synthetic corpus generator and its Morse potential.

The potential is checked against ASE's MorsePotential (same formula) and against central finite
differences of its own energy; the corpus for byte-identical output per seed whatever the worker
count, the size range, atomic files, and that cfdist's readers and the preprocessing chunk function
take every generated record.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from paths import MEGNET_SLICE, ROOT, require

sys.path.insert(0, str(ROOT / "bench"))
import make_corpus as mc  # noqa: E402


@pytest.fixture(scope="module")
def sources():
    """The real MEGNet slice, as the generator reads it by default."""
    return mc.load_sources([require(MEGNET_SLICE)], max_atoms=64, min_distance=0.7, verbose=False)


@pytest.fixture(scope="module")
def generator(sources):
    return mc.Generator(sources, mc.Settings(seed=0))


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# ----------------------------------------------------------------------------- the potential
@pytest.mark.parametrize("case", ["fcc-supercell", "one-atom-cell"])
def test_morse_equals_ase_for_one_element(case):
    """One element: exactly ASE's MorsePotential (energy, forces, stress), periodic self-images included."""
    from ase.build import bulk
    from ase.calculators.morse import MorsePotential

    if case == "fcc-supercell":
        atoms = bulk("Cu", "fcc", a=3.55) * (2, 2, 2)
        atoms.rattle(0.08, seed=3)
        strain = np.eye(3) + np.array([[0.02, 0.01, 0.0], [0.01, -0.015, 0.004], [0.0, 0.004, 0.01]])
        atoms.set_cell(atoms.cell.array @ strain, scale_atoms=True)
    else:  # one atom: every interaction is with the atom's own images
        atoms = bulk("W", "bcc", a=3.1)
    model = mc.MorseModel()
    z = int(atoms.numbers[0])
    atoms.calc = MorsePotential(epsilon=model.depth[z], r0=2 * model.radius[z], rho0=model.rho0,
                                rcut1=model.rcut1, rcut2=model.rcut2)
    energy, forces, stress, _ = model.evaluate(atoms.numbers, atoms.cell.array, atoms.positions)
    assert energy == pytest.approx(atoms.get_potential_energy(), rel=1e-12, abs=1e-12)
    assert abs(atoms.get_potential_energy()) > 0.1  # a real interaction, not 0 == 0
    np.testing.assert_allclose(forces, atoms.get_forces(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(stress, atoms.get_stress(voigt=False), rtol=0, atol=1e-13)
    if case == "fcc-supercell":
        assert np.abs(forces).max() > 0.05
    assert np.abs(stress).max() > 1e-4


def test_forces_and_stress_are_derivatives_of_the_energy(generator, sources):
    """Several species (different pair parameters), a rattled, strained supercell: F = -dE/dr and
    sigma = (1/V) dE/d(strain), against central differences (float64)."""
    rng = np.random.default_rng(7)
    source = next(s for s in sources if len(set(s.numbers.tolist())) >= 3 and 8 <= len(s.numbers) <= 12)
    numbers, lattice, positions, _ = generator.candidate(rng, source)
    model = generator.model
    energy, forces, stress, _ = model.evaluate(numbers, lattice, positions)
    assert len(set(numbers.tolist())) >= 3 and np.abs(forces).max() > 0.05

    def e(lat, pos):
        return model.evaluate(numbers, lat, pos)[0]

    h = 1e-5
    numeric = np.zeros_like(positions)
    for a in range(len(numbers)):
        for k in range(3):
            step = np.zeros_like(positions)
            step[a, k] = h
            numeric[a, k] = -(e(lattice, positions + step) - e(lattice, positions - step)) / (2 * h)
    np.testing.assert_allclose(forces, numeric, rtol=0, atol=1e-6 * np.abs(forces).max())
    volume = abs(np.linalg.det(lattice))
    numeric_stress = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            eps = np.zeros((3, 3))
            eps[a, b] += h / 2
            eps[b, a] += h / 2  # a symmetric strain: d E = V sigma_ab h
            plus, minus = np.eye(3) + eps, np.eye(3) - eps
            numeric_stress[a, b] = (e(lattice @ plus, positions @ plus) - e(lattice @ minus, positions @ minus)) / (
                2 * h * volume)
    np.testing.assert_allclose(stress, numeric_stress, rtol=0, atol=1e-6 * np.abs(stress).max())
    # translation invariance: the forces sum to zero
    np.testing.assert_allclose(forces.sum(axis=0), 0.0, atol=1e-10 * len(numbers))


def test_close_atoms_are_refused():
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.6) * (2, 1, 1)
    assert mc.MorseModel().evaluate(atoms.numbers, atoms.cell.array, atoms.positions, min_distance=0.7) is not None
    positions = atoms.positions.copy()
    positions[1] = positions[0] + [0.3, 0.2, 0.0]
    assert mc.MorseModel().evaluate(atoms.numbers, atoms.cell.array, positions, min_distance=0.7) is None
    positions[1] = positions[0]  # exactly on top of each other
    assert mc.MorseModel().evaluate(atoms.numbers, atoms.cell.array, positions, min_distance=0.0) is None


def test_substitution_stays_within_groups():
    groups = mc.group_members()
    assert groups["1"] == (3, 11, 19, 37, 55, 87) and groups["H"] == (1,)
    assert groups["17"] == (9, 17, 35, 53, 85) and groups["4"] == (22, 40, 72)
    assert groups["Ln"] == tuple(range(57, 72)) and groups["An"] == tuple(range(89, 99))
    assert sum(map(len, groups.values())) == 98
    gen = mc.Generator([mc.Source("x", np.array([8, 26, 55]), np.eye(3) * 5, np.eye(3))], mc.Settings())
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        new, swaps = gen._substitute(rng, np.array([8, 26, 55]))
        for old, z in zip((8, 26, 55), new.tolist()):
            assert mc._group(z) == mc._group(old)
        seen.update(new.tolist())
    assert {16, 34, 44, 76, 3, 87} <= seen  # O -> S, Se; Fe -> Ru, Os; Cs -> Li, Fr


# ----------------------------------------------------------------------------- the corpus
def test_sizes_span_1_to_64_atoms(generator):
    sizes = np.array([len(generator.structure(i).numbers) for i in range(1200)])
    assert sizes.min() == 1 and sizes.max() == 64
    hist = dict(mc.size_histogram(sizes))
    assert all(hist[b] > 0 for b in ("1", "2-4", "5-8", "9-16", "17-32", "33-48", "49-64"))
    assert hist["65-128"] == 0 and sum(hist.values()) == len(sizes)


def test_same_seed_same_bytes_whatever_the_worker_count(sources, tmp_path):
    common = dict(fmt="both", files=3, sources=sources, block=40, progress=False)
    mc.generate(tmp_path / "a", 240, settings=mc.Settings(seed=5), workers=1, **common)
    mc.generate(tmp_path / "b", 240, settings=mc.Settings(seed=5), workers=1, **common)
    mc.generate(tmp_path / "c", 240, settings=mc.Settings(seed=5), workers=2, **common)
    mc.generate(tmp_path / "d", 240, settings=mc.Settings(seed=6), workers=1, **common)
    a = _files(tmp_path / "a")
    assert sorted(a) == ["corpus-00000.extxyz", "corpus-00001.jsonl", "corpus-00002.extxyz", "corpus.yaml"]
    assert a == _files(tmp_path / "b") == _files(tmp_path / "c")
    d = _files(tmp_path / "d")
    assert all(d[name] != a[name] for name in a if name != "corpus.yaml")


def test_generated_files_are_read_and_preprocessed(generator, sources, tmp_path, capsys):
    """cfdist's own readers read every record with the generator's labels; the preprocessing chunk
    function writes all of them (forces and stress too) and rejects none."""
    from cfdist.config import CrystalformerConfig
    from cfdist.io import infer_format, plan_chunks, read_chunk
    from cfdist.preprocess.job import Settings, process_chunk

    out = tmp_path / "corpus"
    assert mc.main(["--out", str(out), "--n", "160", "--format", "both", "--workers", "1", "--no-progress",
                    "--source", str(MEGNET_SLICE)]) == 0
    printed = capsys.readouterr().out
    assert "| atoms per structure | structures | share |" in printed and "160 structures in 2 file(s)" in printed
    settings = Settings(cutoff=CrystalformerConfig().cutoff, targets=["e_form"], shard_size=64, with_forces=True,
                        with_stress=True, split_group="meta:source_id")
    kinds = {"corpus-00000.extxyz": "extxyz", "corpus-00001.jsonl": "jarvis"}
    written = 0
    for k, (name, fmt) in enumerate(kinds.items()):
        path = str(out / name)
        assert infer_format(path) == fmt
        chunks = plan_chunks(path, fmt, 64)
        records = [r for c in chunks for r in read_chunk(c)]
        assert len(records) == 80 and all(r.ok for r in records)
        for r in records:
            index = int(r.id.split("-")[2])
            s = generator.structure(index)
            assert r.id == f"syn-0-{index}" and r.meta["source_id"] == s.source_id and r.meta["variant"] == s.variant
            assert r.labels["e_form"] == s.e_form and r.labels["energy"] == s.energy  # exact (repr)
            np.testing.assert_array_equal(r.crystal.numbers, s.numbers)
            np.testing.assert_allclose(r.crystal.positions, s.positions, rtol=0, atol=1e-12)
            if fmt == "extxyz":
                np.testing.assert_allclose(r.forces, s.forces, rtol=0, atol=1e-10)
                np.testing.assert_array_equal(r.stress, s.stress)
            else:
                assert r.forces is None and r.stress is None
        for c_index, chunk in enumerate(chunks):
            result = process_chunk(10 * k + c_index, chunk, settings, str(tmp_path / "shards"), None)
            assert result["n_rejected"] == 0, json.loads((tmp_path / "shards" / ".progress" /
                                                          f"chunk-{10 * k + c_index:06d}.json").read_text())["rejects"]
            written += result["n_written"]
    assert written == 160
    summary = (out / "corpus.yaml").read_text()
    assert "n: 160" in summary and "atoms_histogram" in summary


def test_existing_corpus_is_kept_unless_overwrite(sources, tmp_path):
    out = tmp_path / "c"
    mc.generate(out, 30, fmt="extxyz", files=3, sources=sources, progress=False)
    with pytest.raises(SystemExit, match="already holds 3 corpus file"):
        mc.generate(out, 30, fmt="jsonl", sources=sources, progress=False)
    mc.generate(out, 30, fmt="jsonl", sources=sources, progress=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["corpus-00000.jsonl", "corpus.yaml"]  # old layout removed


def test_a_failed_run_leaves_no_partial_file(sources, tmp_path):
    """Files are written atomically: a generator that cannot make structure 0 leaves nothing behind."""
    impossible = mc.Settings(max_force=1e-9, max_tries=3)  # no rattled crystal is that close to equilibrium
    with pytest.raises(RuntimeError, match="forces within 1e-09 eV/A in 3 draws"):
        mc.generate(tmp_path / "x", 20, settings=impossible, fmt="extxyz", sources=sources, progress=False)
    assert list((tmp_path / "x").iterdir()) == []


def test_layout_and_argument_errors():
    specs = mc.plan_files(10, "both", files=None, per_file=4)
    assert [(s.name, s.start, s.stop) for s in specs] == [
        ("corpus-00000.extxyz", 0, 3), ("corpus-00001.jsonl", 3, 6), ("corpus-00002.extxyz", 6, 10)]
    assert len(mc.plan_files(5, "both")) == 2  # both formats need two files
    with pytest.raises(ValueError, match="every file needs at least one"):
        mc.plan_files(3, "extxyz", files=4)
    with pytest.raises(ValueError, match="format must be one of"):
        mc.plan_files(3, "cif")
    with pytest.raises(SystemExit):
        mc.main(["--out", "/nonexistent/never", "--n", "0"])
