#!/usr/bin/env python
"""Benchmark: sphere-cutoff image-table attention vs the dense-box baseline, on real crystals.

What it measures (batches of real MEGNet structures, ``examples/data/megnet_slice.json.gz``):

1. **One attention layer, forward + backward** (float32, q/k/v (N, 8, 16), edge_proj (8, 16, 64),
   a = -1 / (2 sigma^2) with sigma ~ U[0.3, sigma_max = 1.98] A, all requiring grad):
   the efficient op ``periodic_attention`` over image tables at c = 4.5 (the default cutoff,
   8.91 A) and c = 6 (11.88 A), against ``dense_box_attention`` over every atom pair x the
   (2R+1)^3 translation box with the (pairs, images, K) basis materialised (R = 2 is the
   reference implementation's PyTorch fallback; R = 3 if memory allows). The per-batch
   geometry precompute (``PeriodicGraph.build`` / ``DenseBoxGeometry.build``) has its own
   column and is included in the total. Image tables themselves are built once, offline, by
   preprocessing; their cost is section 5.
2. **Whole model forward + backward**: default ``Crystalformer()`` (float32, train mode, sigma
   statistics already set, loss = mean of the output) with the table backend vs a dense-box
   backend (``cfdist.ops.dense_box.DenseBoxAttention``); geometry = the backend's ``prepare``. Two more rows
   (first ``--slow-batches`` batches) repeat both with ``model.activation_checkpointing = True``.
3. **Accuracy vs float64 brute force**: per (atom pair, head) S = sum_n exp(a d_n^2) over a
   30 A sphere ("exact"; the Gaussian there is < 1e-49) vs the table (c = 4.5, 6) and the dense
   box (R = 2, 3): max / median absolute shortfall (the self term alone is 1), pairs missing,
   and the max abs error of the layer output y vs the exact float64 output (op in float64 =
   truncation only; op in float32 = what the timed runs compute). The exact output is the
   float64 efficient op on the 30 A table; it is checked against the plain loop
   ``reference_periodic_attention`` on a few small crystals.
4. **Ratios** dense-box / table for time and peak memory (layer and model).
5. **Image-table construction throughput** on the whole slice, one core: ``image_table`` vs
   pymatgen ``Structure.get_neighbor_list`` and vesin ``NeighborList`` (both exclude the N self
   images; their lists are checked entry by entry against ours minus the self images). Best of
   ``--table-passes`` passes; inputs (arrays, pymatgen Structures) are prepared untimed.

How to run (from the repository root, in the project's venv)::

    python bench/attention.py                  # full run (~7 min on 2 cores)
    python bench/attention.py --quick          # smoke run (< 1 min): 1 batch of 16, 1 repeat
    python bench/attention.py --json out.json  # also write every number as JSON
    python bench/attention.py --help           # batches, repeats, seed, data path, sections

How memory is measured: every time/memory measurement runs in a fresh child process
(multiprocessing "spawn" context, one process per measurement, nothing else running). The child
collates the batch, creates inputs / the model and runs one warm-up step on a tiny batch (two
crystals: maps torch's code pages, starts thread pools), then takes a baseline = current RSS
(``VmRSS``), resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``) and runs
one full step (geometry + forward + backward); "peak" = ``VmHWM`` after the step minus the
baseline, i.e. the extra resident memory the step needed at its peak (allocator caching makes
this uncertain by a few tens of MB; "geometry resident" = RSS right after the geometry build
minus the baseline). Where the counter cannot be reset, ``ru_maxrss`` after the step minus the
baseline is used (valid when the step's peak exceeds the small setup's). The same child then
times ``--repeats`` further steps (median reported; the measured step is the timing warm-up).

Timing uses ``time.perf_counter``; torch runs with ``--threads`` intra-op threads (default: all
cores) in sections 1-3 and with 1 thread in section 5. On a shared machine use ``--threads 1``:
when another process holds a core, 2-thread OpenMP ops stall at their barriers and the op timings
jump 3-5x at random (the header prints the load and how busy the CPUs were before the start). OMP/OpenBLAS/MKL thread counts are set
to 1 before numpy is imported, so numpy (image tables) is single-threaded throughout.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy / torch are imported (section 5 is single-core)

import argparse  # noqa: E402
import gzip  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing as mp  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cfdist.batch import CrystalBatch, collate  # noqa: E402
from cfdist.config import CrystalformerConfig  # noqa: E402
from cfdist.crystal import InvalidCrystalError, from_jarvis, validate  # noqa: E402
from cfdist.geometry import image_table  # noqa: E402
from cfdist.graph import gaussian_basis  # noqa: E402
from cfdist.model import Crystalformer, TableAttention  # noqa: E402
from cfdist.ops.dense_box import DenseBoxAttention, dense_box_attention  # noqa: E402
from cfdist.ops.periodic_attention import periodic_attention  # noqa: E402
from cfdist.ops.reference import reference_periodic_attention  # noqa: E402
from memory import PeakRSS, _proc_status_kb  # noqa: E402  (bench/memory.py)

DEFAULT_DATA = Path("examples/data/megnet_slice.json.gz")  # relative to the repository root
SIGMA_MIN = 0.3  # A; smallest sigma of the random layer inputs (largest is config.sigma_max)
MB = 1024.0 * 1024.0


# ----------------------------------------------------------------------------- backends


class TimedBackend:
    """Wraps a backend; records how long its last ``prepare`` (the geometry) took and the RSS after it."""

    def __init__(self, inner):
        self.inner = inner
        self.last_prepare_s = 0.0
        self.rss_after_prepare_kb = 0

    def prepare(self, batch, config, dtype):
        start = time.perf_counter()
        geometry = self.inner.prepare(batch, config, dtype)
        self.last_prepare_s = time.perf_counter() - start
        self.rss_after_prepare_kb = _proc_status_kb("VmRSS")
        return geometry

    def __call__(self, *args):
        return self.inner(*args)


def make_backend(method: dict):
    return TableAttention() if method["kind"] == "table" else DenseBoxAttention(method["box"])


# ----------------------------------------------------------------------------- memory


# ----------------------------------------------------------------------------- inputs


def layer_inputs(n_atoms: int, config: CrystalformerConfig, seed: int, dtype: torch.dtype,
                 requires_grad: bool = False) -> dict:
    """Random layer inputs, drawn in float64 (so every dtype sees the same numbers)."""
    g = torch.Generator().manual_seed(seed)
    h, dh, k = config.n_heads, config.head_dim, config.n_basis
    f64 = torch.float64
    x = {name: torch.randn(n_atoms, h, dh, generator=g, dtype=f64) for name in ("q", "k", "v")}
    sigma = SIGMA_MIN + (config.sigma_max - SIGMA_MIN) * torch.rand(n_atoms, h, generator=g, dtype=f64)
    x["a"] = -0.5 / sigma ** 2
    x["edge_proj"] = torch.randn(h, dh, k, generator=g, dtype=f64) / math.sqrt(k)  # beta ~ O(|v|)
    x["grad_out"] = torch.randn(n_atoms, h, dh, generator=g, dtype=f64)
    out = {name: t.to(dtype) for name, t in x.items()}
    if requires_grad:
        for name in ("q", "k", "v", "a", "edge_proj"):
            out[name].requires_grad_(True)
    return out


def table_cutoff_for(config: CrystalformerConfig, c: float) -> float:
    return c * config.sigma_max


# ----------------------------------------------------------------------------- child measurement


def measure_in_child(spec: dict) -> dict:
    """One time + memory measurement; runs in a fresh spawned process."""
    torch.set_num_threads(spec["threads"])
    config = CrystalformerConfig()
    batch = collate(spec["crystals"], spec["tables"])
    backend = TimedBackend(make_backend(spec["method"]))
    dtype = torch.float32

    # A warm-up step on a tiny batch (the first two crystals) first: it maps the code pages and
    # starts the thread pools, so the measured step's RSS increase is the data's, not torch's.
    tiny = collate(spec["crystals"][:2], spec["tables"][:2])
    if spec["what"] == "layer":
        def make_step(b):
            x = layer_inputs(b.positions.shape[0], config, spec["input_seed"], dtype, requires_grad=True)

            def step():
                geometry = backend.prepare(b, config, dtype)
                y = backend(x["q"], x["k"], x["v"], x["a"], geometry, x["edge_proj"])
                y.backward(x["grad_out"])
                for name in ("q", "k", "v", "a", "edge_proj"):
                    x[name].grad = None
            return step
    else:
        model = Crystalformer(config)
        model.load_state_dict(torch.load(io.BytesIO(spec["state"]), weights_only=True))
        model.train()
        assert model.sigma_stats_ready
        model.attention_backend = backend
        model.activation_checkpointing = bool(spec["method"].get("ckpt", False))

        def make_step(b):
            def step():
                loss = model(b).mean()
                loss.backward()
                model.zero_grad(set_to_none=True)
            return step

    make_step(tiny)()
    step = make_step(batch)
    with PeakRSS() as mem:
        start = time.perf_counter()
        step()
        first_s = time.perf_counter() - start
    geometry_mb = (backend.rss_after_prepare_kb - mem.baseline_kb) / 1024.0

    geom_s, total_s = [], []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        step()
        total_s.append(time.perf_counter() - start)
        geom_s.append(backend.last_prepare_s)
    fb_s = [t - g for t, g in zip(total_s, geom_s)]
    med = statistics.median
    return {
        "geometry_s": med(geom_s) if geom_s else float("nan"),
        "fwd_bwd_s": med(fb_s) if fb_s else float("nan"),
        "total_s": med(total_s) if total_s else first_s,
        "first_call_s": first_s,
        "repeats": spec["repeats"],
        "geometry_s_all": geom_s, "total_s_all": total_s,
        "peak_mb": mem.peak_mb, "geometry_resident_mb": geometry_mb,
        "baseline_rss_mb": mem.baseline_mb, "memory_method": mem.method,
    }


def run_child(spec: dict) -> dict:
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(measure_in_child, spec).result()


# ----------------------------------------------------------------------------- data


def load_crystals(path: Path) -> tuple[list, int]:
    with gzip.open(path, "rt") as fh:
        records = json.load(fh)
    crystals, rejected = [], 0
    for rec in records:
        labels = {"e_form": rec.get("e_form"), "gap pbe": rec.get("gap pbe")}
        try:
            crystals.append(validate(from_jarvis(rec["atoms"], id=rec["id"], labels=labels)))
        except InvalidCrystalError:
            rejected += 1
    return crystals, rejected


def dense_pairs(crystals) -> int:
    return int(sum(c.n_atoms ** 2 for c in crystals))


# ----------------------------------------------------------------------------- accuracy (float64)


def _chunks(sizes, budget):
    """Consecutive index ranges whose summed size stays under ``budget`` (at least one item each)."""
    start, acc = 0, 0
    for idx, s in enumerate(sizes):
        if idx > start and acc + s > budget:
            yield start, idx
            start, acc = idx, 0
        acc += s
    if start < len(sizes):
        yield start, len(sizes)


def _pair_index(batch: CrystalBatch, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Index of (i, j) in the i-major all-pairs order of DenseBoxGeometry (crystal by crystal)."""
    counts = batch.n_atoms
    first = torch.cumsum(counts, 0) - counts
    pair_first = torch.cumsum(counts * counts, 0) - counts * counts
    b = batch.atom_crystal[i]
    return pair_first[b] + (i - first[b]) * counts[b] + (j - first[b])


