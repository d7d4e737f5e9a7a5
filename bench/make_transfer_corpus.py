#!/usr/bin/env python
"""A pretraining corpus with physically meaningful labels, for the transfer benchmark (``bench/transfer.py``).

Structures derived from the real crystals of ``examples/data/megnet_slice.json.gz`` (the supercell /
substitution / strain / rattle generator of ``bench/make_corpus.py``), labelled with energies, forces
and stresses by CHGNet (a universal interatomic potential trained on MPtrj, whose weights ship inside
its PyPI wheel: ``pip install chgnet``, the ``bench`` extra), plus the real MPtrj frames of
``examples/data/mptrj/`` (DFT labels). Written as extended XYZ files that ``cfdist preprocess`` reads::

    python bench/make_transfer_corpus.py --out /tmp/cfdist-transfer-corpus --n 30000 [--workers 2]
    cfdist preprocess /tmp/cfdist-transfer-corpus --out data/transfer-corpus --targets energy \
        --with-forces --with-stress --split-fractions 0.95 0.05 0 --split-group meta:source_id

No leak into the downstream tasks (the slice's band gap and formation energy on its own split file):

* only crystals of the slice's **train** split are sources, and among those only crystals whose
  composition (reduced formula) is not the composition of any val or test crystal;
* a generated structure whose composition (after the species substitution) is a val/test
  composition is redrawn, so substitution cannot recreate a held-out crystal's chemistry;
* an MPtrj frame is dropped when its Materials Project id is a val/test id or its composition is a
  val/test composition.

Every structure ``i`` is a pure function of ``(--seed, i)`` (``ct-<seed>-<i>``), so the files are the
same for any ``--workers``; a structure whose largest CHGNet force exceeds ``--max-force`` is left
out (its index is skipped). ``corpus.yaml`` records the provenance: the CHGNet package and model
version, the seed and settings, the exclusion counts and the labelling rate.

Units, as ``cfdist preprocess`` reads extended XYZ: energy eV (total), forces eV/A, stress eV/A^3
with ASE's sign convention (CHGNet's GPa / 160.21766208, the conversion of its ASE calculator).
CHGNet 0.3.0 was fitted to MPtrj's MP2020-corrected energies; the shipped MPtrj frames carry the
energies of the MatterSim benchmark files. The difference is (mostly) a per-element constant,
which the energy model's per-element reference energies absorb.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# one BLAS / torch thread per worker process: the pool is the parallelism (set before numpy / torch)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_corpus import Generator, MorseModel, Settings, Source, _symbols, load_sources  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SLICE = REPO / "examples" / "data" / "megnet_slice.json.gz"
SLICE_SPLIT = REPO / "examples" / "data" / "megnet_slice_split.json"
MPTRJ = REPO / "examples" / "data" / "mptrj"
GPA = 160.21766208  # GPa per eV/A^3
CHGNET_MAX_Z = 94  # CHGNet 0.3.0's composition model covers H .. Pu
BLOCK = 64  # structures per worker task (one CHGNet batch)
PER_FILE = 10_000


def composition_key(numbers) -> tuple[tuple[int, int], ...]:
    """Reduced composition of a structure: ((Z, count / gcd), ...) sorted by Z (the reduced formula)."""
    z, counts = np.unique(np.asarray(numbers, dtype=np.int64), return_counts=True)
    g = int(np.gcd.reduce(counts))
    return tuple((int(a), int(c) // g) for a, c in zip(z, counts))


@dataclass(frozen=True)
class HeldOut:
    """What the corpus must not derive from: the downstream tasks' val/test ids and compositions."""

    ids: frozenset[str]
    compositions: frozenset[tuple[tuple[int, int], ...]]

    def excludes(self, numbers, ident: str | None = None) -> bool:
        return (ident is not None and ident in self.ids) or composition_key(numbers) in self.compositions


