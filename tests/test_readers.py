"""Readers of the preprocessing stage: every format round-trips the real MEGNet slice, bad records
become error records (never dropped), chunk planning is deterministic and extxyz/jsonl reads stream."""

from __future__ import annotations

import bz2
import gzip
import json
import math
import os
import pickle
from dataclasses import replace as dataclasses_replace

import numpy as np
import pytest

import cfdist.io as readers
from cfdist.io import cut_json, json_container, spill
from corpus_formats import write_every_format
from raw_formats import (cse_dict, forces_stress, structure_of, write_cif_dir,
                         write_extxyz, write_json, write_jsonl)
from cfdist.io import (FORMATS, Chunk, RawRecord, expand_inputs, infer_format, plan_chunks,
                                read_chunk)

N = 20
CHUNK = 7


@pytest.fixture(scope="module")
def recs(megnet_records):
    """N real records; the last one's band gap is set to null (JARVIS's missing value; must become NaN)."""
    out = [dict(r) for r in megnet_records[:N]]
    out[-1]["gap pbe"] = None
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory, recs):
    """One well-formed input per format variant, all holding the same N real crystals."""
    root = tmp_path_factory.mktemp("inputs")
    return write_every_format(root, recs)


def _read_all(path, fmt=None, chunk_size=CHUNK):
    fmt = fmt or infer_format(path)
    chunks = plan_chunks(path, fmt, chunk_size)
    return chunks, [r for c in chunks for r in read_chunk(c)]


def _check_plan(chunks, n, chunk_size=CHUNK):
    assert len(chunks) == math.ceil(n / chunk_size)
    assert [c.start for c in chunks] == list(range(0, n, chunk_size))
    assert sum(c.count for c in chunks) == n
    assert all(c.count == chunk_size for c in chunks[:-1])


def _samestructure_of(crystal, rec, atol=1e-6):
    a = rec["atoms"]
    lattice = np.array(a["lattice_mat"], dtype=float)
    np.testing.assert_allclose(crystal.lattice, lattice, atol=atol)
    np.testing.assert_allclose(crystal.positions, np.array(a["coords"]) @ lattice, atol=atol)
    from cfdist.crystal import _symbol_to_z
    assert crystal.numbers.tolist() == [_symbol_to_z()[e] for e in a["elements"]]


def _same_structure_cif(crystal, rec, tol=1e-4):
    """CIF stores cell parameters (orientation is lost) and pymatgen groups sites by species: compare
    the metric tensor and match sites by species + fractional coordinates modulo 1."""
    from cfdist.crystal import _symbol_to_z

    a = rec["atoms"]
    lattice = np.array(a["lattice_mat"], dtype=float)
    np.testing.assert_allclose(crystal.lattice @ crystal.lattice.T, lattice @ lattice.T, atol=tol * 10)
    frac = np.linalg.solve(crystal.lattice.T, crystal.positions.T).T
    ref_frac = np.array(a["coords"], dtype=float)
    ref_z = [_symbol_to_z()[e] for e in a["elements"]]
    assert sorted(crystal.numbers.tolist()) == sorted(ref_z)
    unused = set(range(len(ref_z)))
    for z, f in zip(crystal.numbers.tolist(), frac):
        d = f - ref_frac
        d -= np.round(d)
        match = [j for j in unused if ref_z[j] == z and np.abs(d[j]).max() < tol]
        assert match, f"site {f} (Z={z}) of {crystal.id} has no counterpart in the source"
        unused.remove(match[0])


def _assert_labels(labels, expected):
    for key, value in expected.items():
        assert key in labels, f"label {key!r} missing from {sorted(labels)}"
        if value is None or (isinstance(value, float) and math.isnan(value)):
            assert math.isnan(labels[key])
        else:
            assert labels[key] == pytest.approx(value, abs=1e-9)


# ----------------------------------------------------------------------------- format inference / inputs


def test_infer_format(files, tmp_path):
    expected = {"jarvis_json": "jarvis", "jarvis_json_gz": "jarvis", "jarvis_json_bz2": "jarvis",
                "jarvis_jsonl": "jarvis", "jarvis_jsonl_gz": "jarvis", "pmg_structures": "pymatgen",
                "pmg_cse": "pymatgen", "pmg_alexandria": "pymatgen", "pmg_wrapped_jsonl": "pymatgen",
                "extxyz": "extxyz", "ase_db": "ase_db", "cif": "cif", "mptrj": "mptrj", "aselmdb": "aselmdb",
                "parquet": "parquet"}
    for key, fmt in expected.items():
        assert infer_format(files[key]) == fmt, key
    assert infer_format(os.path.join(files["cif"], "id_prop.csv")) == "cif"
    assert infer_format(os.path.join(files["cif"], "mp-10096.cif")) == "cif"
    assert infer_format(str(tmp_path / "a.xyz")) == "extxyz"
    assert set(expected.values()) == set(FORMATS)

    unknown = tmp_path / "notes.txt"
    unknown.write_text("hello")
    with pytest.raises(ValueError, match="notes.txt"):
        infer_format(str(unknown))
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{"a": 1}, {"b": 2}]))
    with pytest.raises(ValueError, match="other.json"):
        infer_format(str(other))
    with pytest.raises(ValueError, match="no id_prop.csv"):
        infer_format(str(tmp_path))