def method_outputs(method: dict, crystals, tables, x64: dict, config: CrystalformerConfig,
                   dtype: torch.dtype, want_sum: bool) -> dict:
    """Layer output y (N, H, dh) in float64 and, if ``want_sum``, S (E, H) = sum_n exp(a d^2)."""
    n_atoms = np.array([c.n_atoms for c in crystals])
    atom_first = np.concatenate([[0], np.cumsum(n_atoms)])
    if method["kind"] == "table":
        sizes = [len(t) for t in tables]
        budget = 1_500_000
    else:
        sizes = [int(n) ** 2 * (2 * method["box"] + 1) ** 3 for n in n_atoms]
        budget = 2_000_000
    ys, sums, n_entries = [], [], 0
    for lo, hi in _chunks(sizes, budget):
        batch = collate(crystals[lo:hi], tables[lo:hi])
        a0, a1 = int(atom_first[lo]), int(atom_first[hi])
        x = {name: t[a0:a1].to(dtype) for name, t in x64.items() if name not in ("edge_proj",)}
        edge_proj = x64["edge_proj"].to(dtype)
        a64 = x64["a"][a0:a1]
        geometry = make_backend(method).prepare(batch, config, dtype)
        with torch.no_grad():
            if method["kind"] == "table":
                y = periodic_attention(x["q"], x["k"], x["v"], x["a"], geometry, edge_proj)
            else:
                y = dense_box_attention(x["q"], x["k"], x["v"], x["a"], geometry, edge_proj)
            ys.append(y.to(torch.float64))
            if want_sum:
                n_pairs = int(sum(c.n_atoms ** 2 for c in crystals[lo:hi]))
                if method["kind"] == "table":
                    d2 = geometry.entry_d2.to(torch.float64)
                    terms = torch.exp(a64[geometry.entry_i] * d2[:, None])
                    pidx = _pair_index(batch, batch.entry_i, batch.entry_j)
                    s = terms.new_zeros(n_pairs, a64.shape[1]).index_add_(0, pidx, terms)
                    n_entries += int(d2.shape[0])
                else:
                    d2 = geometry.d2.to(torch.float64)  # (E, M)
                    s = torch.stack([torch.exp(a64[geometry.pair_i, h][:, None] * d2).sum(1)
                                     for h in range(a64.shape[1])], dim=1)
                    n_entries += int(d2.numel())
                sums.append(s)
        del geometry
    out = {"y": torch.cat(ys)}
    if want_sum:
        out["sum"] = torch.cat(sums)
        out["entries"] = n_entries
    return out


