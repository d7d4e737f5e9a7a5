#!/usr/bin/env python
"""Training-step time of the whole model, eager vs ``torch.compile`` (``compute.compile``), on real crystals.

    python bench/step.py                      # default + simplified model (~5 min on 2 shared cores)
    python bench/step.py --quick              # smoke run: 2 timing batches, 20 recompile batches, no float64
    python bench/step.py --sections time,recompiles --models default --json out.json

What it measures, for the default Crystalformer (853,505 parameters) and the paper's simplified one
(no edge encoding, K = 0), on batches of real MEGNet-slice structures (``examples/data``; image
tables at the model's cutoff, built untimed):

1. ``time``: one training step = geometry + forward + backward (loss = mean squared output; no
   optimiser), float32, train mode, sigma statistics fitted beforehand. Eager and compiled run side by
   side in this process on the same ``--timing-batches`` batches of ``--batch`` structures, each
   batch ``--repeats`` times, alternating eager and compiled per batch (so load changes hit both
   alike); the median per-step time of each is reported, with structures/s and the compiled
   speed-up. The compile time is reported separately: the wall time of the first compiled step
   minus the median compiled step. The inductor cache goes to a fresh directory (cold compile)
   unless ``--warm-cache``, with the graph breaks of the first compiled step. The collate (CPU: the
   batch's arrays and its pair / block indices, outside the step) is timed apart.
2. ``numerics``: the largest relative difference compiled vs eager of the outputs and of the
   gradients over the timing batches (float32), and for the default model also in float64 (a
   separate compile).
3. ``recompiles``: the compiled model trains on ``--recompile-batches`` (200) random real batches of
   8-``--batch`` structures (every one a new shape: crystals, atoms, entries, pairs); the table
   lists how many Dynamo compilations happened after the first batch (and why, if any).
4. ``profile``: ``torch.profiler`` self-CPU-time tables of the top operators, eager vs compiled, over
   the timing batches (default model), to show where the time goes.

Numbers depend on the machine and its load: the header prints the thread count and the load
average (also at the end); on a shared machine compare only the ratios, which are measured side by
side. ``--json`` writes every number.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = Path("examples/data/megnet_slice.json.gz")  # relative to the repository root
MODELS = {"default": {}, "simplified": {"n_basis": 0}}  # = configs/model/crystalformer{,_simplified}.yaml


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--models", default="default,simplified", help="any of default,simplified")
    p.add_argument("--sections", default="time,numerics,recompiles,profile")
    p.add_argument("--batch", type=int, default=64, help="structures per timing batch")
    p.add_argument("--timing-batches", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="timed steps per timing batch and mode")
    p.add_argument("--recompile-batches", type=int, default=200)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on a shared machine)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    p.add_argument("--warm-cache", action="store_true", help="keep the default inductor cache (no cold compile)")
    p.add_argument("--no-float64", action="store_true", help="skip the float64 numerics compile")
    p.add_argument("--quick", action="store_true", help="2 timing batches x 1 repeat, 20 recompile batches, no float64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.timing_batches, args.repeats, args.recompile_batches, args.no_float64 = 2, 1, 20, True
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not args.warm_cache:  # before torch imports inductor: a cold compile is what a new run pays
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="cfdist-step-inductor-")
    import numpy as np
    import torch

    import cfdist
    from cfdist import Crystalformer, CrystalformerConfig, collate, image_table
    from cfdist.compile import CompileLog, compile_model
    from cfdist.crystal import InvalidCrystalError, from_jarvis, validate

    torch.set_num_threads(args.threads)
    sections = set(args.sections.split(","))
    t_start = time.perf_counter()
    print(f"# bench/step.py: {' '.join(sys.argv[1:]) or '(defaults)'}")
    print(f"torch {torch.__version__}, cfdist {cfdist.__version__}, Python {platform.python_version()}, "
          f"{platform.machine()} {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"compile backend {args.backend}, inductor cache {'warm (default dir)' if args.warm_cache else 'cold (fresh dir)'}")
    print(f"load average at start (1/5/15 min): {'/'.join(f'{x:.2f}' for x in os.getloadavg())} "
          "(other processes share this machine: compare ratios, not absolute times)\n")

    with gzip.open(args.data, "rt") as fh:
        records = json.load(fh)
    rng = np.random.default_rng(args.seed)
    cutoff = CrystalformerConfig().cutoff  # both models share it (n_basis does not change the cutoff)
    pool_size = max(args.batch * args.timing_batches, 600)
    crystals = []
    for k in rng.permutation(len(records)):
        try:
            rec = records[k]
            crystals.append(validate(from_jarvis(rec["atoms"], id=rec["id"], labels={"e_form": rec["e_form"]})))
        except InvalidCrystalError:
            continue
        if len(crystals) == pool_size:
            break
    tables = [image_table(c.lattice, c.positions, cutoff) for c in crystals]

    def make_batch(indices, dtype):
        return collate([crystals[i] for i in indices], [tables[i] for i in indices], ["e_form"]).to(dtype=dtype)

    timing_idx = [list(range(b * args.batch, (b + 1) * args.batch)) for b in range(args.timing_batches)]
    recompile_idx = [rng.choice(len(crystals), int(rng.integers(8, args.batch + 1)), replace=False)
                     for _ in range(args.recompile_batches)]

    def step(model, batch):
        """Geometry + forward + backward; returns (output, flat gradient)."""
        model.zero_grad(set_to_none=True)
        y = model(batch)
        (y.float() ** 2).mean().backward()
        return y.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    def rel(a, b):
        return float((a.double() - b.double()).abs().max() / b.double().abs().max())

    def models_for(name, dtype):
        """(eager, compiled) with the same weights and sigma statistics (fitted before compiling)."""
        torch.manual_seed(args.seed)
        eager = Crystalformer(CrystalformerConfig(target_names=["e_form"], **MODELS[name])).to(dtype).train()
        eager.fit_sigma_statistics(make_batch(timing_idx[0], dtype))
        compiled = compile_model(copy.deepcopy(eager), backend=args.backend)
        return eager, compiled

    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "models": {}}
    for name in args.models.split(","):
        res = results["models"][name] = {}
        print(f"## {name} model ({sum(p.numel() for p in Crystalformer(CrystalformerConfig(**MODELS[name])).parameters()):,} "
              f"parameters), float32", flush=True)
        torch._dynamo.reset()  # each model compiles from scratch (the on-disk inductor cache stays)
        collate_s = []
        for ix in timing_idx:
            t0 = time.perf_counter()
            make_batch(ix, torch.float32)
            collate_s.append(time.perf_counter() - t0)
        batches = [make_batch(ix, torch.float32) for ix in timing_idx]
        res["timing_batches"] = [{"structures": b.n_crystals, "atoms": int(b.positions.shape[0]),
                                  "entries": b.n_entries} for b in batches]
        eager, compiled = models_for(name, torch.float32)
        log = CompileLog().start()
        t0 = time.perf_counter()
        step(compiled, batches[0])
        first_compiled = time.perf_counter() - t0
        first_compiles, graph_breaks = log.update().compiles, log.graph_breaks
        times = {"eager": [], "compiled": []}
        errs = {"output": 0.0, "grad": 0.0}
        for batch in batches:
            for _ in range(args.repeats):
                for mode, model in (("eager", eager), ("compiled", compiled)):
                    t0 = time.perf_counter()
                    out = step(model, batch)
                    times[mode].append(time.perf_counter() - t0)
                    if mode == "eager":
                        want = out
                errs["output"] = max(errs["output"], rel(out[0], want[0]))
                errs["grad"] = max(errs["grad"], rel(out[1], want[1]))
        med = {mode: statistics.median(v) for mode, v in times.items()}
        res.update(eager_s=med["eager"], compiled_s=med["compiled"], speedup=med["eager"] / med["compiled"],
                   structures_per_s_eager=args.batch / med["eager"], structures_per_s_compiled=args.batch / med["compiled"],
                   compile_s=first_compiled - med["compiled"], first_compile_graphs=first_compiles,
                   graph_breaks=graph_breaks, collate_s=statistics.median(collate_s),
                   fp32_rel_err_output=errs["output"], fp32_rel_err_grad=errs["grad"], step_times=times)
        print(f"step: eager {1e3 * med['eager']:.0f} ms, compiled {1e3 * med['compiled']:.0f} ms "
              f"(x{res['speedup']:.2f}); compile {res['compile_s']:.0f} s ({first_compiles} frames, {graph_breaks} graph "
              f"breaks); collate {1e3 * res['collate_s']:.0f} ms (CPU, outside the step); "
              f"fp32 max rel err output {errs['output']:.1e}, grad {errs['grad']:.1e}", flush=True)

        if "recompiles" in sections:
            log = CompileLog().start()
            t0 = time.perf_counter()
            for ix in recompile_idx:
                step(compiled, make_batch(ix, torch.float32))
            log.update()
            sizes = [len(ix) for ix in recompile_idx]
            res.update(recompile_batches=len(recompile_idx), recompiles=log.compiles, recompile_reasons=log.reasons(),
                       recompile_loop_s=time.perf_counter() - t0, recompile_batch_sizes=[min(sizes), max(sizes)])
            print(f"recompiles over {len(recompile_idx)} random real batches ({min(sizes)}-{max(sizes)} structures): "
                  f"{log.compiles} compilations", flush=True)
            for reason in log.reasons()[:5]:
                print(f"  {reason}")

        if "profile" in sections and name == "default":
            from torch.profiler import ProfilerActivity, profile

            res["profile"] = {}
            for mode, model in (("eager", eager), ("compiled", compiled)):
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for batch in batches:
                        step(model, batch)
                table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60)
                res["profile"][mode] = table
                print(f"\n### torch.profiler, {mode}, {len(batches)} steps (top 15 by self CPU time)\n```\n{table}\n```")

        if "numerics" in sections and name == "default" and not args.no_float64:
            eager64, compiled64 = models_for(name, torch.float64)
            t0 = time.perf_counter()
            worst = {"output": 0.0, "grad": 0.0}
            for ix in timing_idx:
                batch = make_batch(ix, torch.float64)
                (y0, g0), (y1, g1) = step(eager64, batch), step(compiled64, batch)
                worst["output"], worst["grad"] = max(worst["output"], rel(y1, y0)), max(worst["grad"], rel(g1, g0))
            res.update(fp64_rel_err_output=worst["output"], fp64_rel_err_grad=worst["grad"],
                       fp64_compile_and_check_s=time.perf_counter() - t0)
            print(f"float64: max rel err output {worst['output']:.1e}, grad {worst['grad']:.1e} "
                  f"({res['fp64_compile_and_check_s']:.0f} s with its compile)", flush=True)
        del eager, compiled
        print(flush=True)

    print_table(results, args)
    results["load_average_end"] = os.getloadavg()
    results["wall_s"] = time.perf_counter() - t_start
    print(f"\nload average at end (1/5/15 min): {'/'.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"total {results['wall_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return results


def print_table(results: dict, args) -> None:
    rows = []
    for name, r in results["models"].items():
        rows.append([name, f"{1e3 * r['eager_s']:.0f}", f"{1e3 * r['compiled_s']:.0f}", f"{r['speedup']:.2f}",
                     f"{r['structures_per_s_eager']:.0f}", f"{r['structures_per_s_compiled']:.0f}",
                     f"{r['compile_s']:.0f}",
                     f"{r['recompiles']} / {r['recompile_batches']}" if "recompiles" in r else "-",
                     f"{r['fp32_rel_err_output']:.0e} / {r['fp32_rel_err_grad']:.0e}",
                     f"{r['fp64_rel_err_output']:.0e} / {r['fp64_rel_err_grad']:.0e}" if "fp64_rel_err_output" in r else "-"])
    head = ["model", "eager ms/step", "compiled ms/step", "speed-up", "eager structures/s", "compiled structures/s",
            "compile s", "recompilations / batches", "fp32 max rel err out / grad", "fp64 max rel err out / grad"]
    print(f"## Training step (geometry + forward + backward), batches of {args.batch} real structures, float32, "
          f"torch threads {args.threads}; medians of {args.timing_batches} batches x {args.repeats} repeats")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
