"""``mptrj``: the Materials Project trajectory dataset (CHGNet's MPtrj) in the layout it is distributed
in, one JSON object ``MPtrj_2022.9_full.json`` (12 GB, 1.58 M frames)::

    {mp_id: {frame_id: {"structure": <pymatgen Structure dict>, "uncorrected_total_energy": eV,
                        "corrected_total_energy": eV, "energy_per_atom": eV/atom, "ef_per_atom": eV/atom,
                        "force": [[eV/A] * 3] * N, "stress": [[kBar] * 3] * 3, "magmom": [mu_B] * N | null,
                        "bandgap": eV, "mp_id": str, ...}}}

Planning never decodes the object: one byte scan (:class:`~cfdist.io.json_scan.StructuralScanner`)
finds the separators of the members of every ``mp_id`` object (the frames), and a chunk is the byte
span of a run of frames, possibly across several materials; ``Chunk.part`` holds the (JSON-encoded)
``mp_id`` its first frame belongs to, so a worker rescans and decodes only its own span.

Per frame: the id is the frame id; ``energy`` is ``--energy-key`` (default ``corrected_total_energy``,
see :data:`DEFAULT_ENERGY_KEY`); forces are eV/A as stored; stress is converted from VASP's kBar (with
VASP's sign: positive is compressive) to ASE's eV/A^3 (:data:`KBAR_TO_EV_PER_A3`); ``mp_id`` is string
metadata (``--split-group meta:mp_id`` keeps a material's frames in one split); the other numbers
(``uncorrected_total_energy``, ``corrected_total_energy``, ``energy_per_atom``, ``ef_per_atom``,
``bandgap``, ...) are labels, and ``magmom`` becomes the label ``magmom``, the cell's total moment
(sum over atoms, mu_B): shards have no per-atom label column besides forces.
"""

from __future__ import annotations

import functools
import json
import math
import re
from typing import Iterator, Mapping

import numpy as np

from cfdist.crystal import from_pymatgen
from cfdist.io.json_container import JSON_SUFFIXES
from cfdist.io.json_scan import StructuralScanner, first_char
from cfdist.io.records import (ID_KEYS, Chunk, RawRecord, RecordError, error_record, file_errors, forces_array,
                               guarded, numeric_labels, string_meta, stress_3x3)
from cfdist.io.spill import open_binary, spill_source, spilling, with_data_path

SUFFIXES = JSON_SUFFIXES

ENERGY_KEYS = ("corrected_total_energy", "uncorrected_total_energy")
# CHGNet (the model MPtrj was compiled for) is trained on the MP2020-corrected energies: the dataset's
# description (figshare 23713842, "energy_per_atom: corrected energy per atom, the energy label used to
# train CHGNet") and CHGNet's loader (chgnet/data/dataset.py, StructureJsonData reads energy_per_atom).
# Corrected energies are also what the Materials Project phase diagrams use, so a model trained on them
# can be compared with MP hulls directly. Choose uncorrected_total_energy for the raw VASP (GGA/GGA+U)
# total energy, e.g. to mix MPtrj with corpora that carry no MP2020 correction.
DEFAULT_ENERGY_KEY = "corrected_total_energy"

# eV per A^3 in one GPa: 1e9 Pa * 1e-30 m^3/A^3 / 1.6021766208e-19 J/eV (the CODATA 2014 value ASE uses).
GPA_PER_EV_PER_A3 = 160.21766208
# VASP stress (kBar, positive = compressive) -> ASE stress (eV/A^3, positive = tensile):
# 1 kBar = 0.1 GPa and the sign flips.
KBAR_TO_EV_PER_A3 = -0.1 / GPA_PER_EV_PER_A3

# Planning reads the file in blocks of this many bytes: the scan's working memory is ~5x a block
# (the block, its structural bytes, their offsets), so 4 MB keeps the planner near 20 MB.
_BLOCK_SIZE = 1 << 22
_SNIFF_BYTES = 1 << 22  # the sniff decodes the first frame from at most this many leading bytes
_OPEN, _COMMA, _CLOSE = 0, 1, 2  # kinds of frame separators: an mp_id object's {, a comma between frames, its }
_LEAD = re.compile(rb'\s*\{\s*"(?:[^"\\]|\\.)*"\s*:\s*\{\s*"(?:[^"\\]|\\.)*"\s*:\s*(?=\{)')


