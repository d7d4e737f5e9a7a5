"""What bf16 costs in force accuracy: one portable energy checkpoint evaluated in float32 and in
bfloat16 (weights and atom states bf16; geometry, forces and the energy sum stay float32 / float64 as
the model keeps them) on a shard split.

    python tests/scripts/bf16_forces.py MODEL.pt SHARDS [SPLIT ...]

Prints one JSON line per split: force / stress / energy MAE against the labels in both precisions and
the mean |F_bf16 - F_fp32| (meV/A).
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from cfdist.checkpoint import load
    from cfdist.manifest import ShardSet
    from cfdist.run.objective import EV_PER_A3_IN_GPA
    from cfdist.shards import collate_arrow

    model_path, shards = sys.argv[1], ShardSet(sys.argv[2])
    for split in sys.argv[3:] or ["train", "val"]:
        table = pa.concat_tables([pq.read_table(e.path) for e in shards.files(split)])
        batch = collate_arrow(table, ["energy"], cutoff=shards.cutoff, forces=True, stress=True)
        outs = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            model = load(model_path).to(dtype).eval()
            with torch.enable_grad():
                out = model.energy_forward(batch, forces=True, stress=True, create_graph=False)
            outs[name] = (out.energy.detach().double(), out.forces.detach().double(), out.stress.detach().double())
        n = batch.n_atoms.double()
        row = {"split": split, "structures": batch.n_crystals, "atoms": int(n.sum())}
        for name, (e, f, s) in outs.items():
            row[f"{name}_force_mae_mev_per_A"] = float((f - batch.forces).abs().nanmean()) * 1000
            row[f"{name}_stress_mae_gpa"] = float((s - batch.stress).abs().nanmean()) * EV_PER_A3_IN_GPA
            row[f"{name}_energy_mae_mev_per_atom"] = float(((e - batch.labels[:, 0]) / n).abs().mean()) * 1000
        row["force_diff_mev_per_A"] = float((outs["bf16"][1] - outs["fp32"][1]).abs().mean()) * 1000
        row["force_rms_mev_per_A"] = float(outs["fp32"][1].pow(2).mean().sqrt()) * 1000
        row["energy_diff_mev_per_atom"] = float(((outs["bf16"][0] - outs["fp32"][0]) / n).abs().mean()) * 1000
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))


if __name__ == "__main__":
    main()
