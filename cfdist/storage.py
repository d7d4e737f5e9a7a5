"""Object storage wherever cfdist takes a path: ``s3://``, ``gs://`` and local paths, through ``pyarrow.fs``.

A *location* is a string: either a URI (``s3://bucket/key``, ``gs://bucket/key``) or a local path.
URIs never go through :mod:`pathlib` (``Path("s3://b/runs").resolve()`` is the local path
``<cwd>/s3:/b/runs``); local paths keep behaving as before.

    fs, path = filesystem("s3://bucket/shards/manifest.json")   # (pyarrow FileSystem, "bucket/shards/...")
    read_bytes(loc) / write_bytes(loc, data) / upload_file(local, loc) / upload_tree(local_dir, loc)
    exists(loc) / list_files(loc) / identity(loc)                 # identity: size + ETag (or mtime)
    copy(src, dst) / remove(loc)                                  # any pair of locations; a file or a tree
    cached_copy(loc)                                              # a local copy, downloaded once

Writes to object storage are never streamed: an exception inside ``fs.open_output_stream()``
still publishes the partial object (docs/storage.md). Files are written locally, then uploaded
whole (``upload_file``), and a small object written last (a manifest, a state file) is the commit
point that readers trust.

Credentials and endpoints come from the standard variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL_S3``;
``GOOGLE_APPLICATION_CREDENTIALS``, ``STORAGE_EMULATOR_HOST`` for a GCS emulator) and from the
optional ``storage`` config section (:class:`StorageSection`, endpoints and region only: secrets
stay in the environment, so they are never in a config file or a run directory).
:func:`worker_env` is what the Ray runtime environment forwards to every worker.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from cfdist.fileio import atomic_write, user_cache_dir

SCHEMES = ("s3", "gs", "gcs")
# forwarded to Ray workers (Ray does not forward AWS_* itself); never printed or written to run files
FORWARDED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                 "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_EC2_METADATA_DISABLED",
                 "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE",
                 "GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST", "CFDIST_CACHE_DIR")


class StorageError(OSError):
    """A storage operation failed; the message names the location and the reason."""


def is_uri(location: str | os.PathLike) -> bool:
    """True for ``s3://...`` / ``gs://...`` / ``gcs://...`` (a ``Path`` is always local)."""
    if not isinstance(location, str):
        return False
    scheme, sep, _ = location.partition("://")
    return bool(sep) and scheme.lower() in SCHEMES


def _check_scheme(location: str) -> None:
    scheme, sep, _ = location.partition("://")
    if sep and scheme.lower() not in SCHEMES and scheme.lower() != "file":
        raise StorageError(f"{location}: unsupported storage scheme {scheme!r} (cfdist reads s3://, gs:// and "
                           f"local paths)")


def absolute(location: str | os.PathLike) -> str:
    """A URI without trailing slashes, or the resolved local path (as a string)."""
    if is_uri(location):
        return str(location).rstrip("/")
    _check_scheme(str(location))
    return str(Path(location).expanduser().resolve())


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/part/...`` for URIs and local paths alike (a string)."""
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base).joinpath(*parts))


def basename(location: str | os.PathLike) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1] if is_uri(location) else Path(location).name


def relative(location: str, root: str) -> str:
    """``location`` relative to ``root`` (posix separators)."""
    if is_uri(location):
        return location[len(root.rstrip("/")) + 1:]
    return Path(location).relative_to(root).as_posix()


# ----------------------------------------------------------------------------- the storage section
@dataclass
class StorageSection:
    """Optional ``storage`` config section: where the object store is, never the secrets.

    endpoint: S3 endpoint URL (sets ``AWS_ENDPOINT_URL_S3`` unless already set), e.g. a MinIO or
    Ceph gateway ``http://10.0.0.5:9000``; region: ``AWS_DEFAULT_REGION``; gcs_endpoint: a GCS
    endpoint (``STORAGE_EMULATOR_HOST``). Keys (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
    ``GOOGLE_APPLICATION_CREDENTIALS``) come only from the environment or the instance's role.
    """

    endpoint: str = ""
    region: str = ""
    gcs_endpoint: str = ""

    def apply(self) -> None:
        """Set the corresponding variables in this process (an explicit environment variable wins),
        so that this process, and through :func:`worker_env` every Ray worker, uses them."""
        for name, value in (("AWS_ENDPOINT_URL_S3", self.endpoint), ("AWS_DEFAULT_REGION", self.region),
                            ("STORAGE_EMULATOR_HOST", self.gcs_endpoint)):
            if value and not os.environ.get(name):
                os.environ[name] = value
        _FILESYSTEMS.clear()


def worker_env() -> dict[str, str]:
    """The storage variables of this process, for a Ray ``runtime_env`` (``env_vars``)."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    if any(k.startswith("AWS_") for k in env) or os.environ.get("AWS_ENDPOINT_URL_S3"):
        # without a region the AWS SDK probes the instance metadata address (slow, not loopback)
        env.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    return env


