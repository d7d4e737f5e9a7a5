"""The format table of :mod:`cfdist.io.registry` is the one way a format is named, inferred, planned and
read: every registered format is reachable by ``--format NAME`` and by each of its file endings, the
errors list what is registered, and no module outside the format modules branches on a format's name."""

from __future__ import annotations

import ast
import bz2
import gzip
import json
import os
import shutil
from pathlib import Path

import pytest

import cfdist.io as cio
from cfdist.io import (FORMATS, KNOWN_SUFFIXES, REGISTRY, Chunk, infer_format, iter_input_records, plan_chunks,
                       read_chunk)
from cfdist.io import registry
from cfdist.io.jarvis import jarvis_record
from cfdist.io.records import guarded
from cfdist.io.registry import Format, get_format
from corpus_formats import ase_rows, parquet_columns, write_aselmdb, write_every_format, write_mptrj, write_parquet
from paths import ROOT
from raw_formats import atoms_of, cse_dict, structure_of, write_all_formats, write_extxyz, write_json, write_jsonl

N = 6

# A well-formed input of each registered format (key of raw_formats.write_all_formats). A format
# added to the table without an entry here fails test_every_registered_format_has_a_sample.
SAMPLE = {"cif": "cif", "jarvis": "jarvis_json", "pymatgen": "pmg_cse", "extxyz": "extxyz", "ase_db": "ase_db",
          "mptrj": "mptrj", "aselmdb": "aselmdb", "parquet": "parquet"}


@pytest.fixture(scope="module")
def recs(megnet_records):
    return [dict(r) for r in megnet_records[:N]]


@pytest.fixture(scope="module")
def files(tmp_path_factory, recs):
    root = tmp_path_factory.mktemp("inputs")
    return write_every_format(root, recs)