def check_options(path: str, options: Mapping[str, str]) -> None:
    """Reader options of ``mptrj``: ``energy_key`` (one of :data:`ENERGY_KEYS`); ``ValueError`` otherwise."""
    unknown = sorted(set(options) - {"energy_key"})
    if unknown:
        raise ValueError(f"{path}: format mptrj takes the option energy_key only, got {unknown}")
    key = options.get("energy_key", DEFAULT_ENERGY_KEY)
    if key not in ENERGY_KEYS:
        raise ValueError(f"{path}: --energy-key must be one of {list(ENERGY_KEYS)} for mptrj, got {key!r}")


# ----------------------------------------------------------------------------- which format


def sniff(path: str) -> str | None:
    """``"mptrj"`` when the file opens with ``{"<mp_id>": {"<frame_id>": {...`` and that first frame
    (decoded from the leading bytes only) has a ``structure``; None otherwise (another JSON format's)."""
    with open_binary(path) as f:
        head = f.read(_SNIFF_BYTES)
    head = head[3:] if head.startswith(b"\xef\xbb\xbf") else head  # a UTF-8 byte-order mark
    match = _LEAD.match(head)
    if match is None:
        return None
    text = head[match.end():].decode("utf-8", errors="replace")
    try:
        frame, _ = json.JSONDecoder().raw_decode(text)
    except ValueError:
        return None  # a first frame longer than the sniff window, or not JSON: not claimed
    return "mptrj" if isinstance(frame, Mapping) and "structure" in frame else None


# ----------------------------------------------------------------------------- planning