def test_infer_format_peeks_large_json_list(tmp_path, recs):
    """The first records of a JSON list are enough: a list far larger than the peek buffer whose tail
    is not even valid JSON is still recognised."""
    path = tmp_path / "big.json"
    body = json.dumps(recs * 40)
    path.write_text(body[:-5000])  # truncated: json.load would fail
    assert len(body) > 1 << 17
    assert infer_format(str(path)) == "jarvis"
    # the same for the entries of an Alexandria-style object (pymatgen entries)
    entries = json.dumps({"@class": "dump", "entries": [cse_dict(r) for r in recs] * 10})
    path = tmp_path / "big_alexandria.json.bz2"
    with bz2.open(path, "wt") as f:
        f.write(entries[:-5000])
    assert len(entries) > 1 << 17
    assert infer_format(str(path)) == "pymatgen"


def test_expand_inputs(files, tmp_path):
    root = tmp_path / "tree"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.extxyz").write_text("")
    (root / "README.md").write_text("docs")
    (root / "sub" / "b.json.gz").write_bytes(b"")
    (root / "sub" / "deeper" / "c.db").write_bytes(b"")
    cif_dir = root / "sub" / "cifset"
    cif_dir.mkdir()
    (cif_dir / "id_prop.csv").write_text("x,1\n")
    (cif_dir / "x.cif").write_text("")

    got = expand_inputs([str(root)])
    assert got == sorted([str(root / "a.extxyz"), str(root / "sub" / "b.json.gz"),
                          str(root / "sub" / "deeper" / "c.db"), str(cif_dir)])
    # globs, de-duplication, id_prop.csv -> its directory, explicit files kept, relative -> absolute
    got = expand_inputs([str(root / "**" / "*.db"), str(root / "sub" / "deeper" / "c.db"),
                         str(cif_dir / "id_prop.csv"), str(cif_dir)])
    assert got == [str(root / "sub" / "cifset"), str(root / "sub" / "deeper" / "c.db")]
    assert expand_inputs([files["cif"]]) == [files["cif"]]
    cwd = os.getcwd()
    try:
        os.chdir(root)
        assert expand_inputs(["a.extxyz"]) == [str(root / "a.extxyz")]
        assert expand_inputs("*.extxyz") == [str(root / "a.extxyz")]
    finally:
        os.chdir(cwd)

    with pytest.raises(FileNotFoundError, match="nothing-here"):
        expand_inputs([str(root / "a.extxyz"), str(tmp_path / "nothing-here" / "*.xyz")])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        expand_inputs([str(tmp_path / "missing.json")])
    with pytest.raises(FileNotFoundError, match=r"\*\.md"):
        expand_inputs([str(root / "*.md")])  # matches only a file of no known format


# ----------------------------------------------------------------------------- round trips


def test_plan_is_deterministic_and_chunks_pickle(files):
    for key in ("jarvis_jsonl", "extxyz", "ase_db", "cif", "pmg_cse"):
        path = files[key]
        fmt = infer_format(path)
        first = plan_chunks(path, fmt, CHUNK)
        assert first == plan_chunks(path, fmt, CHUNK)
        assert pickle.loads(pickle.dumps(first)) == first
        _check_plan(first, N)
        assert all(c.format == fmt and os.path.isabs(c.path) for c in first)
    with pytest.raises(ValueError, match="chunk_size"):
        plan_chunks(files["jarvis_json"], "jarvis", 0)
    with pytest.raises(ValueError, match="unknown format"):
        plan_chunks(files["jarvis_json"], "poscar", 5)
    with pytest.raises(FileNotFoundError, match="absent.json"):
        plan_chunks(os.path.join(os.path.dirname(files["jarvis_json"]), "absent.json"), "jarvis", 5)


@pytest.mark.parametrize("key", ["jarvis_json", "jarvis_json_gz", "jarvis_json_bz2", "jarvis_jsonl",
                                 "jarvis_jsonl_gz"])
def test_jarvis_roundtrip(files, recs, key):
    chunks, out = _read_all(files[key])
    _check_plan(chunks, N)
    assert [r.index for r in out] == list(range(N))
    assert [r.id for r in out] == [r["id"] for r in recs]
    for got, rec in zip(out, recs):
        assert got.error_reason is None and got.error is None, got.error
        _samestructure_of(got.crystal, rec)
        _assert_labels(got.labels, {"e_form": rec["e_form"], "gap pbe": rec["gap pbe"]})
        assert set(got.labels) == {"e_form", "gap pbe"}
        assert got.crystal.id == rec["id"]
        assert got.forces is None and got.stress is None
        assert got.meta == {}  # the MEGNet records hold no strings besides their id
    if key == "jarvis_jsonl":
        # blank lines (before records 5 and 11) are skipped; sources name the physical line
        assert out[0].source == f"{files[key]}:line 1"
        assert out[5].source == f"{files[key]}:line 7"
        assert out[11].source == f"{files[key]}:line 14"
    elif key == "jarvis_json":
        assert out[3].source == f"{files[key]}:3"