def accuracy_section(crystals, config: CrystalformerConfig, seed: int, exact_cutoff: float,
                     methods: list[dict], log) -> dict:
    n_total = sum(c.n_atoms for c in crystals)
    x64 = layer_inputs(n_total, config, seed, torch.float64)
    x64.pop("grad_out")
    f64, f32 = torch.float64, torch.float32

    t0 = time.perf_counter()
    exact_tables = [image_table(c.lattice, c.positions, exact_cutoff) for c in crystals]
    exact_method = {"kind": "table", "label": f"exact: table r_c = {exact_cutoff:g} A, float64"}
    exact = method_outputs(exact_method, crystals, exact_tables, x64, config, f64, True)
    log(f"  exact reference ({sum(len(t) for t in exact_tables):,} entries) in {time.perf_counter() - t0:.1f} s")

    # Check the exact path against the plain loop reference on a few small crystals.
    small = [k for k in np.argsort([c.n_atoms for c in crystals], kind="stable")][:4]
    small = sorted(int(k) for k in small)
    sc = [crystals[k] for k in small]
    st = [exact_tables[k] for k in small]
    atom_first = np.concatenate([[0], np.cumsum([c.n_atoms for c in crystals])])
    sel = torch.cat([torch.arange(int(atom_first[k]), int(atom_first[k + 1])) for k in small])
    xs = {name: (t[sel] if name != "edge_proj" else t) for name, t in x64.items()}
    sb = collate(sc, st)
    graph = TableAttention().prepare(sb, config, f64)
    y_fast = periodic_attention(xs["q"], xs["k"], xs["v"], xs["a"], graph, xs["edge_proj"])
    dist = torch.sqrt(graph.entry_d2)
    basis = gaussian_basis(dist.clamp_min(1e-15), config.n_basis, config.gbf_r_max, config.gbf_width_scale)
    y_ref = reference_periodic_attention(xs["q"], xs["k"], xs["v"], xs["a"], sb.entry_i, sb.entry_j, dist,
                                         basis, xs["edge_proj"])
    ref_check = {"crystals": [c.id for c in sc], "atoms": int(sel.numel()), "entries": sb.n_entries,
                 "max_abs_diff": float((y_fast - y_ref).abs().max())}

    y_exact, s_exact = exact["y"], exact["sum"]
    rows = [{"method": exact_method["label"], "entries": exact["entries"], "pairs_missing": 0,
             "shortfall_max": 0.0, "shortfall_median": 0.0, "rel_shortfall_max": 0.0, "y_err_f64": 0.0,
             "y_err_f32": float("nan")}]
    for method in methods:
        t0 = time.perf_counter()
        if method["kind"] == "table":
            tables = [image_table(c.lattice, c.positions, table_cutoff_for(config, method["c"])) for c in crystals]
        else:
            tables = exact_tables  # unused by the dense box, but collate wants tables
        r64 = method_outputs(method, crystals, tables, x64, config, f64, True)
        r32 = method_outputs(method, crystals, tables, x64, config, f32, False)
        shortfall = s_exact - r64["sum"]
        present = r64["sum"][:, 0] > 0
        missing = int((~present).sum())
        rel = shortfall[present] / s_exact[present]
        rows.append({
            "method": method["label"], "entries": r64["entries"], "pairs_missing": missing,
            "shortfall_max": float(shortfall.max()), "shortfall_median": float(shortfall.median()),
            "shortfall_min": float(shortfall.min()), "rel_shortfall_max": float(rel.max()),
            "y_err_f64": float((r64["y"] - y_exact).abs().max()),
            "y_err_f32": float((r32["y"] - y_exact).abs().max()),
        })
        log(f"  {method['label']} in {time.perf_counter() - t0:.1f} s")
    return {"rows": rows, "reference_check": ref_check, "pairs": int(s_exact.shape[0]),
            "heads": int(s_exact.shape[1]), "y_exact_max_abs": float(y_exact.abs().max()),
            "exact_cutoff": exact_cutoff}