def _separators(scanner: StructuralScanner, offsets: np.ndarray, kinds: np.ndarray, depth: np.ndarray,
                where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Of one scanned block: the frame separators (offsets int64, kinds uint8 of _OPEN/_COMMA/_CLOSE) and
    the top-level separators (the object's {, the commas between materials and its }: offsets int64)."""
    if np.any((kinds == ord("[")) & (depth == 1)):
        at = int(offsets[(kinds == ord("[")) & (depth == 1)][0])
        raise ValueError(f"{where}: not the MPtrj layout: a member of the top-level object is a list "
                         f"(byte {at}); expected {{mp_id: {{frame_id: frame}}}}")
    opens = (kinds == ord("{")) & (depth == 1)
    commas = (kinds == ord(",")) & (depth == 2)
    closes = (kinds == ord("}")) & (depth == 2)
    frame_mask = opens | commas | closes
    frame_kinds = np.where(opens, _OPEN, np.where(commas, _COMMA, _CLOSE))[frame_mask].astype(np.uint8)
    top = (depth == 0) | (((kinds == ord(",")) | (kinds == ord("}"))) & (depth == 1))
    return offsets[frame_mask], frame_kinds, offsets[top]


def _frames(seps: np.ndarray, kinds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frame spans from the frame separators: ``(starts, ends, material)``, frame k being the bytes
    ``starts[k]:ends[k]`` (``"frame_id": {...}`` with surrounding blanks) of the ``material[k]``-th
    mp_id object (counted from 0 in ``seps``). A candidate between an object's { and } (no comma) may
    be blank (an empty object): the caller checks those (:func:`_drop_blank`)."""
    if len(seps) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    take = kinds[:-1] != _CLOSE
    material = np.cumsum(kinds == _OPEN)[:-1][take] - 1
    return seps[:-1][take] + 1, seps[1:][take], material


def _drop_blank(read_at, seps: np.ndarray, kinds: np.ndarray, frames: tuple) -> tuple:
    """``frames`` without the blank candidates of empty ``{}`` material objects (read with ``read_at``)."""
    starts, ends, material = frames
    empty_open = np.flatnonzero((kinds[:-1] == _OPEN) & (kinds[1:] == _CLOSE))
    if not len(empty_open):
        return frames
    keep = np.ones(len(starts), dtype=bool)
    for k in np.flatnonzero(np.isin(starts, seps[empty_open] + 1)):  # only the candidates are read
        keep[k] = bool(read_at(int(starts[k]), int(ends[k] - starts[k])).strip())
    return starts[keep], ends[keep], material[keep]


def plan(path: str, fmt: str, chunk_size: int, spill_dir: str | None = None) -> list[Chunk]:
    """Chunks of ``chunk_size`` frames as byte spans, found by one scan of the file (never decoded
    whole: the scan holds one block and ~9 bytes per frame); ``ValueError`` naming the byte when the
    file is not ``{mp_id: {frame_id: frame}}`` or not closed. A ``.gz``/``.bz2`` input is decompressed
    into ``spill_dir`` on the way (offsets are into the decompressed bytes)."""
    source, copy, spill = spill_source(path, spill_dir)
    seps, kinds, tops = [], [], []
    with open_binary(source) as f, spilling(copy) as sink:
        head = f.read(1 << 16)
        if first_char(head) != b"{":
            raise ValueError(f"{path}: not the MPtrj layout: expected a JSON object, starts with {head[:20]!r}")
        scanner = StructuralScanner()
        block = head
        while block:
            if sink is not None:
                sink.write(block)
            part = _separators(scanner, *scanner.feed(block), where=path)
            seps.append(part[0])
            kinds.append(part[1])
            tops.append(part[2])
            block = f.read(_BLOCK_SIZE)
        if scanner.depth != 0 or scanner.in_string:
            raise ValueError(f"{path}: not valid JSON: the object is not closed at byte {scanner.base} (truncated?)")
    seps, kinds, tops = np.concatenate(seps), np.concatenate(kinds), np.concatenate(tops)
    n_members = int(np.count_nonzero(kinds == _OPEN))
    if len(tops) - 1 != max(n_members, 1) and not (n_members == 0 and len(tops) == 2):
        raise ValueError(f"{path}: not the MPtrj layout: {len(tops) - 1} members in the top-level object but "
                         f"{n_members} of them are objects of frames")
    with open_binary(copy or source) as f:
        def read_at(offset: int, length: int) -> bytes:
            f.seek(offset)
            return f.read(length)

        starts, ends, material = _drop_blank(read_at, seps, kinds, _frames(seps, kinds))
        material_open = seps[kinds == _OPEN]
        chunks = []
        for start in range(0, len(starts), chunk_size):
            stop = min(start + chunk_size, len(starts))
            key = _material_key(read_at, tops, int(material_open[material[start]]), path)
            chunks.append(Chunk(fmt, path, start, stop - start, int(starts[start]),
                                int(ends[stop - 1] - starts[start]), part=json.dumps(key)))
    return with_data_path(chunks, spill)


def _material_key(read_at, tops: np.ndarray, open_at: int, where: str) -> str:
    """The mp_id whose object opens at byte ``open_at``: the member name between the top-level
    separator before it and its {."""
    before = int(tops[np.searchsorted(tops, open_at) - 1])
    text = read_at(before + 1, open_at - before - 1).strip()
    try:
        key = json.loads(text[:-1]) if text.endswith(b":") else None
    except ValueError:
        key = None
    if not isinstance(key, str):
        raise ValueError(f"{where}: not the MPtrj layout: expected a member name before byte {open_at}, "
                         f"got {text[:60]!r}")
    return key


# ----------------------------------------------------------------------------- reading


def read(chunk: Chunk) -> Iterator[RawRecord]:
    """The frames of one planned span, one record each (id: the frame id; source ``<path>:<index>``)."""
    options = json.loads(chunk.options) if chunk.options else {}
    energy_key = options.get("energy_key", DEFAULT_ENERGY_KEY)
    with file_errors(chunk.path), open_binary(chunk.data_path or chunk.path) as f:
        f.seek(chunk.byte_offset)
        buf = f.read(chunk.byte_length)
    try:
        frames, keys = _span_frames(buf, chunk)
    except ValueError as exc:  # the span no longer splits into frames (file modified since planning?)
        for k in range(chunk.start, chunk.start + chunk.count):
            yield error_record(f"{chunk.path}:{k}", k, None, "unparseable", f"frame {k} unreadable: {exc}")
        return
    for k, (start, end, material) in enumerate(zip(*frames)):
        index = chunk.start + k
        source = f"{chunk.path}:{index}"
        text = buf[start:end]
        yield guarded(source, index, functools.partial(_frame_record, text, keys[material], energy_key,
                                                       source, index))


def _span_frames(buf: bytes, chunk: Chunk) -> tuple[tuple, list[str]]:
    """Frames of a planned span (offsets relative to ``buf``) and the mp_id of each material in it."""
    scanner = StructuralScanner(depth=2)
    offsets, kinds, depth = scanner.feed(buf)
    seps, frame_kinds, tops = _separators(scanner, offsets, kinds, depth, where=chunk.path)
    if scanner.depth != 2 or scanner.in_string:
        raise ValueError("the span does not end between two frames")
    # The span starts just after a separator and ends at one: bracket it as if by the material's { and }.
    seps = np.concatenate([[-1], seps, [len(buf)]])
    frame_kinds = np.concatenate([[_OPEN], frame_kinds, [_CLOSE]]).astype(np.uint8)
    tops = np.concatenate([[-2], tops])

    def read_at(offset: int, length: int) -> bytes:
        return buf[offset:offset + length]

    frames = _drop_blank(read_at, seps, frame_kinds, _frames(seps, frame_kinds))
    keys = [json.loads(chunk.part)] + [_material_key(read_at, tops, int(at), chunk.path)
                                        for at in seps[frame_kinds == _OPEN][1:]]
    return frames, keys


def _frame_record(text: bytes, mp_id: str, energy_key: str, source: str, index: int, partial: dict) -> RawRecord:
    from pymatgen.core import Structure

    try:
        decoded = text.decode("utf-8")
        lead = len(decoded) - len(decoded.lstrip())
        frame_id, at = json.JSONDecoder().raw_decode(decoded, lead)
        colon = decoded.index(":", at)
        if decoded[at:colon].strip() or not isinstance(frame_id, str):
            raise ValueError(f"expected a frame id and ':', got {decoded[lead:colon + 1][:40]!r}")
    except ValueError as exc:
        raise RecordError("unparseable", f"frame of {mp_id!r} has no frame id ({exc})") from None
    partial["id"] = frame_id
    try:
        frame = json.loads(decoded[colon + 1:])
    except ValueError as exc:
        raise RecordError("unparseable", f"frame {frame_id!r} of {mp_id!r} is not valid JSON ({exc})") from None
    if not isinstance(frame, Mapping):
        raise RecordError("unparseable", f"frame {frame_id!r}: expected a JSON object, got {type(frame).__name__}")
    labels = numeric_labels(frame, exclude=("structure", "force", "stress", "magmom") + ID_KEYS)
    energy = frame.get(energy_key)
    labels["energy"] = math.nan if energy is None else float(energy)
    magmom = frame.get("magmom")
    if magmom is not None:
        labels["magmom"] = float(np.sum(np.asarray(magmom, dtype=np.float64)))
    partial["labels"] = labels
    meta = string_meta(frame, exclude=("structure", "mp_id"))
    meta["mp_id"] = mp_id  # the member name the frame sits under (the frame's own "mp_id" is the same)
    sdict = frame.get("structure")
    if not isinstance(sdict, Mapping):
        raise RecordError("unparseable", f"frame {frame_id!r} has no 'structure' dict")
    crystal = from_pymatgen(Structure.from_dict(sdict), id=frame_id, labels=labels)
    forces = frame.get("force")
    forces = None if forces is None else forces_array(forces, crystal.n_atoms, frame_id)
    stress = frame.get("stress")
    stress = None if stress is None else KBAR_TO_EV_PER_A3 * stress_3x3(stress, frame_id)
    return RawRecord(source, index, frame_id, crystal, labels, forces=forces, stress=stress, meta=meta)
