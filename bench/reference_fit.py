"""Start-up cost of an energy run's reference energies: the pass over the train split (what
pretraining did before the manifest carried the sums) vs solving the sums the preprocessing job
wrote into the manifest (``statistics.element_fit``, what pretraining does now), side by side on
the same shards at each size.

    python bench/reference_fit.py --sizes 10000,100000          # ~10 min on 2 cores
    python bench/reference_fit.py --sizes 1000000 --work /big   # ~1.5 h: generation + preprocessing dominate

For each N: ``bench/make_corpus.py`` writes N structures (JSON lines with a total ``energy``),
``cfdist preprocess`` builds shards with target ``energy`` (in this process), then each method
runs ``--repeats`` times (fresh ``ShardSet`` each time; the page cache is warm for both, which
flatters the pass: on network storage it reads ~ 0.5 GB per million structures). Prints one
Markdown row per N: structures in the train split, seconds per method (best of the repeats), the
ratio, and the largest difference between the two sets of reference energies (eV/atom).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def shards_for(n: int, work: Path) -> Path:
    corpus, out = work / f"corpus-{n}", work / f"shards-{n}"
    if not (corpus / "corpus.yaml").is_file():
        subprocess.run([sys.executable, "bench/make_corpus.py", "--out", str(corpus), "--n", str(n), "--format",
                        "jsonl", "--no-progress", "--overwrite"], cwd=REPO, env=ENV, check=True)
    if not (out / "manifest.json").is_file():
        from cfdist.config import CrystalformerConfig
        from cfdist.preprocess.job import Settings, build

        build([str(p) for p in sorted(corpus.glob("*.jsonl"))], out,
              Settings(cutoff=CrystalformerConfig().cutoff, targets=["energy"]), in_process=True)
    return out


def measure(shards: Path, repeats: int) -> dict:
    import numpy as np

    from cfdist.manifest import ShardSet
    from cfdist.preprocess.element_fit import ElementFitSums, solve
    from cfdist.run.objective import fit_element_energies

    times = {"pass": [], "manifest": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        sset = ShardSet(shards)
        by_pass = fit_element_energies([e.path for e in sset.files("train")], "energy", 118)
        times["pass"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sset = ShardSet(shards)
        by_manifest = solve(ElementFitSums.from_dict(sset.element_fit("energy")), 118)
        times["manifest"].append(time.perf_counter() - t0)
    diff = float(np.abs(by_pass["element_energy"] - by_manifest["element_energy"]).max())
    return {"structures": by_pass["structures"], "pass_s": min(times["pass"]),
            "manifest_s": min(times["manifest"]), "max_diff_ev": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--work", default="/tmp/cfdist-reference-fit")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"load average {os.getloadavg()}", flush=True)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        result = {"n": n, **measure(shards_for(n, work), args.repeats)}
        print(json.dumps(result), flush=True)
        rows.append(result)
    print("\n| N | train structures | pass over the train split (s) | from the manifest (s) | ratio | max |diff| (eV/atom) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']:,} | {r['structures']:,} | {r['pass_s']:.2f} | {r['manifest_s']:.3f} | "
              f"{r['pass_s'] / r['manifest_s']:.0f}x | {r['max_diff_ev']:.1e} |")


if __name__ == "__main__":
    main()
