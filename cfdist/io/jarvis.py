"""``jarvis``: JARVIS-style records ``{"id", "atoms": {lattice_mat, coords, elements, cartesian}, <labels>}``
in any JSON container (:mod:`cfdist.io.json_container`); the MEGNet slice ships this way.

Every scalar number of the record is a label (null -> NaN); ``id`` / ``jid`` / ``material_id`` name it;
its other short strings are metadata.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

from cfdist.crystal import from_jarvis
from cfdist.io.json_container import read_json
from cfdist.io.records import ID_KEYS, Chunk, RawRecord, RecordError, first_id, id_key, numeric_labels, string_meta


def read(chunk: Chunk) -> Iterator[RawRecord]:
    """The records of one planned chunk of a JARVIS JSON input."""
    return read_json(chunk, jarvis_record)


def jarvis_record(rec: Any, source: str, index: int, partial: dict) -> RawRecord:
    """One decoded JARVIS record as a :class:`RawRecord` (``partial`` collects its id and labels for
    the error record if it fails; see :func:`cfdist.io.records.guarded`)."""
    if not isinstance(rec, Mapping):
        raise RecordError("unparseable", f"expected a JSON object, got {type(rec).__name__}")
    rid = partial["id"] = first_id(rec, ("id", "jid", "material_id"))
    labels = partial["labels"] = numeric_labels(rec, exclude=("atoms",) + ID_KEYS)
    if "atoms" not in rec:
        raise RecordError("unparseable", f"record {rid or index!r} has no 'atoms' field")
    crystal = from_jarvis(rec["atoms"], id=rid or source, labels=labels)
    meta = string_meta(rec, exclude=("atoms", id_key(rec, ("id", "jid", "material_id"))))
    return RawRecord(source, index, rid, crystal, labels, meta=meta)
