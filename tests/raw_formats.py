"""Writers of small raw inputs in every format the preprocessor reads (built from real records)."""

from __future__ import annotations

import bz2
import gzip
import json
import os

import numpy as np

def structure_of(rec, properties=None):
    from pymatgen.core import Structure

    a = rec["atoms"]
    return Structure(a["lattice_mat"], a["elements"], a["coords"], properties=properties or {})


def atoms_of(rec):
    from ase import Atoms

    a = rec["atoms"]
    lattice = np.array(a["lattice_mat"], dtype=float)
    return Atoms(symbols=a["elements"], positions=np.array(a["coords"], dtype=float) @ lattice,
                 cell=lattice, pbc=True)


def forces_stress(k, n_atoms):
    rng = np.random.default_rng(k)
    forces = rng.normal(size=(n_atoms, 3))
    s = rng.normal(size=(3, 3)) * 0.01
    return forces, (s + s.T) / 2


def write_json(path, obj):
    opener = gzip.open if path.endswith(".gz") else bz2.open if path.endswith(".bz2") else open
    with opener(path, "wt") as f:
        json.dump(obj, f)


def write_jsonl(path, objs, raw_lines=()):
    """objs as JSON lines; raw_lines: {position: text} of extra raw lines inserted before objs[position]."""
    lines = [json.dumps(o) for o in objs]
    for pos, text in sorted(dict(raw_lines).items(), reverse=True):
        lines.insert(pos, text)
    opener = gzip.open if path.endswith(".gz") else bz2.open if path.endswith(".bz2") else open
    with opener(path, "wt") as f:
        f.write("\n".join(lines) + "\n")


def cse_dict(rec):
    from pymatgen.entries.computed_entries import ComputedStructureEntry

    s = structure_of(rec)
    return ComputedStructureEntry(s, energy=rec["e_form"] * len(s), correction=-0.25, entry_id=rec["id"],
                                  data={"e_form": rec["e_form"], "gap pbe": rec["gap pbe"], "note": "x"}).as_dict()


def write_extxyz(path, recs, extra=None):
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = []
    for k, rec in enumerate(recs):
        atoms = atoms_of(rec)
        forces, stress = forces_stress(k, len(atoms))
        atoms.info["mp_id"] = rec["id"]
        atoms.info["energy_per_atom"] = rec["e_form"]
        atoms.info["config_type"] = "bulk"
        atoms.calc = SinglePointCalculator(atoms, energy=rec["e_form"] * len(atoms), forces=forces,
                                           stress=stress[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]])
        frames.append(atoms)
    for pos, atoms in sorted((extra or {}).items(), reverse=True):
        frames.insert(pos, atoms)
    ase.io.write(path, frames, format="extxyz")


def write_cif_dir(directory, recs, rows=None):
    from pymatgen.io.cif import CifWriter

    os.makedirs(directory, exist_ok=True)
    for rec in recs:
        CifWriter(structure_of(rec)).write_file(os.path.join(directory, rec["id"] + ".cif"))
    if rows is None:
        rows = [f"{rec['id']},{rec['e_form']}" for rec in recs]
    with open(os.path.join(directory, "id_prop.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")


def write_all_formats(root, recs) -> dict[str, str]:
    """One well-formed input per format variant, all holding the same N real crystals."""
    import ase.db
    from ase.calculators.singlepoint import SinglePointCalculator

    p = {}
    p["jarvis_json"] = str(root / "megnet.json")
    write_json(p["jarvis_json"], recs)
    p["jarvis_json_gz"] = str(root / "megnet.json.gz")
    write_json(p["jarvis_json_gz"], recs)
    p["jarvis_json_bz2"] = str(root / "megnet.json.bz2")
    write_json(p["jarvis_json_bz2"], recs)
    p["jarvis_jsonl"] = str(root / "megnet.jsonl")
    write_jsonl(p["jarvis_jsonl"], recs, {5: "", 11: "   "})  # blank lines are not records
    p["jarvis_jsonl_gz"] = str(root / "megnet.jsonl.gz")
    write_jsonl(p["jarvis_jsonl_gz"], recs)
    p["pmg_structures"] = str(root / "structures.json.bz2")
    write_json(p["pmg_structures"], [structure_of(r, {"id": r["id"], "e_form": r["e_form"]}).as_dict()
                                      for r in recs])
    p["pmg_cse"] = str(root / "entries.json")
    write_json(p["pmg_cse"], [cse_dict(r) for r in recs])
    p["pmg_alexandria"] = str(root / "alexandria.json.bz2")
    write_json(p["pmg_alexandria"], {"entries": [cse_dict(r) for r in recs]})
    p["pmg_wrapped_jsonl"] = str(root / "mp_dump.jsonl")
    write_jsonl(p["pmg_wrapped_jsonl"], [{"material_id": r["id"], "structure": structure_of(r).as_dict(),
                                           "e_form": r["e_form"], "gap pbe": r["gap pbe"], "nelements": 2,
                                           "formula": "x"} for r in recs])
    p["extxyz"] = str(root / "mptrj.extxyz")
    write_extxyz(p["extxyz"], recs)
    p["ase_db"] = str(root / "structures.db")
    with ase.db.connect(p["ase_db"]) as db:
        for k, rec in enumerate(recs):
            atoms = atoms_of(rec)
            forces, stress = forces_stress(k, len(atoms))
            atoms.calc = SinglePointCalculator(atoms, energy=rec["e_form"] * len(atoms), forces=forces,
                                               stress=stress[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]])
            db.write(atoms, material_id=rec["id"], e_form=rec["e_form"])
    p["cif"] = str(root / "cifs")
    write_cif_dir(p["cif"], recs)
    return p
