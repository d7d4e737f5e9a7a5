"""Small file helpers shared by every stage: atomic writes, content digests, the user cache directory.

A file written through :func:`atomic_write` is either absent or complete: the bytes go to a
temporary sibling (named with the process id, so concurrent writers never share one) that is
renamed over the target, which POSIX makes atomic on one file system.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

TMP_MARK = ".tmp-"  # temporary files are ``.<name>.tmp-<pid>``; a killed run's leftovers match ``.*.tmp-*``


@contextlib.contextmanager
def atomic_write(path: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on error it is removed.

        with atomic_write(out / "rejects.jsonl") as tmp:
            tmp.write_text(...)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: str | Path, data: Any, **dumps_kwargs) -> Path:
    """``json.dumps(data, **dumps_kwargs)`` to ``path`` atomically (default: indent=1, str() for unknowns)."""
    dumps_kwargs.setdefault("default", str)
    if "sort_keys" not in dumps_kwargs:
        dumps_kwargs.setdefault("indent", 1)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, **dumps_kwargs))
    return Path(path)


def user_cache_dir() -> Path:
    """cfdist's per-user cache directory (not created): ``$CFDIST_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/cfdist``, else ``~/.cache/cfdist``. Holds only data that can be recomputed
    (e.g. shard verification records for read-only shard directories)."""
    if os.environ.get("CFDIST_CACHE_DIR"):
        return Path(os.environ["CFDIST_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cfdist"


def sha256_file(path: str | Path, block_size: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in blocks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(block_size), b""):
            digest.update(block)
    return digest.hexdigest()
