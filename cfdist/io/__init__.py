"""Reading raw structure files: every input format the preprocessor and ``cfdist predict`` accept.

    registry.py         THE table of formats (name -> file endings, plan, read, sniff, marker, cut
                        reader) and the entry points that dispatch through it: infer_format,
                        plan_chunks (driver), read_chunk (worker), read_prefix (cut files)
    inputs.py           what a user names -> inputs (expand_inputs) -> records with ids
                        (iter_input_records; FileError rows for inputs that cannot be read)
    records.py          Chunk, RawRecord, and turning one bad record into an error record
    spill.py            planning helpers: plain / byte-range / list-element chunks, .gz/.bz2 spill
    json_scan.py        element boundaries of a JSON list without decoding it (streamed planning)
    json_container.py   JSON list / JSON lines / {"entries": [...]} containers of the JSON family
    jarvis.py           --format jarvis      JARVIS / MEGNet records
    pymatgen_dicts.py   --format pymatgen    Structure / ComputedStructureEntry dicts, MP / Alexandria
    extxyz.py           --format extxyz      extended XYZ, plain / .gz / .bz2
    ase_db.py           --format ase_db      ASE database (.db, ASE JSON)
    cif.py              --format cif         directory with id_prop.csv, or a CIF file
    mptrj.py            --format mptrj       MPtrj's one JSON object {mp_id: {frame_id: frame}}
    aselmdb.py          --format aselmdb     fairchem's .aselmdb (OMat24, sAlex), read with lmdb
    parquet_table.py    --format parquet     a Parquet table through a column mapping (LeMat-Bulk preset)
    cut_json.py         prediction's reader of JSON inputs cut short (partial downloads)

Contract of every reader: planning is deterministic and parses no structure; ``read(chunk)`` yields
the chunk's records in order and never raises for a bad record (it comes back with ``error_reason``
and ``error``, so every input record is written or rejected with a reason); crystals are not
validated here. Only whole-file failures raise, naming the path.

How to add a format (e.g. ``mptrj``, ``aselmdb``, ``parquet``):

1. Write ``cfdist/io/<name>.py`` with ``plan(path, fmt, chunk_size, spill_dir) -> list[Chunk]`` and
   ``read(chunk) -> Iterator[RawRecord]``. Chunks say where their records are in the format's own
   terms: a byte range (``byte_offset``/``byte_length``/``line``, as extxyz and JSON do; a 12 GB
   object-keyed JSON is planned as byte spans of its members, found by a byte scan like
   :mod:`cfdist.io.json_scan`'s, never by decoding the object), an index range (``start``/``count``
   only, as database rows), or ``Chunk.part``, a string the format alone interprets (a Parquet
   row-group index, the first key of an LMDB shard). Build records with
   :func:`cfdist.io.records.guarded` so a bad record becomes an error record; use
   :func:`~cfdist.io.records.numeric_labels` / :func:`~cfdist.io.records.string_meta` for labels and
   metadata, :mod:`cfdist.io.spill` for ``.gz``/``.bz2`` inputs.
2. Add one :class:`~cfdist.io.registry.Format` row to :data:`cfdist.io.registry.REGISTRY`: its name,
   file endings, ``plan``, ``read``; a ``sniff(path) -> name | None`` if it shares an ending with
   other formats (sniffs run in table order: put the more specific layout first; the JSON family's
   sniff decodes a top-level object that is neither a list nor an ``entries`` dump whole), a
   ``marker`` if its inputs are directories, a ``cut`` reader if prediction should read its partial
   files.
   ``--format NAME``, inference, ``expand_inputs``, preprocessing and prediction then know it.
3. Add its tests (fixtures written by the format's own tools where one exists); the registry test
   checks it is reachable by ``--format NAME`` and by each of its endings.

Nothing here imports from the layers above (preprocess, manifest, data, stream, model, run, train,
finetune, predict, cli).
"""

from cfdist.io.cut_json import TruncatedInputError
from cfdist.io.inputs import FILE_REASONS, FileError, expand_inputs, file_error, iter_input_records
from cfdist.io.records import MAX_META_CHARS, MAX_META_FIELDS, Chunk, RawRecord, UnknownFormatError, default_id
from cfdist.io.registry import (FORMATS, KNOWN_SUFFIXES, REGISTRY, Format, infer_format, plan_chunks, read_chunk,
                                read_prefix)

__all__ = [
    "FORMATS",
    "KNOWN_SUFFIXES",
    "REGISTRY",
    "FILE_REASONS",
    "Format",
    "Chunk",
    "RawRecord",
    "FileError",
    "default_id",
    "file_error",
    "infer_format",
    "expand_inputs",
    "plan_chunks",
    "read_chunk",
    "read_prefix",
    "iter_input_records",
    "UnknownFormatError",
    "TruncatedInputError",
    "MAX_META_FIELDS",
    "MAX_META_CHARS",
]
