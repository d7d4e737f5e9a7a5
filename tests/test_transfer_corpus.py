"""bench/make_transfer_corpus.py: nothing of the pretraining corpus derives from the downstream
tasks' val/test crystals (the slice's split file), neither directly nor through a near-copy
(same composition), in the generated structures and in the MPtrj frames.

The CHGNet labelling itself (a bench-only dependency) is not exercised here; the drawing, the
exclusion rule and the MPtrj filter are.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from paths import MEGNET_SLICE, MEGNET_SPLIT, ROOT, require

sys.path.insert(0, str(ROOT / "bench"))
import make_transfer_corpus as mtc  # noqa: E402


@pytest.fixture(scope="module")
def held_and_sources():
    return mtc.held_out_and_sources(require(MEGNET_SLICE), require(MEGNET_SPLIT), max_atoms=8)


def test_composition_key_is_the_reduced_formula():
    assert mtc.composition_key([8, 22, 8]) == mtc.composition_key([22, 8, 8, 22, 8, 8]) == ((8, 2), (22, 1))
    assert mtc.composition_key([8, 22, 8]) != mtc.composition_key([8, 22])


def test_no_val_or_test_crystal_or_composition_reaches_the_corpus(held_and_sources):
    held, sources, counts = held_and_sources
    split = json.loads(MEGNET_SPLIT.read_text())
    val_test = set(split["val"]) | set(split["test"])
    assert held.ids == val_test and len(held.compositions) == counts["held_out_compositions"] > 400
    # sources: train ids only, none with a held-out composition; the rule did remove some
    assert {s.id for s in sources} <= set(split["train"])
    assert not any(mtc.composition_key(s.numbers) in held.compositions for s in sources)
    assert counts["train_sources_same_composition_as_val_test"] > 0
    # generated structures (supercells, substitutions, strain, rattle): none has a held-out composition
    drawer = mtc.Drawer(sources, held, mtc.CorpusSettings(seed=3))
    drawn = [drawer.draw(i) for i in range(400)]
    assert not any(held.excludes(d.numbers) for d in drawn)
    assert all(d.source_id not in val_test for d in drawn)
    assert any("sub:" in d.variant for d in drawn) and all(d.numbers.max() <= mtc.CHGNET_MAX_Z for d in drawn)
    # a pure function of (seed, index)
    again = drawer.draw(17)
    assert np.array_equal(again.positions, drawn[17].positions) and np.array_equal(again.numbers, drawn[17].numbers)


def test_the_rule_rejects_a_substitution_that_recreates_a_held_out_composition(held_and_sources):
    held, sources, _ = held_and_sources
    composition = sorted(held.compositions)[0]
    numbers = np.repeat([z for z, _ in composition], [c for _, c in composition] * 1)
    assert held.excludes(np.concatenate([numbers, numbers]))  # a 2x supercell of a held-out chemistry
    assert not held.excludes(np.array([1, 1, 1, 1, 1, 1, 1, 3]))


def test_mptrj_frames_of_held_out_materials_are_dropped(tmp_path):
    import ase.io
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = []
    for k, (symbols, traj) in enumerate([("NaCl", "mp-22862"), ("KBr", "mp-23251"), ("LiF", "mp-1138")]):
        atoms = Atoms(symbols, positions=[[0, 0, 0], [1.4, 1.4, 1.4]], cell=np.eye(3) * 2.8, pbc=True)
        atoms.info.update(mptrj_traj_id=traj, mptrj_snapshot_id=f"{traj}-0-{k}")
        atoms.calc = SinglePointCalculator(atoms, energy=-7.0 - k, forces=np.full((2, 3), 0.1 * k),
                                           stress=np.arange(6, dtype=float) * 1e-3)
        frames.append(atoms)
    path = tmp_path / "frames.extxyz"
    ase.io.write(path, frames, format="extxyz")
    # KBr held out by id, LiF by composition (another material id)
    held = mtc.HeldOut(frozenset({"mp-23251"}), frozenset({mtc.composition_key([3, 9])}))
    out = tmp_path / "kept.extxyz"
    counts = mtc.filtered_mptrj([path], held, out)
    assert counts == {"frames": 3, "kept": 1, "dropped_val_test": 2}
    (kept,) = ase.io.read(out, index=":")
    assert kept.get_chemical_formula() == "ClNa" and kept.info["source_id"] == "mp-22862"
    assert kept.get_potential_energy() == pytest.approx(-7.0)
    np.testing.assert_allclose(kept.get_stress(), frames[0].get_stress(), atol=1e-12)


def test_the_mixture_property_set_holds_no_test_crystal_and_never_the_tasks_label(tmp_path):
    """bench/transfer.py's mixture for a task: the slice's train (+ val, for validation) crystals with
    the OTHER label; the test crystals and the task's own label never reach pretraining."""
    sys.path.insert(0, str(ROOT / "bench"))
    import transfer

    split = json.loads(require(MEGNET_SPLIT).read_text())
    prop = transfer.property_split(split)
    assert set(prop) == {"train", "val"} and prop["train"] == split["train"] and prop["val"] == split["val"]
    with pytest.raises(ValueError, match="two splits"):
        transfer.property_split({**split, "val": split["val"] + split["test"][:1]})
    assert transfer.other_label("e_form") == "gap pbe" and transfer.other_label("gap pbe") == "e_form"

    def manifest(targets, test=0):
        (tmp_path / "manifest.json").write_text(json.dumps({"targets": targets,
                                                            "splits": {"train": 3418, "val": 265, "test": test}}))
        return tmp_path

    corpus = tmp_path / "corpus"
    ds = transfer.mixture_datasets("e_form", corpus, manifest(["gap pbe"]), {"corpus": 1.0, "slice": 3.0})
    assert [(d["name"], d["targets"], d.get("energy", False), d["weight"]) for d in ds] == [
        ("corpus", ["energy"], True, 1.0), ("slice_gap_pbe", ["gap pbe"], False, 3.0)]
    assert ds[1]["transforms"] == {"gap pbe": "softplus"}
    ds = transfer.mixture_datasets("gap pbe", corpus, manifest(["e_form"]))
    assert ds[1]["targets"] == ["e_form"] and "weight" not in ds[1]
    with pytest.raises(ValueError, match="holds that label or test crystals"):
        transfer.mixture_datasets("gap pbe", corpus, manifest(["e_form", "gap pbe"]))
    with pytest.raises(ValueError, match="holds that label or test crystals"):
        transfer.mixture_datasets("e_form", corpus, manifest(["gap pbe"], test=226))
    # and the property shards the benchmark builds hold no test crystal at all: cfdist preprocess
    # rejects the ids the split file does not list
    from cfdist.preprocess.splits import load_split_file

    (tmp_path / "split.json").write_text(json.dumps(prop))
    assert not set(load_split_file(str(tmp_path / "split.json"))) & set(split["test"])