@pytest.mark.parametrize("key", ["pmg_structures", "pmg_cse", "pmg_alexandria", "pmg_wrapped_jsonl"])
def test_pymatgen_roundtrip(files, recs, key):
    chunks, out = _read_all(files[key])
    _check_plan(chunks, N)
    assert [r.index for r in out] == list(range(N))
    assert [r.id for r in out] == [r["id"] for r in recs]
    for got, rec in zip(out, recs):
        assert got.error_reason is None, got.error
        _samestructure_of(got.crystal, rec)
        n_atoms = len(rec["atoms"]["elements"])
        if key == "pmg_structures":
            _assert_labels(got.labels, {"e_form": rec["e_form"]})
            assert got.meta == {}
        elif key == "pmg_wrapped_jsonl":
            _assert_labels(got.labels, {"e_form": rec["e_form"], "gap pbe": rec["gap pbe"], "nelements": 2})
            assert "formula" not in got.labels and "material_id" not in got.labels
            assert got.meta == {"formula": "x"}  # string fields, not the id (material_id) or structure
        else:
            raw = rec["e_form"] * n_atoms
            _assert_labels(got.labels, {"energy": raw - 0.25, "uncorrected_energy": raw, "correction": -0.25,
                                        "energy_per_atom": (raw - 0.25) / n_atoms, "e_form": rec["e_form"],
                                        "gap pbe": rec["gap pbe"]})
            assert "note" not in got.labels
            assert got.meta == {"note": "x"}  # the entry's data strings; no @module/@class, no entry_id


def test_extxyz_roundtrip(files, recs):
    chunks, out = _read_all(files["extxyz"])
    _check_plan(chunks, N)
    assert [r.id for r in out] == [r["id"] for r in recs]
    line = 1
    for k, (got, rec) in enumerate(zip(out, recs)):
        assert got.error_reason is None, got.error
        _samestructure_of(got.crystal, rec)
        n_atoms = len(rec["atoms"]["elements"])
        assert got.source == f"{files['extxyz']}:line {line}"
        line += n_atoms + 2
        forces, stress = forces_stress(k, n_atoms)
        np.testing.assert_allclose(got.forces, forces, atol=1e-6)
        assert got.stress.shape == (3, 3)
        np.testing.assert_allclose(got.stress, stress, atol=1e-6)
        _assert_labels(got.labels, {"energy": rec["e_form"] * n_atoms, "energy_per_atom": rec["e_form"]})
        assert "config_type" not in got.labels and "mp_id" not in got.labels
        assert got.meta == {"config_type": "bulk"}  # info strings; mp_id is the id, so not meta


def test_extxyz_meta_carries_mptrj_trajectory_ids():
    """Real MPtrj frames: the string entries of each frame's info line (mptrj_traj_id, ...) land in
    RawRecord.meta, exactly as written; numbers stay labels; the -TP frames carry internal_id instead."""
    import re

    from paths import FIXTURES, require

    path = str(require(FIXTURES / "mptrj_24.extxyz"))
    with open(path) as f:
        headers = [line for line in f.read().splitlines() if line.startswith("Lattice=")]
    _, out = _read_all(path)
    assert len(out) == len(headers) == 24
    n_traj = 0
    for got, header in zip(out, headers):
        assert got.ok, got.error
        traj = re.search(r"\bmptrj_traj_id=(\S+)", header)
        if traj:
            n_traj += 1
            assert got.meta["mptrj_traj_id"] == traj.group(1)
            assert got.meta["mptrj_snapshot_id"] == re.search(r"\bmptrj_snapshot_id=(\S+)", header).group(1)
            assert got.meta["source"] == "MPtrj"
        else:
            assert "mptrj_traj_id" not in got.meta
            assert got.meta["internal_id"] == re.search(r"\binternal_id=(\S+)", header).group(1)
        assert all(isinstance(v, str) for v in got.meta.values())
        assert "energy" not in got.meta and "energy" in got.labels
    assert n_traj == 12


def test_meta_is_bounded_and_leaves_out_ids_and_structures(tmp_path, recs):
    """Only short string values, at most MAX_META_FIELDS of them; never the id or the structure."""
    import ase.db

    from raw_formats import atoms_of

    many = {f"s{k:03d}": f"v{k}" for k in range(readers.MAX_META_FIELDS + 10)}
    rec = {**recs[0], "formula": "Ac", "long": "x" * readers.MAX_META_CHARS, "nested": {"a": "b"},
           "flag": True, "tags": ["a", "b"]}
    path = str(tmp_path / "one.json")
    write_json(path, [rec, {**recs[1], **many}])
    _, (first, second) = _read_all(path)
    assert first.meta == {"formula": "Ac"} and first.id == recs[0]["id"]
    assert len(second.meta) == readers.MAX_META_FIELDS
    assert second.meta == dict(list(many.items())[:readers.MAX_META_FIELDS])
    db_path = str(tmp_path / "kvp.db")
    with ase.db.connect(db_path) as db:
        db.write(atoms_of(recs[0]), material_id=recs[0]["id"], prototype="rocksalt", e_form=1.0)
    _, (row,) = _read_all(db_path)
    assert row.id == recs[0]["id"] and row.meta == {"prototype": "rocksalt"} and row.labels["e_form"] == 1.0


