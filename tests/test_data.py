"""Shards -> training batches (cfdist.data): manifest verification, packing budgets, plain streaming
(the training stream's order and resume: test_stream.py).

Real shards are built without Ray by the ``shard_dir`` fixture (conftest.py): crystals_to_arrow +
write_shard + a manifest.json in the format of preprocess/build_shards.py's ``finalize``.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cfdist.manifest import ShardSet
from cfdist.data import BatchBudget, PackStats, iter_local_shards, pack_boundaries, pack_rows, training_columns
from cfdist.shards import SCHEMA_VERSION, ShardError, collate_arrow

from conftest import CUTOFF, TARGETS


@pytest.fixture()
def shard_copy(shard_dir, tmp_path):
    """A private copy of the shard directory that a test may damage."""
    dst = tmp_path / "shards"
    shutil.copytree(shard_dir, dst)
    return dst


def _ids(tables) -> list[str]:
    return [i for t in tables for i in t["id"].to_pylist()]


def _stream(shard_dir, split="train", rows_per_read=5):
    sset = ShardSet(shard_dir)
    paths = [e.path for e in sset.files(split)]
    cols = training_columns(pq.read_schema(paths[0]), TARGETS)
    return list(iter_local_shards(paths, columns=cols, rows_per_read=rows_per_read))


@pytest.fixture(scope="session")
def train_rows(megnet_crystals):
    return [c.id for c in megnet_crystals[:48]]


# ----------------------------------------------------------------------------- manifest
def test_manifest_is_read_and_good_shards_verify(shard_dir, megnet_crystals):
    sset = ShardSet(shard_dir)
    assert sset.cutoff == CUTOFF and sset.targets == TARGETS
    assert sset.n_rows("train") == 48 and sset.n_rows("val") == 12 and sset.n_rows("test") == 0
    assert [e.path.name for e in sset.files("val")] == ["part-000004.parquet", "part-000005.parquet"]
    labels = [c.labels["e_form"] for c in megnet_crystals[:48]]
    mean, std = sset.target_stats("e_form", "train")
    assert mean == pytest.approx(np.mean(labels)) and std == pytest.approx(np.std(labels))
    with pytest.raises(ShardError, match="no statistics for target 'band_gap'"):
        sset.target_stats("band_gap")
    sset.verify(["train", "val"], required_cutoff=CUTOFF, targets=TARGETS)  # does not raise
    sset.verify(["train"], required_cutoff=CUTOFF - 1.0, checksums=False)


def test_truncated_shard_is_named(shard_copy):
    path = shard_copy / "train/part-000002.parquet"
    path.write_bytes(path.read_bytes()[:-100])
    sset = ShardSet(shard_copy)
    with pytest.raises(ShardError, match=r"part-000002\.parquet: .* bytes, the manifest says .*truncated"):
        sset.verify(["train"])
    sset.verify(["val"])  # the other split is untouched


def test_same_size_corruption_fails_the_checksum(shard_copy):
    path = shard_copy / "val/part-000005.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    sset = ShardSet(shard_copy)
    # size, footer, row count, version and cutoff still agree: only the sha256 sees it
    sset.verify(["val"], checksums=False)
    with pytest.raises(ShardError, match=r"part-000005\.parquet: sha256 .* does not match .*corrupted"):
        sset.verify(["val"])


def test_missing_shard_file_is_named(shard_copy):
    (shard_copy / "train/part-000001.parquet").unlink()
    with pytest.raises(ShardError, match=r"part-000001\.parquet: listed in the manifest but missing"):
        ShardSet(shard_copy).verify(["train"], checksums=False)


def test_model_cutoff_beyond_the_tables_asks_for_a_rebuild(shard_dir):
    with pytest.raises(ShardError, match=r"cutoff 8\.9095 A but the model needs 9\.5000 A; rebuild"):
        ShardSet(shard_dir).verify(["train"], required_cutoff=9.5)


def test_unknown_target_and_empty_split(shard_dir):
    sset = ShardSet(shard_dir)
    with pytest.raises(ShardError, match=r"target\(s\) \['band_gap'\] not in the shards"):
        sset.verify(["train"], targets=["e_form", "band_gap"])
    with pytest.raises(ShardError, match=r"no shards for split 'test' \(splits: \['train', 'val'\]\)"):
        sset.verify(["train", "test"])


def test_missing_or_foreign_manifest(shard_copy):
    manifest = shard_copy / "manifest.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(ShardError, match=f"schema version {SCHEMA_VERSION + 1}.*rebuild the shards"):
        ShardSet(shard_copy)
    manifest.write_text("{not json")
    with pytest.raises(ShardError, match="unreadable manifest"):
        ShardSet(shard_copy)
    manifest.unlink()
    with pytest.raises(ShardError, match="no manifest.json"):
        ShardSet(shard_copy)


def test_manifest_disagreeing_with_the_file(shard_copy):
    manifest = shard_copy / "manifest.json"
    data = json.loads(manifest.read_text())
    data["shards"][0]["rows"] += 1
    manifest.write_text(json.dumps(data))
    with pytest.raises(ShardError, match=r"part-000000\.parquet: 14 rows, the manifest says 15"):
        ShardSet(shard_copy).verify(["train"])
    data["shards"][0]["rows"] -= 1
    data["cutoff"] = CUTOFF + 0.5
    manifest.write_text(json.dumps(data))
    with pytest.raises(ShardError, match=r"part-000000\.parquet: built with cutoff 8\.9095 A"):
        ShardSet(shard_copy).verify(["train"])


# ----------------------------------------------------------------------------- packing
def _check_packed(tables, budget: BatchBudget, stats: PackStats) -> None:
    oversize = 0
    for t in tables:
        entries, atoms = int(pa.compute.sum(t["n_entries"]).as_py()), int(pa.compute.sum(t["n_atoms"]).as_py())
        assert 1 <= t.num_rows <= budget.max_structures
        if entries > budget.max_entries or atoms > budget.max_atoms:
            assert t.num_rows == 1, (t.num_rows, entries, atoms, budget)
            oversize += 1
    assert stats.oversize == oversize
    assert stats.batches == len(tables)
    assert stats.structures == sum(t.num_rows for t in tables)


def test_pack_rows_respects_the_budget_and_keeps_order(shard_dir, train_rows):
    stream = _stream(shard_dir)
    budget = BatchBudget(max_entries=12_000, max_atoms=60, max_structures=6)
    stats = PackStats()
    packed = list(pack_rows(stream, budget, stats))
    _check_packed(packed, budget, stats)
    assert _ids(packed) == train_rows
    assert stats.oversize == 0 and len(packed) > len(train_rows) // 6
    # greedy: adding the next batch's first row would have broken a limit
    for a, b in zip(packed, packed[1:]):
        e = int(pa.compute.sum(a["n_entries"]).as_py()) + b["n_entries"][0].as_py()
        n = int(pa.compute.sum(a["n_atoms"]).as_py()) + b["n_atoms"][0].as_py()
        assert e > budget.max_entries or n > budget.max_atoms or a.num_rows + 1 > budget.max_structures


@pytest.mark.parametrize("seed", range(8))
def test_pack_rows_random_budgets(shard_dir, train_rows, seed):
    rng = np.random.default_rng(seed)
    stream = _stream(shard_dir, rows_per_read=int(rng.integers(1, 20)))
    budget = BatchBudget(max_entries=int(rng.integers(200, 20_000)), max_atoms=int(rng.integers(1, 80)),
                         max_structures=int(rng.integers(1, 12)))
    stats = PackStats()
    packed = list(pack_rows(stream, budget, stats))
    _check_packed(packed, budget, stats)
    assert _ids(packed) == train_rows

    # pack_boundaries on the whole sequence gives the same groups as streaming table by table
    full = pa.concat_tables(stream)
    cuts = pack_boundaries(full["n_entries"].to_numpy(), full["n_atoms"].to_numpy(), budget)
    sizes = np.diff([0, *cuts, full.num_rows])
    assert [t.num_rows for t in packed] == sizes.tolist()


def test_pack_boundaries_oversize_rows_stand_alone():
    entries = np.array([10, 10, 500, 10, 10, 10, 600, 700, 10])
    atoms = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1])
    budget = BatchBudget(max_entries=100, max_atoms=100, max_structures=100)
    assert pack_boundaries(entries, atoms, budget) == [2, 3, 6, 7, 8]
    # carried-over open group: 95 entries already open, the first row no longer fits
    assert pack_boundaries(entries[:2], atoms[:2], budget, start_entries=95, start_count=3) == [0]
    assert pack_boundaries(entries[:2], atoms[:2], budget, start_entries=80, start_count=3) == []  # 100 fits
    assert pack_boundaries(entries[:2], atoms[:2], budget, start_entries=85, start_count=3) == [1]
    assert pack_boundaries(entries[:2], atoms[:2], budget, start_atoms=99, start_count=3) == [1]
    assert pack_boundaries(entries[:2], atoms[:2], budget, start_atoms=100, start_count=3) == [0]
    assert pack_boundaries(entries[:3], atoms[:3], BatchBudget(max_structures=2), start_count=1) == [1]


def test_budget_below_one_structure_gives_single_structure_batches(shard_dir, train_rows):
    budget = BatchBudget(max_entries=1, max_atoms=1, max_structures=256)
    stats = PackStats()
    packed = list(pack_rows(_stream(shard_dir), budget, stats))
    assert [t.num_rows for t in packed] == [1] * len(train_rows)
    assert _ids(packed) == train_rows
    # every structure has more than one image-table entry, so each batch is an oversize single
    assert min(t["n_entries"][0].as_py() for t in packed) > 1
    assert stats.oversize == stats.batches == len(train_rows)


def test_batch_budget_rejects_non_positive_limits():
    with pytest.raises(ValueError, match="max_atoms must be >= 1"):
        BatchBudget(max_atoms=0)


# ----------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_iter_local_shards_splits_files_across_ranks(shard_dir, train_rows, world_size):
    paths = [e.path for e in ShardSet(shard_dir).files("train")]
    per_rank = [_ids(iter_local_shards(paths, rank=r, world_size=world_size, rows_per_read=3))
                for r in range(world_size)]
    assert sorted(i for ids in per_rank for i in ids) == sorted(train_rows)
    assert sum(len(ids) for ids in per_rank) == len(train_rows)  # disjoint
    rows = [14, 13, 11, 10]
    assert [len(ids) for ids in per_rank] == [sum(rows[r::world_size]) for r in range(world_size)]
    assert per_rank[0][:14] == train_rows[:14]  # rank 0 starts with file 0, in order


def test_iter_local_shards_reads_only_the_requested_columns(shard_dir):
    paths = [e.path for e in ShardSet(shard_dir).files("val")]
    cols = training_columns(pq.read_schema(paths[0]), ["e_form", "band_gap"])
    assert "source" not in cols and cols[-1] == "y.e_form" and "y.band_gap" not in cols
    tables = list(iter_local_shards(paths, columns=cols, rows_per_read=4))
    assert [t.num_rows for t in tables] == [4, 2, 4, 2]
    assert all(t.column_names == cols for t in tables)


def test_unreadable_shard_in_the_stream_is_named(shard_copy):
    path = shard_copy / "val/part-000004.parquet"
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ShardError, match=r"part-000004\.parquet: cannot read shard"):
        list(iter_local_shards([path]))


def test_collate_packed_table(shard_dir):
    budget = BatchBudget(max_entries=20_000, max_atoms=100, max_structures=16)
    packed = list(pack_rows(_stream(shard_dir), budget))
    table = max(packed, key=lambda t: t.num_rows)
    assert table.num_rows > 1
    batch = collate_arrow(table, TARGETS)
    assert batch.n_crystals == table.num_rows
    assert batch.ids == table["id"].to_pylist()
    assert int(batch.n_atoms.sum()) == int(pa.compute.sum(table["n_atoms"]).as_py()) == batch.positions.shape[0]
    assert batch.entry_i.shape[0] == int(pa.compute.sum(table["n_entries"]).as_py())
    assert batch.cutoff == CUTOFF
    np.testing.assert_array_equal(batch.labels[:, 0].numpy(), table["y.e_form"].to_numpy())


def test_model_with_too_few_elements_is_refused_by_the_shard_check(shard_dir, megnet_crystals):
    """Regression: a model whose one-hot embedding is smaller than the data's highest Z used to fail
    with an IndexError inside model.embed; the shard check now names the element and the fix."""
    from cfdist.shards import ShardError

    sset = ShardSet(shard_dir)
    highest = max(int(z) for c in megnet_crystals[:60] for z in c.numbers)
    assert sset.max_element == highest
    sset.verify(["train"], n_elements=highest, checksums=False)
    with pytest.raises(ShardError, match=f"element Z={highest} but the model embeds only Z = 1..{highest - 1}"):
        sset.verify(["train"], n_elements=highest - 1, checksums=False)


def test_the_pretraining_driver_checks_elements_before_any_worker(shard_dir, tmp_path):
    from cfdist.shards import ShardError
    from cfdist.train.config import load_pretrain_config
    from cfdist.train.driver import check_shards, resolve

    cfg = resolve(load_pretrain_config("megnet_slice", [f"data.shards={shard_dir}", f"output_dir={tmp_path}",
                                                         "model={n_elements: 20, cutoff_sigmas: 4.49}", "data.val_split="]))
    with pytest.raises(ShardError, match=r"model embeds only Z = 1\.\.20"):
        check_shards(cfg)
    assert not (tmp_path / "megnet_slice").exists()
