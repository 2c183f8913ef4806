"""A real S3-compatible server for tests: moto's server mode on 127.0.0.1, started by the tests themselves.

``s3_server`` (session) serves moto's S3 through a thin WSGI layer that logs every request (method, key, status,
response bytes) and can fail the next requests with a real HTTP 503, the way a throttled or overloaded store does,
hold requests (a stalled store, or a deterministic point to kill an uploading process), and ignore conditional
headers (``If-None-Match``/``If-Match``, as some S3-compatible stores do).
``s3_bucket`` (per test) creates a fresh bucket and points the standard AWS environment at the server: endpoint,
fake credentials, no config files, no instance metadata, so nothing a developer has configured is ever used.
``upload_dir`` copies a local cache folder into the bucket. Import the fixtures into a test module::

    from tests.s3_server import s3_bucket, s3_server  # noqa: F401  (pytest fixtures)

Nothing here mocks a client: the code under test talks HTTP to a server listening on a socket.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest


@dataclass
class Request:
    method: str
    path: str
    status: int
    bytes: int


@dataclass
class _Faults:
    fail_next: int = 0
    status: int = 503
    match: str = ""
    stall_next: int = 0
    stall_seconds: float = 0.0
    stall_methods: tuple[str, ...] = ("GET",)
    stalled: threading.Event = field(default_factory=threading.Event)
    """Set when a stall begins (a test can act while the request is held)."""
    ignore_conditions: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, method: str, path: str) -> int | None:
        with self.lock:
            if self.fail_next > 0 and method == "GET" and self.match in path:
                self.fail_next -= 1
                return self.status
        return None

    def stall(self, method: str, path: str) -> float:
        with self.lock:
            if self.stall_next > 0 and method in self.stall_methods and self.match in path:
                self.stall_next -= 1
                self.stalled.set()
                return self.stall_seconds
        return 0.0


class _Recorder:
    """WSGI middleware: record each request and its response size; inject 5xx responses on demand."""

    def __init__(self, app):
        self.app = app
        self.log: list[Request] = []
        self.faults = _Faults()
        self._lock = threading.Lock()
        self.inflight = 0
        self.max_inflight = 0
        """Most GET requests served at once since the last ``reset_inflight()``."""

    def reset_inflight(self) -> None:
        with self._lock:
            self.max_inflight = self.inflight

    def __call__(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        if path == LOG_PATH:  # the request log, for a server run in another process (benchmarks)
            with self._lock:
                body = json.dumps([[r.method, r.path, r.status, r.bytes] for r in self.log]).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        if method != "GET":
            return self._serve(environ, start_response, method, path)
        with self._lock:
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            return self._serve(environ, start_response, method, path)
        finally:
            with self._lock:
                self.inflight -= 1

    def _serve(self, environ, start_response, method, path):
        if self.faults.ignore_conditions:  # a store that does not implement conditional writes
            environ.pop("HTTP_IF_NONE_MATCH", None)
            environ.pop("HTTP_IF_MATCH", None)
        delay = self.faults.stall(method, path)
        if delay:
            time.sleep(delay)  # a store that accepts the request and then says nothing
        status = self.faults.take(method, path)
        if status is not None:
            body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                    b"<Message>Please reduce your request rate.</Message></Error>")
            start_response(f"{status} Service Unavailable", [("Content-Type", "application/xml"),
                                                              ("Content-Length", str(len(body)))])
            self._record(method, path, status, len(body))
            return [body]
        seen = {}

        def start(status_line, headers, exc_info=None):
            seen["status"] = int(status_line.split()[0])
            return start_response(status_line, headers, exc_info)

        chunks = list(self.app(environ, start))
        self._record(method, path, seen.get("status", 0), sum(len(c) for c in chunks))
        return chunks

    def _record(self, method, path, status, nbytes):
        with self._lock:
            self.log.append(Request(method, path, status, nbytes))


def _unbound_context_proxies_look_missing() -> None:
    """Let ``hasattr`` answer False on flask's context proxies (``flask.request``, ...) outside a request.

    moto's server imports flask, whose module-level proxies raise RuntimeError ("Working outside of application
    context") on any attribute lookup outside a request. vLLM scans every module's globals with ``hasattr(value,
    "__dict__")`` when it builds an engine (``vllm.triton_utils.dispatcher._rebind_kernels``), and ``hasattr`` only
    swallows AttributeError: in a process that has started this server, building a vLLM engine failed. Inside a
    request (all that moto does) nothing changes."""
    from werkzeug import local

    lookup = local._ProxyLookup
    if getattr(lookup, "_rlkd_patched", False):
        return
    original = lookup.__get__

    def __get__(self, instance, owner=None):
        try:
            return original(self, instance, owner)
        except RuntimeError as e:
            raise AttributeError(str(e)) from e

    lookup.__get__ = __get__
    lookup._rlkd_patched = True


class S3Server:
    """moto's S3 on 127.0.0.1:port; ``stop()`` and ``start()`` again keep the data (moto keeps it in-process)."""

    def __init__(self):
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

        _unbound_context_proxies_look_missing()

        self.recorder = _Recorder(DomainDispatcherApplication(create_backend_app))
        self.port = _free_port()
        self._server = None
        self._thread = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        import logging

        from moto.moto_server.werkzeug_app import MotoRequestHandler
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise; see .log instead

        self._server = make_server("127.0.0.1", self.port, self.recorder, threaded=True,
                                   request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="moto-s3", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = None

    @property
    def log(self) -> list[Request]:
        return self.recorder.log

    def fail_next(self, n: int, *, status: int = 503, match: str = "") -> None:
        """Answer the next ``n`` GET requests whose path contains ``match`` with HTTP ``status``."""
        with self.recorder.faults.lock:
            self.recorder.faults.fail_next, self.recorder.faults.status = n, status
            self.recorder.faults.match = match

    def stall_next(self, n: int, seconds: float, *, match: str = "", methods: tuple[str, ...] = ("GET",)) -> None:
        """Hold the next ``n`` requests (of ``methods``) whose path contains ``match`` for ``seconds`` before
        answering; ``recorder.faults.stalled`` is set when the first one arrives."""
        with self.recorder.faults.lock:
            self.recorder.faults.stall_next, self.recorder.faults.stall_seconds = n, seconds
            self.recorder.faults.match, self.recorder.faults.stall_methods = match, tuple(methods)
            self.recorder.faults.stalled.clear()

    def ignore_conditions(self, on: bool = True) -> None:
        """Drop ``If-None-Match`` / ``If-Match`` from requests, like a store without conditional writes."""
        self.recorder.faults.ignore_conditions = on

    def gets(self, match: str = "") -> list[Request]:
        """Successful GETs whose path contains ``match``, in order."""
        return [r for r in list(self.log) if r.method == "GET" and match in r.path and r.status < 300]


LOG_PATH = "/_rlkd/request-log"
"""GET this path for the request log as JSON ``[[method, path, status, bytes], ...]``."""


def fetch_log(endpoint: str) -> list[Request]:
    """The request log of a server started with ``python -m tests.s3_server`` (in another process)."""
    from urllib.request import urlopen

    with urlopen(endpoint + LOG_PATH) as r:
        return [Request(*row) for row in json.loads(r.read())]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server()
    server.start()
    yield server
    server.stop()


@dataclass
class Bucket:
    name: str
    server: S3Server

    def url(self, prefix: str = "") -> str:
        return f"s3://{self.name}/{prefix}".rstrip("/")

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.server.endpoint, region_name="us-east-1")

    def keys(self, prefix: str = "") -> list[str]:
        out = self.client().list_objects_v2(Bucket=self.name, Prefix=prefix)
        return sorted(o["Key"] for o in out.get("Contents", []))