def held_out_and_sources(slice_path: Path, split_path: Path, *, max_atoms: int) -> tuple[HeldOut, list[Source], dict]:
    """The held-out set (val + test of ``split_path``) and the usable source crystals: train split,
    composition not held out, at most ``max_atoms`` atoms. Returns (held_out, sources, counts)."""
    split = json.loads(split_path.read_text())
    if not isinstance(split, dict) or not {"train", "val", "test"} <= set(split):
        raise SystemExit(f"{split_path}: expected a JSON object with train / val / test id lists")
    train, held_ids = set(split["train"]), frozenset(split["val"]) | frozenset(split["test"])
    # every crystal (no size or distance filter: a held-out crystal must never be missed); the
    # drawer rejects candidates with atoms closer than min_distance itself
    everything = load_sources([slice_path], max_atoms=1 << 30, min_distance=0.0, verbose=False)
    held = HeldOut(held_ids, frozenset(composition_key(s.numbers) for s in everything if s.id in held_ids))
    found = {s.id for s in everything}
    if missing := held_ids - found:
        raise SystemExit(f"{slice_path}: {len(missing)} val/test ids of {split_path} are not in it (e.g. "
                         f"{sorted(missing)[:3]}); the held-out compositions would be incomplete")
    in_train = [s for s in everything if s.id in train and len(s.numbers) <= max_atoms]
    sources = [s for s in in_train if not held.excludes(s.numbers, s.id)]
    counts = {"slice_crystals": len(everything), "held_out_ids": len(held_ids),
              "held_out_compositions": len(held.compositions), "train_sources_small_enough": len(in_train),
              "train_sources_same_composition_as_val_test": len(in_train) - len(sources), "sources": len(sources)}
    if not sources:
        raise SystemExit(f"no source crystal left (train split, <= {max_atoms} atoms, composition not in val/test)")
    return held, sources, counts


# ----------------------------------------------------------------------------- generation + labels
@dataclass(frozen=True)
class CorpusSettings:
    """Everything that decides the corpus besides the sources (stored in corpus.yaml)."""

    seed: int = 0
    max_atoms: int = 8
    min_distance: float = 0.7
    max_strain: float = 0.04
    rattle: float = 0.1
    substitute: float = 0.5
    max_force: float = 30.0
    max_tries: int = 100


@dataclass
class Drawn:
    """One generated structure before labelling (Cartesian positions, rows of ``lattice`` = vectors, A)."""

    numbers: np.ndarray
    lattice: np.ndarray
    positions: np.ndarray
    source_id: str
    variant: str
    redraws: int


class Drawer:
    """Draws structure ``index``: a pure function of (sources, held-out set, settings, index); never a
    held-out composition, no element beyond CHGNet's, no two atoms closer than ``min_distance``."""

    def __init__(self, sources: list[Source], held: HeldOut, settings: CorpusSettings):
        self.settings = settings
        self.held = held
        self.generator = Generator(sources, Settings(seed=settings.seed, max_atoms=settings.max_atoms,
                                                     min_distance=settings.min_distance,
                                                     max_strain=settings.max_strain, rattle=settings.rattle,
                                                     substitute=settings.substitute))
        self.morse = MorseModel()  # its exact image table gives the shortest-distance check

    def draw(self, index: int) -> Drawn:
        rng = self.generator.rng(index)
        s = self.settings
        sources = self.generator.sources
        for attempt in range(s.max_tries):
            source = sources[int(rng.integers(len(sources)))]
            numbers, lattice, positions, variant = self.generator.candidate(rng, source)
            if self.held.excludes(numbers):
                continue  # a substitution recreated a val/test composition
            if numbers.max() > CHGNET_MAX_Z:
                continue  # an actinide substitution beyond CHGNet's elements
            if self.morse.evaluate(numbers, lattice, positions, min_distance=s.min_distance) is None:
                continue
            return Drawn(numbers, lattice, positions, source.id, variant, attempt)
        raise RuntimeError(f"structure {index}: no valid candidate in {s.max_tries} draws")


@contextlib.contextmanager
def first_derivatives_only():
    """CHGNet's ``predict_*`` differentiates with ``create_graph=True`` (the graph of the forces, for
    training on them); labelling needs no second derivative. Dropping it costs 1/1.6 of the CPU time
    (64 structures of <= 8 atoms: 2.0 vs 3.2 s) and changes the labels by float32 rounding only
    (forces 7e-5 eV/A, stress 3e-4 GPa). ``torch.autograd.grad`` is patched for the block only
    (labelling workers run nothing else)."""
    import torch

    grad = torch.autograd.grad

    def without_graph(*args, **kwargs):
        kwargs["create_graph"] = False
        return grad(*args, **kwargs)

    torch.autograd.grad = without_graph
    try:
        yield
    finally:
        torch.autograd.grad = grad


