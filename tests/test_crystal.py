"""Tests for cfdist.crystal: the Crystal record, converters and validation (CPU, fast)."""

from __future__ import annotations

import ast
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from pymatgen.core import IStructure, Lattice, Species, Structure
from pymatgen.io.ase import AseAtomsAdaptor

import cfdist.crystal as crystal_module
from cfdist.crystal import (
    REASONS, Crystal, InvalidCrystalError, SiteDisorder, from_ase, from_jarvis, from_pymatgen, from_record,
    to_pymatgen, validate,
)

@pytest.fixture(scope="module")
def records(megnet_records):
    return megnet_records


def assert_same(a: Crystal, b: Crystal, atol: float = 1e-10, check_id: bool = True):
    """Field-by-field equality of two crystals (positions/lattice up to ``atol``)."""
    if check_id:
        assert a.id == b.id
    assert a.numbers.dtype == b.numbers.dtype == np.int64
    np.testing.assert_array_equal(a.numbers, b.numbers)
    np.testing.assert_allclose(a.lattice, b.lattice, rtol=0, atol=atol)
    np.testing.assert_allclose(a.positions, b.positions, rtol=0, atol=atol)
    assert a.labels.keys() == b.labels.keys()
    for k in a.labels:
        assert a.labels[k] == b.labels[k] or (math.isnan(a.labels[k]) and math.isnan(b.labels[k]))
    assert (a.disorder is None) == (b.disorder is None)
    if a.disorder is not None:
        np.testing.assert_array_equal(a.disorder.site, b.disorder.site)
        np.testing.assert_array_equal(a.disorder.z, b.disorder.z)
        np.testing.assert_allclose(a.disorder.occupancy, b.disorder.occupancy, rtol=0, atol=1e-12)


def cubic(positions, a=10.0, numbers=None, id="test", **kw) -> Crystal:
    positions = np.asarray(positions, dtype=float).reshape(-1, 3)
    numbers = [6] * len(positions) if numbers is None else numbers
    return Crystal(id, numbers, np.eye(3) * a, positions, {}, **kw)


