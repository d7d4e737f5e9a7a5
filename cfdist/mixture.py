"""Dataset mixtures: how often each dataset of a mixture is drawn, and which dataset each
micro-batch of a rank draws, deterministically from (seed, epoch, rank) and resumable from a count.

    p = mixture_probabilities([1_500_000, 40_000], temperature=2.0)   # p_i ~ n_i^(1/T): [0.86, 0.14]
    draws = MixtureDraws(p, seed=0, epoch=3, rank=1)
    draws.block(0, 8)        # dataset index of this rank's micro-batches 0..7 of epoch 3
    draws.counts(1000)       # micro-batches each dataset got among the first 1000 (its stream position)

The probabilities follow JMP / fairchem UMA (docs: /work/shared/docs/anchors_multidataset.md):
explicit relative weights, or temperature sampling p_i ∝ n_i^(1/T) (T = 1: proportional to size;
T = 2: JMP's choice, which lifts small datasets; T -> inf: uniform). Draws are counter-based: draw
k of (seed, epoch, rank) is a function of those four numbers alone (uniforms in blocks of
:data:`BLOCK` from ``SeedSequence([seed, epoch, rank, k // BLOCK])``), so a resumed rank needs only
how many micro-batches it has drawn (a cursor field), and per dataset how far its own stream has
got follows from :meth:`MixtureDraws.counts`.

:func:`mixture_batches` is a rank's training stream over a mixture: each draw's dataset gives
the next micro-batch of its own :mod:`cfdist.stream` (its own epochs, shuffles and positions), so
a resumed rank needs the draw count and each dataset's (epoch, position):
:class:`MixturePosition` (docs/model.md, "Dataset mixtures").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from cfdist.data import BatchBudget
from cfdist.stream import EpochPlan, Position, RowGroupReader, epoch_batches

BLOCK = 4096  # draws generated per seed sequence


def mixture_probabilities(sizes: Sequence[int], weights: Sequence[float] | None = None,
                          temperature: float = 1.0) -> np.ndarray:
    """(D,) float64 sampling probabilities of D datasets.

    Args:
        sizes: structures per dataset (train split), each >= 1.
        weights: relative weights (any positive scale); when given they decide and ``temperature``
            is not used.
        temperature: T > 0 of p_i ∝ n_i^(1/T).
    """
    sizes = np.asarray(sizes, dtype=np.float64)
    if sizes.ndim != 1 or len(sizes) == 0:
        raise ValueError(f"a mixture needs at least one dataset size, got {sizes.tolist()}")
    if (sizes < 1).any():
        raise ValueError(f"every dataset of a mixture needs at least one structure, got sizes {sizes.tolist()}")
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != sizes.shape or not np.isfinite(w).all() or (w <= 0).any():
            raise ValueError(f"mixture weights must be one positive number per dataset, got {list(weights)}")
        return w / w.sum()
    if not temperature > 0:
        raise ValueError(f"mixture temperature must be > 0, got {temperature}")
    # in log space: n^(1/T) of 1e9 structures at T = 0.1 would overflow
    logits = np.log(sizes) / float(temperature)
    p = np.exp(logits - logits.max())
    return p / p.sum()


class MixtureDraws:
    """Which dataset (index into the probabilities) each micro-batch of one rank's epoch draws."""

    def __init__(self, probabilities: Sequence[float], *, seed: int, epoch: int, rank: int):
        p = np.asarray(probabilities, dtype=np.float64)
        if p.ndim != 1 or len(p) == 0 or (p < 0).any() or not np.isclose(p.sum(), 1.0, rtol=0, atol=1e-9):
            raise ValueError(f"probabilities must be non-negative and sum to 1, got {p.tolist()}")
        self.cumulative = np.cumsum(p)
        self.cumulative[-1] = 1.0  # no draw past the end through rounding
        self.key = (int(seed), int(epoch), int(rank))

    def _uniforms(self, block: int) -> np.ndarray:
        return np.random.default_rng(np.random.SeedSequence([*self.key, block])).random(BLOCK)

    def block(self, start: int, count: int) -> np.ndarray:
        """(count,) int64 dataset indices of micro-batches start .. start + count - 1."""
        if start < 0 or count < 0:
            raise ValueError(f"start and count must be >= 0, got {start}, {count}")
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        first, last = start // BLOCK, (start + count - 1) // BLOCK
        u = np.concatenate([self._uniforms(b) for b in range(first, last + 1)])
        offset = start - first * BLOCK
        return np.searchsorted(self.cumulative, u[offset:offset + count], side="right").astype(np.int64)

    def dataset(self, k: int) -> int:
        """The dataset of micro-batch ``k``."""
        return int(self.block(k, 1)[0])

    def counts(self, k: int) -> np.ndarray:
        """(D,) int64 micro-batches each dataset got among the first ``k``: where each dataset's own
        stream resumes after ``k`` draws."""
        return np.bincount(self.block(0, k), minlength=len(self.cumulative)).astype(np.int64)