# ----------------------------------------------------------------------------- table throughput


def _best_of(passes: int, fn):
    """(fastest wall time of ``passes`` calls of ``fn``, result of the last call)."""
    best, out = math.inf, None
    for _ in range(max(1, passes)):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def throughput_section(crystals, cutoff: float, max_atoms: int, limit: int | None, passes: int, log) -> dict:
    torch.set_num_threads(1)
    sel = [c for c in crystals if c.n_atoms <= max_atoms]
    if limit:
        sel = sel[:limit]
    n_atoms = np.array([c.n_atoms for c in sel])
    result = {"structures": len(sel), "max_atoms": int(n_atoms.max()), "cutoff": cutoff, "passes": passes,
              "methods": {}}
    warm = sel[:20]

    # ours
    for c in warm:
        image_table(c.lattice, c.positions, cutoff)
    dt, ours = _best_of(passes, lambda: [image_table(c.lattice, c.positions, cutoff) for c in sel])
    ours_counts = np.array([len(t) for t in ours])
    result["methods"]["cfdist image_table"] = {"seconds": dt, "entries": int(ours_counts.sum()),
                                                "self_images": True}
    log(f"  image_table: {dt:.2f} s")

    # vesin
    try:
        from vesin import NeighborList
        nl = NeighborList(cutoff=cutoff, full_list=True, n_threads=1)
        data = [(np.ascontiguousarray(c.positions), np.ascontiguousarray(c.lattice)) for c in sel]
        for p, b in data[:20]:
            nl.compute(p, b, periodic=True, quantities="ijS")
        dt, vres = _best_of(passes, lambda: [nl.compute(p, b, periodic=True, quantities="ijS") for p, b in data])
        vcounts = np.array([len(r[0]) for r in vres])
        count_bad = np.nonzero(vcounts != ours_counts - n_atoms)[0]
        set_bad = [k for k in range(len(sel)) if not _same_entries(ours[k], vres[k][0], vres[k][1], vres[k][2])]
        result["methods"]["vesin NeighborList"] = {
            "seconds": dt, "entries": int(vcounts.sum()), "self_images": False,
            "count_mismatches": len(count_bad), "entry_set_mismatches": len(set_bad),
            "mismatch_examples": [{"id": sel[k].id, "ours_minus_self": int(ours_counts[k] - n_atoms[k]),
                                   "theirs": int(vcounts[k])} for k in sorted(set(count_bad.tolist()) | set(set_bad))[:5]],
        }
        log(f"  vesin: {dt:.2f} s")
    except ImportError as exc:
        result["methods"]["vesin NeighborList"] = {"error": f"not installed ({exc})"}

    # pymatgen
    try:
        from cfdist.crystal import to_pymatgen
        structures = [to_pymatgen(c) for c in sel]
        for s in structures[:20]:
            s.get_neighbor_list(r=cutoff)
        dt, pres = _best_of(passes, lambda: [s.get_neighbor_list(r=cutoff) for s in structures])
        pcounts = np.array([len(r[0]) for r in pres])
        count_bad = np.nonzero(pcounts != ours_counts - n_atoms)[0]
        set_bad = [k for k in range(len(sel))
                   if not _same_entries(ours[k], pres[k][0], pres[k][1], np.rint(pres[k][2]).astype(np.int64))]
        result["methods"]["pymatgen get_neighbor_list"] = {
            "seconds": dt, "entries": int(pcounts.sum()), "self_images": False,
            "count_mismatches": len(count_bad), "entry_set_mismatches": len(set_bad),
            "mismatch_examples": [{"id": sel[k].id, "ours_minus_self": int(ours_counts[k] - n_atoms[k]),
                                   "theirs": int(pcounts[k])} for k in sorted(set(count_bad.tolist()) | set(set_bad))[:5]],
        }
        log(f"  pymatgen: {dt:.2f} s")
    except ImportError as exc:
        result["methods"]["pymatgen get_neighbor_list"] = {"error": f"not installed ({exc})"}
    return result


