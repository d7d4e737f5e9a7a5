"""Which split each structure goes to: a split file, or a salted hash of its id.

Both rules are deterministic: the same id lands in the same split on every run, machine and
input order, which is what lets a killed preprocessing job resume and a rebuild reproduce.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

SPLITS = ("train", "val", "test")


class BuildError(RuntimeError):
    """The preprocessing job cannot run as asked (stale output directory, bad split file, ...)."""


def load_split_file(path: str) -> dict[str, str]:
    """id -> split from ``{"train": [ids], "val": [...], "test": [...]}`` or ``{id: split}`` JSON."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise BuildError(f"{path}: split file must be a JSON object")
    if data and all(isinstance(v, list) for v in data.values()):
        unknown = sorted(set(data) - set(SPLITS))
        if unknown:
            raise BuildError(f"{path}: unknown split name(s) {unknown}; use {list(SPLITS)}")
        mapping = {}
        for split, ids in data.items():
            for rid in ids:
                if str(rid) in mapping and mapping[str(rid)] != split:
                    raise BuildError(f"{path}: id {rid!r} is in both {mapping[str(rid)]!r} and {split!r}")
                mapping[str(rid)] = split
        return mapping
    bad = {v for v in data.values() if v not in SPLITS}
    if bad:
        raise BuildError(f"{path}: unknown split name(s) {sorted(map(str, bad))}; use {list(SPLITS)}")
    return {str(k): v for k, v in data.items()}


def hash_split(rid: str, fractions: Sequence[float], salt: str) -> str:
    """Deterministic split from a hash of the id: stable across runs, machines and input order."""
    u = int.from_bytes(hashlib.sha256(f"{salt}:{rid}".encode()).digest()[:8], "big") / 2**64
    edge = 0.0
    for split, fraction in zip(SPLITS, fractions):
        edge += fraction
        if u < edge:
            return split
    return SPLITS[len(fractions) - 1]

