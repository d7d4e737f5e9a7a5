"""Write real MPtrj frames (the shipped ``examples/data/mptrj/*.extxyz.gz``) in the layout MPtrj is
distributed in, ``{mp_id: {frame_id: {structure, uncorrected_total_energy, corrected_total_energy,
energy_per_atom, force, stress, magmom, bandgap, mp_id}}}`` (``MPtrj_2022.9_full.json``), for the
mptrj reader's tests and ``bench/preprocess.py``.

The conversion inverts every convention the reader undoes, independently of cfdist's constants:
the extxyz stress (ASE: eV/A^3, positive = tensile) becomes VASP's kBar (positive = compressive),
``s_kbar = -10 * s_gpa = -10 * 160.21766208 * s_ase``; forces stay eV/A; the structure becomes a
pymatgen ``Structure.as_dict()``. The extxyz energy is the frame's ``uncorrected_total_energy``; its
``corrected_total_energy`` adds a made-up MP2020-like correction of :data:`CORRECTION_PER_ATOM`
eV/atom, so a test can tell which key the reader used.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from paths import EXAMPLE_DATA, require

MPTRJ_EXTXYZ = EXAMPLE_DATA / "mptrj" / "mptrj-random-1k.extxyz.gz"
CORRECTION_PER_ATOM = -0.25  # eV/atom: corrected = uncorrected + this * n_atoms
EV_PER_A3_IN_GPA = 160.21766208


def real_frames(n: int, path: Path = MPTRJ_EXTXYZ) -> list:
    """The first ``n`` frames of a shipped MPtrj extxyz (``ase.Atoms`` with energy/forces/stress)."""
    import ase.io

    return ase.io.read(str(require(path)), index=f":{n}", format="extxyz")


def mptrj_frame(atoms, mp_id: str) -> dict:
    """One frame of ``atoms`` as MPtrj stores it (stress in kBar with VASP's sign)."""
    from pymatgen.io.ase import AseAtomsAdaptor

    energy = float(atoms.get_potential_energy())
    n = len(atoms)
    stress_ase = atoms.get_stress(voigt=False)  # (3, 3) eV/A^3
    corrected = energy + CORRECTION_PER_ATOM * n
    return {"structure": AseAtomsAdaptor.get_structure(atoms).as_dict(),
            "uncorrected_total_energy": energy,
            "corrected_total_energy": corrected,
            "energy_per_atom": corrected / n,
            "ef_per_atom": -0.5,
            "force": atoms.get_forces().tolist(),
            "stress": (-10.0 * EV_PER_A3_IN_GPA * stress_ase).tolist(),
            "magmom": [0.5] * n,
            "bandgap": 1.25,
            "mp_id": mp_id}


def mptrj_layout(frames: list) -> dict:
    """``{mp_id: {frame_id: frame}}`` of extxyz frames, grouped by their ``mptrj_traj_id`` (in order of
    first appearance) and keyed by their ``mptrj_snapshot_id``."""
    out: dict[str, dict] = {}
    for atoms in frames:
        mp_id = atoms.info["mptrj_traj_id"]
        out.setdefault(mp_id, {})[atoms.info["mptrj_snapshot_id"]] = mptrj_frame(atoms, mp_id)
    return out


def write_mptrj_json(frames: list, path: Path, indent: int | None = None) -> Path:
    """Write ``frames`` as one MPtrj JSON object to ``path``; returns ``path``."""
    path.write_text(json.dumps(mptrj_layout(frames), indent=indent))
    return path


def write_large_mptrj_json(path: Path, frames: list, target_bytes: int) -> int:
    """A file of at least ``target_bytes`` in the MPtrj layout, streamed out (never held whole): the
    frames repeated under fresh mp_ids / frame ids. Returns the number of frames written."""
    encoded = [json.dumps(mptrj_frame(a, "mp-0")) for a in frames]
    n = written = 0
    with open(path, "w") as f:
        f.write("{")
        while written < target_bytes:
            members = ", ".join(f'"copy{n}-{k}": {text}' for k, text in enumerate(encoded))
            piece = ("" if n == 0 else ", ") + f'"mp-{n}": {{{members}}}'
            f.write(piece)
            written += len(piece)
            n += 1
        f.write("}")
    return n * len(encoded)


def ase_stress_from_kbar(stress_kbar) -> np.ndarray:
    """The ASE stress (eV/A^3) of a VASP stress in kBar, written out by hand for the tests."""
    return -0.1 * np.asarray(stress_kbar, dtype=np.float64) / EV_PER_A3_IN_GPA