def _same_entries(table, i, j, shifts) -> bool:
    """Whether (i, j, n) lists equal our table without its self images (order-independent)."""
    self_image = (table.i == table.j) & np.all(table.n == 0, axis=1)
    ours = np.concatenate([table.i[~self_image, None], table.j[~self_image, None], table.n[~self_image]], axis=1)
    theirs = np.concatenate([np.asarray(i, np.int64)[:, None], np.asarray(j, np.int64)[:, None],
                             np.asarray(shifts, np.int64).reshape(-1, 3)], axis=1)
    if ours.shape != theirs.shape:
        return False
    return bool(np.array_equal(ours[np.lexsort(ours.T[::-1])], theirs[np.lexsort(theirs.T[::-1])]))


# ----------------------------------------------------------------------------- formatting


def md_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        return v if isinstance(v, str) else f"{v}"
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fs(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def fe(x: float) -> str:
    return "0" if x == 0 else f"{x:.2e}"


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="megnet_slice.json.gz (JARVIS format)")
    p.add_argument("--n-batches", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (after the warm-up) for the table op")
    p.add_argument("--dense-repeats", type=int, default=1, help="timed repeats for the dense box")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, sections 1-3")
    p.add_argument("--no-r3", action="store_true", help="skip the dense box with R = 3")
    p.add_argument("--slow-batches", type=int, default=1,
                   help="run the slow extras (layer: dense box R = 3; model: activation-checkpointing rows) "
                        "on only the first this-many batches")
    p.add_argument("--no-ckpt", action="store_true", help="skip the activation-checkpointing model rows")
    p.add_argument("--exact-cutoff", type=float, default=30.0, help="radius (A) of the 'exact' float64 sum")
    p.add_argument("--accuracy-batches", type=int, default=1, help="batches used in the accuracy section")
    p.add_argument("--table-limit", type=int, default=0, help="structures for section 5 (0 = all)")
    p.add_argument("--max-atoms", type=int, default=30, help="largest cell in section 5")
    p.add_argument("--table-passes", type=int, default=3, help="section 5: best of this many passes")
    p.add_argument("--sections", default="layer,model,accuracy,tables",
                   help="comma-separated subset of layer,model,accuracy,tables")
    p.add_argument("--json", type=Path, default=None, help="write all results to this JSON file")
    p.add_argument("--quick", action="store_true",
                   help="smoke mode: 1 batch of 16, 1 repeat, no R = 3, 20 A exact sphere, 300 structures "
                        "in section 5 (< 60 s)")
    args = p.parse_args(argv)
    if args.quick:
        args.n_batches, args.batch_size, args.repeats, args.dense_repeats = 1, 16, 1, 1
        args.accuracy_batches = 1
        args.table_limit = args.table_limit or 300
        args.exact_cutoff = min(args.exact_cutoff, 20.0)
        args.no_r3 = True
        args.no_ckpt = True
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    wall0 = time.perf_counter()

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    torch.set_num_threads(args.threads)
    config = CrystalformerConfig()
    cmd = " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else f"main({argv!r})"
    print("# Periodic attention benchmark: image-table op vs dense box\n")
    print(f"- command: `{cmd}`")
    print(f"- torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), numpy {np.__version__}, "
          f"python {platform.python_version()}, {platform.machine()} with {os.cpu_count()} cores")
    print(f"- threads: torch intra-op {args.threads} in sections 1-3, 1 in section 5; "
          f"OMP/OPENBLAS/MKL_NUM_THREADS=1 (numpy single-threaded)")
    print(f"- data: {args.data}; {args.n_batches} batch(es) of {args.batch_size}, seed {args.seed}")
    load0, busy0 = os.getloadavg(), cpu_busy_fraction(2.0)
    busy_note = "" if busy0 is None else f"; CPU busy before start (2 s sample, other processes): {100 * busy0:.0f}%"
    print(f"- load average at start (1/5/15 min): {load0[0]:.2f} / {load0[1]:.2f} / {load0[2]:.2f}{busy_note}"
          + ("  **WARNING: the machine is busy; timings will be inflated (try --threads 1)**"
             if (busy0 or 0.0) > 0.15 else ""))
    print(f"- model config: default CrystalformerConfig (H = {config.n_heads}, d_h = {config.head_dim}, "
          f"K = {config.n_basis}); sigma_max = {config.sigma_max:.4f} A; cutoff c = {config.cutoff_sigmas} "
          f"-> r_c = {config.cutoff:.4f} A")
    print("- memory: peak RSS increase over a baseline taken right before one full step "
          "(geometry + forward + backward), each measurement in a fresh spawned child process after a "
          "warm-up step on a 2-crystal batch (VmHWM reset via /proc/self/clear_refs; ru_maxrss fallback)")
    print(f"- timing: median of {args.repeats} (table) / {args.dense_repeats} (dense box) repeats after "
          "one warm-up step (the memory-measured one); geometry = PeriodicGraph.build / "
          "DenseBoxGeometry.build per batch\n")
    sys.stdout.flush()

    crystals, rejected = load_crystals(args.data)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(crystals))
    n_batches = min(args.n_batches, len(crystals) // args.batch_size)
    batches = [[crystals[k] for k in order[b * args.batch_size:(b + 1) * args.batch_size]] for b in range(n_batches)]
    log(f"loaded {len(crystals)} crystals ({rejected} rejected by validate)")

    cut45 = config.cutoff
    table_methods = [{"kind": "table", "c": config.cutoff_sigmas, "label": f"table c={config.cutoff_sigmas:g} "
                      f"(r_c={table_cutoff_for(config, config.cutoff_sigmas):.2f} A)"},
                     {"kind": "table", "c": 6.0, "label": f"table c=6 (r_c={table_cutoff_for(config, 6.0):.2f} A)"}]
    dense_methods = [{"kind": "dense", "box": 2, "label": "dense box R=2 (125 images)"}]
    if not args.no_r3:
        dense_methods.append({"kind": "dense", "box": 3, "label": "dense box R=3 (343 images)"})

    results = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "torch": torch.__version__, "numpy": np.__version__, "cpu_count": os.cpu_count(),
               "threads": args.threads, "batches": [], "layer": {}, "model": {}}

    tables_by_c: dict[float, list] = {}
    batch_info = []
    for b, crys in enumerate(batches):
        tabs, build_s = {}, {}
        for m in table_methods:
            start = time.perf_counter()
            tabs[m["c"]] = [image_table(c.lattice, c.positions, table_cutoff_for(config, m["c"])) for c in crys]
            build_s[m["c"]] = time.perf_counter() - start
        tables_by_c[b] = tabs
        batch_info.append({"batch": b, "crystals": len(crys), "atoms": int(sum(c.n_atoms for c in crys)),
                           "max_atoms": int(max(c.n_atoms for c in crys)),
                           "entries_c4.5": int(sum(len(t) for t in tabs[table_methods[0]["c"]])),
                           "entries_c6": int(sum(len(t) for t in tabs[6.0])),
                           "dense_pairs": dense_pairs(crys),
                           "table_build_s_c4.5": build_s[table_methods[0]["c"]]})
    results["batches"] = batch_info
    print("## Batches\n")
    print(md_table(["batch", "crystals", "atoms N", "max atoms/cell", "table entries c=4.5", "table entries c=6",
                    "dense pairs E", "E x 125", "E x 343", "image tables c=4.5 build (s)"],
                   [[d["batch"], d["crystals"], d["atoms"], d["max_atoms"], f"{d['entries_c4.5']:,}",
                     f"{d['entries_c6']:,}", f"{d['dense_pairs']:,}", f"{d['dense_pairs'] * 125:,}",
                     f"{d['dense_pairs'] * 343:,}", fs(d["table_build_s_c4.5"])] for d in batch_info]))
    print("\nImage tables are built once, offline (preprocessing), so their build time (numpy, one core) is "
          "not in the per-step totals below; see section 5.\n")
    sys.stdout.flush()

    def available_mb():
        try:
            import psutil
            return psutil.virtual_memory().available / MB
        except ImportError:
            return float("inf")

    def measure(what, method, b, state=None):
        crys = batches[b]
        repeats = args.repeats if method["kind"] == "table" else args.dense_repeats
        if method["kind"] == "dense":
            n_img = (2 * method["box"] + 1) ** 3
            est_mb = dense_pairs(crys) * n_img * (config.n_basis + 8) * 4 * 2.0 / MB
            if est_mb > 0.7 * available_mb():
                log(f"  skip {method['label']} on batch {b}: needs ~{est_mb:.0f} MB")
                return {"skipped": f"needs ~{est_mb:.0f} MB"}
        tabs = tables_by_c[b][method.get("c", config.cutoff_sigmas)]
        spec = {"what": what, "method": method, "crystals": crys, "tables": tabs, "threads": args.threads,
                "repeats": repeats, "input_seed": args.seed * 1000 + b, "state": state}
        t0 = time.perf_counter()
        res = run_child(spec)
        log(f"  {what} {method['label']} batch {b}: total {res['total_s']:.3f} s, peak {res['peak_mb']:.0f} MB "
            f"({time.perf_counter() - t0:.1f} s wall)")
        return res

    def aggregate(per_batch: list[dict]) -> dict:
        ok = [r for r in per_batch if "skipped" not in r]
        if not ok:
            return {"skipped": per_batch[0]["skipped"] if per_batch else "not run", "batches": 0}
        mean = lambda key: float(np.mean([r[key] for r in ok]))  # noqa: E731
        return {"batches": len(ok), "geometry_s": mean("geometry_s"), "fwd_bwd_s": mean("fwd_bwd_s"),
                "total_s": mean("total_s"), "peak_mb": float(max(r["peak_mb"] for r in ok)),
                "peak_mb_mean": mean("peak_mb"), "geometry_resident_mb": mean("geometry_resident_mb"),
                "memory_method": ok[0]["memory_method"], "per_batch": per_batch}

    # ---------------------------------------------------------------- 1. layer
    if "layer" in sections:
        log("section 1: one attention layer")
        for method in table_methods + dense_methods:
            per = []
            for b in range(n_batches):
                if method["kind"] == "dense" and method["box"] >= 3 and b >= args.slow_batches:
                    continue
                per.append(measure("layer", method, b))
            results["layer"][method["label"]] = aggregate(per)
        print_layer_table(results["layer"], "## 1. One attention layer, forward + backward (float32)",
                          "geometry (PeriodicGraph / DenseBoxGeometry .build)")

    # ---------------------------------------------------------------- 2. model
    if "model" in sections:
        log("section 2: whole model")
        torch.manual_seed(args.seed)
        model = Crystalformer(config)
        model.train()
        model.fit_sigma_statistics(collate(batches[0], tables_by_c[0][config.cutoff_sigmas]))
        assert model.sigma_stats_ready
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        state = buf.getvalue()
        model_methods = [{"kind": "table", "c": config.cutoff_sigmas, "label": table_methods[0]["label"]},
                         dense_methods[0]]
        if not args.no_ckpt:
            model_methods += [dict(m, ckpt=True, label=m["label"] + " + activation checkpointing")
                              for m in model_methods]
        for method in model_methods:
            n = min(args.slow_batches, n_batches) if method.get("ckpt") else n_batches
            per = [measure("model", method, b, state) for b in range(n)]
            results["model"][method["label"]] = aggregate(per)
        print_layer_table(results["model"], "## 2. Whole model (default Crystalformer, 4 blocks), forward + "
                          "backward (float32, train mode, loss = mean of output)", "geometry (backend.prepare)")

    # ---------------------------------------------------------------- 3. accuracy
    if "accuracy" in sections:
        log("section 3: accuracy")
        acc_batches = []
        for b in range(min(args.accuracy_batches, n_batches)):
            acc_batches.append(accuracy_section(batches[b], config, args.seed * 1000 + b, args.exact_cutoff,
                                                table_methods + dense_methods, log))
        results["accuracy"] = acc_batches
        print_accuracy(acc_batches, config)

    # ---------------------------------------------------------------- 4. ratios
    if "layer" in sections or "model" in sections:
        pairs = [("layer", table_methods[0]["label"], m["label"]) for m in dense_methods]
        pairs += [("model", m["label"], d["label"]) for m, d in zip(model_methods[0::2], model_methods[1::2])
                  ] if "model" in sections else []
        results["ratios"] = print_ratios(results, pairs)

    # ---------------------------------------------------------------- 5. tables
    if "tables" in sections:
        log("section 5: image-table throughput")
        tp = throughput_section(crystals, cut45, args.max_atoms, args.table_limit or None, args.table_passes, log)
        results["tables"] = tp
        print_throughput(tp)
        torch.set_num_threads(args.threads)

    results["runtime_s"] = time.perf_counter() - wall0
    results["loadavg_start"], results["loadavg_end"] = load0, os.getloadavg()
    results["cpu_busy_before_start"] = busy0
    print(f"\nTotal runtime: {results['runtime_s']:.1f} s; load average at the end (1/5/15 min): "
          + " / ".join(f"{x:.2f}" for x in results["loadavg_end"])
          + f" (this benchmark itself adds ~{args.threads}).")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=_json_default))
        print(f"JSON written to {args.json}")
    return results


