"""Provenance of ``mptrj36.aselmdb``: written by fairchem's own ``.aselmdb`` writer.

RUN ONLY IN THE SCRATCH ENVIRONMENT THAT HAS FAIRCHEM (see README.md in this directory); cfdist
neither imports fairchem nor runs this script in its tests.

fairchem-core writes ``.aselmdb`` files through ``ase.db.connect(path)`` (its
``fairchem/core/scripts/create_finetune_dataset.py`` does exactly this), which picks the LMDB backend
``ase_db_backends.aselmdb.LMDBDatabase`` (package ``ase-db-backends``, a dependency of fairchem-core,
maintained with it). This script writes the first 36 frames of
``examples/data/mptrj/mptrj-random-1k.extxyz.gz`` (real MPtrj frames with a single-point calculator:
energy eV, forces eV/A, stress eV/A^3) with string key-value pairs ``sid`` (the frame id) and
``mp_id``, a numeric key-value pair ``bandgap_ev``, and ``data`` as fairchem's script passes it.

    /tmp/fairchem-venv/bin/python tests/data/aselmdb/make_fixture.py
"""

from importlib.metadata import version
from pathlib import Path

import ase.db
import ase.io

import fairchem.core  # noqa: F401 - only to make sure this runs where fairchem is installed

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent.parent.parent / "examples" / "data" / "mptrj" / "mptrj-random-1k.extxyz.gz"
TARGET = HERE / "mptrj36.aselmdb"

frames = ase.io.read(str(SOURCE), index=":36", format="extxyz")
TARGET.unlink(missing_ok=True)
with ase.db.connect(str(TARGET)) as db:
    print(f"writer: {type(db).__module__}.{type(db).__name__}")
    for atoms in frames:
        db.write(atoms, sid=atoms.info["mptrj_snapshot_id"], mp_id=atoms.info["mptrj_traj_id"], bandgap_ev=1.5,
                 data={"source": "MPtrj"})
print(f"wrote {len(frames)} rows to {TARGET} with fairchem-core {version('fairchem-core')}, "
      f"ase-db-backends {version('ase-db-backends')}, ase {version('ase')}, lmdb {version('lmdb')}")
