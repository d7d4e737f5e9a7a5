"""bench/replicate_shards.py: a K-copy shard directory (the start-up benchmark's 1M set) whose manifest is
what the preprocessing job would have written for those files.

Checked on the job-built ``tiny_shards`` (48 real crystals, 6 files): one copy reproduces the source's
manifest exactly; three copies pass the full shard check (sizes, footers, sha256), and their statistics
equal those recomputed from the replicated files by the job's own accumulator, including the
reference-energy sums that a training run solves, which match a pass over the replicated train split.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from paths import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import replicate_shards as rs  # noqa: E402


def test_one_copy_reproduces_the_manifest(tiny_shards, tmp_path):
    source = json.loads((tiny_shards / "manifest.json").read_text())
    written = rs.replicate(tiny_shards, tmp_path / "one", 1, link=False)
    assert written == source
    with pytest.raises(FileExistsError, match="already holds a manifest"):
        rs.replicate(tiny_shards, tmp_path / "one", 1)


def test_three_copies_are_the_statistics_of_their_files(tiny_shards, tmp_path):
    from cfdist.manifest import SPLITS, ShardSet
    from cfdist.preprocess.element_fit import FIT_COLUMNS, ElementFitSums, solve
    from cfdist.preprocess.statistics import StatsAccumulator
    from cfdist.run.objective import fit_element_energies

    source = ShardSet(tiny_shards)
    out = tmp_path / "three"
    written = rs.replicate(tiny_shards, out, 3)
    shards = ShardSet(out)
    report = shards.verify(list(SPLITS), checksums="full")
    assert report.hashed == 3 * len(source.entries) == len({e.path for e in shards.entries})
    assert written["splits"] == {s: 3 * source.n_rows(s) for s in SPLITS}
    assert written["n_input"] == written["n_written"] == 3 * source.manifest["n_written"]
    assert written["content_hash"] != source.manifest["content_hash"]
    assert written["replicated_from"]["copies"] == 3 and "occurs 3 times" in written["replicated_from"]["note"]

    # what the preprocessing job's finalize would compute from these files
    stats = StatsAccumulator(source.targets)
    for entry in shards.entries:
        stats.add(entry.split, pq.read_table(entry.path, columns=sorted({"n_entries", *FIT_COLUMNS})
                                             + [f"y.{t}" for t in source.targets]))
    want, got = stats.summary(), written["statistics"]
    assert got.keys() == want.keys()
    for key in ("element_counts", "atoms_histogram", "entries_histogram", "total_atoms", "total_entries"):
        assert got[key] == want[key], key
    for target, per_split in want["targets"].items():
        for split, m in per_split.items():
            assert got["targets"][target][split]["count"] == m["count"]
            np.testing.assert_allclose([got["targets"][target][split][k] for k in ("mean", "std")],
                                       [m["mean"], m["std"]], rtol=1e-9)
    for target in source.targets:
        g, w = got["element_fit"][target], want["element_fit"][target]
        assert g["elements"] == w["elements"] and g["count"] == w["count"]
        for key in ("gram", "rhs", "col_sum", "e_sum", "e_sq"):
            np.testing.assert_allclose(g[key], w[key], rtol=1e-9, atol=1e-12, err_msg=key)
        # per-element least squares (not a sum; ill-conditioned on 32 crystals, so the solution's last
        # digits depend on the summation order): it solves the normal equations of the replicated files
        reference = got["reference_per_element"][target]
        assert reference.keys() == want["reference_per_element"][target].keys()
        present = np.array(sorted(int(z) for z in reference))
        mu = np.array([reference[str(z)] for z in present])
        gram, rhs = stats.gram[np.ix_(present, present)], stats.rhs[target][present]
        residual = (gram + 1e-10 * np.eye(len(present))) @ mu - rhs
        assert np.abs(residual).max() < 1e-8 * np.abs(rhs).max()
        # the training run's reference energies from the manifest = a pass over the replicated train split
        from_manifest = solve(ElementFitSums.from_dict(shards.element_fit(target)), 118)
        by_pass = fit_element_energies([e.path for e in shards.files("train")], target, 118)
        assert from_manifest["structures"] == by_pass["structures"] == 3 * source.n_rows("train")
        # equal up to the fit's conditioning on 32 crystals (the sums above are equal to 1e-9)
        np.testing.assert_allclose(from_manifest["element_energy"], by_pass["element_energy"], rtol=0, atol=1e-6)


def test_an_unknown_statistic_is_an_error():
    with pytest.raises(KeyError, match="statistics.new_sum: unknown"):
        rs.replicate_statistics({"total_atoms": 5, "new_sum": 1}, 2)