def test_ase_db_roundtrip(files, recs):
    chunks, out = _read_all(files["ase_db"])
    _check_plan(chunks, N)
    assert [r.id for r in out] == [r["id"] for r in recs]
    for k, (got, rec) in enumerate(zip(out, recs)):
        assert got.error_reason is None, got.error
        _samestructure_of(got.crystal, rec)
        n_atoms = len(rec["atoms"]["elements"])
        forces, stress = forces_stress(k, n_atoms)
        np.testing.assert_allclose(got.forces, forces, atol=1e-9)
        np.testing.assert_allclose(got.stress, stress, atol=1e-9)
        _assert_labels(got.labels, {"energy": rec["e_form"] * n_atoms, "e_form": rec["e_form"]})


def test_cif_dir_roundtrip(files, recs):
    chunks, out = _read_all(files["cif"])
    _check_plan(chunks, N)
    assert all(c.path == files["cif"] for c in chunks)
    assert [r.id for r in out] == [r["id"] for r in recs]
    for k, (got, rec) in enumerate(zip(out, recs)):
        assert got.error_reason is None, got.error
        _same_structure_cif(got.crystal, rec)
        assert got.labels == {"target": pytest.approx(rec["e_form"])}
        assert got.source == f"{files['cif']}/id_prop.csv:line {k + 1}"
    # planning through the id_prop.csv file itself gives the same chunks
    assert plan_chunks(os.path.join(files["cif"], "id_prop.csv"), "cif", CHUNK) == chunks


def test_cif_dir_header_multiple_columns(tmp_path, recs):
    sub = recs[:3]
    rows = ["name,e_form,gap"] + [f"{r['id']}.cif,{r['e_form']},{r['gap pbe'] if r['gap pbe'] is not None else 'na'}"
                                  for r in sub]
    write_cif_dir(str(tmp_path / "d"), sub, rows)
    _, out = _read_all(str(tmp_path / "d"))
    assert [r.id for r in out] == [r["id"] for r in sub]
    for got, rec in zip(out, sub):
        _assert_labels(got.labels, {"e_form": rec["e_form"], "gap": rec["gap pbe"]})
    assert out[0].source.endswith("id_prop.csv:line 2")

    write_cif_dir(str(tmp_path / "e"), sub, [f"{r['id']},{r['e_form']},1.5" for r in sub])
    _, out = _read_all(str(tmp_path / "e"))
    assert set(out[0].labels) == {"target_0", "target_1"}


def test_standalone_cif_file(tmp_path, recs):
    from pymatgen.io.cif import CifWriter

    text = "".join(str(CifWriter(structure_of(r))) for r in recs[:3])
    path = tmp_path / "three.cif"
    path.write_text(text)
    chunks, out = _read_all(str(path), chunk_size=2)
    assert [c.count for c in chunks] == [2, 1]
    assert len(out) == 3 and all(r.ok for r in out), [r.error for r in out]
    for got, rec in zip(out, recs[:3]):
        _same_structure_cif(got.crystal, rec)
        assert got.id.startswith("three/")


# ----------------------------------------------------------------------------- bad records


def _check_errors(out, n, bad):
    """len(out) == n; exactly the indices in ``bad`` (index -> reason) are error records."""
    assert len(out) == n
    assert [r.index for r in out] == list(range(n))
    for r in out:
        if r.index in bad:
            assert r.crystal is None
            assert r.error_reason == bad[r.index], (r.index, r.error)
            assert r.error.startswith(r.source) and r.error_reason in r.error
        else:
            assert r.error_reason is None and r.error is None, r.error
            assert r.crystal is not None


def test_jarvis_bad_records(tmp_path, recs):
    bad_element = json.loads(json.dumps(recs[3]))
    bad_element["id"] = "bad-element"
    bad_element["atoms"]["elements"][0] = "Xx"
    data = recs[:3] + [{"id": "no-atoms", "e_form": 1.0}, bad_element, 42] + recs[3:10]
    bad = {3: "unparseable", 4: "bad_element", 5: "unparseable"}
    path = str(tmp_path / "bad.json")
    write_json(path, data)
    _, out = _read_all(path)
    _check_errors(out, len(data), bad)
    assert out[3].id == "no-atoms" and "no 'atoms'" in out[3].error and out[3].labels == {"e_form": 1.0}
    assert out[4].id == "bad-element" and "'Xx'" in out[4].error
    assert f"{path}:4" in out[4].error

    path = str(tmp_path / "bad.jsonl")
    write_jsonl(path, data, {7: '{"id": "broken", "atoms": '})
    _, out = _read_all(path)
    _check_errors(out, len(data) + 1, {**bad, 7: "unparseable"})
    assert out[7].error.startswith(f"{path}:line 8") and "not valid JSON" in out[7].error