def rocksalt() -> Structure:
    return Structure(Lattice.cubic(4.2), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def disordered() -> Structure:
    lat = Lattice.from_parameters(4.0, 4.5, 5.0, 80, 95, 100)
    return Structure(lat, [{"Fe": 0.5, "Co": 0.5}, {"O": 0.9}, "Li", {"Ni": 0.3, "Mn": 0.6}],
                     [[0, 0, 0], [0.5, 0.5, 0.5], [0.1, 0.6, 0.3], [0.7, 0.2, 0.8]])


# ----------------------------------------------------------------------------- record type


def test_post_init_normalises_dtypes_and_shapes():
    c = Crystal(7, [1, 8], [[3, 0, 0], [0, 3, 0], [0, 0, 3]], [[0, 0, 0], [1, 0, 0]], {"y": 1, "gap": None})
    assert c.id == "7"
    assert c.numbers.dtype == np.int64 and c.numbers.shape == (2,)
    assert c.lattice.dtype == np.float64 and c.positions.dtype == np.float64
    assert c.labels == {"y": 1.0, "gap": c.labels["gap"]} and math.isnan(c.labels["gap"])
    assert c.n_atoms == 2 and c.volume == pytest.approx(27.0)
    site, z, occ = c.species()
    np.testing.assert_array_equal(site, [0, 1])
    np.testing.assert_array_equal(z, [1, 8])
    np.testing.assert_array_equal(occ, [1.0, 1.0])
    assert site.dtype == z.dtype == np.int64 and occ.dtype == np.float64


@pytest.mark.parametrize("kwargs, match", [
    (dict(lattice=np.eye(2)), r"lattice must have shape \(3, 3\)"),
    (dict(positions=np.zeros((2, 2))), r"positions must have shape \(N, 3\)"),
    (dict(numbers=[1, 2, 3]), r"3 atomic numbers but 2 positions"),
    (dict(numbers=[[1, 2]]), r"numbers must be 1-D"),
    (dict(numbers=[1.0, 2.5]), r"numbers must be integers"),
])
def test_bad_shapes_raise_value_error_naming_the_id(kwargs, match):
    args = dict(id="mp-shape", numbers=[1, 1], lattice=np.eye(3) * 5, positions=[[0, 0, 0], [1, 1, 1]])
    args.update(kwargs)
    with pytest.raises(ValueError, match=match) as info:
        Crystal(**args)
    assert isinstance(info.value, InvalidCrystalError)
    assert info.value.reason == "bad_shape" and "'mp-shape'" in str(info.value)


def test_site_disorder_shape_mismatch():
    with pytest.raises(ValueError, match="equal length"):
        SiteDisorder([0, 0], [26, 27], [0.5])


def test_species_merges_ordered_and_disordered_sites():
    c = from_pymatgen(disordered())
    site, z, occ = c.species()
    np.testing.assert_array_equal(site, [0, 0, 1, 2, 3, 3])
    np.testing.assert_array_equal(z, [26, 27, 8, 3, 28, 25])
    np.testing.assert_allclose(occ, [0.5, 0.5, 0.9, 1.0, 0.3, 0.6])
    np.testing.assert_array_equal(c.numbers, [26, 8, 3, 25])  # majority species; first listed on ties


def test_error_pickles_and_module_import_is_lazy():
    err = InvalidCrystalError("mp-1", "empty", "structure has no atoms")
    back = pickle.loads(pickle.dumps(err))
    assert (back.crystal_id, back.reason, str(back)) == ("mp-1", "empty", str(err))
    assert set(REASONS) == {"non_finite", "non_finite_label", "small_volume", "overlapping_atoms", "bad_element", "bad_occupancy",
                            "empty", "bad_shape", "not_periodic", "unparseable"}
    # No module-level pymatgen/ase import: those cost seconds in every data worker.
    tree = ast.parse(Path(crystal_module.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in top if isinstance(n, ast.ImportFrom)]
    assert not [m for m in names if m.split(".")[0] in ("pymatgen", "ase")]


# ----------------------------------------------------------------------------- round trips


def test_pymatgen_round_trip_ordered():
    s = rocksalt()
    c = validate(from_pymatgen(s, id="nacl", labels={"e_form": -2.0, "gap pbe": float("nan")}))
    assert c.disorder is None
    np.testing.assert_array_equal(c.numbers, [11, 17])
    np.testing.assert_allclose(c.positions, s.cart_coords)
    back = to_pymatgen(c)
    # pymatgen's own site comparison (species + coords within tolerance); properties differ.
    assert back.lattice == s.lattice and len(back) == len(s) and all(site in s for site in back)
    assert back.properties["id"] == "nacl"
    assert_same(from_pymatgen(back), c)  # id and labels travel in properties


def test_pymatgen_round_trip_disordered_with_vacancy():
    s = disordered()
    c = validate(from_pymatgen(s, id="dis", labels={"y": 1.5}))
    assert c.disorder is not None
    np.testing.assert_array_equal(c.disorder.site, [0, 0, 1, 3, 3])
    back = to_pymatgen(c)
    for site_a, site_b in zip(back, s):
        assert site_a.species == site_b.species
    np.testing.assert_allclose(back.cart_coords, s.cart_coords, atol=1e-12)
    assert not back.is_ordered
    assert_same(from_pymatgen(back), c)


def test_pymatgen_unwrapped_positions_and_istructure():
    s = Structure(Lattice.cubic(5.0), ["Si", "Si"], [[1.2, -0.3, 0.1], [0.25, 0.25, 2.25]])
    c = from_pymatgen(IStructure.from_sites(s), id="istr")
    np.testing.assert_allclose(c.positions, s.cart_coords)  # not wrapped
    assert c.positions[0, 0] == pytest.approx(6.0)
    assert_same(from_pymatgen(to_pymatgen(c)), c)


def test_pymatgen_default_id_and_oxidation_states():
    s = Structure(Lattice.cubic(8.0), [{Species("Fe", 2): 0.5, Species("Fe", 3): 0.5}, Species("O", -2)],
                  [[0, 0, 0], [0.5, 0.5, 0.5]], properties={"id": "mp-ox"})
    c = from_pymatgen(s)
    assert c.id == "mp-ox" and c.disorder is None  # Fe2+/Fe3+ merge into fully occupied Fe
    np.testing.assert_array_equal(c.numbers, [26, 8])
    assert from_pymatgen(rocksalt()).id == "structure"


def test_ase_equals_pymatgen():
    s = disordered()  # its triclinic lattice and sites, with ordered species
    ordered = Structure(s.lattice, ["Fe", "O", "Li", "Mn"], s.frac_coords)
    atoms = AseAtomsAdaptor.get_atoms(ordered)
    a = from_ase(atoms, id="x", labels={"y": 2.0})
    p = from_pymatgen(ordered, id="x", labels={"y": 2.0})
    assert_same(a, p, atol=1e-12)
    # Copies, not views of the live ASE arrays.
    atoms.positions += 1.0
    np.testing.assert_allclose(a.positions, p.positions, atol=1e-12)
    atoms.info["id"] = "from-info"
    assert from_ase(atoms).id == "from-info"
    assert from_ase(Atoms("H", cell=np.eye(3) * 3, pbc=True)).id == "atoms"


def test_jarvis_matches_pymatgen_on_real_records(records):
    for r in records[:100]:
        atoms = r["atoms"]
        assert atoms["cartesian"] is False
        labels = {"e_form": r["e_form"], "gap pbe": r["gap pbe"]}
        c = from_jarvis(atoms, id=r["id"], labels=labels)
        ref = from_pymatgen(Structure(atoms["lattice_mat"], atoms["elements"], atoms["coords"]),
                            id=r["id"], labels=labels)
        assert_same(c, ref, atol=1e-9)
        # The same record with Cartesian coordinates gives the same crystal.
        cart = dict(atoms, coords=(np.array(atoms["coords"]) @ np.array(atoms["lattice_mat"])).tolist(),
                    cartesian=True)
        assert_same(from_jarvis(cart, id=r["id"], labels=labels), c, atol=1e-12)
        assert_same(from_record(cart, id=r["id"], labels=labels), c, atol=1e-12)


def test_first_200_real_records_validate(records):
    for r in records[:200]:
        c = from_jarvis(r["atoms"], id=r["id"], labels={"e_form": r["e_form"], "gap pbe": r["gap pbe"]})
        assert validate(c) is c
        assert c.n_atoms == len(r["atoms"]["elements"])


def test_from_record_dispatch():
    s = rocksalt()
    c = from_pymatgen(s, id="r")
    assert from_record(c) is c
    renamed = from_record(c, id="r2", labels={"y": 1.0})
    assert renamed.id == "r2" and renamed.labels == {"y": 1.0}
    assert_same(from_record(s, id="r"), c)
    assert_same(from_record(IStructure.from_sites(s), id="r"), c)
    assert_same(from_record(AseAtomsAdaptor.get_atoms(s), id="r"), c, atol=1e-12)
    jarvis = {"lattice_mat": s.lattice.matrix.tolist(), "coords": s.frac_coords.tolist(),
              "elements": ["Na", "Cl"], "cartesian": False}
    assert_same(from_record(jarvis, id="r"), c, atol=1e-12)
    with pytest.raises(InvalidCrystalError, match=r"crystal 'q': cannot build a crystal from a builtins.list") as e:
        from_record([1, 2, 3], id="q")
    assert e.value.reason == "unparseable"


def test_left_handed_lattice_is_valid():
    c = from_pymatgen(Structure(Lattice.from_parameters(4, 5, 6, 90, 100, 90), ["Na", "Cl"],
                                [[0, 0, 0], [0.5, 0.5, 0.5]]))
    swapped = Crystal("lh", c.numbers, c.lattice[[1, 0, 2]], c.positions, {})
    assert np.linalg.det(swapped.lattice) < 0
    assert validate(swapped).volume == pytest.approx(c.volume) == pytest.approx(abs(np.linalg.det(c.lattice)))


# ----------------------------------------------------------------------------- validation errors


def check(crystal_or_call, reason, match, **kw):
    """Assert validate (or a converter call) raises ``reason`` with ``match`` and names the id."""
    with pytest.raises(InvalidCrystalError, match=match) as info:
        if callable(crystal_or_call):
            crystal_or_call()
        else:
            validate(crystal_or_call, **kw)
    err = info.value
    assert err.reason == reason
    assert f"crystal '{err.crystal_id}'" in str(err)
    return err


def test_nan_position():
    c = cubic([[0, 0, 0], [1, np.nan, 1]], id="mp-nan")
    err = check(c, "non_finite", r"crystal 'mp-nan': non-finite position \[1.0, nan, 1.0\] of site 1")
    assert err.crystal_id == "mp-nan"


def test_inf_lattice():
    lat = np.eye(3) * 5
    lat[2, 1] = np.inf
    check(Crystal("mp-inf", [1], lat, [[0, 0, 0]], {}), "non_finite",
          r"crystal 'mp-inf': non-finite lattice entry inf at row 2, column 1")


def test_inf_label_rejected_nan_label_allowed():
    check(Crystal("lab", [1], np.eye(3) * 5, [[0, 0, 0]], {"e_form": float("-inf")}),
          "non_finite_label", r"crystal 'lab': label 'e_form' is -inf")
    validate(Crystal("lab", [1], np.eye(3) * 5, [[0, 0, 0]], {"e_form": float("nan")}))


def test_zero_volume_coplanar_lattice():
    lat = [[3, 0, 0], [0, 3, 0], [3, 3, 0]]  # third vector in the plane of the first two
    check(Crystal("mp-flat", [1], lat, [[0, 0, 0]], {}), "small_volume",
          r"crystal 'mp-flat': cell volume 0 A\^3 is below 0.1 A\^3")
    check(Crystal("mp-thin", [1], np.diag([1.0, 1.0, 0.05]), [[0, 0, 0]], {}), "small_volume",
          r"crystal 'mp-thin': cell volume 0.05 A\^3 is below 0.1 A\^3")


def test_overlap_between_two_atoms():
    c = cubic([[1, 1, 1], [5, 5, 5], [1.2, 1.1, 1.0], [7, 7, 7]], id="mp-123")
    check(c, "overlapping_atoms",
          r"^crystal 'mp-123': two atoms closer than 0.5 A \(sites 0 and 2, distance 0.224 A\)$")


def test_overlap_with_own_periodic_image():
    lat = [[0.4, 0, 0], [0, 10, 0], [0, 0, 10]]  # volume 40, but the atom sees itself 0.4 A away
    c = Crystal("mp-self", [6], lat, [[0.1, 5, 5]], {})
    assert c.volume == pytest.approx(40.0)
    check(c, "overlapping_atoms",
          r"crystal 'mp-self': two atoms closer than 0.5 A \(sites 0 and 0, periodic image \(1, 0, 0\), "
          r"distance 0.400 A\)")


def test_overlap_across_periodic_boundary():
    c = cubic([[0.1, 5, 5], [9.9, 5, 5]], id="mp-pbc")  # fractional 0.01 and 0.99 on a 10 A axis
    check(c, "overlapping_atoms",
          r"crystal 'mp-pbc': two atoms closer than 0.5 A \(sites 0 and 1, periodic image \(-1, 0, 0\), "
          r"distance 0.200 A\)")
    # Unwrapped positions are handled too: same atoms shifted by whole cells.
    c = cubic([[20.1, 5, 5], [-0.1, 5, -15]], id="mp-pbc2")
    check(c, "overlapping_atoms", r"crystal 'mp-pbc2': .*distance 0.200 A")


def test_min_distance_configurable():
    c = cubic([[1, 1, 1], [1.8, 1, 1]], id="mp-08")  # 0.8 A apart
    assert validate(c) is c
    check(c, "overlapping_atoms", r"crystal 'mp-08': two atoms closer than 1 A \(sites 0 and 1, distance 0.800 A\)",
          min_distance=1.0)
    # min_volume is configurable too.
    check(c, "small_volume", r"cell volume 1000 A\^3 is below 2000 A\^3", min_volume=2000.0)


@pytest.mark.parametrize("z", [0, 99])
def test_bad_atomic_number(z):
    c = cubic([[0, 0, 0], [5, 5, 5]], numbers=[8, z], id=f"mp-z{z}")
    check(c, "bad_element", rf"crystal 'mp-z{z}': atomic number Z={z} at site 1 is outside 1..98")


def test_bad_element_in_disorder():
    d = SiteDisorder([0, 0], [26, 120], [0.5, 0.4])
    check(cubic([[0, 0, 0]], numbers=[26], id="dz", disorder=d), "bad_element",
          r"crystal 'dz': atomic number Z=120 on disordered site 0 is outside 1..98")


def test_occupancy_sum_above_one():
    d = SiteDisorder([0, 0], [26, 27], [0.7, 0.6])
    check(cubic([[0, 0, 0], [5, 5, 5]], numbers=[26, 8], id="mp-occ", disorder=d), "bad_occupancy",
          r"crystal 'mp-occ': occupancies on site 0 sum to 1.3 > 1")
    # Within the 1e-6 rounding slack it is fine (3 x 0.3333334 = 1.0000002).
    d = SiteDisorder([1, 1, 1], [26, 27, 28], [0.3333334] * 3)
    validate(cubic([[0, 0, 0], [5, 5, 5]], numbers=[8, 26], disorder=d))


@pytest.mark.parametrize("site, z, occ, numbers, match", [
    ([0], [26], [0.0], [26, 8], r"occupancy 0 of Z=26 on site 0 is outside \(0, 1\]"),
    ([0], [26], [1.5], [26, 8], r"occupancy 1.5 of Z=26 on site 0 is outside \(0, 1\]"),
    ([5], [26], [0.5], [26, 8], r"disorder entry 0 refers to site 5, but there are 2 sites"),
    ([1, 0], [8, 26], [0.5, 0.5], [26, 8], r"disorder sites must be non-decreasing"),
    ([0, 0], [26, 26], [0.3, 0.3], [26, 8], r"site 0 lists a species twice"),
    ([0, 0], [26, 27], [0.3, 0.6], [26, 8], r"site 0 has numbers Z=26 but its majority species is Z=27"),
])
def test_malformed_disorder(site, z, occ, numbers, match):
    c = cubic([[0, 0, 0], [5, 5, 5]], numbers=numbers, id="md", disorder=SiteDisorder(site, z, occ))
    check(c, "bad_occupancy", "crystal 'md': " + match)


def test_nan_occupancy():
    c = cubic([[0, 0, 0]], numbers=[26], id="nocc", disorder=SiteDisorder([0], [26], [np.nan]))
    check(c, "non_finite", r"crystal 'nocc': non-finite occupancy nan on site 0")


def test_ase_not_periodic():
    atoms = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], cell=np.eye(3) * 10,
                  pbc=[True, True, False])
    check(lambda: from_ase(atoms, id="water"), "not_periodic",
          r"crystal 'water': atoms are not periodic along all axes \(pbc=\(True, True, False\)\)")
    atoms.pbc = False
    atoms.info["id"] = "mol"
    check(lambda: from_ase(atoms), "not_periodic", r"crystal 'mol'")


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.pop("coords"), r"JARVIS atoms dict lacks key\(s\) \['coords'\]"),
    (lambda d: d.update(lattice_mat=[[1, 0], [0, 1]]), r"lattice_mat must be 3x3"),
    (lambda d: d.update(coords=[[0, 0, 0]]), r"coords must be Nx3 with N = 2 elements, got shape \(1, 3\)"),
    (lambda d: d.update(coords=[[0, 0, "a"], [1, 1, 1]]), r"non-numeric lattice_mat or coords"),
    (lambda d: d.update(cartesian="no"), r"'cartesian' must be a bool"),
    (lambda d: d.update(elements="NaCl"), r"'elements' must be a list of element symbols"),
])
def test_malformed_jarvis_dict(mutate, match):
    d = {"lattice_mat": np.eye(3).tolist(), "coords": [[0, 0, 0], [0.5, 0.5, 0.5]], "elements": ["Na", "Cl"],
         "cartesian": False}
    mutate(d)
    check(lambda: from_jarvis(d, id="jv-1"), "unparseable", r"crystal 'jv-1': " + match)


