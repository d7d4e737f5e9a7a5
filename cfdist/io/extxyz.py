"""``extxyz``: extended XYZ (MPtrj style) with energy / forces / stress, plain or ``.gz``/``.bz2``.

Planning scans lines for frame boundaries (atom-count line, comment line, atom lines) without parsing
a frame, so chunks are byte ranges; a worker reads only its range and hands each frame to ASE.
String ``info`` entries (e.g. ``mptrj_traj_id``) become metadata; numeric ones labels.
"""

from __future__ import annotations

import functools
import io
import itertools
from typing import Iterable, Iterator

from cfdist.crystal import from_ase
from cfdist.io.records import (ID_KEYS, Chunk, RawRecord, RecordError, error_record, file_errors, first_id,
                               forces_array, guarded, id_key, numeric_labels, string_meta, stress_3x3)
from cfdist.io.spill import byte_chunks, open_binary, spill_source, spilling, with_data_path

SUFFIXES = (".xyz", ".extxyz", ".xyz.gz", ".xyz.bz2", ".extxyz.gz", ".extxyz.bz2")


def plan(path: str, fmt: str, chunk_size: int, spill_dir: str | None = None) -> list[Chunk]:
    """Byte-range chunks of whole frames; a malformed atom-count line raises ``ValueError`` naming the
    line (the file cannot be split into frames). Offsets of a ``.gz``/``.bz2`` input are into its
    decompressed stream, copied to the spill directory on the way when one is given."""
    source, copy, spill = spill_source(path, spill_dir)
    with open_binary(source) as f, spilling(copy) as sink:
        frames = [(start, line) for start, _, line in iter_xyz_frames(f, path, copy_to=sink)]
        end = f.tell()  # the (decompressed) length
    return with_data_path(byte_chunks(fmt, path, frames, end, chunk_size), spill)


def iter_xyz_frames(lines: Iterable[bytes], path: str, offset0: int = 0,
                     line0: int = 1, copy_to=None) -> Iterator[tuple[int, int, int]]:
    """Yield (start byte, end byte, first line number) per frame of an (ext)xyz byte-line stream.

    Frames are an atom-count line, a comment line and ``count`` atom lines (plus optional
    ``VEC1..3`` lines). Blank lines between frames are skipped. A last frame with fewer lines than
    announced is still yielded (it will fail to parse). A count line that is not an integer raises
    ``ValueError`` with the line number. ``copy_to``: a binary file every line read is also written
    to (the spill copy of a compressed input; complete once the generator is exhausted).
    """
    it = iter(lines)
    pos, lineno = offset0, line0 - 1
    pending: list[int] | None = None
    for line in it:
        if copy_to is not None:
            copy_to.write(line)
        lineno += 1
        start = pos
        pos += len(line)
        stripped = line.strip()
        if not stripped:
            continue
        if pending is not None and stripped[:3] == b"VEC":
            pending[1] = pos
            continue
        try:
            natoms = int(stripped)
        except ValueError:
            natoms = -1
        if natoms < 0:
            raise ValueError(f"{path}:line {lineno}: expected the atom count line of an extxyz frame, got "
                             f"{line[:80].decode('utf-8', 'replace')!r}; cannot split the file into frames")
        if pending is not None:
            yield tuple(pending)
        body = list(itertools.islice(it, natoms + 1))
        if copy_to is not None:
            copy_to.writelines(body)
        pos += sum(map(len, body))
        pending = [start, pos, lineno]
        lineno += len(body)
    if pending is not None:
        yield tuple(pending)


def read(chunk: Chunk) -> Iterator[RawRecord]:
    """The frames of one planned byte range, one record each (named ``<path>:line <n>``)."""
    # a .gz/.bz2 input without a spill copy: seeking decompresses (but does not parse) what comes before
    with file_errors(chunk.path), open_binary(chunk.data_path or chunk.path) as f:
        f.seek(chunk.byte_offset)
        buf = f.read(chunk.byte_length)
    line0 = chunk.line if chunk.line > 0 else 1
    index = chunk.start
    try:
        for start, end, line in iter_xyz_frames(io.BytesIO(buf), chunk.path, chunk.byte_offset, line0):
            source = f"{chunk.path}:line {line}" if chunk.line > 0 else f"{chunk.path}:{index}"
            text = buf[start - chunk.byte_offset:end - chunk.byte_offset]
            yield guarded(source, index, functools.partial(_extxyz_record, text, source, index))
            index += 1
    except ValueError as exc:  # the planned byte range no longer splits into frames (file modified?)
        for k in range(index, chunk.start + chunk.count):
            yield error_record(f"{chunk.path}:{k}", k, None, "unparseable", f"frame {k} unreadable: {exc}")


def _extxyz_record(data: bytes, source: str, index: int, partial: dict) -> RawRecord:
    import ase.io

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError("unparseable", f"frame is not valid UTF-8 ({exc})") from None
    try:
        atoms = ase.io.read(io.StringIO(text), format="extxyz", index=0)
    except Exception as exc:  # noqa: BLE001 - ASE raises many types for a malformed frame
        raise RecordError("unparseable", f"extxyz frame does not parse ({type(exc).__name__}: {exc})") from None
    info = atoms.info
    rid = partial["id"] = first_id(info, ("id", "mp_id", "material_id", "name"))
    meta = string_meta(info, exclude=(id_key(info, ("id", "mp_id", "material_id", "name")),))
    # ASE >= 3.23 moves energy/forces/stress into a SinglePointCalculator; older versions keep them
    # in info/arrays. Take both (calculator first).
    results = dict(getattr(atoms.calc, "results", None) or {}) if atoms.calc is not None else {}
    labels: dict[str, float] = {}
    if "energy" in results:
        labels["energy"] = float(atoms.get_potential_energy())
    for key, value in numeric_labels(results).items():
        labels.setdefault(key, value)
    for key, value in numeric_labels(info, exclude=ID_KEYS).items():
        labels.setdefault(key, value)
    partial["labels"] = labels
    where = rid or source
    forces = results.get("forces", atoms.arrays.get("forces"))
    forces = None if forces is None else forces_array(forces, len(atoms), where)
    stress = results.get("stress", info.get("stress"))
    stress = None if stress is None else stress_3x3(stress, where)
    crystal = from_ase(atoms, id=where, labels=labels)
    return RawRecord(source, index, rid, crystal, labels, forces=forces, stress=stress, meta=meta)