def test_pymatgen_bad_records(tmp_path, recs):
    good = [structure_of(r, {"id": r["id"]}).as_dict() for r in recs[:8]]
    broken_sites = json.loads(json.dumps(good[0]))
    broken_sites["sites"] = "garbage"
    broken_cse = cse_dict(recs[0])
    broken_cse["structure"]["lattice"] = {"nonsense": 1}
    data = good[:2] + [broken_sites, {"foo": 1}, broken_cse,
                       {"@class": "ComputedEntry", "entry_id": "ce-1", "energy": 1.0}] + good[2:]
    path = str(tmp_path / "bad_structures.json.gz")
    write_json(path, data)
    assert infer_format(path) == "pymatgen"
    _, out = _read_all(path)
    _check_errors(out, len(data), {2: "unparseable", 3: "unparseable", 4: "unparseable", 5: "unparseable"})
    assert out[4].id == recs[0]["id"]
    assert out[5].id == "ce-1" and "no structure" in out[5].error


def test_cif_bad_records(tmp_path, recs):
    d = str(tmp_path / "cifs")
    sub = recs[:9]
    rows = [f"{r['id']},{r['e_form']}" for r in sub]
    rows.insert(2, "missing-structure,1.0")
    rows.insert(5, "garbage,2.0")
    rows.insert(7, f"{sub[0]['id']},not-a-number")
    rows.insert(8, "")  # blank: not a record
    write_cif_dir(d, sub, rows)
    with open(os.path.join(d, "garbage.cif"), "w") as f:
        f.write("this is not a CIF file\n_cell_length_a oops\n")
    _, out = _read_all(d)
    _check_errors(out, len(sub) + 3, {2: "unparseable", 5: "unparseable", 7: "unparseable"})
    assert out[2].id == "missing-structure" and "not found" in out[2].error
    assert out[5].id == "garbage" and "garbage.cif" in out[5].error
    assert "not a number" in out[7].error
    assert out[8].source.endswith("id_prop.csv:line 10")


def _corrupt_atom_line(path, frame, atom_line=1):
    """Replace a coordinate of one atom line of frame ``frame`` (0-based) by garbage."""
    with open(path) as f:
        lines = f.readlines()
    k = 0
    for _ in range(frame):
        k += int(lines[k]) + 2
    target = k + 2 + atom_line
    tokens = lines[target].split()
    tokens[2] = "1.2.3abc"
    lines[target] = " ".join(tokens) + "\n"
    with open(path, "w") as f:
        f.writelines(lines)
    return k + 1  # line number of the frame header


def test_extxyz_bad_frames(tmp_path, recs):
    from ase import Atoms

    molecule = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])  # not periodic
    path = str(tmp_path / "bad.xyz")
    write_extxyz(path, recs[:15], extra={12: molecule})
    header = _corrupt_atom_line(path, 8)
    _, out = _read_all(path)
    _check_errors(out, 16, {8: "unparseable", 12: "not_periodic"})
    assert out[8].source == f"{path}:line {header}" and out[8].error.startswith(f"{path}:line {header}")
    assert out[8].id is None
    assert [r.id for r in out if r.index not in (8, 12)] == [r["id"] for r in recs[:15] if r is not recs[8]]
    _samestructure_of(out[7].crystal, recs[7])
    _samestructure_of(out[9].crystal, recs[9])


def test_extxyz_truncated_and_malformed(tmp_path, recs):
    path = tmp_path / "trunc.xyz"
    write_extxyz(str(path), recs[:4])
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))  # last frame lost its last atom line
    chunks, out = _read_all(str(path), chunk_size=3)
    _check_errors(out, 4, {3: "unparseable"})

    lines[0] = "two\n"
    path.write_text("".join(lines))
    with pytest.raises(ValueError, match=r"trunc.xyz:line 1\b"):
        plan_chunks(str(path), "extxyz", 3)
    n0 = len(recs[0]["atoms"]["elements"])
    lines[0] = f"{n0}\n"
    lines[n0 + 2] = "garbage count\n"
    path.write_text("".join(lines))
    with pytest.raises(ValueError, match=rf"trunc.xyz:line {n0 + 3}\b"):
        plan_chunks(str(path), "extxyz", 3)


class _CountingFile:
    """A read-only binary file that records seeks and bytes read."""

    def __init__(self, path, log):
        self._f = open(path, "rb")
        self._log = log

    def seek(self, pos, whence=0):
        self._log.append(("seek", pos))
        return self._f.seek(pos, whence)

    def read(self, n=-1):
        data = self._f.read(n)
        self._log.append(("read", len(data)))
        return data

    def readline(self, *a):
        raise AssertionError("read_chunk must read its byte range in one go")

    def __iter__(self):
        raise AssertionError("read_chunk must not iterate over the whole file")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.mark.parametrize("key", ["extxyz", "jarvis_jsonl"])
