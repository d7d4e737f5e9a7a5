"""The one table of input formats, and the entry points that dispatch through it.

Every format is one :class:`Format` row of :data:`REGISTRY`: its name (``--format NAME``), the file
endings it is inferred from, how it plans chunks (driver) and how it reads a chunk into records
(worker), plus the optional hooks below. Nothing else in cfdist branches on a format's name:
:func:`infer_format`, :func:`plan_chunks`, :func:`read_chunk`, :func:`read_prefix` and
:func:`cfdist.io.inputs.expand_inputs` only look rows up here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import numpy as np

from cfdist.io import ase_db, aselmdb, cif, cut_json, extxyz, jarvis, mptrj, parquet_table, pymatgen_dicts
from cfdist.io.json_container import JSON_SUFFIXES, JSONL_SUFFIXES, json_format, plan_json
from cfdist.io.records import Chunk, RawRecord, UnknownFormatError, exactly, file_errors

# plan(path, format name, chunk_size, spill_dir) -> chunks in input order, stamped with that name
Plan = Callable[[str, str, int, "str | None"], list[Chunk]]
# read(chunk) -> exactly chunk.count records, in order (a bad record is an error record, never an exception)
Read = Callable[[Chunk], Iterator[RawRecord]]


@dataclass(frozen=True)
class CutReader:
    """How a format reads an input that stops early (prediction's partial downloads).

    Attributes:
        is_cut: ``is_cut(path)``: the input is cut although planning accepts it (e.g. a JSON-lines
            file whose last line breaks off), so prediction must read it this way from the start.
        read: ``read(path, fmt, chunk_size, infer, read_chunk)``: every complete record before the
            cut, then raises :class:`~cfdist.io.cut_json.TruncatedInputError` saying where the data
            stops (returns normally if it turns out complete); ``fmt`` None: named by ``infer``.
    """

    is_cut: Callable[[str], bool]
    read: Callable[..., Iterator[RawRecord]]


@dataclass(frozen=True)
class Format:
    """One registered input format.

    Attributes:
        name: the ``--format`` name, stored in manifests and in every :class:`Chunk`.
        suffixes: lower-case file endings the format is inferred from (and that
            :func:`~cfdist.io.inputs.expand_inputs` picks up in directories and globs).
        plan: ``plan(path, name, chunk_size, spill_dir)``: deterministic chunks of ``chunk_size``
            records (the last may be shorter) in input order, without parsing structures. Chunks
            say where their records are in whatever terms the format needs: a byte range (JSON,
            extxyz), an index range (CIF rows, database rows), or ``Chunk.part`` (e.g. a row group or
            the key of a keyed store). ``spill_dir``: where decompressed copies may be kept.
        read: ``read(chunk)``: the chunk's records in order; :func:`read_chunk` pads a shortfall.
        sniff: for a file ending several formats share: ``sniff(path)`` names the format the file
            holds, or None (or :class:`UnknownFormatError`, whose message is kept in case no other sniff
            claims the file) to let the next sniff decide. Sniffs run in table order, once each: put
            the more specific and cheaper one first. A name whose row does not claim the ending is an
            :class:`UnknownFormatError` (the data is that format's, in a container it is not read from).
        marker: a file whose directory is one input of this format (``cif``: ``id_prop.csv``).
        cut: how to read the format's inputs when they stop early, or None (prediction then reports
            the input as unreadable).
        check_options: for a format that takes reader options (``--energy-key``, ``--columns``):
            ``check_options(path, options)`` raises ``ValueError`` naming the path for an unknown
            option or value (it may look at the file, e.g. a table's columns); None: the format takes
            none. The reader finds them in ``Chunk.options``.
    """

    name: str
    suffixes: tuple[str, ...]
    plan: Plan
    read: Read
    sniff: Callable[[str], "str | None"] | None = None
    marker: str | None = None
    cut: CutReader | None = None
    check_options: Callable[[str, Mapping[str, str]], None] | None = None


_JSON_CUT = CutReader(is_cut=cut_json.json_lines_cut, read=cut_json.read_json_prefix)

REGISTRY: tuple[Format, ...] = (
    Format("cif", cif.SUFFIXES, cif.plan, cif.read, marker=cif.ID_PROP),
    # before the JSON family: its sniff reads only the head, theirs decodes a top-level object whole
    Format("mptrj", mptrj.SUFFIXES, mptrj.plan, mptrj.read, sniff=mptrj.sniff, check_options=mptrj.check_options),
    Format("jarvis", JSON_SUFFIXES + JSONL_SUFFIXES, plan_json, jarvis.read, sniff=json_format, cut=_JSON_CUT),
    Format("pymatgen", JSON_SUFFIXES + JSONL_SUFFIXES, plan_json, pymatgen_dicts.read, sniff=json_format,
           cut=_JSON_CUT),
    Format("extxyz", extxyz.SUFFIXES, extxyz.plan, extxyz.read),
    Format("ase_db", ase_db.SUFFIXES, ase_db.plan, ase_db.read, sniff=json_format),
    Format("aselmdb", aselmdb.SUFFIXES, aselmdb.plan, aselmdb.read),
    Format("parquet", parquet_table.SUFFIXES, parquet_table.plan, parquet_table.read,
           check_options=parquet_table.check_options),
)


def format_names() -> tuple[str, ...]:
    """The registered format names, in table order."""
    return tuple(f.name for f in REGISTRY)


def known_suffixes() -> tuple[str, ...]:
    """The file endings of inputs, in table order without repeats."""
    return tuple(dict.fromkeys(s for f in REGISTRY for s in f.suffixes))


def markers() -> tuple[str, ...]:
    """The marker files that make a directory one input."""
    return tuple(f.marker for f in REGISTRY if f.marker)


# Snapshots of the table for argument parsers (``choices=FORMATS``) and importers; the functions of
# this module read REGISTRY itself.
FORMATS: tuple[str, ...] = format_names()
KNOWN_SUFFIXES: tuple[str, ...] = known_suffixes()


def get_format(name: str, path: str = "") -> Format:
    """The row named ``name``; ``ValueError`` naming ``path`` and every registered name otherwise."""
    for f in REGISTRY:
        if f.name == name:
            return f
    where = f" for {path!r}" if path else ""
    raise ValueError(f"unknown format {name!r}{where}; expected one of {format_names()}")


def suffix_of(path: str) -> str | None:
    """The longest registered ending of ``path`` (case-insensitive), or None."""
    low = os.fspath(path).lower()
    for suffix in sorted(known_suffixes(), key=len, reverse=True):
        if low.endswith(suffix):
            return suffix
    return None


def marker_of(path: str) -> Format | None:
    """The format whose marker file is ``path`` or sits in directory ``path``, or None."""
    for f in REGISTRY:
        if f.marker and (os.path.basename(path) == f.marker or os.path.isfile(os.path.join(path, f.marker))):
            return f
    return None


def candidates(path: str) -> list[Format]:
    """The formats ``path`` may hold by its name: those claiming its longest ending, in table order."""
    suffix = suffix_of(path)
    return [f for f in REGISTRY if suffix in f.suffixes] if suffix else []


def infer_format(path: str) -> str:
    """Format name of one input; :class:`UnknownFormatError` (a ``ValueError``) naming the path if
    unknown, ``ValueError`` if the content that must tell formats apart cannot be decoded.

    A directory (or file) carrying a format's marker is that format (``cif``: ``id_prop.csv``). A file
    ending that one format claims is that format; when several claim it (``.json``: ``jarvis``,
    ``pymatgen``, an ASE JSON database), their sniffs look at the first records.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        marked = marker_of(path)
        if marked is not None:
            return marked.name
        raise UnknownFormatError(f"cannot infer the format of directory {path!r}: it has no "
                                 f"{' or '.join(markers())}")
    marked = marker_of(path) if os.path.basename(path) in markers() else None
    if marked is not None:
        return marked.name
    found = candidates(path)
    if len(found) == 1:
        return found[0].name
    names = [f.name for f in found]
    refusal: UnknownFormatError | None = None  # the first sniff's reason, if no later sniff claims the file
    for sniff in dict.fromkeys(f.sniff for f in found if f.sniff is not None):
        try:
            name = sniff(path)
        except UnknownFormatError as exc:
            refusal = refusal or exc
            continue
        if name in names:
            return name
        if name is not None:  # e.g. an ASE JSON database compressed: ASE reads only a plain .json
            raise UnknownFormatError(f"cannot read {path!r}: it holds {name} data, but {name} is read only from "
                                     f"files ending in {', '.join(get_format(name).suffixes)}")
    if refusal is not None:
        raise refusal
    if found:
        raise UnknownFormatError(f"cannot infer the format of {path!r}: none of {names} recognises it")
    raise UnknownFormatError(f"cannot infer the format of {path!r}: unknown extension (known: "
                             f"{' or '.join(markers())} directory, {', '.join(known_suffixes())})")


def plan_chunks(path: str, fmt: str, chunk_size: int, spill_dir: str | None = None,
                options: Mapping[str, str] | None = None) -> list[Chunk]:
    """Deterministic chunks of ``chunk_size`` records (the last may be shorter) of one input, in input
    order, planned by format ``fmt``'s row (see :class:`Format`); counts records without parsing
    structures. A whole-file read failure is re-raised as ``OSError`` naming the path.

    ``options``: reader options (``{"energy_key": ...}`` for mptrj, ``{"columns": ...}`` for
    parquet), checked by the format's ``check_options`` (``ValueError`` for a format that takes none)
    and stamped on every chunk (``Chunk.options``).

    ``spill_dir``: for a compressed (``.gz``/``.bz2``) byte-addressed input, keep the decompressed bytes
    there while planning (one pass) and point the chunks' ``data_path`` at them, so a worker seeks
    straight to its chunk instead of decompressing everything before it. An existing complete copy is
    reused.
    """
    spec = get_format(fmt, path)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"input {path!r} does not exist")
    options = dict(options or {})
    if options and spec.check_options is None:
        raise ValueError(f"format {spec.name} takes no reader options, got {sorted(options)} for {path!r}")
    with file_errors(path):
        if spec.check_options is not None:
            spec.check_options(path, options)
        chunks = spec.plan(path, spec.name, int(chunk_size), spill_dir)
    if not options:
        return chunks
    stamp = json.dumps(options, sort_keys=True)
    return [dataclasses.replace(c, options=stamp) for c in chunks]


def read_chunk(chunk: Chunk) -> Iterator[RawRecord]:
    """Yield exactly ``chunk.count`` records of ``chunk`` in order.

    A record that cannot be parsed is yielded with ``crystal=None`` and ``error_reason`` / ``error``
    set; a shortfall (the input changed since planning) is filled with such records. Raises only when
    the input itself cannot be opened (``FileNotFoundError`` / ``PermissionError`` / ``OSError``
    naming the path) or for an unknown format.
    """
    spec = next((f for f in REGISTRY if f.name == chunk.format), None)
    if spec is None:
        raise ValueError(f"unknown format {chunk.format!r} in chunk of {chunk.path!r}; "
                         f"expected one of {format_names()}")
    if not os.path.exists(chunk.path):
        raise FileNotFoundError(f"input {chunk.path!r} does not exist")
    return exactly(chunk, spec.read(chunk))


def cut_reader(path: str, fmt: str | None = None) -> CutReader | None:
    """How to read ``path`` if it stops early: the cut reader of ``fmt`` (or, ``fmt`` None, of the first
    format its ending may be) when ``path``'s ending belongs to that format; None when there is none."""
    found = [f for f in candidates(path) if fmt is None or f.name == fmt]
    return next((f.cut for f in found if f.cut is not None), None)


def read_prefix(path: str, fmt: str | None = None, chunk_size: int = 1024) -> Iterator[RawRecord]:
    """Every complete record of an input cut short, then :class:`~cfdist.io.cut_json.TruncatedInputError`
    saying where it stops (see :class:`CutReader`); ``ValueError`` when ``fmt`` / the file's ending
    has no cut reader."""
    reader = cut_reader(path, fmt)
    if reader is None:
        able = [f.name for f in REGISTRY if f.cut is not None]
        raise ValueError(f"no reader for cut files of {path!r}" + (f" as {fmt!r}" if fmt else "")
                         + f"; formats read this way: {able}")
    return reader.read(path, fmt, chunk_size, infer_format, read_chunk)