# ----------------------------------------------------------------------------- the mixture stream
@dataclass(frozen=True)
class MixturePosition:
    """Where one rank is in its mixture stream: ``draws`` micro-batches drawn so far, and per
    dataset (epoch, window, offset) of that dataset's own stream (:class:`cfdist.stream.Position`
    within its epoch ``epoch``)."""

    draws: int = 0
    datasets: tuple[tuple[int, int, int], ...] = ()

    def values(self) -> list[float]:
        """Flat numbers to all-gather into a checkpoint: the per-dataset triples (draws is the same
        on every rank: ranks consume micro-batches in lockstep)."""
        return [float(v) for triple in self.datasets for v in triple]

    @classmethod
    def from_values(cls, draws: int, values: Sequence[float]) -> "MixturePosition":
        v = [int(x) for x in values]
        return cls(int(draws), tuple(tuple(v[i:i + 3]) for i in range(0, len(v), 3)))


@dataclass
class MixtureRows:
    """A packed micro-batch of rows (``table``) drawn from dataset ``dataset`` (an index)."""

    dataset: int
    table: pa.Table

    @property
    def num_rows(self) -> int:
        return self.table.num_rows


def mixture_batches(plans: Callable[[int, int], EpochPlan], readers: Sequence[RowGroupReader],
                    probabilities: Sequence[float], budgets: Sequence[BatchBudget], *, seed: int, rank: int,
                    start: MixturePosition, names: Sequence[str]) -> Iterator[tuple[MixtureRows, MixturePosition]]:
    """One rank's endless mixture stream: draw k picks a dataset (:class:`MixtureDraws` of
    (seed, rank)), whose own stream (``plans(d, epoch)``, read by ``readers[d]``, packed within
    ``budgets[d]``) gives the micro-batch; a dataset that runs out of rows starts its next epoch (its
    own file order and shuffle). Yields each micro-batch with the position right after it, so a
    stream started at that position yields exactly the rest (batch boundaries never depend on
    where a stream started: :func:`cfdist.stream.epoch_batches`)."""
    n = len(readers)
    draws = MixtureDraws(probabilities, seed=seed, epoch=0, rank=rank)
    state = [tuple(t) for t in start.datasets] if start.datasets else [(0, 0, 0)] * n
    if len(state) != n:
        raise ValueError(f"mixture position has {len(state)} datasets, the mixture {n}")
    streams: list[Iterator | None] = [None] * n
    empty_epochs = [0] * n
    k = int(start.draws)

    def next_batch(d: int) -> pa.Table:
        while True:
            epoch, window, offset = state[d]
            if streams[d] is None:
                streams[d] = epoch_batches(plans(d, epoch), readers[d], budgets[d], Position(window, offset))
            for table, after in streams[d]:
                state[d] = (epoch, after.window, after.offset)
                empty_epochs[d] = 0
                return table
            streams[d], state[d] = None, (epoch + 1, 0, 0)
            empty_epochs[d] += 1
            if empty_epochs[d] > 1:
                raise RuntimeError(f"dataset {names[d]!r}: rank {rank} gets no rows of its train split (two epochs "
                                   f"in a row); use fewer workers than that split has structures")

    while True:
        for d in draws.block(k, BLOCK - k % BLOCK).tolist():
            table = next_batch(d)
            k += 1
            yield MixtureRows(d, table), MixturePosition(k, tuple(state))