def test_jarvis_not_a_dict():
    check(lambda: from_jarvis([1, 2], id="jv-2"), "unparseable", r"crystal 'jv-2': expected a JARVIS atoms dict")


def test_unknown_element_symbol():
    d = {"lattice_mat": (np.eye(3) * 5).tolist(), "coords": [[0, 0, 0], [0.5, 0.5, 0.5]],
         "elements": ["Na", "Xx"], "cartesian": False}
    check(lambda: from_jarvis(d, id="jv-xx"), "bad_element",
          r"crystal 'jv-xx': unknown element symbol 'Xx' at site 1")


def test_empty_structure():
    check(Crystal("mp-empty", [], np.eye(3) * 5, [], {}), "empty", r"crystal 'mp-empty': structure has no atoms")
    d = {"lattice_mat": (np.eye(3) * 5).tolist(), "coords": [], "elements": [], "cartesian": False}
    check(from_jarvis(d, id="jv-empty"), "empty",
          r"crystal 'jv-empty': structure has no atoms")


def test_check_order_volume_before_overlap():
    # Singular lattice and overlapping atoms: volume is reported, image_table never runs on it.
    c = Crystal("order", [1, 1], [[3, 0, 0], [0, 3, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 0.1]], {})
    check(c, "small_volume", "cell volume 0 A")
    # Non-finite beats bad element; bad element beats overlap.
    c = Crystal("order", [0, 1], np.eye(3) * 5, [[0, 0, 0], [np.nan, 0, 0]], {})
    check(c, "non_finite", "non-finite position")
    c = Crystal("order", [0, 1], np.eye(3) * 5, [[0, 0, 0], [0, 0, 0.1]], {})
    check(c, "bad_element", "Z=0 at site 0")


