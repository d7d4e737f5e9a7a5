"""Which split each structure goes to: a split file, or a salted hash of its id or group key.

Every rule is deterministic: the same id (group) lands in the same split on every run, machine and
input order, which is what lets a killed preprocessing job resume and a rebuild reproduce.

Group splits (``--split-group``, :func:`parse_group_spec`): the salted hash is taken of a group
key instead of the id, so every member of a group (the frames of one MPtrj trajectory, the
polymorphs of one composition) lands in the same split:

    meta:NAME        the record's metadata field NAME (``RawRecord.meta``: extxyz info strings such
                     as ``mptrj_traj_id``, ASE db key_value_pairs strings, JSON record strings)
    id-prefix:SEP:N  the first N SEP-separated fields of the record's id
                     (``id-prefix:-:2``: 'mp-1080834-0-1' -> 'mp-1080834')
    id-prefix:SEP    the id up to its last SEP ('mp-1080834-0-1' -> 'mp-1080834-0')
    composition      the reduced formula of the crystal (:func:`reduced_formula`)

A record without a group key (no such metadata field; an id with too few SEP-separated fields) is
rejected with reason ``missing_group``, or, with ``--split-group-missing id``, grouped by its id.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from cfdist.manifest import SPLITS


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



GROUP_KINDS = ("meta", "id-prefix", "composition")
MISSING_GROUP = ("reject", "id")  # what --split-group-missing does with a record that has no group key


@dataclass(frozen=True)
class GroupSpec:
    """A parsed ``--split-group`` value (:func:`parse_group_spec`)."""

    kind: str  # one of GROUP_KINDS
    name: str = ""  # meta: the field; id-prefix: the separator
    fields: int = 0  # id-prefix: how many leading fields (0: all but the last)


def parse_group_spec(spec: str) -> GroupSpec:
    """``meta:NAME``, ``id-prefix:SEP[:N]`` or ``composition`` (module docstring); BuildError if malformed."""
    kind, _, rest = spec.partition(":")
    if kind == "composition" and not rest:
        return GroupSpec("composition")
    if kind == "meta" and rest:
        return GroupSpec("meta", rest)
    if kind == "id-prefix" and rest:
        # the separator may itself be ':' ("id-prefix:::2"); N is what follows the last ':' if numeric
        sep, colon, n = rest.rpartition(":")
        if colon and sep and n.isdigit():
            if int(n) < 1:
                raise BuildError(f"--split-group {spec!r}: N must be >= 1")
            return GroupSpec("id-prefix", sep, int(n))
        return GroupSpec("id-prefix", rest, 0)
    raise BuildError(f"--split-group {spec!r}: expected meta:NAME, id-prefix:SEP, id-prefix:SEP:N or composition")


def group_key(spec: GroupSpec, rid: str, meta: Mapping[str, str], crystal) -> str | None:
    """The group of a record (None: it has none, see the module docstring)."""
    if spec.kind == "meta":
        value = meta.get(spec.name)
        return value if value else None
    if spec.kind == "id-prefix":
        parts = rid.split(spec.name)
        if spec.fields:
            return spec.name.join(parts[:spec.fields]) if len(parts) >= spec.fields else None
        return spec.name.join(parts[:-1]) if len(parts) >= 2 else None
    return reduced_formula(crystal)


def missing_group_detail(spec: GroupSpec) -> str:
    """Why a record has no group key under ``spec`` (the message of a ``missing_group`` reject)."""
    if spec.kind == "meta":
        return f"no metadata field {spec.name!r} (or it is empty)"
    if spec.fields:
        return f"its id has fewer than {spec.fields} {spec.name!r}-separated field(s)"
    return f"its id contains no {spec.name!r}"


def reduced_formula(crystal) -> str:
    """Canonical reduced formula: elements in alphabetical order of their symbols, amounts divided
    by their greatest common divisor ('Fe2O3', 'NaCl', 'O' for any elemental oxygen cell). Site
    occupancies count (``Crystal.species``); amounts that are not all whole numbers are written as
    atomic fractions with 6 decimals ('Fe0.333333O0.666667')."""
    from ase.data import chemical_symbols

    _, z, occupancy = crystal.species()
    amounts: dict[int, float] = {}
    for zi, occ in zip(z.tolist(), occupancy.tolist()):
        amounts[zi] = amounts.get(zi, 0.0) + occ
    items = sorted((chemical_symbols[zi], a) for zi, a in amounts.items() if a > 1e-9)
    if all(abs(a - round(a)) < 1e-6 for _, a in items):
        counts = [round(a) for _, a in items]
        g = math.gcd(*counts) or 1
        return "".join(sym + (str(c // g) if c // g != 1 else "") for (sym, _), c in zip(items, counts))
    total = sum(a for _, a in items)
    return "".join(f"{sym}{a / total:.6f}" for sym, a in items)
