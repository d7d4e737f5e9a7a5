"""The readers of the pretraining corpora: MPtrj's JSON (``mptrj``), fairchem's ``.aselmdb``
(``aselmdb``) and Parquet tables (``parquet``), on fixtures made of real MPtrj frames.

- mptrj: the MPtrj layout is written from the shipped extxyz frames (``tests/mptrj_layout.py``,
  inverting the stress convention independently of cfdist), so the mptrj path and the extxyz path
  must give the same crystals, forces, stress and energies; a 100+ MB file is planned in a small
  fraction of its size.
- aselmdb: ``tests/data/aselmdb/mptrj36.aselmdb`` was written by fairchem's own writer (its README);
  its rows must be the extxyz frames they were written from.
- parquet: tables written by pyarrow, read through a column mapping or the LeMat-Bulk preset.
"""

from __future__ import annotations

import json
import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from cfdist.io import Chunk, infer_format, iter_input_records, plan_chunks, read_chunk
from cfdist.io import mptrj as mptrj_reader
from corpus_formats import ase_rows, write_aselmdb, write_parquet
from mptrj_layout import (CORRECTION_PER_ATOM, MPTRJ_EXTXYZ, ase_stress_from_kbar, mptrj_frame, real_frames,
                          write_large_mptrj_json, write_mptrj_json)
from paths import FIXTURES, require

N_FRAMES = 48
ASELMDB = FIXTURES / "aselmdb" / "mptrj36.aselmdb"


@pytest.fixture(scope="module")
def frames():
    """The first real MPtrj frames of the shipped extxyz (ase.Atoms with energy, forces, stress)."""
    return real_frames(N_FRAMES)


@pytest.fixture(scope="module")
def extxyz_records():
    """The same frames read by cfdist's extxyz reader (the path MPtrj users take today), by id."""
    first = plan_chunks(str(require(MPTRJ_EXTXYZ)), "extxyz", N_FRAMES)[0]
    records = list(read_chunk(first))
    assert all(r.ok for r in records)
    return {r.meta["mptrj_snapshot_id"]: r for r in records}


@pytest.fixture(scope="module")
def mptrj_file(tmp_path_factory, frames):
    return write_mptrj_json(frames, tmp_path_factory.mktemp("mptrj") / "MPtrj_2022.9_small.json", indent=1)


def _read(path, fmt, chunk_size=7, options=None):
    chunks = plan_chunks(str(path), fmt, chunk_size, options=options)
    return chunks, [r for c in chunks for r in read_chunk(c)]


# ----------------------------------------------------------------------------- mptrj


def test_mptrj_is_inferred_from_its_layout(mptrj_file, tmp_path, megnet_records):
    assert infer_format(str(mptrj_file)) == "mptrj"
    # other JSON objects keyed by ids are not MPtrj: no 'structure' in the first member's first member
    keyed = tmp_path / "keyed.json"
    keyed.write_text(json.dumps({"mp-1": {"frame": {"atoms": megnet_records[0]["atoms"]}}}))
    assert mptrj_reader.sniff(str(keyed)) is None
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(megnet_records[:2]))
    assert mptrj_reader.sniff(str(listed)) is None and infer_format(str(listed)) == "jarvis"


def test_mptrj_frames_are_the_extxyz_frames_they_came_from(mptrj_file, frames, extxyz_records):
    """Round trip: extxyz -> MPtrj layout (kBar, VASP's sign) -> mptrj reader gives back the extxyz
    reader's crystals, forces, stress (eV/A^3, ASE's sign) and energies, frame by frame."""
    chunks, records = _read(mptrj_file, "mptrj", options={"energy_key": "uncorrected_total_energy"})
    assert sum(c.count for c in chunks) == N_FRAMES and all(r.ok for r in records), \
        [r.error for r in records if not r.ok]
    assert sorted(r.id for r in records) == sorted(extxyz_records)
    for rec in records:
        ref = extxyz_records[rec.id]
        assert rec.meta["mp_id"] == ref.meta["mptrj_traj_id"]
        np.testing.assert_array_equal(rec.crystal.numbers, ref.crystal.numbers)
        np.testing.assert_allclose(rec.crystal.lattice, ref.crystal.lattice, atol=1e-12)
        np.testing.assert_allclose(rec.crystal.positions, ref.crystal.positions, atol=1e-9)
        np.testing.assert_array_equal(rec.forces, ref.forces)
        np.testing.assert_allclose(rec.stress, ref.stress, rtol=1e-12, atol=1e-15)
        assert rec.labels["energy"] == ref.labels["energy"]
        assert rec.labels["magmom"] == pytest.approx(0.5 * rec.crystal.n_atoms)
        assert rec.labels["bandgap"] == 1.25
    # the default energy is the MP2020-corrected one
    _, default = _read(mptrj_file, "mptrj")
    for rec in default:
        ref = extxyz_records[rec.id]
        assert rec.labels["energy"] == pytest.approx(ref.labels["energy"] + CORRECTION_PER_ATOM * rec.crystal.n_atoms)
        assert rec.labels["energy"] == rec.labels["corrected_total_energy"]