def test_streaming_reads_only_the_chunk(files, monkeypatch, key):
    path = files[key]
    chunks = plan_chunks(path, infer_format(path), 3)
    size = os.path.getsize(path)
    # byte ranges partition the file exactly, in order
    assert chunks[0].byte_offset == 0
    for a, b in zip(chunks, chunks[1:]):
        assert a.byte_offset + a.byte_length == b.byte_offset
    assert chunks[-1].byte_offset + chunks[-1].byte_length == size
    with open(path, "rb") as f:
        data = f.read()
    for c in chunks:
        assert c.line == data[:c.byte_offset].count(b"\n") + 1

    later = chunks[len(chunks) // 2]
    expected = list(read_chunk(later))
    log = []
    opened = []

    def fake_open(p, mode="r", *a, **k):
        assert mode == "rb", mode
        opened.append(p)
        return _CountingFile(p, log)

    monkeypatch.setattr(spill, "open", fake_open, raising=False)
    got = list(read_chunk(later))
    assert opened == [path]
    assert ("seek", later.byte_offset) in log
    assert sum(n for op, n in log if op == "read") == later.byte_length < size / 3
    assert [r.id for r in got] == [r.id for r in expected]
    assert [r.index for r in got] == list(range(later.start, later.start + later.count))


def test_read_chunk_missing_file_and_records_pickle(files, tmp_path):
    missing = str(tmp_path / "gone.extxyz")
    with pytest.raises(FileNotFoundError, match="gone.extxyz"):
        list(read_chunk(Chunk("extxyz", missing, 0, 1, 0, 10)))
    with pytest.raises(FileNotFoundError, match="gone.db"):
        plan_chunks(str(tmp_path / "gone.db"), "ase_db", 5)
    assert not os.path.exists(tmp_path / "gone.db")  # ase.db.connect would have created it
    rec = next(read_chunk(plan_chunks(files["extxyz"], "extxyz", 5)[0]))
    back = pickle.loads(pickle.dumps(rec))
    assert isinstance(back, RawRecord) and back.id == rec.id
    np.testing.assert_array_equal(back.crystal.positions, rec.crystal.positions)


def test_shortfall_becomes_error_records(files):
    """A chunk planned past the end of the input (file shrank) still yields chunk.count records."""
    out = list(read_chunk(Chunk("jarvis", files["jarvis_json"], N - 2, 5)))
    assert [r.index for r in out] == [N - 2, N - 1, N, N + 1, N + 2]
    assert [r.error_reason for r in out] == [None, None, "unparseable", "unparseable", "unparseable"]
    assert "fewer records than planned" in out[-1].error


def test_unreadable_files_name_the_path(tmp_path):
    bad_db = tmp_path / "corrupt.db"
    bad_db.write_bytes(b"this is not an SQLite database" * 100)
    with pytest.raises(OSError, match="corrupt.db"):
        plan_chunks(str(bad_db), "ase_db", 5)
    with pytest.raises(OSError, match="corrupt.db"):
        list(read_chunk(Chunk("ase_db", str(bad_db), 0, 5)))
    bad_gz = tmp_path / "corrupt.jsonl.gz"
    bad_gz.write_bytes(b"\x1f\x8b\x08\x00garbage" * 10)
    with pytest.raises(OSError, match="corrupt.jsonl.gz"):
        plan_chunks(str(bad_gz), "jarvis", 5)
    with pytest.raises(OSError, match="corrupt.jsonl.gz"):
        list(read_chunk(Chunk("jarvis", str(bad_gz), 0, 2, 0, 100, 1)))


@pytest.mark.parametrize("suffix", [".json", ".json.gz"])
def test_json_list_chunks_are_byte_spans_and_bad_elements_stay_local(tmp_path, recs, suffix):
    """A JSON list is planned by scanning (chunks carry byte spans) and a syntactically broken element
    is rejected on its own instead of failing the file."""
    good = [json.dumps(r) for r in recs[:10]]
    broken = '{"id": "broken", "atoms": {"lattice_mat": [1, 2,, 3]}}'  # balanced but not JSON
    text = "[\n" + ",\n".join(good[:4] + [broken, "[]", "tru"] + good[4:]) + "\n]\n"
    path = str(tmp_path / f"spans{suffix}")
    opener = gzip.open if suffix.endswith(".gz") else open
    with opener(path, "wt") as f:
        f.write(text)
    chunks = plan_chunks(path, "jarvis", 4)
    assert [c.count for c in chunks] == [4, 4, 4, 1]
    assert all(c.byte_offset > 0 and c.byte_length > 0 for c in chunks)
    out = [r for c in chunks for r in read_chunk(c)]
    _check_errors(out, 13, {4: "unparseable", 5: "unparseable", 6: "unparseable"})
    assert "not valid JSON" in out[4].error and out[4].source == f"{path}:4"
    assert [r.id for r in out if r.error is None] == [r["id"] for r in recs[:10]]
    with opener(str(tmp_path / f"cut{suffix}"), "wt") as f:
        f.write(text[:-40])
    with pytest.raises(ValueError, match=r"cut.*not closed"):
        plan_chunks(str(tmp_path / f"cut{suffix}"), "jarvis", 4)


def test_alexandria_entries_are_planned_as_byte_spans(files, recs):
    chunks = plan_chunks(files["pmg_alexandria"], "pymatgen", CHUNK)
    assert all(c.byte_offset > 0 for c in chunks) and sum(c.count for c in chunks) == N
    assert [r.id for c in chunks for r in read_chunk(c)] == [r["id"] for r in recs]


@pytest.mark.parametrize("key", ["jarvis_json_gz", "jarvis_json_bz2", "jarvis_jsonl_gz"])
def test_compressed_inputs_spill_once_and_read_the_same(files, tmp_path, key):
    """With a spill dir, planning keeps the decompressed bytes (one pass) and chunks read them directly."""
    plain = plan_chunks(files[key], "jarvis", CHUNK)
    spilled = plan_chunks(files[key], "jarvis", CHUNK, spill_dir=str(tmp_path / "spill"))
    copies = list((tmp_path / "spill").iterdir())
    assert len(copies) == 1 and not copies[0].name.endswith((".gz", ".bz2", ".tmp"))
    opener = gzip.open if key.endswith("gz") else bz2.open
    with opener(files[key], "rb") as f:
        assert copies[0].read_bytes() == f.read()
    assert all(c.data_path == str(copies[0]) for c in spilled)
    assert [dataclasses_replace(c, data_path="") for c in spilled] == plain
    for a, b in zip(plain, spilled):
        assert [(r.id, r.source, json.dumps(r.labels)) for r in read_chunk(a)] == \
               [(r.id, r.source, json.dumps(r.labels)) for r in read_chunk(b)]
    mtime = copies[0].stat().st_mtime_ns
    assert plan_chunks(files[key], "jarvis", CHUNK, spill_dir=str(tmp_path / "spill")) == spilled
    assert copies[0].stat().st_mtime_ns == mtime  # reused, not rewritten


def _record_content(rec):
    """What a record holds, apart from where it came from (id and source name the input)."""
    c = rec.crystal
    return (rec.index, rec.error_reason, c.numbers.tolist(), c.lattice.tolist(), c.positions.tolist(),
            json.dumps(c.labels), json.dumps(rec.labels), rec.forces.tolist(), rec.stress.tolist(),
            sorted(rec.meta.items()))


@pytest.mark.parametrize("suffix", [".extxyz.gz", ".extxyz.bz2", ".xyz.gz", ".xyz.bz2"])
@pytest.mark.parametrize("spill", [False, True])
def test_compressed_extxyz_reads_like_the_plain_file(tmp_path, suffix, spill):
    """Real MPtrj frames gzipped / bz2'd: inferred as extxyz, planned over the decompressed stream (the
    same byte spans as the plain file, chunks of 5 crossing frame boundaries), read back with the same
    crystals, labels, forces, stress and meta; sources name the compressed input. With a spill dir the
    stream is decompressed once while planning and workers read the copy; without one (``cfdist
    predict``) each chunk decompresses the stream up to itself."""
    from paths import FIXTURES, require

    plain = str(require(FIXTURES / "mptrj_24.extxyz"))
    packed = str(tmp_path / f"mptrj_24{suffix}")
    with open(plain, "rb") as f:
        data = f.read()
    with (gzip.open if suffix.endswith(".gz") else bz2.open)(packed, "wb") as f:
        f.write(data)
    assert infer_format(packed) == "extxyz" and suffix in readers.KNOWN_SUFFIXES
    assert not json_container.is_json_input(packed)
    assert expand_inputs([str(tmp_path / "*")]) == [packed]

    spill_dir = str(tmp_path / "spill") if spill else None
    want_chunks, want = _read_all(plain, chunk_size=5)
    chunks = plan_chunks(packed, "extxyz", 5, spill_dir=spill_dir)
    assert [c.count for c in chunks] == [5, 5, 5, 5, 4]
    assert [(c.start, c.count, c.byte_offset, c.byte_length, c.line) for c in chunks] == \
           [(c.start, c.count, c.byte_offset, c.byte_length, c.line) for c in want_chunks]
    assert all(c.path == packed for c in chunks)
    if spill:
        copies = list((tmp_path / "spill").iterdir())
        assert len(copies) == 1 and copies[0].read_bytes() == data
        assert all(c.data_path == str(copies[0]) for c in chunks)
        mtime = copies[0].stat().st_mtime_ns
        assert plan_chunks(packed, "extxyz", 5, spill_dir=spill_dir) == chunks
        assert copies[0].stat().st_mtime_ns == mtime  # reused, not rewritten
    else:
        assert all(c.data_path == "" for c in chunks)
    got = [r for c in chunks for r in read_chunk(c)]
    assert len(got) == len(want) == 24 and all(r.ok for r in got), [r.error for r in got if not r.ok]
    assert [_record_content(r) for r in got] == [_record_content(r) for r in want]
    assert [r.source for r in got] == [r.source.replace(plain, packed) for r in want]
    assert [r.id for r in got] == [r.id for r in want]


def test_cut_compressed_extxyz_is_refused(tmp_path):
    """A .extxyz.gz whose stream breaks off cannot be planned (never shards from part of a file), and no
    partial spill copy is left behind."""
    from paths import FIXTURES, require

    data = gzip.compress(require(FIXTURES / "mptrj_24.extxyz").read_bytes())
    path = tmp_path / "cut.extxyz.gz"
    path.write_bytes(data[: len(data) // 2])
    for spill_dir in (None, str(tmp_path / "spill")):
        with pytest.raises(OSError, match="cut.extxyz.gz"):
            plan_chunks(str(path), "extxyz", 5, spill_dir=spill_dir)
    assert not (tmp_path / "spill").exists() or not list((tmp_path / "spill").iterdir())


# ---- cut files (prediction reads the complete records before the cut)


def _cut_case(kind: str, recs: list[dict], inside: bool = True) -> tuple[str, str, str]:
    """(file name, complete text, text cut inside record 5, or else right after it) of a JSON input of ``kind``."""
    broken = '{"id": "broken", "atoms": {"lattice_mat": [1, 2,, 3]}}'  # balanced but not JSON: a record error
    parts = [json.dumps(r) for r in recs[:2]] + [broken] + [json.dumps(r) for r in recs[2:]]
    if kind == "alexandria":
        parts = [json.dumps(cse_dict(r)) for r in recs]
        name, text = "alexandria.json.bz2", '{"@module": "x", "entries": [' + ", ".join(parts) + '], "n": 1}'
    elif kind.startswith("jsonl"):
        name, text = "cut" + kind.replace("jsonl", ".jsonl"), "\n".join(parts) + "\n"
    else:
        name, text = "cut" + kind.replace("json", ".json"), "[\n" + ",\n".join(parts) + "\n]\n"
    at = text.index(parts[5])
    return name, text, text[:at + (len(parts[5]) // 2 if inside else len(parts[5]))]


def _prefix(path: str) -> tuple[list, readers.TruncatedInputError]:
    """read_json_prefix's records and cut; a compressed input is overwritten after the first record (the
    records come from the copy decompressed while scanning, not from decompressing it again)."""
    out = []
    with pytest.raises(readers.TruncatedInputError) as info:
        for record in readers.read_prefix(path, chunk_size=2):
            out.append(record)
            if len(out) == 1 and path.endswith((".gz", ".bz2")):
                with open(path, "wb") as f:
                    f.write(b"\x1f\x8b\x08\x00 not gzip any more")
    return out, info.value


def _rows(records, path):
    return [(r.index, r.id, r.source.replace(path, "P"), r.error_reason, json.dumps(r.labels)) for r in records]


@pytest.mark.parametrize("kind, inside", [("json", True), ("json.gz", True), ("json.bz2", True), ("jsonl", True),
                                          ("jsonl.gz", True), ("alexandria", True), ("json", False),
                                          ("alexandria", False)])
def test_read_json_prefix_reads_the_complete_records_before_a_cut(tmp_path, recs, kind, inside):
    """A JSON list, JSON-lines file or Alexandria dump cut inside record 5 (the compressed stream intact):
    planning refuses it; read_json_prefix yields records 0-4 exactly as reading the whole file does (the
    bad element 2 an unparseable record), then TruncatedInputError naming the cut. A list cut right after
    record 5 (only its end missing) gives records 0-5."""
    name, text, cut_text = _cut_case(kind, recs, inside)
    n = 5 if inside else 6
    whole, cut = tmp_path / "whole" / name, tmp_path / "cut" / name
    for path, body in ((whole, text), (cut, cut_text)):
        path.parent.mkdir()
        opener = gzip.open if name.endswith(".gz") else bz2.open if name.endswith(".bz2") else open
        with opener(path, "wt") as f:
            f.write(body)
    expected = _rows(_read_all(str(whole), chunk_size=3)[1][:n], str(whole))
    if not kind.startswith("jsonl"):  # a cut last line is a record to planning (predict checks json_lines_cut)
        with pytest.raises(ValueError, match="not closed"):
            plan_chunks(str(cut), infer_format(str(whole)), 3)
    out, exc = _prefix(str(cut))
    assert _rows(out, str(cut)) == expected
    assert exc.n_read == n and f"{n} complete record(s) before the cut" in str(exc)
    assert exc.detail.startswith("the file ends inside line 6 (record 5)" if kind.startswith("jsonl") else
                                 "the file ends inside record 5" if inside else
                                 "the file ends after record 5, before the list is closed")
    assert cut_json.json_lines_cut(str(cut)) == (kind == "jsonl")


@pytest.mark.parametrize("kind", ["json.gz", "jsonl.gz", "json.bz2"])
def test_read_json_prefix_of_a_broken_compressed_stream(tmp_path, recs, kind):
    """A .gz/.bz2 whose compressed bytes are cut: the records decompressed before the break (a prefix of the
    whole file's, fewer for bz2's large blocks), then the cut naming the stream error. A stream that only
    lacks its last bytes (the gzip trailer) gives every record and still reports the break."""
    name, text, _ = _cut_case(kind, recs)
    whole = tmp_path / name
    opener = gzip.open if name.endswith(".gz") else bz2.open
    with opener(whole, "wt") as f:
        f.write(text)
    expected = _rows(_read_all(str(whole))[1], str(whole))
    data = whole.read_bytes()
    for keep in (len(data) // 2, len(data) - 4):
        cut = tmp_path / f"{keep}" / name
        cut.parent.mkdir()
        cut.write_bytes(data[:keep])
        with pytest.raises(OSError, match="EOFError"):
            plan_chunks(str(cut), "jarvis", 3)
        out, exc = _prefix(str(cut))
        assert _rows(out, str(cut)) == expected[:len(out)] and exc.n_read == len(out)
        assert "the compressed stream breaks off: EOFError" in exc.detail
        if keep == len(data) - 4:
            assert len(out) == len(expected)
        elif name.endswith(".gz"):
            assert 0 < len(out) < len(expected)