# ----------------------------------------------------------------------------- filesystems
_FILESYSTEMS: dict[tuple, pafs.FileSystem] = {}
_LOCK = threading.Lock()


def _env_key() -> tuple:
    return tuple(os.environ.get(k, "") for k in FORWARDED_ENV)


def _make_filesystem(scheme: str, location: str) -> pafs.FileSystem:
    if scheme == "s3":
        if os.environ.get("AWS_ENDPOINT_URL_S3"):  # a custom endpoint: no instance-metadata probe
            os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
        # from_uri honours AWS_ENDPOINT_URL_S3 (the plain constructor does not)
        fs, _ = pafs.FileSystem.from_uri(location)
        return fs
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        scheme_, _, host = emulator.rpartition("://")
        return pafs.GcsFileSystem(anonymous=True, endpoint_override=host, scheme=scheme_ or "http",
                                  project_id=os.environ.get("GOOGLE_CLOUD_PROJECT", "cfdist"))
    return pafs.GcsFileSystem()  # application default credentials (GOOGLE_APPLICATION_CREDENTIALS)


def filesystem(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` for a location; one filesystem per scheme and environment."""
    if not is_uri(location):
        _check_scheme(str(location))
        return pafs.LocalFileSystem(), absolute(location)
    location = str(location)
    scheme, _, rest = location.partition("://")
    scheme = "s3" if scheme.lower() == "s3" else "gs"
    key = (scheme, _env_key())
    with _LOCK:
        fs = _FILESYSTEMS.get(key)
        if fs is None:
            try:
                fs = _FILESYSTEMS[key] = _make_filesystem(scheme, location)
            except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for bad settings
                raise StorageError(f"{location}: cannot open the {scheme} filesystem ({exc})") from exc
    return fs, rest.rstrip("/")


def _info(location: str) -> pafs.FileInfo:
    fs, path = filesystem(location)
    try:
        return fs.get_file_info(path)
    except OSError as exc:
        raise StorageError(f"{location}: {exc}") from exc


def exists(location: str | os.PathLike) -> bool:
    return _info(str(location)).type != pafs.FileType.NotFound


def is_file(location: str | os.PathLike) -> bool:
    return _info(str(location)).type == pafs.FileType.File


def size(location: str | os.PathLike) -> int:
    info = _info(str(location))
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{location}: no such file")
    return int(info.size)


def list_files(location: str | os.PathLike) -> list[tuple[str, int]]:
    """Every file under ``location`` (recursive) as ``(relative posix path, size)``, sorted; [] if none."""
    fs, root = filesystem(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise StorageError(f"{location}: cannot list ({exc})") from exc
    return sorted((i.path[len(root) + 1:], int(i.size)) for i in infos if i.type == pafs.FileType.File)


def identity(location: str | os.PathLike) -> dict:
    """What changes when the object changes: ``{"size", "etag"}`` for object storage (S3 ETag, GCS
    etag or generation), ``{"size", "mtime_ns", "ctime_ns", "inode"}`` for a local file.
    FileNotFoundError if it does not exist."""
    location = str(location)
    if not is_uri(location):
        st = os.stat(location)
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}
    fs, path = filesystem(location)
    try:
        with fs.open_input_file(path) as fh:  # a HEAD request: nothing is read
            meta = {k.lower(): v for k, v in (fh.metadata() or {}).items()}
            n = fh.size()
    except FileNotFoundError:
        raise
    except OSError as exc:
        if "not found" in str(exc).lower() or "does not exist" in str(exc).lower():
            raise FileNotFoundError(f"{location}: no such object") from exc
        raise StorageError(f"{location}: {exc}") from exc
    tag = meta.get("etag") or meta.get("generation") or meta.get("last-modified") or meta.get("updated") or b""
    return {"size": int(n), "etag": tag.decode() if isinstance(tag, bytes) else str(tag)}


# ----------------------------------------------------------------------------- reading and writing
def open_input_file(location: str | os.PathLike):
    """A random-access file (Parquet footers and row groups are then range requests)."""
    fs, path = filesystem(location)
    try:
        return fs.open_input_file(path)
    except OSError as exc:
        if is_uri(location) and "not found" in str(exc).lower():
            raise FileNotFoundError(f"{location}: no such object") from exc
        raise


def read_bytes(location: str | os.PathLike) -> bytes:
    if not is_uri(location):
        return Path(location).read_bytes()
    with open_input_file(location) as fh:
        return fh.read()


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode()


def write_bytes(location: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` atomically: a local file through a renamed temporary, an object by one upload
    of a complete local file (never a stream that could publish a partial object)."""
    if not is_uri(location):
        with atomic_write(location) as tmp:
            tmp.write_bytes(data)
        return str(location)
    with tempfile.TemporaryDirectory(prefix="cfdist-upload-") as tmp:
        local = Path(tmp) / "data"
        local.write_bytes(data)
        upload_file(local, location)
    return str(location)


def write_text(location: str | os.PathLike, text: str) -> str:
    return write_bytes(location, text.encode())


def upload_file(local: str | os.PathLike, location: str | os.PathLike) -> str:
    """Copy a complete local file to ``location`` (an object, or a local path via an atomic rename)."""
    if not is_uri(location):
        if Path(local).resolve() != Path(location).resolve():
            with atomic_write(location) as tmp:
                shutil.copyfile(local, tmp)
        return str(location)
    fs, path = filesystem(location)
    try:
        pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    except OSError as exc:
        raise StorageError(f"{location}: upload of {local} failed ({exc})") from exc
    return str(location)


def upload_tree(local_dir: str | os.PathLike, location: str | os.PathLike, *, skip=()) -> list[str]:
    """Upload every file under ``local_dir`` to ``location/<relative path>`` (names in ``skip`` and
    their subtrees excluded); returns the relative paths uploaded."""
    local_dir = Path(local_dir)
    done = []
    for file in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        rel = file.relative_to(local_dir).as_posix()
        if rel.split("/")[0] in skip:
            continue
        upload_file(file, join(location, rel))
        done.append(rel)
    return done


def copy(source: str | os.PathLike, dest: str | os.PathLike) -> str:
    """Copy one file between any two locations (local or object storage), through a local
    temporary for object storage: the destination appears whole or not at all."""
    if not is_uri(source):
        return upload_file(source, dest)
    with tempfile.TemporaryDirectory(prefix="cfdist-copy-") as tmp:
        local = download_file(source, Path(tmp) / basename(str(source)))
        return upload_file(local, dest)


def remove(location: str | os.PathLike) -> None:
    """Delete ``location``: a file, or a directory / object prefix with everything under it; no
    error when it does not exist."""
    if not is_uri(location):
        path = Path(location)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        return
    fs, path = filesystem(location)
    try:
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)
            return
        # object by object: a prefix is no directory on S3 / GCS (and may hold "directory" markers)
        for rel, _ in list_files(location):
            fs.delete_file(f"{path}/{rel}")
    except OSError as exc:
        raise StorageError(f"{location}: cannot delete ({exc})") from exc


def download_file(location: str | os.PathLike, local: str | os.PathLike) -> Path:
    """Copy ``location`` to the local path ``local`` (atomically: complete or absent)."""
    local = Path(local)
    if not is_uri(location):
        with atomic_write(local) as tmp:
            shutil.copyfile(location, tmp)
        return local
    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(f"{location}: no such object")
    with atomic_write(local) as tmp:
        pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local


def download_tree(location: str, local_dir: str | os.PathLike) -> Path:
    """Every file under ``location`` into ``local_dir`` (same relative paths)."""
    local_dir = Path(local_dir)
    for rel, _ in list_files(location):
        download_file(join(location, rel), local_dir / rel)
    return local_dir


def cached_copy(location: str | os.PathLike, kind: str = "objects") -> Path:
    """A local copy of ``location``: the path itself when local, else a file in the user cache
    (``<cache>/<kind>/<key>/<name>``) keyed by the URI and the object's identity (size + ETag), so
    it is downloaded once and again only when the object changes."""
    if not is_uri(location):
        return Path(location)
    ident = identity(location)
    key = hashlib.sha256(f"{location}\0{ident['size']}\0{ident['etag']}".encode()).hexdigest()[:32]
    dest = user_cache_dir() / kind / key / basename(location)
    if not dest.is_file() or dest.stat().st_size != ident["size"]:
        download_file(location, dest)
    return dest


def staging_dir(location: str, kind: str = "runs") -> Path:
    """A local directory that stands for the remote directory ``location`` (files are written here,
    then uploaded): ``<cache>/<kind>/<hash of the URI>-<last name>``; created."""
    key = hashlib.sha256(location.encode()).hexdigest()[:16]
    path = user_cache_dir() / kind / f"{key}-{basename(location)}"
    path.mkdir(parents=True, exist_ok=True)
    return path