def test_mptrj_stress_is_converted_from_kbar_by_hand(tmp_path, frames):
    """10 kBar = 1 GPa = 1 / 160.21766208 eV/A^3 = 0.0062415091 eV/A^3, and VASP's compressive-positive
    sign flips to ASE's tensile-positive one."""
    frame = mptrj_frame(frames[0], "mp-1")
    frame["stress"] = [[10.0, 0.0, 0.0], [0.0, -20.0, 2.5], [0.0, 2.5, 5.0]]
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"mp-1": {"mp-1-0": frame}}))
    _, [rec] = _read(path, "mptrj")
    expected = np.array([[-0.0062415091, 0.0, 0.0],
                         [0.0, 0.0124830182, -0.0015603773],
                         [0.0, -0.0015603773, -0.0031207546]])
    np.testing.assert_allclose(rec.stress, expected, atol=1e-10)
    np.testing.assert_allclose(rec.stress, ase_stress_from_kbar(frame["stress"]), rtol=1e-15)


def test_mptrj_options_are_checked(mptrj_file, tmp_path):
    with pytest.raises(ValueError, match="--energy-key must be one of"):
        plan_chunks(str(mptrj_file), "mptrj", 8, options={"energy_key": "energy_per_atom"})
    with pytest.raises(ValueError, match="takes the option energy_key only"):
        plan_chunks(str(mptrj_file), "mptrj", 8, options={"columns": "cfdist"})
    xyz = tmp_path / "a.xyz"
    xyz.write_text("")
    with pytest.raises(ValueError, match="format extxyz takes no reader options"):
        plan_chunks(str(xyz), "extxyz", 8, options={"energy_key": "corrected_total_energy"})
    chunks = plan_chunks(str(mptrj_file), "mptrj", 8, options={"energy_key": "uncorrected_total_energy"})
    assert {c.options for c in chunks} == {'{"energy_key": "uncorrected_total_energy"}'}
    assert {c.options for c in plan_chunks(str(mptrj_file), "mptrj", 8)} == {""}