class Labeller:
    """Labels blocks of drawn structures with CHGNet (energy eV, forces eV/A, stress eV/A^3 ASE sign)."""

    def __init__(self, drawer: Drawer):
        import torch
        from chgnet.model import CHGNet

        torch.set_num_threads(1)
        self.drawer = drawer
        self.model = CHGNet.load(verbose=False)
        self.model.eval()

    def block(self, start: int, stop: int) -> tuple[str, dict]:
        """Extended XYZ text of structures start .. stop - 1 and counters."""
        from pymatgen.core import Lattice, Structure

        drawn = [self.drawer.draw(i) for i in range(start, stop)]
        graphs, isolated = [], 0
        for d in drawn:
            structure = Structure(Lattice(d.lattice), d.numbers.tolist(), d.positions, coords_are_cartesian=True)
            try:
                graphs.append(self.model.graph_converter(structure))
            except ValueError:  # an atom without neighbours within CHGNet's 6 A: CHGNet cannot label it
                graphs.append(None)
                isolated += 1
        kept = [g for g in graphs if g is not None]
        with first_derivatives_only():
            preds = self.model.predict_graph(kept, task="efs", batch_size=len(kept)) if kept else []
        preds = iter(preds if isinstance(preds, list) else [preds])
        parts, dropped, atoms = [], 0, 0
        max_force = self.drawer.settings.max_force
        for index, d, g in zip(range(start, stop), drawn, graphs):
            if g is None:
                continue
            p = next(preds)
            forces = np.asarray(p["f"], dtype=np.float64)
            if not np.isfinite(forces).all() or np.abs(forces).max(initial=0.0) > max_force:
                dropped += 1
                continue
            energy = float(p["e"]) * len(d.numbers)  # CHGNet's energy is per atom
            stress = np.asarray(p["s"], dtype=np.float64) / GPA
            parts.append(frame(f"ct-{self.drawer.settings.seed}-{index}", d.source_id, d.variant, d.numbers,
                               d.lattice, d.positions, energy, forces, stress, label="CHGNet"))
            atoms += len(d.numbers)
        return "".join(parts), {"written": len(parts), "dropped_force": dropped, "dropped_isolated": isolated,
                                "atoms": atoms,
                                "redraws": sum(d.redraws for d in drawn)}


def frame(ident: str, source_id: str, variant: str, numbers, lattice, positions, energy: float, forces,
          stress, *, label: str) -> str:
    """One extended XYZ frame (ASE's layout: energy, 3x3 stress, per-atom forces; ``id`` / ``source_id`` /
    ``variant`` / ``label_source`` strings in ``info``)."""
    sym = _symbols()
    lat = " ".join(f"{x:.8f}" for x in np.asarray(lattice).ravel().tolist())
    st = " ".join(repr(float(x)) for x in np.asarray(stress).ravel().tolist())
    n = len(numbers)
    header = (f'{n}\nLattice="{lat}" Properties=species:S:1:pos:R:3:forces:R:3 energy={energy!r} stress="{st}" '
              f'id="{ident}" source_id="{source_id}" variant="{variant}" label_source="{label}" pbc="T T T"\n')
    rows = np.concatenate([np.asarray(positions), np.asarray(forces)], axis=1).tolist()
    flat = [v for z, row in zip(np.asarray(numbers).tolist(), rows) for v in (sym[z], *row)]
    return header + ("%-2s %.8f %.8f %.8f %.10f %.10f %.10f\n" * n) % tuple(flat)


_LABELLER: Labeller | None = None


def _init(sources, held, settings) -> None:
    global _LABELLER
    _LABELLER = Labeller(Drawer(sources, held, settings))


def _run(task: tuple[int, int]) -> tuple[int, str, dict]:
    return task[0], *_LABELLER.block(*task)


# ----------------------------------------------------------------------------- MPtrj frames
def filtered_mptrj(paths: list[Path], held: HeldOut, out: Path) -> dict:
    """Copy the MPtrj frames whose trajectory's Materials Project id and composition are not held out
    to ``out`` (extended XYZ; ``source_id`` = the trajectory id, else the frame's own id)."""
    import ase.io

    counts = {"frames": 0, "kept": 0, "dropped_val_test": 0}
    parts = []
    for path in paths:
        for k, atoms in enumerate(ase.io.read(path, index=":")):
            counts["frames"] += 1
            traj = atoms.info.get("mptrj_traj_id")
            ident = str(atoms.info.get("mptrj_snapshot_id") or f"{path.name.split('.')[0]}-{k}")
            if held.excludes(atoms.numbers, str(traj) if traj is not None else None):
                counts["dropped_val_test"] += 1
                continue
            parts.append(frame(ident, str(traj or ident), "mptrj", atoms.numbers, atoms.cell.array,
                               atoms.positions, float(atoms.get_potential_energy()), atoms.get_forces(),
                               atoms.get_stress(voigt=False), label=f"DFT:{path.name}"))
            counts["kept"] += 1
    out.write_text("".join(parts))
    return counts