def _compress(plain: Path, target: Path) -> Path:
    """``plain``'s bytes written to ``target`` compressed as its ending says (or copied)."""
    opener = gzip.open if target.name.endswith(".gz") else bz2.open if target.name.endswith(".bz2") else open
    with open(plain, "rb") as src, opener(target, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return target


def _write(fmt: str, suffix: str, directory: Path, recs) -> tuple[Path, int]:
    """An input of format ``fmt`` whose name ends in ``suffix``, and how many records it holds."""
    path = directory / f"{fmt}-sample{suffix}"
    if fmt == "cif":
        from pymatgen.io.cif import CifWriter

        CifWriter(structure_of(recs[0])).write_file(str(path))
        return path, 1
    if fmt in ("jarvis", "pymatgen"):
        objs = recs if fmt == "jarvis" else [cse_dict(r) for r in recs]
        (write_jsonl if ".jsonl" in suffix else write_json)(str(path), objs)
        return path, len(recs)
    if fmt == "extxyz":
        plain = directory / "frames.plain"  # an ending no format claims: globs leave it out
        write_extxyz(str(plain), recs)
        _compress(plain, path)
        plain.unlink()
        return path, len(recs)
    if fmt == "mptrj":
        plain = directory / "mptrj.plain"
        write_mptrj(plain, recs)
        _compress(plain, path)
        plain.unlink()
        return path, len(recs)
    if fmt == "aselmdb":
        return write_aselmdb(path, ase_rows(recs)), len(recs)
    if fmt == "parquet":
        return write_parquet(path, parquet_columns(recs)), len(recs)
    if fmt == "ase_db":
        import ase.db

        with ase.db.connect(str(path)) as db:
            for rec in recs:
                db.write(atoms_of(rec), material_id=rec["id"])
        return path, len(recs)
    raise AssertionError(f"no writer for {fmt!r}: add one with the format's tests")


def test_every_registered_format_has_a_sample():
    assert tuple(f.name for f in REGISTRY) == FORMATS
    assert set(SAMPLE) == set(FORMATS)
    assert len(set(FORMATS)) == len(FORMATS)
    for f in REGISTRY:
        assert f.suffixes and all(s == s.lower() and s.startswith(".") for s in f.suffixes), f.name
        assert callable(f.plan) and callable(f.read), f.name
    # a file ending claimed by several formats can only be told apart by looking inside
    for suffix in KNOWN_SUFFIXES:
        claiming = [f for f in REGISTRY if suffix in f.suffixes]
        assert len(claiming) == 1 or all(f.sniff is not None for f in claiming), suffix


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_is_reachable_by_name(files, recs, fmt):
    """``cfdist preprocess --format NAME`` accepts it; planning and reading with that name (what the
    preprocessor and ``cfdist predict --format NAME`` do) give every record, stamped with the name."""
    from cfdist.preprocess.cli import parse_args

    path = files[SAMPLE[fmt]]
    assert parse_args([path, "--out", "unused", "--format", fmt]).format == fmt
    chunks = plan_chunks(path, fmt, 4)
    assert {c.format for c in chunks} == {fmt} and sum(c.count for c in chunks) == N
    assert all(r.ok for c in chunks for r in read_chunk(c))
    records = list(iter_input_records([path], fmt, chunk_size=4, on_error="row"))
    assert [r.id for r in records] == [r["id"] for r in recs] and all(r.ok for r in records)


@pytest.mark.parametrize("fmt,suffix", [(f.name, s) for f in REGISTRY for s in f.suffixes])
def test_every_format_is_reachable_by_each_of_its_endings(tmp_path, recs, fmt, suffix):
    path, n = _write(fmt, suffix, tmp_path, recs)
    assert infer_format(str(path)) == fmt
    assert cio.expand_inputs([str(tmp_path / "*")]) == [str(path)]  # globs pick the ending up
    records = list(iter_input_records([str(path)], on_error="row"))
    assert len(records) == n and all(r.ok for r in records), [r.error for r in records if not r.ok]


def test_a_marker_makes_a_directory_one_input(files):
    cif_dir = files["cif"]
    assert infer_format(cif_dir) == "cif" == infer_format(os.path.join(cif_dir, "id_prop.csv"))
    assert cio.expand_inputs([os.path.join(cif_dir, "id_prop.csv")]) == [cif_dir]


def test_unknown_names_and_endings_list_what_is_registered(files, tmp_path):
    names = str(FORMATS).replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ValueError, match=rf"unknown format 'netcdf' for .*; expected one of {names}"):
        plan_chunks(files["extxyz"], "netcdf", 4)
    with pytest.raises(ValueError, match=rf"unknown format 'netcdf' in chunk .*; expected one of {names}"):
        list(read_chunk(Chunk("netcdf", files["extxyz"], 0, 1)))
    with pytest.raises(ValueError, match="unknown format 'netcdf'"):
        get_format("netcdf")
    odd = tmp_path / "table.nc"
    odd.write_bytes(b"CDF\x01")
    with pytest.raises(cio.UnknownFormatError, match=r"unknown extension \(known: id_prop.csv directory, "
                       + r"\.cif, .*\.pq\)"):
        infer_format(str(odd))
    rows = list(iter_input_records([files["extxyz"]], "netcdf", on_error="row"))
    assert [r.error_reason for r in rows] == ["unreadable_file"] and "expected one of" in rows[0].error


def test_data_of_a_format_in_a_container_it_is_not_read_from(tmp_path, recs):
    """An ASE JSON database gzipped: the sniff sees ASE's layout, but ASE reads only a plain .json."""
    path, _ = _write("ase_db", ".json", tmp_path, recs)
    packed = _compress(path, tmp_path / "db.json.gz")
    with pytest.raises(cio.UnknownFormatError, match=r"db.json.gz.*holds ase_db data.*\.db, \.json"):
        infer_format(str(packed))


def _compares_to_a_format_name(node: ast.AST) -> bool:
    """``x == "jarvis"``, ``x in ("jarvis", "pymatgen")`` and the like."""
    if not isinstance(node, ast.Compare):
        return False
    for side in [node.left, *node.comparators]:
        for sub in ast.walk(side):
            if isinstance(sub, ast.Constant) and sub.value in FORMATS:
                return True
    return False