def test_check_overlaps_reuses_a_larger_table(records):
    from cfdist.crystal import check_overlaps
    from cfdist.geometry import image_table

    good = from_jarvis(records[0]["atoms"], id="good")
    check_overlaps(good, 0.5, image_table(good.lattice, good.positions, 8.0))
    bad = Crystal(id="bad", numbers=[11, 17], lattice=4.0 * np.eye(3),
                  positions=[[0.0, 0.0, 0.0], [3.9, 0.0, 0.0]])  # 0.1 A apart across the boundary
    messages = []
    for table in (None, image_table(bad.lattice, bad.positions, 6.0)):
        with pytest.raises(InvalidCrystalError) as info:
            check_overlaps(bad, 0.5, table)
        messages.append(str(info.value))
    assert messages[0] == messages[1] and "periodic image (-1, 0, 0)" in messages[0]


def test_relabelled_copies_id_and_labels_and_shares_arrays():
    c = Crystal("a", [14, 8], np.eye(3) * 4.0, [[0, 0, 0], [1, 1, 1]], {"e_form": 1.0, "gap": 2.0})
    r = c.relabelled("b", {"gap": None, "e_form": np.float32(0.5)})
    assert (c.id, c.labels) == ("a", {"e_form": 1.0, "gap": 2.0})  # original untouched
    assert r.id == "b" and r.labels["e_form"] == 0.5 and math.isnan(r.labels["gap"])
    assert type(r.labels["e_form"]) is float
    assert r.positions is c.positions and r.lattice is c.lattice and r.numbers is c.numbers
    with pytest.raises(InvalidCrystalError, match="not a number"):
        c.relabelled("b", {"e_form": "x"})