def cpu_busy_fraction(seconds: float) -> float | None:
    """Fraction of all cores busy (user + nice + system + irq) over ``seconds``, from /proc/stat."""
    def sample():
        with open("/proc/stat") as fh:
            vals = [int(v) for v in fh.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals[:8]), idle
    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    return str(obj)


def print_layer_table(res: dict, title: str, geometry_label: str) -> None:
    print(title + "\n")
    rows = []
    for label, r in res.items():
        if "skipped" in r:
            rows.append([label, "-", "-", "-", "-", "-", f"skipped: {r['skipped']}"])
            continue
        rows.append([label, fs(r["geometry_s"]), fs(r["fwd_bwd_s"]), fs(r["total_s"]), f"{r['peak_mb']:.0f}",
                     fs(r["geometry_resident_mb"], 0), str(r["batches"])])
    print(md_table(["method", f"{geometry_label} (s)", "fwd+bwd (s)", "total (s)", "peak RSS increase (MB)",
                    "geometry resident (MB)", "batches"], rows))
    print("\nTimes: mean over batches of the per-batch median; peak: max over batches.\n")
    sys.stdout.flush()


def print_accuracy(acc_batches: list[dict], config: CrystalformerConfig) -> None:
    print("## 3. Accuracy vs float64 brute force\n")
    for k, acc in enumerate(acc_batches):
        chk = acc["reference_check"]
        print(f"Batch {k}: {acc['pairs']:,} atom pairs x {acc['heads']} heads; sigma ~ U[{SIGMA_MIN}, "
              f"{config.sigma_max:.2f}] A; exact = float64 efficient op on a {acc['exact_cutoff']:g} A table "
              f"(max |y_exact| = {acc['y_exact_max_abs']:.3f}). Check of the exact path against "
              f"reference_periodic_attention on {len(chk['crystals'])} crystals ({chk['atoms']} atoms, "
              f"{chk['entries']:,} entries): max |diff| = {fe(chk['max_abs_diff'])}.\n")
        rows = [[r["method"], f"{r['entries']:,}", str(r["pairs_missing"]), fe(r["shortfall_max"]),
                 fe(r["shortfall_median"]), fe(r["rel_shortfall_max"]), fe(r["y_err_f64"]),
                 "-" if math.isnan(r["y_err_f32"]) else fe(r["y_err_f32"])] for r in acc["rows"]]
        print(md_table(["method", "terms (entries / pairs x images)", "pairs with no term",
                        "S shortfall max", "S shortfall median", "max rel. shortfall (pairs with terms)",
                        "max |y - y_exact| (op f64)", "max |y - y_exact| (op f32)"], rows))
        print("\nS = sum over images of exp(a d^2) per (pair, head), float64; shortfall = S_exact - S_method "
              "(the self term alone is 1); rel. shortfall = shortfall / S_exact = the error of alpha = log S. "
              "'op f64' isolates truncation; 'op f32' is the float32 op as timed above (float32 rounding "
              "floor ~2e-6).\n")
    sys.stdout.flush()