def write_yaml(path: Path, data: dict) -> None:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=30_000, help="CHGNet-labelled structures to draw")
    parser.add_argument("--time-limit", type=float, default=None, metavar="S",
                        help="stop after S seconds of labelling: the corpus is then structures 0 .. k-1 of the "
                             "--n (the manifest says how many were drawn)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-atoms", type=int, default=8,
                        help="largest generated structure (CHGNet's force+stress cost grows fast with size)")
    parser.add_argument("--no-mptrj", action="store_true", help="leave out the real MPtrj frames")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        parser.error(f"{args.out} is not empty (--overwrite replaces it)")
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.extxyz"):
        old.unlink()
    settings = CorpusSettings(seed=args.seed, max_atoms=args.max_atoms)
    held, sources, counts = held_out_and_sources(SLICE, SLICE_SPLIT, max_atoms=settings.max_atoms)
    print(f"sources: {counts['sources']:,} train-split crystals of <= {settings.max_atoms} atoms "
          f"({counts['train_sources_same_composition_as_val_test']} left out: composition of a val/test crystal; "
          f"{counts['held_out_compositions']} held-out compositions)", flush=True)
    mptrj = None
    if not args.no_mptrj:
        mptrj = filtered_mptrj(sorted(MPTRJ.glob("*.extxyz.gz")), held, args.out / "mptrj-filtered.extxyz")
        print(f"MPtrj frames: kept {mptrj['kept']:,} of {mptrj['frames']:,} "
              f"({mptrj['dropped_val_test']} dropped: val/test id or composition)", flush=True)

    import multiprocessing as mp

    tasks = [(a, min(a + BLOCK, args.n)) for a in range(0, args.n, BLOCK)]
    drawn = 0
    totals = {"written": 0, "dropped_force": 0, "dropped_isolated": 0, "atoms": 0, "redraws": 0}
    files, handle, file_count, t0 = [], None, 0, time.perf_counter()
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.workers, initializer=_init, initargs=(sources, held, settings)) as pool:
        t_ready = time.perf_counter()
        for k, (start, text, stats) in enumerate(pool.imap(_run, tasks)):
            if handle is None or file_count >= PER_FILE:
                if handle is not None:
                    handle.close()
                files.append(f"chgnet-{len(files):03d}.extxyz")
                handle, file_count = open(args.out / files[-1], "w"), 0
            handle.write(text)
            file_count += stats["written"]
            for key in totals:
                totals[key] += stats[key]
            drawn = min(start + BLOCK, args.n)
            if args.time_limit is not None and time.perf_counter() - t0 > args.time_limit:
                print(f"  --time-limit {args.time_limit:.0f} s reached", flush=True)
                break
            if k % 20 == 0 or k == len(tasks) - 1:
                el = time.perf_counter() - t0
                print(f"  {start + BLOCK:>7,} / {args.n:,} drawn, {totals['written']:,} written, "
                      f"{el:.0f} s, {totals['written'] / max(el, 1e-9):.1f} /s", flush=True)
    if handle is not None:
        handle.close()
    elapsed = time.perf_counter() - t0
    import chgnet

    manifest = {
        "what": "cfdist transfer-benchmark pretraining corpus (bench/make_transfer_corpus.py)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "labels": {"chgnet_package": chgnet.__version__, "chgnet_model": "CHGNet.load() default (0.3.0), "
                   "weights shipped in the PyPI wheel", "task": "efs", "dtype": "float32 model, written as float64",
                   "units": "energy eV (total), forces eV/A, stress eV/A^3 (ASE sign)"},
        "settings": asdict(settings), "n_requested": args.n, "n_drawn": drawn, "time_limit_s": args.time_limit,
        "workers": args.workers,
        "sources": {"file": str(SLICE.relative_to(REPO)), "split_file": str(SLICE_SPLIT.relative_to(REPO)), **counts},
        "exclusion_rule": "sources: train split only, composition (reduced formula) not that of any val/test "
                          "crystal; generated structures with a val/test composition redrawn; MPtrj frames with "
                          "a val/test Materials Project id or composition dropped",
        "chgnet_structures": totals, "mptrj": mptrj, "files": files + (["mptrj-filtered.extxyz"] if mptrj else []),
        "labelling_s": round(elapsed, 1), "worker_start_s": round(t_ready - t0, 1),
        "rate_per_s": round(totals["written"] / max(elapsed, 1e-9), 2),
        "host_load_avg": list(os.getloadavg()),
    }
    write_yaml(args.out / "corpus.yaml", manifest)
    print(f"wrote {totals['written']:,} CHGNet-labelled structures ({totals['dropped_force']} dropped: force > "
          f"{settings.max_force} eV/A) in {elapsed:.0f} s ({manifest['rate_per_s']} /s, {args.workers} workers) "
          f"+ {mptrj['kept'] if mptrj else 0:,} MPtrj frames -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
