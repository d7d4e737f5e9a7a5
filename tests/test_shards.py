"""Shard schema: crystal -> Arrow -> Parquet -> crystal round trips and the vectorised collate."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from cfdist.batch import collate
from cfdist.crystal import Crystal, SiteDisorder, from_jarvis
from cfdist.geometry import ImageTable, image_table
from cfdist.shards import (ShardError, TableRangeError, arrow_to_crystals, collate_arrow, crystals_to_arrow,
                           decode_table, encode_table, read_shard, shard_metadata, write_shard)

CUTOFF = 8.9095
FIELDS = ["positions", "lattice", "atom_crystal", "n_atoms", "species_site", "species_z", "species_occupancy",
          "entry_i", "entry_j", "entry_n", "labels"]


@pytest.fixture(scope="module")
def crystals(megnet_records):
    out = [from_jarvis(r["atoms"], id=r["id"], labels={"e_form": r["e_form"]}) for r in megnet_records[:12]]
    disordered = Crystal(id="disordered", numbers=[26, 8], lattice=4.1 * np.eye(3),
                         positions=[[0.0, 0.0, 0.0], [2.05, 2.05, 2.05]], labels={"e_form": -1.5},
                         disorder=SiteDisorder(site=[0, 0], z=[26, 27], occupancy=[0.5, 0.4]))
    return out[:5] + [disordered] + out[5:]


@pytest.fixture(scope="module")
def shard(crystals, tmp_path_factory):
    tables = [image_table(c.lattice, c.positions, CUTOFF) for c in crystals]
    arrow = crystals_to_arrow(crystals, tables, [f"src:{k}" for k in range(len(crystals))], ["e_form"])
    path = tmp_path_factory.mktemp("shard") / "part.parquet"
    write_shard(path, arrow, shard_metadata(CUTOFF, ["e_form"]))
    return path, tables


def test_round_trip_is_exact(crystals, shard):
    path, tables = shard
    back, back_tables = arrow_to_crystals(read_shard(path))
    for a, b, ta, tb in zip(crystals, back, tables, back_tables):
        assert a.id == b.id and a.labels == b.labels
        np.testing.assert_array_equal(a.numbers, b.numbers)
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.lattice, b.lattice)
        for x, y in zip((ta.i, ta.j, ta.n), (tb.i, tb.j, tb.n)):
            np.testing.assert_array_equal(x, y)
        assert tb.cutoff == CUTOFF
        assert (a.disorder is None) == (b.disorder is None)
    np.testing.assert_array_equal(back[5].disorder.occupancy, [0.5, 0.4])


@pytest.mark.parametrize("rows", [slice(0, None), slice(3, 9), slice(5, 6)])
def test_collate_arrow_equals_collate_on_any_slice(crystals, shard, rows):
    path, tables = shard
    table = read_shard(path)
    start, stop = rows.start, rows.stop or table.num_rows
    for source in (table.slice(start, stop - start), table.to_batches(max_chunksize=100)[0].slice(start, stop - start)):
        got = collate_arrow(source, ["e_form"])
        want = collate(crystals[rows], tables[rows], ["e_form"])
        for name in FIELDS:
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        assert got.ids == want.ids and got.cutoff == CUTOFF


def test_packed_table_codes_round_trip_and_range():
    rng = np.random.default_rng(0)
    n = rng.integers(-31, 32, size=(50, 3))
    i = np.sort(rng.integers(0, 7, size=50))
    j = rng.integers(0, 7, size=50)
    counts, codes = encode_table(ImageTable(i, j, n, 1.0), 7)
    i2, j2, n2 = decode_table(counts, codes)
    np.testing.assert_array_equal(i, i2)
    np.testing.assert_array_equal(j, j2)
    np.testing.assert_array_equal(n, n2)
    with pytest.raises(TableRangeError, match="exceeds"):
        encode_table(ImageTable(i[:1], j[:1], np.array([[32, 0, 0]]), 1.0), 7)


def test_unreadable_or_foreign_shards_fail_clearly(tmp_path, shard):
    bad = tmp_path / "truncated.parquet"
    bad.write_bytes(shard[0].read_bytes()[:500])
    with pytest.raises(ShardError, match="not a readable Parquet shard"):
        read_shard(bad)
    import pyarrow.parquet as pq

    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), foreign)
    with pytest.raises(ShardError, match="schema version"):
        read_shard(foreign)