def print_ratios(results: dict, pairs: list[tuple[str, str, str]]) -> dict:
    """Dense-box / table ratios, each on the batches both rows ran on (slow rows run on fewer)."""
    print("## 4. Ratios dense box / table (c=4.5)\n")
    rows, out = [], {}
    for section, table_label, label in pairs:
        res = results.get(section, {})
        base, r = res.get(table_label), res.get(label)
        if not base or "skipped" in base or not r or "skipped" in r:
            continue
        n = min(r["batches"], base["batches"])
        tb, rb = base["per_batch"][:n], r["per_batch"][:n]
        mean = lambda rs, key: float(np.mean([x[key] for x in rs]))  # noqa: E731
        ratio_t = mean(rb, "total_s") / mean(tb, "total_s")
        ratio_fb = mean(rb, "fwd_bwd_s") / mean(tb, "fwd_bwd_s")
        ratio_m = max(x["peak_mb"] for x in rb) / max(x["peak_mb"] for x in tb)
        out[f"{section}: {label} / {table_label}"] = {"time": ratio_t, "fwd_bwd_time": ratio_fb,
                                                      "peak_memory": ratio_m, "batches": n}
        rows.append([section, f"{label} / {table_label}", f"{ratio_t:.1f}x", f"{ratio_fb:.1f}x",
                     f"{ratio_m:.1f}x", str(n)])
    print(md_table(["section", "dense box / table", "total time ratio", "fwd+bwd time ratio (excl. geometry)",
                    "peak memory ratio", "batches"], rows))
    print("\nTarget: >= 10x on time and memory.\n")
    sys.stdout.flush()
    return out


