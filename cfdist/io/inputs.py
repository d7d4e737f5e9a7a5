"""From what a user names to records: input patterns to input paths (:func:`expand_inputs`), and every
input's records in order with an id each (:func:`iter_input_records`), the way ``cfdist predict``,
``cfdist evaluate`` and fine-tuning's split files read raw inputs.

An input that cannot be found, opened, recognised or planned either raises (as the preprocessor does)
or, for prediction, becomes one :class:`FileError` record naming the file and the reason
(:data:`FILE_REASONS`); a JSON list or JSON-lines input cut short gives its complete records and one
``truncated`` file error for the rest.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from cfdist.io.cut_json import TruncatedInputError
from cfdist.io.records import RawRecord, UnknownFormatError, default_id
from cfdist.io.registry import (CutReader, cut_reader, infer_format, known_suffixes, markers, plan_chunks, read_chunk,
                                suffix_of)

# Why a whole input (or the rest of one) gave no records.
FILE_REASONS = ("not_found", "permission_denied", "unknown_format", "unreadable_file", "truncated", "empty")


@dataclass
class FileError(RawRecord):
    """An input (or the rest of one) that yields no records: ``source`` is its path, ``id`` its file
    name, ``index`` -1, ``error_reason`` one of :data:`FILE_REASONS`."""


def file_error(path: str, reason: str, detail: str) -> FileError:
    """The error record for an input that cannot be read; the message starts with the path and reason."""
    name = os.path.basename(os.path.normpath(path)) or path
    return FileError(source=path, index=-1, id=name, crystal=None, labels={}, error_reason=reason,
                     error=f"{path}: {reason}: {detail}")


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files, directories or globs -> sorted, de-duplicated absolute input paths.

    A directory with a format's marker file (``cif``: ``id_prop.csv``) is one input (the directory);
    the marker file stands for its directory. Other directories are searched recursively for files
    with known extensions (sub-directories with a marker are single inputs). Files named explicitly are
    kept whatever their extension; files matched by a glob only with a known extension. A pattern
    that yields no input raises ``FileNotFoundError`` naming it.
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    out: set[str] = set()
    for pattern in patterns:
        pat = os.path.expanduser(os.fspath(pattern))
        magic = glob.has_magic(pat)
        matches = sorted(glob.glob(pat, recursive=True)) if magic else ([pat] if os.path.exists(pat) else [])
        found: set[str] = set()
        for match in matches:
            match = os.path.abspath(match)
            if os.path.isdir(match):
                found.update(_walk_inputs(match))
            elif os.path.basename(match) in markers():
                found.add(os.path.dirname(match))
            elif not magic or suffix_of(match) is not None:
                found.add(match)
        if not found:
            raise FileNotFoundError(f"input pattern {os.fspath(pattern)!r} matches no input "
                                    + ("file or directory" if not matches else
                                       f"of a known format ({len(matches)} path(s) matched, none usable)"))
        out |= found
    return sorted(out)


def _walk_inputs(root: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if any(marker in filenames for marker in markers()):
            found.append(os.path.abspath(dirpath))
            dirnames[:] = []  # the CIFs below belong to this input
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and suffix_of(name) is not None:
                found.append(os.path.abspath(os.path.join(dirpath, name)))
    return found


def iter_input_records(inputs: Sequence[str], fmt: str | None = None, chunk_size: int = 1024,
                       on_error: str = "raise") -> Iterator[RawRecord]:
    """Raw records of every input, in order (see :mod:`cfdist.io.registry`), each with an id.

    A record that cannot be read is an error record either way. An input that cannot be found,
    opened, recognised or planned: ``on_error="raise"`` raises (as the preprocessor does);
    ``on_error="row"`` yields one file error record for it instead (``error_reason`` in
    :data:`FILE_REASONS`, ``source`` the path, ``id`` the file name) and goes on with the other
    inputs. With ``"row"`` a JSON list or JSON-lines input that is cut short yields its complete
    records and then one ``truncated`` file error for the rest.
    """
    if on_error not in ("raise", "row"):
        raise ValueError(f"on_error must be 'raise' or 'row', got {on_error!r}")
    if on_error == "raise":
        paths = expand_inputs(list(inputs))
        if not paths:
            raise FileNotFoundError(f"no input structures found in {list(inputs)}")
        for path in paths:
            for chunk in plan_chunks(path, fmt or infer_format(path), chunk_size):
                yield from _with_ids(chunk.path, read_chunk(chunk))
        return
    for path, problem in _expand_each(inputs):
        if problem is not None:
            yield problem
        else:
            yield from _read_input(path, fmt, chunk_size)


def _with_ids(path: str, records: Iterable[RawRecord]) -> Iterator[RawRecord]:
    """Records without an id get the one the preprocessor gives them (split files match)."""
    for record in records:
        yield record if record.id else dataclasses.replace(record, id=default_id(path, record.index))


def _expand_each(inputs: Sequence[str]) -> list[tuple[str, FileError | None]]:
    """(path, None) for every input found, (the pattern's path, file error) for a pattern that gives
    none; sorted by path as :func:`expand_inputs` sorts."""
    found: dict[str, FileError | None] = {}
    for pattern in inputs:
        try:
            for path in expand_inputs([pattern]):
                found[path] = None
        except FileNotFoundError as exc:
            path = os.path.abspath(os.path.expanduser(os.fspath(pattern)))
            found.setdefault(path, _pattern_error(path, exc, glob.has_magic(path) and bool(glob.glob(path))))
    return sorted(found.items())


def _pattern_error(path: str, exc: Exception, matched: bool) -> FileError:
    """Why an input pattern gave no input: a broken link, an unreadable or empty directory, a glob
    matching no file of a known format (``matched``), nothing there."""
    if os.path.islink(path) and not os.path.exists(path):
        return file_error(path, "not_found", f"broken symbolic link (to {os.readlink(path)!r})")
    if os.path.isdir(path):
        if not os.access(path, os.R_OK | os.X_OK):
            return file_error(path, "permission_denied", "directory cannot be listed (permission denied)")
        files = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, names in os.walk(path)
                       for f in names if not f.startswith("."))
        known = f"{' or '.join(markers())} or files ending in {', '.join(known_suffixes())}"
        if not files:
            return file_error(path, "empty", f"directory holds no files (looked for {known})")
        return file_error(path, "unknown_format", f"directory holds no structure files: {len(files)} file(s) "
                          f"({', '.join(files[:5])}{', ...' if len(files) > 5 else ''}), none is {known}")
    return file_error(path, "unknown_format" if matched else "not_found", str(exc))


def _read_input(path: str, fmt: str | None, chunk_size: int) -> Iterator[RawRecord]:
    """Records of one input; whatever stops the input becomes one file error (after the records before it)."""
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        yield file_error(path, "empty", "the file is empty (0 bytes)")
        return
    cut = cut_reader(path, fmt)  # None: the format has no way to read a file that stops early
    if cut is not None and cut.is_cut(path):  # read_chunk would reject the cut record as a record
        yield from _read_cut(cut, path, fmt, chunk_size, None)
        return
    try:
        chunks = plan_chunks(path, fmt or infer_format(path), chunk_size)
    except Exception as exc:  # noqa: BLE001 - one input must not stop the others
        if cut is not None and not isinstance(exc, (FileNotFoundError, PermissionError)):
            yield from _read_cut(cut, path, fmt, chunk_size, exc)  # a cut list still holds records; "[]" is empty
        else:
            yield file_error(path, _file_reason(exc), _message(exc, path))
        return
    if not chunks:
        yield file_error(path, "empty", "the input holds no structures")
        return
    n = 0
    try:
        for chunk in chunks:
            for record in _with_ids(chunk.path, read_chunk(chunk)):
                yield record
                n += 1
    except Exception as exc:  # noqa: BLE001 - read_chunk raises only when the input cannot be opened
        yield file_error(path, _file_reason(exc), _message(exc, path) + (f" (after {n} record(s))" if n else ""))


def _read_cut(cut: CutReader, path: str, fmt: str | None, chunk_size: int,
              planning_error: Exception | None) -> Iterator[RawRecord]:
    """Records of an input planning refused (or that ``cut`` says is cut), up to where its data stops;
    then one file error."""
    n = 0
    try:
        for record in _with_ids(path, cut.read(path, fmt, chunk_size, infer_format, read_chunk)):
            yield record
            n += 1
    except TruncatedInputError as exc:
        yield file_error(path, "truncated", exc.detail)
    except Exception as exc:  # noqa: BLE001
        # not a cut list: planning's message is the familiar one unless records came first
        shown = planning_error if planning_error is not None and not n and not isinstance(
            exc, (UnknownFormatError, PermissionError)) else exc
        yield file_error(path, _file_reason(shown), _message(shown, path))
    else:
        if not n:
            yield file_error(path, "empty", "the input holds no structures")


def _file_reason(exc: Exception) -> str:
    if isinstance(exc, PermissionError) or isinstance(exc.__cause__, PermissionError):
        return "permission_denied"
    if isinstance(exc, FileNotFoundError):
        return "not_found"
    if isinstance(exc, UnknownFormatError):
        return "unknown_format"
    if isinstance(exc, TruncatedInputError):
        return "truncated"
    return "unreadable_file"


def _message(exc: Exception, path: str) -> str:
    """The exception's message, without a leading copy of the path (the row's message starts with it)."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror and exc.filename else str(exc)
    for prefix in (f"{path}: ", f"{path!r}: ", f"{path}:"):
        if text.startswith(prefix):
            text = text[len(prefix):].lstrip()
    return text if isinstance(exc, (OSError, ValueError)) else f"{type(exc).__name__}: {text}"
