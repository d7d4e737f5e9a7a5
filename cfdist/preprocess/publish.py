"""Shards on object storage: ``cfdist preprocess ... --out s3://bucket/shards`` (or ``gs://``).

The job builds into a local staging directory (the user cache, keyed by the URI: a re-run on the
same machine resumes from its chunk records), then publishes::

    every shard     uploaded whole after it was written and hashed locally (never a stream: an
                    exception inside fs.open_output_stream() still publishes the partial object)
    rejects.jsonl   uploaded
    manifest.json   uploaded LAST: the commit point. A reader trusts only the manifest, and every
                    object it names was complete before it was written.

A re-run (after a kill anywhere in the upload) skips shards whose object already has the
manifest's size, and finishes with the manifest; a bucket that already holds a manifest with
this build's content hash is left alone; one with another content hash is refused unless
``--overwrite``. Inputs may be URIs too (:func:`localize_inputs`: downloaded once into the user
cache, keyed by the object's identity).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Sequence

from cfdist import storage
from cfdist.manifest import MANIFEST
from cfdist.preprocess.splits import BuildError


def localize_inputs(inputs: Sequence[str]) -> list[str]:
    """Local paths for the inputs: an ``s3://`` / ``gs://`` object -> its cached copy; a URI prefix
    -> every object under it (cached); local paths and globs unchanged."""
    out = []
    for item in inputs:
        item = str(item)
        if not storage.is_uri(item):
            out.append(item)
            continue
        if storage.is_file(item):
            out.append(str(storage.cached_copy(item, "inputs")))
            continue
        files = storage.list_files(item)
        if not files:
            raise FileNotFoundError(f"{item}: no such object or prefix")
        out.extend(str(storage.cached_copy(storage.join(item, rel), "inputs")) for rel, _ in files)
    return out


def existing_build(uri: str) -> str | None:
    """The content hash of the manifest already at ``uri`` (None when there is none)."""
    location = storage.join(uri, MANIFEST)
    if not storage.is_file(location):
        return None
    return json.loads(storage.read_text(location)).get("content_hash")


def check_target(uri: str, digest: str, overwrite: bool) -> bool:
    """True when ``uri`` already holds this build (nothing to do); BuildError when it holds another
    one (unless ``overwrite``: then the old manifest is removed first, so no reader trusts a mix)."""
    existing = existing_build(uri)
    if existing is None:
        return False
    if existing == digest:
        return True
    if not overwrite:
        raise BuildError(f"{uri} holds shards with content hash {existing[:12]}, but this command's inputs/"
                         f"settings hash to {digest[:12]}; use a new --out or pass --overwrite to rebuild")
    fs, key = storage.filesystem(storage.join(uri, MANIFEST))
    fs.delete_file(key)
    return False


def publish(local_dir, uri: str, manifest: dict) -> dict:
    """Upload a finished local build to ``uri``: shards, rejects.jsonl, then the manifest (commit
    point). Returns ``{"uploaded", "skipped", "bytes", "seconds"}``."""
    t0 = time.perf_counter()
    uploaded = skipped = nbytes = 0
    present = dict(storage.list_files(uri))
    for shard in manifest["shards"]:
        if present.get(shard["file"]) == shard["bytes"]:  # uploaded by an earlier, interrupted run
            skipped += 1
            continue
        storage.upload_file(local_dir / shard["file"], storage.join(uri, shard["file"]))
        uploaded, nbytes = uploaded + 1, nbytes + shard["bytes"]
    if (local_dir / "rejects.jsonl").is_file():
        storage.upload_file(local_dir / "rejects.jsonl", storage.join(uri, "rejects.jsonl"))
    storage.upload_file(local_dir / MANIFEST, storage.join(uri, MANIFEST))
    report = {"uploaded": uploaded, "skipped": skipped, "bytes": nbytes, "seconds": time.perf_counter() - t0}
    print(f"published to {uri}: {uploaded} shard(s) uploaded ({nbytes:,} bytes), {skipped} already there, "
          f"manifest last ({report['seconds']:.2f} s)", file=sys.stderr)
    return report
