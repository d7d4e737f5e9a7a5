"""Peak memory per image-table entry of one training step, with and without forces / stress
(the measurement behind ``data.force_memory_factor``).

    python tests/scripts/force_memory.py SHARDS MODE [ROWS]      MODE: property | energy | forces | forces+stress

Each mode must run in a fresh process (peak RSS is per process). It reads the first ROWS (default 32)
train rows, builds the paper's architecture (with ``cutoff_sigmas`` lowered to fit the shards' cutoff),
runs one forward + backward in training mode (the forces' graph kept for the double backward) and
prints one JSON line: {"mode", "entries", "atoms", "baseline_mb", "peak_mb", "step_mb", "kb_per_entry"}.
"""

from __future__ import annotations

import json
import math
import resource
import sys


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from cfdist.config import CrystalformerConfig
    from cfdist.manifest import ShardSet
    from cfdist.model import Crystalformer
    from cfdist.shards import collate_arrow

    shards, mode = ShardSet(sys.argv[1]), sys.argv[2]
    rows = int(sys.argv[3]) if len(sys.argv) > 3 else 32
    table = pa.concat_tables([pq.read_table(e.path) for e in shards.files("train")]).slice(0, rows)
    batch = collate_arrow(table, ["energy"], cutoff=shards.cutoff, forces=True, stress=True)
    base = CrystalformerConfig()
    sigmas = math.floor(shards.cutoff / base.sigma_max * 1000) / 1000
    energy = mode != "property"
    config = CrystalformerConfig(cutoff_sigmas=min(base.cutoff_sigmas, sigmas), energy=energy,
                                 target_names=[] if energy else ["y"])
    torch.manual_seed(0)
    model = Crystalformer(config).train()
    with torch.no_grad():  # warm-up forward on one crystal: sigma statistics, allocator
        small = collate_arrow(table.slice(0, 1), ["energy"], cutoff=shards.cutoff)
        model(small) if not energy else model(small).energy
    baseline = rss_mb()
    if mode == "property":
        loss = model(batch).sum()
    else:
        out = model(batch, forces="forces" in mode, stress="stress" in mode)
        loss = out.energy.sum() * 1e-3
        if out.forces is not None:
            loss = loss + out.forces.pow(2).sum()
        if out.stress is not None:
            loss = loss + out.stress.pow(2).sum()
    loss.backward()
    peak = rss_mb()
    print(json.dumps({"mode": mode, "entries": batch.n_entries, "atoms": int(batch.n_atoms.sum()),
                      "baseline_mb": round(baseline, 1), "peak_mb": round(peak, 1),
                      "step_mb": round(peak - baseline, 1), "kb_per_entry": round((peak - baseline) * 1024 / batch.n_entries, 3)}))


if __name__ == "__main__":
    main()
