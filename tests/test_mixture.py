"""Dataset-mixture sampling: temperature / weight probabilities, realised fractions that match
them, and draws that are a function of (seed, epoch, rank, index) alone (exact resume)."""

from __future__ import annotations

import numpy as np
import pytest

from cfdist.mixture import BLOCK, MixtureDraws, mixture_probabilities


def test_probabilities_follow_temperature_and_weights():
    sizes = [1_000_000, 10_000]
    np.testing.assert_allclose(mixture_probabilities(sizes, temperature=1.0), [100 / 101, 1 / 101])
    np.testing.assert_allclose(mixture_probabilities(sizes, temperature=2.0), [10 / 11, 1 / 11])  # JMP's T = 2
    assert mixture_probabilities(sizes, temperature=1e9) == pytest.approx([0.5, 0.5])
    np.testing.assert_allclose(mixture_probabilities(sizes, weights=[1, 3]), [0.25, 0.75])  # weights win
    p = mixture_probabilities([10**12, 1], temperature=0.05)  # n^(1/T) = 1e240: no overflow
    assert np.isfinite(p).all() and p[0] == 1.0 and p[1] < 1e-200
    for bad in ({"sizes": [10, 0]}, {"sizes": []}, {"sizes": [5, 5], "weights": [1, -1]},
                {"sizes": [5, 5], "weights": [1]}, {"sizes": [5], "temperature": 0.0}):
        with pytest.raises(ValueError):
            mixture_probabilities(**{"temperature": 1.0, **bad})


def test_realised_fractions_match_the_configured_ones():
    p = mixture_probabilities([400_000, 90_000, 10_000], temperature=2.0)
    n = 60_000
    for rank in (0, 1):
        realised = MixtureDraws(p, seed=5, epoch=2, rank=rank).counts(n) / n
        sigma = np.sqrt(p * (1 - p) / n)
        assert (np.abs(realised - p) < 4 * sigma).all(), (realised, p)
    # one micro-batch at a time gives the same draws as a block
    draws = MixtureDraws(p, seed=5, epoch=2, rank=0)
    assert [draws.dataset(k) for k in range(50)] == draws.block(0, 50).tolist()


def test_draws_resume_exactly_and_differ_per_rank_and_epoch():
    p = [0.5, 0.3, 0.2]
    draws = MixtureDraws(p, seed=1, epoch=0, rank=0)
    whole = draws.block(0, 3 * BLOCK + 17)
    for cut in (1, BLOCK - 1, BLOCK, BLOCK + 5, 2 * BLOCK + 3):  # across block boundaries
        resumed = MixtureDraws(p, seed=1, epoch=0, rank=0)  # a new process: only the count survives
        np.testing.assert_array_equal(np.concatenate([draws.block(0, cut), resumed.block(cut, len(whole) - cut)]),
                                      whole)
        np.testing.assert_array_equal(resumed.counts(cut), np.bincount(whole[:cut], minlength=3))
    others = [MixtureDraws(p, seed=1, epoch=1, rank=0), MixtureDraws(p, seed=1, epoch=0, rank=1),
              MixtureDraws(p, seed=2, epoch=0, rank=0)]
    for other in others:
        assert (other.block(0, 200) != whole[:200]).mean() > 0.3
    with pytest.raises(ValueError, match="sum to 1"):
        MixtureDraws([0.5, 0.4], seed=0, epoch=0, rank=0)
