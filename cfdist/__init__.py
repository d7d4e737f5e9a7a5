"""cfdist: distributed training of Crystalformer on Ray + DeepSpeed.

Pipeline: raw structures -> ``preprocess`` -> shards (:mod:`cfdist.shards`) -> batches
(:mod:`cfdist.batch`) -> :mod:`cfdist.model` -> training -> checkpoint -> fine-tune / predict.

Top-level names are imported lazily, so ``import cfdist.crystal`` or ``cfdist.geometry``
(used by preprocessing workers) does not pay for importing torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Crystal": "cfdist.crystal", "InvalidCrystalError": "cfdist.crystal",
    "ImageTable": "cfdist.geometry", "image_table": "cfdist.geometry",
    "CrystalformerConfig": "cfdist.config", "table_cutoff": "cfdist.config",
    "CrystalBatch": "cfdist.batch", "collate": "cfdist.batch",
    "Crystalformer": "cfdist.model", "count_parameters": "cfdist.model", "EnergyOutput": "cfdist.model",
    "load": "cfdist.checkpoint", "save_portable": "cfdist.checkpoint",
    "CrystalformerCalculator": "cfdist.calculator",  # needs ase
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cfdist' has no attribute {name!r}")


def __dir__():
    return __all__