S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
          "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION",
          "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED")


def s3_environment(server: S3Server, scratch: Path) -> dict[str, str | None]:
    """The standard AWS environment pointed at ``server`` (None: unset): fake credentials, no config files, no
    instance metadata, so nothing a developer has configured is ever used. Child processes inherit it."""
    env: dict[str, str | None] = dict.fromkeys(S3_ENV)
    env.update(AWS_ENDPOINT_URL=server.endpoint, AWS_ACCESS_KEY_ID="rlkd-test-key",
               AWS_SECRET_ACCESS_KEY="rlkd-test-secret", AWS_DEFAULT_REGION="us-east-1",
               AWS_CONFIG_FILE=str(scratch / "no-aws-config"),
               AWS_SHARED_CREDENTIALS_FILE=str(scratch / "no-aws-credentials"), AWS_EC2_METADATA_DISABLED="true")
    return env


def set_environment(monkeypatch, env: dict[str, str | None]) -> None:
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


def new_bucket(server: S3Server) -> Bucket:
    """A fresh, empty bucket on ``server``."""
    bucket = Bucket(f"rlkd-test-{uuid.uuid4().hex[:16]}", server)
    bucket.client().create_bucket(Bucket=bucket.name)
    return bucket


@pytest.fixture
def s3_bucket(s3_server, monkeypatch, tmp_path):
    set_environment(monkeypatch, s3_environment(s3_server, tmp_path))
    yield new_bucket(s3_server)


def upload_dir(local: str | Path, bucket: Bucket, prefix: str) -> str:
    """Copy every file under ``local`` to ``s3://bucket/prefix/...``; return that URL."""
    client = bucket.client()
    local = Path(local)
    for path in sorted(local.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket.name, f"{prefix}/{path.relative_to(local).as_posix()}")
    return bucket.url(prefix)


def flip_byte(bucket: Bucket, key: str, offset: int) -> None:
    """Invert one byte of an object in place (download, flip, put back)."""
    client = bucket.client()
    data = bytearray(client.get_object(Bucket=bucket.name, Key=key)["Body"].read())
    data[offset] ^= 0xFF
    client.put_object(Bucket=bucket.name, Key=key, Body=bytes(data))


def main() -> None:
    """``python -m tests.s3_server [--port N]``: serve until killed, in its own process (and its own GIL: a
    benchmark should not share an interpreter with a pure-Python server). Prints the endpoint."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    server = S3Server()
    if args.port:
        server.port = args.port
    server.start()
    print(server.endpoint, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()