def print_throughput(tp: dict) -> None:
    print(f"## 5. Image-table construction, one core ({tp['structures']} structures, <= {tp['max_atoms']} "
          f"atoms, r_c = {tp['cutoff']:.4f} A; best of {tp['passes']} passes, inputs prepared untimed)\n")
    base = tp["methods"]["cfdist image_table"]
    base_rate = tp["structures"] / base["seconds"]
    rows = []
    for label, r in tp["methods"].items():
        if "error" in r:
            rows.append([label, "-", "-", "-", "-", r["error"]])
            continue
        rate = tp["structures"] / r["seconds"]
        check = "-" if label == "cfdist image_table" else (
            f"{r['count_mismatches']} count / {r['entry_set_mismatches']} entry-set mismatches")
        rows.append([label + (" (incl. N self images)" if r["self_images"] else " (excl. self images)"),
                     f"{rate:,.0f}", f"{r['entries'] / tp['structures']:,.0f}", f"{r['seconds']:.2f}",
                     f"{base_rate / rate:.2f}x" if label != "cfdist image_table" else "1.00x", check])
    print(md_table(["method", "structures/s", "entries/structure", "seconds", "speed of image_table / this", "check vs ours"],
                   rows))
    for label, r in tp["methods"].items():
        if r.get("mismatch_examples"):
            print(f"\n{label} mismatches (first {len(r['mismatch_examples'])}): {r['mismatch_examples']}")
    print()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
