"""Shards and checkpoints on object storage vs local disk: moto's S3 server and the fake GCS server on loopback.

    python bench/storage.py                  # 1,000 real crystals of the MEGNet slice, 4 shards (~1 min, 2 cores)
    python bench/storage.py --n 3909 --shard-size 1000
    python bench/storage.py --stores s3      # only local vs S3

Measures, side by side on the same files (a local directory, ``s3://`` on a moto server and
``gs://`` on the fake GCS server, both started here on 127.0.0.1 by ``tests/storage_servers.py``
and stopped at the end):

1. the shard check of ``cfdist pretrain`` (:meth:`cfdist.manifest.ShardSet.verify`): first check
   (sizes, footers, sha256 of every file) and the cached re-check (records keyed by size + ETag);
2. one epoch of the training stream (:mod:`cfdist.stream`, the megnet_slice budget: 128
   structures per batch): batches, time per batch, and the bytes the reads fetch per batch
   (footers + the column chunks of the row groups decoded: ``RowGroupReader.bytes_read``);
3. checkpoint upload: a checkpoint directory of the default model (weights + AdamW moments, as
   DeepSpeed writes them) copied with ``pyarrow.fs.copy_files`` (what Ray Train's persistence does).

Numbers are loopback: they measure the client path (requests, copies, hashing), not a network.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_shards(out: Path, n: int, shard_size: int) -> None:
    from cfdist.config import CrystalformerConfig
    from cfdist.crystal import from_jarvis
    from cfdist.geometry import image_table
    from cfdist.manifest import shard_record, write_manifest
    from cfdist.preprocess.statistics import StatsAccumulator
    from cfdist.shards import crystals_to_arrow, shard_metadata, write_shard

    with gzip.open(ROOT / "examples/data/megnet_slice.json.gz", "rt") as fh:
        records = json.load(fh)[:n]
    cutoff = CrystalformerConfig().cutoff
    crystals = [from_jarvis(r["atoms"], id=r["id"], labels={"e_form": r["e_form"]}) for r in records]
    shards, stats = [], StatsAccumulator(["e_form"])
    for k, lo in enumerate(range(0, len(crystals), shard_size)):
        part = crystals[lo:lo + shard_size]
        tables = [image_table(c.lattice, c.positions, cutoff) for c in part]
        arrow = crystals_to_arrow(part, tables, [c.id for c in part], ["e_form"])
        rel = f"train/part-{k:06d}.parquet"
        write_shard(out / rel, arrow, shard_metadata(cutoff, ["e_form"], chunk=k, split="train"))
        shards.append(shard_record(out, rel, "train", len(part)))
        stats.add("train", arrow)
    write_manifest(out, cutoff=cutoff, targets=["e_form"], shards=shards, statistics=stats.summary())


def stream_epoch(root: str) -> dict:
    from cfdist.data import BatchBudget, training_columns
    from cfdist.manifest import ShardSet
    from cfdist.shards import read_schema
    from cfdist.stream import EpochPlan, RowGroupReader, epoch_batches

    shards = ShardSet(root)
    files = [(e.path, e.rows) for e in shards.files("train")]
    columns = training_columns(read_schema(files[0][0]), ["e_form"])
    plan = EpochPlan(files, seed=0, epoch=0, rank=0, world_size=1, window=2048, lanes=4, shuffle_files=True,
                     shuffle_rows=True)
    reader = RowGroupReader(columns, cache=6)  # the trainer's cache: shuffle_lanes + 2
    t0, batches = time.perf_counter(), 0
    for _table, _pos in epoch_batches(plan, reader, BatchBudget(max_atoms=4096, max_structures=128)):
        batches += 1
    seconds = time.perf_counter() - t0
    return {"batches": batches, "s_per_batch": seconds / batches, "bytes_per_batch": reader.bytes_read / batches,
            "bytes_read": reader.bytes_read, "shard_bytes": sum(e.bytes for e in shards.files("train"))}


def checkpoint_dir(out: Path) -> int:
    """Weights + AdamW moments of the default model after one step (what a checkpoint holds)."""
    import torch

    from cfdist.config import CrystalformerConfig
    from cfdist.model import Crystalformer

    model = Crystalformer(CrystalformerConfig(target_names=["e_form"]))
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "model_states.pt")
    torch.save(opt.state_dict(), out / "optim_states.pt")
    return sum(f.stat().st_size for f in out.iterdir())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--stores", default="s3,gs", help="object stores to compare with local disk (s3, gs)")
    args = parser.parse_args()
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    from storage_servers import gcs_server, s3_server

    from cfdist import storage
    from cfdist.manifest import ShardSet

    rows, uploads = {}, {}
    with tempfile.TemporaryDirectory(prefix="cfdist-bench-storage-") as tmp:
        tmp = Path(tmp)
        os.environ["CFDIST_CACHE_DIR"] = str(tmp / "cache")
        local = tmp / "shards"
        build_shards(local, args.n, args.shard_size)
        ckpt = tmp / "ckpt"
        size = checkpoint_dir(ckpt)
        stream_epoch(str(local))  # warm-up (imports, allocator): not counted

        def measure(name: str, root: str) -> None:
            shards = ShardSet(root)
            first = shards.verify(["train"], checksums="full")
            again = shards.verify(["train"])
            rows[name] = (first.seconds, again.seconds, stream_epoch(root))

        measure("local", str(local))
        for scheme in stores:
            with (s3_server() if scheme == "s3" else gcs_server()) as server:
                storage.StorageSection().apply()  # this server's variables: drop cached filesystems
                bucket = server.make_bucket("cfdist-bench")
                t0 = time.perf_counter()
                storage.upload_tree(local, f"{bucket}/shards", skip=(".verified.json",))
                shard_s = time.perf_counter() - t0
                name = f"{scheme} ({'moto' if scheme == 's3' else 'fake-gcs-server'})"
                measure(name, f"{bucket}/shards")
                t0 = time.perf_counter()
                storage.upload_tree(ckpt, f"{bucket}/runs/r/ray/checkpoint_000000001")
                uploads[name] = (shard_s, time.perf_counter() - t0)
    total = rows["local"][2]["shard_bytes"]
    print(f"# {args.n} crystals, {-(-args.n // args.shard_size)} shards, {total / 1e6:.2f} MB; "
          f"command: python bench/storage.py --n {args.n} --shard-size {args.shard_size} --stores {args.stores}; "
          f"load average {os.getloadavg()[0]:.2f}\n")
    print("| storage | shard check (sha256 all) s | cached re-check s | batches | s/batch | bytes read/batch | "
          "read/total | shard upload s | checkpoint upload s |\n|---|---|---|---|---|---|---|---|---|")
    for name, (first, again, e) in rows.items():
        up = uploads.get(name)
        print(f"| {name} | {first:.3f} | {again:.3f} | {e['batches']} | {e['s_per_batch']:.4f} | "
              f"{e['bytes_per_batch']:,.0f} | {e['bytes_read'] / e['shard_bytes']:.2f} | "
              f"{f'{up[0]:.2f}' if up else '-'} | {f'{up[1]:.2f}' if up else '-'} |")
    lf, la, le = rows["local"]
    for name in uploads:
        sf, sa, se = rows[name]
        print(f"\nratios {name}/local: shard check {sf / lf:.1f}x, cached re-check {sa / la:.1f}x, "
              f"time per batch {se['s_per_batch'] / le['s_per_batch']:.2f}x")
    print(f"\nshards {total / 1e6:.2f} MB; checkpoint (default model + AdamW moments) {size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
