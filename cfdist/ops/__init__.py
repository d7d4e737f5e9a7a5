"""Periodic-attention ops: the efficient training op, a float64 reference and the dense-box baseline."""

from cfdist.ops.periodic_attention import periodic_attention
from cfdist.ops.reference import reference_periodic_attention, unrolled_attention

__all__ = ["periodic_attention", "reference_periodic_attention", "unrolled_attention"]