def test_mptrj_chunks_are_byte_spans_across_materials(mptrj_file, frames):
    """Chunk k starts at its first frame's member; ``part`` names that frame's mp_id, and each chunk
    read alone gives its frames (whatever materials they belong to)."""
    chunks = plan_chunks(str(mptrj_file), "mptrj", 5)
    assert [c.count for c in chunks] == [5] * (N_FRAMES // 5) + [N_FRAMES % 5]
    raw = Path(mptrj_file).read_bytes()
    layout = json.loads(raw)
    order = [(mp, fid) for mp, members in layout.items() for fid in members]
    for chunk in chunks:
        mp_id, frame_id = order[chunk.start]
        assert json.loads(chunk.part) == mp_id
        assert raw[chunk.byte_offset:chunk.byte_offset + chunk.byte_length].lstrip().startswith(
            json.dumps(frame_id).encode())
        assert [(r.meta["mp_id"], r.id) for r in read_chunk(chunk)] == order[chunk.start:chunk.start + chunk.count]


def test_mptrj_bad_frames_are_rejected_with_reasons(tmp_path, frames):
    good = mptrj_frame(frames[0], "mp-1")
    no_structure = {k: v for k, v in good.items() if k != "structure"}
    bad_forces = {**good, "force": [[0.0, 0.0, 0.0]]}
    text = ('{"mp-1": {"ok-0": %s, "no-structure": %s, "not-json": {"structure": tru}, "number": 5},'
            ' "mp-empty": {}, "mp-2": {"bad-forces": %s, "ok-1": %s}}'
            % (json.dumps(good), json.dumps(no_structure), json.dumps(bad_forces), json.dumps(good)))
    path = tmp_path / "mixed.json"
    path.write_text(text)
    chunks, records = _read(path, "mptrj", chunk_size=2)
    assert sum(c.count for c in chunks) == 6  # the empty material has no frame
    by_id = {r.id: r for r in records}
    assert [r.id for r in records] == ["ok-0", "no-structure", "not-json", "number", "bad-forces", "ok-1"]
    assert by_id["ok-0"].ok and by_id["ok-1"].ok and by_id["ok-1"].meta["mp_id"] == "mp-2"
    assert by_id["no-structure"].error_reason == "unparseable" and "no 'structure'" in by_id["no-structure"].error
    assert by_id["not-json"].error_reason == "unparseable" and "not valid JSON" in by_id["not-json"].error
    assert by_id["number"].error_reason == "unparseable" and "expected a JSON object" in by_id["number"].error
    assert by_id["bad-forces"].error_reason == "bad_shape"
    assert by_id["no-structure"].labels["energy"] == good["corrected_total_energy"]  # kept on the reject


@pytest.mark.parametrize("text,match", [
    ('[{"structure": {}}]', "expected a JSON object"),
    ('{"mp-1": [{"structure": {}}]}', "a member of the top-level object is a list"),
    ('{"mp-1": {"f": {}}, "mp-2": 7}', "2 members in the top-level object but 1 of them"),
    ('{"mp-1": {"f": {"structure": {}}', "not closed"),
])
def test_mptrj_files_not_in_its_layout_are_refused_naming_the_file(tmp_path, text, match):
    path = tmp_path / "odd.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        plan_chunks(str(path), "mptrj", 4)
    assert str(path) in str(err.value)


def test_a_large_mptrj_file_is_planned_without_decoding_it_whole(tmp_path, frames, monkeypatch):
    """A 100+ MB file in the MPtrj layout: the planner's peak traced memory stays under a quarter of
    the file (decoding it whole would take several times its size) and nothing larger than a member
    name is ever handed to the JSON decoder."""
    path = tmp_path / "MPtrj_large.json"
    n_frames = write_large_mptrj_json(path, frames[:8], target_bytes=100 * 2**20)
    size = path.stat().st_size
    decoded: list[int] = []
    real_loads = json.loads

    def counting_loads(s, *args, **kwargs):
        decoded.append(len(s))
        return real_loads(s, *args, **kwargs)

    monkeypatch.setattr(json, "loads", counting_loads)
    tracemalloc.start()
    try:
        chunks = plan_chunks(str(path), "mptrj", 4096)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    monkeypatch.setattr(json, "loads", real_loads)
    assert size > 100 * 2**20 and sum(c.count for c in chunks) == n_frames
    assert peak < size / 4, f"planning a {size / 2**20:.0f} MB file peaked at {peak / 2**20:.0f} MB"
    assert max(decoded) < 100  # member names only
    last = list(read_chunk(chunks[-1]))
    assert len(last) == chunks[-1].count and all(r.ok for r in last)


# ----------------------------------------------------------------------------- aselmdb


def test_aselmdb_written_by_fairchem_reads_as_its_frames(frames):
    """The fixture's 36 rows (fairchem's writer, tests/data/aselmdb/README.md) are the extxyz frames
    they were written from: ids (``sid``), crystals, energy, forces, stress (ASE units as stored),
    ``mp_id`` metadata and numeric key-value pairs as labels; rows in LMDB key order."""
    path = require(ASELMDB)
    assert infer_format(str(path)) == "aselmdb"
    chunks, records = _read(path, "aselmdb", chunk_size=10)
    assert [(c.start, c.count, c.part) for c in chunks] == [(0, 10, "1"), (10, 10, "19"), (20, 10, "28"),
                                                           (30, 6, "4")]
    assert all(r.ok for r in records), [r.error for r in records if not r.ok]
    written = {a.info["mptrj_snapshot_id"]: a for a in frames[:36]}
    key_order = sorted(range(1, 37), key=str)  # b"1" < b"10" < ... < b"2"
    assert [r.id for r in records] == [frames[k - 1].info["mptrj_snapshot_id"] for k in key_order]
    for rec in records:
        atoms = written[rec.id]
        np.testing.assert_array_equal(rec.crystal.numbers, atoms.numbers)
        np.testing.assert_array_equal(rec.crystal.positions, atoms.positions)
        np.testing.assert_array_equal(rec.crystal.lattice, atoms.cell.array)
        assert rec.labels["energy"] == atoms.get_potential_energy()
        np.testing.assert_array_equal(rec.forces, atoms.get_forces())
        np.testing.assert_allclose(rec.stress, atoms.get_stress(voigt=False), rtol=1e-15, atol=0)
        assert rec.meta == {"mp_id": atoms.info["mptrj_traj_id"]} and rec.labels["bandgap_ev"] == 1.5
    assert [r.id for r in iter_input_records([str(path)], chunk_size=8)] == [r.id for r in records]


def test_aselmdb_bad_rows_are_rejected_with_reasons(tmp_path, megnet_records):
    rows = ase_rows(megnet_records[:4])
    rows[1].pop("positions")
    rows[2]["pbc"] = [True, True, False]
    path = write_aselmdb(tmp_path / "bad.aselmdb", rows)
    import lmdb

    env = lmdb.open(str(path), subdir=False, map_size=1 << 30)
    with env.begin(write=True) as txn:
        txn.put(b"5", b"not zlib")  # a fifth row that does not decode
        txn.put(b"metadata", b"x")  # bookkeeping keys are not rows
    env.close()
    chunks, records = _read(path, "aselmdb", chunk_size=2)
    assert sum(c.count for c in chunks) == 5
    assert [r.error_reason for r in records] == [None, "unparseable", "not_periodic", None, "unparseable"]
    assert "no 'positions'" in records[1].error and "not a zlib-compressed JSON row" in records[4].error
    assert records[1].id == megnet_records[1]["id"]  # the id is kept on the reject


def test_aselmdb_that_is_not_lmdb_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "broken.aselmdb"
    path.write_bytes(b"\0" * 100)
    with pytest.raises(OSError, match=str(path)):
        plan_chunks(str(path), "aselmdb", 4)


# ----------------------------------------------------------------------------- parquet


def _table(frames, names: dict[str, str]) -> dict[str, list]:
    cols: dict[str, list] = {names[k]: [] for k in ("id", "lattice", "species", "positions", "energy", "forces",
                                                     "stress")}
    cols["formula"], cols["nsites"] = [], []
    for atoms in frames:
        cols[names["id"]].append(atoms.info["mptrj_snapshot_id"])
        cols[names["lattice"]].append(atoms.cell.array.tolist())
        cols[names["species"]].append(atoms.get_chemical_symbols())
        cols[names["positions"]].append(atoms.positions.tolist())
        cols[names["energy"]].append(float(atoms.get_potential_energy()))
        cols[names["forces"]].append(atoms.get_forces().tolist())
        cols[names["stress"]].append(atoms.get_stress(voigt=False).tolist())
        cols["formula"].append(atoms.get_chemical_formula())
        cols["nsites"].append(len(atoms))
    return cols


CUSTOM = {"id": "name", "lattice": "cell", "species": "symbols", "positions": "pos", "energy": "e_total",
          "forces": "f", "stress": "sigma"}
LEMAT = {"id": "immutable_id", "lattice": "lattice_vectors", "species": "species_at_sites",
         "positions": "cartesian_site_positions", "energy": "energy", "forces": "forces", "stress": "stress_tensor"}


def test_parquet_through_a_column_mapping_in_row_groups(tmp_path, frames):
    path = write_parquet(tmp_path / "t.parquet", _table(frames[:12], CUSTOM), row_group_size=5)
    options = {"columns": ",".join(f"{role}={col}" for role, col in CUSTOM.items())}
    chunks, records = _read(path, "parquet", chunk_size=4, options=options)
    # chunks never cross a row group (5 + 5 + 2 rows)
    assert [(c.start, c.count, json.loads(c.part)) for c in chunks] == [
        (0, 4, [0, 0]), (4, 1, [0, 4]), (5, 4, [1, 0]), (9, 1, [1, 4]), (10, 2, [2, 0])]
    assert all(r.ok for r in records)
    for rec, atoms in zip(records, frames[:12]):
        assert rec.id == atoms.info["mptrj_snapshot_id"] and rec.source.endswith(f":{rec.index}")
        np.testing.assert_array_equal(rec.crystal.numbers, atoms.numbers)
        np.testing.assert_array_equal(rec.crystal.positions, atoms.positions)
        np.testing.assert_array_equal(rec.forces, atoms.get_forces())
        np.testing.assert_array_equal(rec.stress, atoms.get_stress(voigt=False))
        assert rec.labels["energy"] == atoms.get_potential_energy() and rec.labels["nsites"] == len(atoms)
        assert rec.meta == {"formula": atoms.get_chemical_formula()}
    with pytest.raises(ValueError, match=r"no --columns given and the table matches no preset"):
        plan_chunks(str(path), "parquet", 4)


def test_parquet_lemat_preset(tmp_path, frames):
    path = write_parquet(tmp_path / "lemat.parquet", _table(frames[:6], LEMAT))
    _, inferred = _read(path, "parquet")
    _, named = _read(path, "parquet", options={"columns": "lemat"})
    assert [r.id for r in inferred] == [r.id for r in named] == [a.info["mptrj_snapshot_id"] for a in frames[:6]]
    assert all(r.ok and r.forces is not None and r.stress is not None for r in inferred)
    assert [r.id for r in iter_input_records([str(path)])] == [r.id for r in inferred]  # predict's reader


@pytest.mark.parametrize("spec,match", [
    ("lattice=cell,species=symbols", r"\['positions'\] not mapped"),
    ("lattice=cell,species=symbols,positions=pos,charge=q", "unknown role 'charge'"),
    ("lattice=cell,species=symbols,positions", "expected ROLE=COLUMN"),
    ("lattice=cell,species=symbols,positions=xyz", r"no column\(s\) \['positions=xyz'\]"),
    ("lattice=cell,species=symbols,positions=pos,energy=E", r"no column\(s\) \['energy=E'\]"),
])
def test_parquet_column_mapping_errors_name_the_problem(tmp_path, frames, spec, match):
    path = write_parquet(tmp_path / "t.parquet", _table(frames[:2], CUSTOM))
    with pytest.raises(ValueError, match=match):
        plan_chunks(str(path), "parquet", 4, options={"columns": spec})


def test_parquet_bad_rows_are_rejected_with_reasons(tmp_path, frames):
    cols = _table(frames[:4], LEMAT)
    cols["species_at_sites"][1] = ["Xx"] * len(cols["species_at_sites"][1])
    cols["forces"][2] = [[0.0, 0.0, 0.0]]
    cols["lattice_vectors"][3] = [[1.0, 0.0], [0.0, 1.0]]
    path = write_parquet(tmp_path / "bad.parquet", cols)
    _, records = _read(path, "parquet")
    assert [r.error_reason for r in records] == [None, "bad_element", "bad_shape", "bad_shape"]
    assert records[1].id == frames[1].info["mptrj_snapshot_id"] and not math.isnan(records[1].labels["energy"])


def test_cli_reader_options_reach_the_settings_and_the_content_hash():
    from cfdist.preprocess.cli import parse_args, settings_from_args
    from cfdist.preprocess.job import Settings, content_hash

    args = parse_args(["in.json", "--out", "o", "--cutoff", "6", "--energy-key", "uncorrected_total_energy"])
    settings = settings_from_args(args)
    assert settings.reader_options == {"energy_key": "uncorrected_total_energy"}
    assert settings_from_args(parse_args(["t.parquet", "--out", "o", "--cutoff", "6", "--columns", "lemat"])
                              ).reader_options == {"columns": "lemat"}
    plain = Settings(cutoff=6.0, targets=[])
    assert settings_from_args(parse_args(["in.json", "--out", "o", "--cutoff", "6"])).reader_options == {}
    inputs = [{"sha256": "0" * 64}]
    assert content_hash(inputs, "mptrj", settings) != content_hash(inputs, "mptrj", plain)


def test_reader_options_survive_the_plan_file(mptrj_file):
    """Chunks go to the workers (and to plan.json) as dicts: the options come back with them."""
    from dataclasses import asdict

    chunk = plan_chunks(str(mptrj_file), "mptrj", 8, options={"energy_key": "uncorrected_total_energy"})[0]
    again = Chunk(**json.loads(json.dumps(asdict(chunk))))
    assert [r.labels["energy"] for r in read_chunk(again)] == \
        [r.labels["uncorrected_total_energy"] for r in read_chunk(chunk)]


# ----------------------------------------------------------------------------- through the job (Ray)


@pytest.fixture(scope="module")
def ray_session(ray_cluster):
    """This process as a driver of the session's Ray cluster (conftest): connecting costs about a
    second, a Ray instance of its own took ~7 s to start and ~1.5 s to end on 2 cores."""
    import ray

    ray.init(address=ray_cluster.gcs_address, logging_level="ERROR")
    yield ray
    ray.shutdown()


def _shard_rows(out: Path) -> dict[str, dict]:
    """Every written row by id: its split, energy, forces and stress."""
    import pyarrow.parquet as pq

    rows = {}
    for path in sorted(out.glob("*/part-*.parquet")):
        table = pq.read_table(path, columns=["id", "y.energy", "forces", "stress"]).to_pylist()
        for row in table:
            rows[row["id"]] = {"split": path.parent.name, **row}
    return rows


@pytest.mark.slow
def test_mptrj_and_extxyz_give_the_same_shards_and_keep_materials_in_one_split(ray_session, tmp_path, frames):
    """The same frames through ``cfdist preprocess`` as extxyz (grouped by ``mptrj_traj_id``) and as
    MPtrj JSON (``--energy-key uncorrected_total_energy --split-group meta:mp_id``): the same rows
    in the same splits with the same energy, forces and stress; every material in one split."""
    import ase.io

    from cfdist.preprocess.job import Settings, build

    xyz = tmp_path / "frames.extxyz"
    try:
        for atoms in frames:
            atoms.info["id"] = atoms.info["mptrj_snapshot_id"]  # the extxyz path names frames by this
        ase.io.write(str(xyz), frames, format="extxyz")
    finally:
        for atoms in frames:  # the module's frames are shared: leave them as they were
            atoms.info.pop("id")
    json_path = write_mptrj_json(frames, tmp_path / "MPtrj_frames.json")
    common = {"cutoff": 6.0, "targets": ["energy"], "shard_size": 16, "with_forces": True, "with_stress": True,
              "split_fractions": [0.5, 0.25, 0.25]}
    by_xyz = build([str(xyz)], tmp_path / "xyz", Settings(**common, split_group="meta:mptrj_traj_id"), workers=2)
    by_json = build([str(json_path)], tmp_path / "json",
                    Settings(**common, split_group="meta:mp_id",
                             reader_options={"energy_key": "uncorrected_total_energy"}), workers=2)
    assert by_json["format"] == "mptrj" and by_json["n_written"] == by_xyz["n_written"] == N_FRAMES
    assert by_json["split_groups"]["groups"] == by_xyz["split_groups"]["groups"]
    a, b = _shard_rows(tmp_path / "xyz"), _shard_rows(tmp_path / "json")
    assert set(a) == set(b)
    for rid, row in b.items():
        assert row["split"] == a[rid]["split"]
        assert row["y.energy"] == a[rid]["y.energy"]
        assert row["forces"] == a[rid]["forces"]
        np.testing.assert_allclose(row["stress"], a[rid]["stress"], rtol=1e-12, atol=1e-15)
    split_of_material: dict[str, set] = {}
    for atoms in frames:
        split = b[atoms.info["mptrj_snapshot_id"]]["split"]
        split_of_material.setdefault(atoms.info["mptrj_traj_id"], set()).add(split)
    assert all(len(splits) == 1 for splits in split_of_material.values())
    assert len({s for splits in split_of_material.values() for s in splits}) > 1
