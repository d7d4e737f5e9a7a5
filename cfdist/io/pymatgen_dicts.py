"""``pymatgen``: pymatgen ``Structure.as_dict()``, ``ComputedStructureEntry.as_dict()`` or
``{"structure": ..., "material_id": ..., <labels>}`` dicts in any JSON container
(:mod:`cfdist.io.json_container`), including Materials Project and Alexandria ``{"entries": [...]}`` dumps.

A ``ComputedStructureEntry`` gives ``energy`` (corrected total, eV), ``energy_per_atom``,
``uncorrected_energy`` and ``correction`` plus the numbers of its ``data``; a bare ``ComputedEntry`` has
no structure and is rejected.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

from cfdist.crystal import from_pymatgen
from cfdist.io.json_container import read_json
from cfdist.io.records import ID_KEYS, Chunk, RawRecord, RecordError, first_id, id_key, numeric_labels, string_meta


def read(chunk: Chunk) -> Iterator[RawRecord]:
    """The records of one planned chunk of a pymatgen JSON input."""
    return read_json(chunk, pymatgen_record)


def pymatgen_record(rec: Any, source: str, index: int, partial: dict) -> RawRecord:
    """One decoded pymatgen dict (``ComputedStructureEntry``, ``{"structure": ...}`` wrapper or bare
    ``Structure``) as a :class:`RawRecord`; ``partial`` as in :func:`cfdist.io.records.guarded`."""
    if not isinstance(rec, Mapping):
        raise RecordError("unparseable", f"expected a JSON object, got {type(rec).__name__}")
    from pymatgen.core import Structure

    cls = rec.get("@class")
    if cls == "ComputedEntry":
        partial["id"] = first_id(rec, ("entry_id",))
        raise RecordError("unparseable", "a ComputedEntry has no structure")
    if cls == "ComputedStructureEntry":
        from pymatgen.entries.computed_entries import ComputedStructureEntry

        rid = partial["id"] = first_id(rec, ("entry_id",))
        data = rec.get("data") if isinstance(rec.get("data"), Mapping) else {}
        meta = string_meta(data, into=string_meta(rec, exclude=("entry_id", "structure", "data")))
        entry = ComputedStructureEntry.from_dict(rec)
        structure = entry.structure
        labels = {
            "energy": float(entry.energy),  # corrected total energy (pymatgen's ComputedEntry.energy), eV
            "energy_per_atom": float(entry.energy) / max(len(structure), 1),
            "uncorrected_energy": float(entry.uncorrected_energy),
            "correction": float(entry.correction),
        }
        for key, value in numeric_labels(data, exclude=ID_KEYS).items():
            labels.setdefault(key, value)
        partial["labels"] = labels
    elif "structure" in rec:
        rid = partial["id"] = first_id(rec, ("material_id", "id", "mp_id", "entry_id"))
        labels = partial["labels"] = numeric_labels(rec, exclude=("structure",) + ID_KEYS)
        meta = string_meta(rec, exclude=("structure", id_key(rec, ("material_id", "id", "mp_id", "entry_id"))))
        sdict = rec["structure"]
        if not isinstance(sdict, Mapping):
            raise RecordError("unparseable", f"'structure' must be a Structure dict, got {type(sdict).__name__}")
        structure = Structure.from_dict(sdict)
    elif "lattice" in rec and "sites" in rec:
        props = rec.get("properties") if isinstance(rec.get("properties"), Mapping) else {}
        rid = partial["id"] = first_id(props, ("id", "material_id", "mp_id", "entry_id"))
        labels = partial["labels"] = numeric_labels(props, exclude=ID_KEYS)
        meta = string_meta(props, exclude=(id_key(props, ("id", "material_id", "mp_id", "entry_id")),))
        structure = Structure.from_dict(rec)
    else:
        raise RecordError("unparseable", "not a pymatgen Structure / ComputedStructureEntry dict and no "
                                          f"'structure' key (keys: {sorted(map(str, rec))[:12]})")
    crystal = from_pymatgen(structure, id=rid or source, labels=labels)
    return RawRecord(source, index, rid, crystal, labels, meta=meta)
