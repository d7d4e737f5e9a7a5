"""Preprocessing throughput: the Ray Data job vs a plain loop over the same chunk function.

Replicates the real MEGNet slice (3,909 crystals, 1-25 atoms) to ``--n`` structures (default
100,000; ids made unique) in one JARVIS JSON file, then measures end to end (read -> validate
-> image tables at the default cutoff -> zstd Parquet):

* ``loop``: one process calling ``process_chunk`` over every chunk (no Ray) - the floor;
* ``ray-1`` / ``ray-2``: ``build_shards.build`` with 1 and 2 Ray Data workers (includes Ray
  start-up, actor start-up, planning and the final manifest pass).

and prints structures/s, structures/s per core, the Ray overhead and bytes per structure.

``--compressed`` adds a reading-only comparison on the same records gzipped (``.json.gz``): plan +
read every record when each chunk seeks inside the compressed stream (decompressing everything before
it: quadratic in the file size) vs when planning spills the decompressed bytes once (what
``build_shards`` does).

``--formats`` instead compares the input formats on the same real frames (the shipped
``examples/data/mptrj/mptrj-random-1k.extxyz.gz``, 1,000 MPtrj frames): today's extxyz path against
the same frames as MPtrj JSON (``mptrj``), as an ``.aselmdb`` (fairchem's layout: zlib-compressed
ASE JSON rows in LMDB) and as a Parquet table (``parquet``). One process, no Ray: plan + read every
record (the reader alone), then plan + ``process_chunk`` (read -> validate -> image tables -> shards,
energy + forces + stress), in structures/s per core.

    python bench/preprocess.py [--n 100000] [--shard-size 4096] [--work /tmp/cfdist-bench-pre] [--compressed]
    python bench/preprocess.py --formats [--work /tmp/cfdist-bench-pre]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from cfdist.io import plan_chunks  # noqa: E402
from cfdist.preprocess.job import Settings, build, process_chunk  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--shard-size", type=int, default=4096)
    parser.add_argument("--data", type=Path, default=Path("examples/data/megnet_slice.json.gz"),
                        help="real structures to replicate (default: the example slice, from the repository root)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cfdist-bench-pre"))
    parser.add_argument("--skip-loop", action="store_true")
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--compressed", action="store_true", help="also compare reading a .json.gz with/without spill")
    parser.add_argument("--formats", action="store_true",
                        help="only compare the input formats (extxyz, mptrj, aselmdb, parquet) on real MPtrj frames")
    args = parser.parse_args()
    if args.formats:
        compare_formats(args.work, args.shard_size)
        return

    from cfdist.config import CrystalformerConfig

    cutoff = CrystalformerConfig().cutoff
    with gzip.open(args.data, "rt") as f:
        base = json.load(f)
    records = []
    for k in range(args.n):
        rec = dict(base[k % len(base)])
        rec["id"] = f"{rec['id']}-r{k // len(base)}"
        records.append(rec)
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    raw = args.work / "replicated.json"
    raw.write_text(json.dumps(records))
    del records
    print(f"# {args.n:,} structures (MEGNet slice x{args.n / len(base):.1f}), cutoff {cutoff:.3f} A, "
          f"shard size {args.shard_size}, {os.cpu_count()} cores, input {raw.stat().st_size / 1e6:.0f} MB")
    settings = Settings(cutoff=cutoff, targets=["e_form"], shard_size=args.shard_size)
    rows = []

    if not args.skip_loop:
        out = args.work / "loop"
        chunks = plan_chunks(str(raw), "jarvis", args.shard_size)
        start = time.perf_counter()
        written = 0
        for index, chunk in enumerate(chunks):
            written += process_chunk(index, chunk, settings, str(out), None)["n_written"]
        elapsed = time.perf_counter() - start
        size = sum(p.stat().st_size for p in out.rglob("*.parquet"))
        rows.append(("loop (1 process, no Ray)", 1, elapsed, written, size))

    import ray

    from cfdist.cluster import init_ray

    for workers in (() if args.skip_ray else (1, 2)):
        out = args.work / f"ray-{workers}"
        init_ray(num_cpus=2, object_store_memory=512 * 1024**2)
        start = time.perf_counter()
        manifest = build([str(raw)], out, settings, workers=workers)
        elapsed = time.perf_counter() - start
        ray.shutdown()
        size = sum(s["bytes"] for s in manifest["shards"])
        rows.append((f"Ray Data, {workers} worker(s)", workers, elapsed, manifest["n_written"], size))

    print()
    print("| pipeline | workers | wall s | structures/s | structures/s/core | bytes/structure |")
    print("|---|---|---|---|---|---|")
    for name, workers, elapsed, written, size in rows:
        print(f"| {name} | {workers} | {elapsed:.1f} | {written / elapsed:,.0f} | {written / elapsed / workers:,.0f} | "
              f"{size / written:,.0f} |")
    if not args.skip_loop and not args.skip_ray:
        loop, ray1 = rows[0], rows[1]
        print(f"\nRay overhead (1 worker vs plain loop): {ray1[2] / loop[2]:.2f}x wall time")
    if not args.skip_ray:
        print(f"scaling 1 -> 2 workers: {rows[-2][2] / rows[-1][2]:.2f}x")
    if args.compressed:
        compressed_reading(raw, args.shard_size)


def compressed_reading(raw: Path, shard_size: int) -> None:
    """Plan + read every record of the gzipped input: seeking in the stream vs a spilled copy."""
    from cfdist.io import read_chunk

    packed = raw.with_name(raw.name + ".gz")
    with open(raw, "rb") as f, gzip.open(packed, "wb", compresslevel=6) as g:
        shutil.copyfileobj(f, g)
    print(f"\n# {packed.name}: {packed.stat().st_size / 1e6:.0f} MB gzipped, {raw.stat().st_size / 1e6:.0f} MB raw")
    print("| reading a .json.gz | plan s | read every record s | total s |")
    print("|---|---|---|---|")
    for name, spill in (("seek in the gzip stream per chunk", None), ("spill once while planning", raw.parent / "spill")):
        if spill is not None and spill.exists():
            shutil.rmtree(spill)
        start = time.perf_counter()
        chunks = plan_chunks(str(packed), "jarvis", shard_size, str(spill) if spill else None)
        planned = time.perf_counter()
        n = sum(1 for chunk in chunks for _ in read_chunk(chunk))
        done = time.perf_counter()
        print(f"| {name} ({n:,} records, {len(chunks)} chunks) | {planned - start:.1f} | {done - planned:.1f} | "
              f"{done - start:.1f} |")


MPTRJ_FRAMES = Path("examples/data/mptrj/mptrj-random-1k.extxyz.gz")


def _write_formats(frames, work: Path) -> dict[str, Path]:
    """The frames as MPtrj JSON (stress in kBar, VASP's sign), .aselmdb (fairchem's layout) and Parquet."""
    import zlib

    import lmdb
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ase.db.row import AtomsRow
    from ase.io.jsonio import encode
    from pymatgen.io.ase import AseAtomsAdaptor

    paths = {"mptrj": work / "mptrj.json", "aselmdb": work / "frames.aselmdb", "parquet": work / "frames.parquet"}
    layout: dict[str, dict] = {}
    for atoms in frames:
        mp_id = atoms.info["mptrj_traj_id"]
        energy = float(atoms.get_potential_energy())
        layout.setdefault(mp_id, {})[atoms.info["mptrj_snapshot_id"]] = {
            "structure": AseAtomsAdaptor.get_structure(atoms).as_dict(), "uncorrected_total_energy": energy,
            "corrected_total_energy": energy, "force": atoms.get_forces().tolist(),
            "stress": (-10.0 * 160.21766208 * atoms.get_stress(voigt=False)).tolist(), "mp_id": mp_id}
    paths["mptrj"].write_text(json.dumps(layout))
    env = lmdb.open(str(paths["aselmdb"]), subdir=False, map_size=1 << 32, meminit=False)
    with env.begin(write=True) as txn:
        for k, atoms in enumerate(frames, 1):
            row = AtomsRow(atoms)
            dct = {key: row[key] for key in row.__dict__ if key[0] != "_" and key not in row._keys and key != "id"}
            dct["cell"] = np.asarray(dct["cell"])
            dct["key_value_pairs"] = {"sid": atoms.info["mptrj_snapshot_id"], "mp_id": atoms.info["mptrj_traj_id"]}
            txn.put(str(k).encode(), zlib.compress(encode(dct).encode()))
        txn.put(b"nextid", zlib.compress(encode(len(frames) + 1).encode()))
    env.close()
    pq.write_table(pa.table({
        "immutable_id": [a.info["mptrj_snapshot_id"] for a in frames],
        "lattice_vectors": [a.cell.array.tolist() for a in frames],
        "species_at_sites": [a.get_chemical_symbols() for a in frames],
        "cartesian_site_positions": [a.positions.tolist() for a in frames],
        "energy": [float(a.get_potential_energy()) for a in frames],
        "forces": [a.get_forces().tolist() for a in frames],
        "stress_tensor": [a.get_stress(voigt=False).tolist() for a in frames]}), str(paths["parquet"]))
    return paths


def compare_formats(work: Path, shard_size: int) -> None:
    """Reader alone and the whole chunk function, per format, on the same 1,000 real frames."""
    import ase.io

    from cfdist.config import CrystalformerConfig
    from cfdist.io import read_chunk

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    frames = ase.io.read(str(MPTRJ_FRAMES), index=":", format="extxyz")
    inputs = {"extxyz": MPTRJ_FRAMES.resolve(), **_write_formats(frames, work)}
    settings = Settings(cutoff=CrystalformerConfig().cutoff, targets=["energy"], shard_size=shard_size,
                        with_forces=True, with_stress=True)
    print(f"# {len(frames):,} real MPtrj frames ({MPTRJ_FRAMES.name}), cutoff {settings.cutoff:.3f} A, "
          f"one process (structures/s per core)")
    print("| format | input MB | plan + read s | read structures/s | plan + process_chunk s | "
          "preprocess structures/s | written |")
    print("|---|---|---|---|---|---|---|")
    for fmt, path in inputs.items():
        start = time.perf_counter()
        chunks = plan_chunks(str(path), fmt, shard_size, str(work / "spill"))
        n = sum(1 for chunk in chunks for rec in read_chunk(chunk) if rec.ok)
        read_s = time.perf_counter() - start
        out = work / f"out-{fmt}"
        start = time.perf_counter()
        chunks = plan_chunks(str(path), fmt, shard_size, str(work / "spill"))
        written = sum(process_chunk(i, c, settings, str(out), None)["n_written"] for i, c in enumerate(chunks))
        full_s = time.perf_counter() - start
        print(f"| {fmt} | {path.stat().st_size / 1e6:.1f} | {read_s:.2f} | {n / read_s:,.0f} | {full_s:.2f} | "
              f"{len(frames) / full_s:,.0f} | {written:,} |")


if __name__ == "__main__":
    main()