def test_the_table_is_the_only_dispatch_on_format_names():
    """No module compares a value with a registered format's name: what differs between formats is
    a row of the table. (The format modules name formats only in what they return or register.)"""
    offenders = []
    modules = sorted((ROOT / "cfdist").rglob("*.py"))
    assert len(modules) > 40 and ROOT / "cfdist" / "predict.py" in modules  # the scan sees the package
    for path in modules:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if _compares_to_a_format_name(node):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"dispatch on format names (make it a column of cfdist/io/registry.py): {offenders}"


def test_io_imports_nothing_from_higher_layers():
    higher = ("preprocess", "manifest", "data", "stream", "model", "run", "train", "finetune", "predict", "cli")
    found = []
    for path in sorted(Path(cio.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):  # "from cfdist import predict" names cfdist.predict
                names = [f"cfdist.{a.name}" if node.module == "cfdist" else node.module or "" for a in node.names]
            else:
                continue
            found += [f"{path.name}: {n}" for n in names
                      if n.startswith("cfdist.") and n.split(".")[1] in higher]
        assert len(path.read_text().splitlines()) < 400, f"{path.name} is over 400 lines"
    assert not found


def test_docs_list_every_format_and_ending():
    """docs/shards.md's format table follows the registry: a row per format naming each of its endings."""
    text = (ROOT / "docs" / "shards.md").read_text()
    rows = {line.split("|")[1].strip().strip("`"): line for line in text.splitlines() if line.startswith("| `")}
    for f in REGISTRY:
        assert f.name in rows, f"docs/shards.md has no row for --format {f.name}"
        row = rows[f.name] if f.name != "pymatgen" else rows["jarvis"]  # "the same JSON endings"
        assert all(f"`{s}`" in row for s in f.suffixes), (f.name, row)
        assert f.marker is None or f.marker in row


# ----------------------------------------------------------------------------- a format added in one row

def _plan_keyed(path, fmt, chunk_size, spill_dir=None):
    """Chunks of a ``{id: JARVIS record}`` object, each located by its first key (``Chunk.part``)."""
    keys = list(json.loads(Path(path).read_text()))
    return [Chunk(fmt, path, start, min(chunk_size, len(keys) - start), part=keys[start])
            for start in range(0, len(keys), chunk_size)]


def _read_keyed(chunk):
    members = json.loads(Path(chunk.path).read_text())
    keys = list(members)
    first = keys.index(chunk.part)  # located by key, not by position
    for index, key in enumerate(keys[first:first + chunk.count], chunk.start):
        source = f"{chunk.path}:{key}"
        yield guarded(source, index, lambda partial, key=key, source=source, index=index:
                      jarvis_record({"id": key, **members[key]}, source, index, partial))


def _sniff_keyed(path):
    with open(path, "rb") as f:
        return "keyed" if f.read(5) == b'{"mp-' else None


def test_a_new_format_is_one_row(monkeypatch, tmp_path, recs, files):
    """A format whose chunks are located by key (``Chunk.part``), sharing ``.json`` with the JSON
    family: one more row makes it inferred, planned, read and reachable by name, and the files of the
    other formats with that ending are still told apart (sniffs fall through in table order)."""
    row = Format("keyed", (".json",), _plan_keyed, _read_keyed, sniff=_sniff_keyed)
    monkeypatch.setattr(registry, "REGISTRY", registry.REGISTRY + (row,))
    path = tmp_path / "keyed.json"
    path.write_text(json.dumps({r["id"]: {k: v for k, v in r.items() if k != "id"} for r in recs}))
    assert recs[0]["id"].startswith("mp-")  # what the sniff looks for
    assert infer_format(str(path)) == "keyed"
    assert infer_format(files["jarvis_json"]) == "jarvis"  # the JSON family's sniff runs first
    chunks = plan_chunks(str(path), "keyed", 4)
    assert [c.part for c in chunks] == [recs[0]["id"], recs[4]["id"]]
    records = list(iter_input_records([str(path)], on_error="row"))
    assert [r.id for r in records] == [r["id"] for r in recs] and all(r.ok for r in records)
    assert [r.index for r in records] == list(range(N))
    with pytest.raises(ValueError, match=r"expected one of \('cif', .*'parquet', 'keyed'\)"):
        plan_chunks(str(path), "netcdf", 4)
