"""Where a cache lives: one filesystem layer (``pyarrow.fs``) for local folders and object stores.

A cache location is a plain path or a URL::

    cache/dolly, /data/cache, file:///data/cache    a local folder (pyarrow LocalFileSystem)
    s3://bucket/prefix                              S3 or an S3-compatible store (MinIO, Ceph, R2, moto, ...)
    gs://bucket/prefix                              Google Cloud Storage
    hf://datasets/org/name[@revision]/sub           a Hugging Face dataset repository, read-only

Credentials and endpoints come from the standard environment, never from rlkd's command line, and rlkd never prints
them (:func:`CacheLocation.parse` refuses URLs that carry any):

- S3: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` with
  ``~/.aws/credentials`` and ``~/.aws/config``, web identity, or the instance metadata service (the AWS SDK's chain).
  The endpoint of an S3-compatible store is ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (read here: Arrow's SDK
  does not), the region ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` (else the bucket's own region is looked up).
- GCS: Google's default credentials (``GOOGLE_APPLICATION_CREDENTIALS``, gcloud's login, the metadata server);
  ``STORAGE_EMULATOR_HOST`` points at an emulator.
- Hugging Face: ``HF_TOKEN`` or ``huggingface-cli login``.

Every read goes through :meth:`CacheLocation.read_range` / :meth:`read_bytes` / :meth:`download`, which retry
transient failures (5xx, throttling, timeouts, refused or reset connections) with exponential backoff
(:class:`RetryPolicy`) and then raise :class:`StorageError` naming the object. A missing object or a refused
permission is not retried. Writes are whole-object: a local file appears by rename, an object when its upload
completes (see :meth:`CacheLocation.write_bytes`). Why pyarrow.fs and not fsspec: ``docs/design.md``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from rlkd.errors import UserError

DOWNLOAD_SUFFIX = ".rlkd-download"
"""Suffix of the temporary files :meth:`CacheLocation.download` writes (renamed away when complete)."""
_SCHEME_ALIASES = {"s3a": "s3", "gcs": "gs"}


class StorageError(UserError, OSError):
    """An object could not be read or written: retries spent, or a permanent failure. Names the object."""


class StorageURLError(UserError, ValueError):
    """A cache location that rlkd cannot use (unknown scheme, credentials or options in the URL, no bucket)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How transient I/O failures are retried: ``attempts`` tries in all, sleeping ``first_delay`` seconds after
    the first failure and doubling up to ``max_delay`` (with 0-25% jitter, so that ranks do not retry in step).
    The default rides out about 30 s of an unreachable store; the AWS SDK also retries each request a few times
    within one attempt."""

    attempts: int = 7
    first_delay: float = 0.5
    max_delay: float = 10.0

    def delays(self):
        """The sleeps between attempts (``attempts - 1`` of them)."""
        delay = self.first_delay
        for _ in range(self.attempts - 1):
            yield delay * (1.0 + 0.25 * _JITTER.random())
            delay = min(self.max_delay, delay * 2)


_JITTER = random.Random()
"""Private: retries must not consume the global ``random`` state that training seeds."""


@dataclass
class IOStats:
    """Bytes and requests read from a location's store, counted in this process (thread-safe)."""

    bytes_read: int = 0
    requests: int = 0
    retries: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, nbytes: int, requests: int = 1) -> None:
        with self._lock:
            self.bytes_read += int(nbytes)
            self.requests += requests

    def add_retry(self) -> None:
        with self._lock:
            self.retries += 1

    def snapshot(self) -> dict:
        with self._lock:
            return {"bytes_read": self.bytes_read, "requests": self.requests, "retries": self.retries}


_PERMANENT_MARKERS = ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                      "NoSuchBucket", "NO_SUCH_BUCKET", "HTTP status 403", "HTTP status 404", "HTTP status 400",
                      "HTTP status 401", "INVALID_ACCESS_KEY_ID", "Forbidden", "Unauthorized",
                      "400 Client Error", "401 Client Error", "403 Client Error", "404 Client Error",
                      "Offline mode is enabled")
"""Substrings of error messages (Arrow's AWS SDK, huggingface_hub) that mean retrying cannot help."""


def is_transient(err: BaseException) -> bool:
    """True for failures worth retrying: network errors, timeouts, 5xx and throttling. Missing objects, refused
    permissions and bad requests are permanent (retrying cannot help); anything that is not an I/O error is a bug."""
    if isinstance(err, (StorageError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if not isinstance(err, OSError):
        return False
    text = str(err)
    return not any(marker in text for marker in _PERMANENT_MARKERS)


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


def _redacted(url: str) -> str:
    """``url`` without anything between ``://`` and ``@`` (credentials must never reach a log)."""
    head, sep, rest = url.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        return f"{head}://***@{rest.split('@', 1)[1]}"
    return url


def _scheme(text: str) -> str:
    scheme = text.split("://", 1)[0].lower()
    return _SCHEME_ALIASES.get(scheme, scheme)


def url_problem(where) -> str | None:
    """What is wrong with a cache location's syntax (None for plain paths and usable URLs). Talks to no server,
    so config validation can report it together with every other problem."""
    text = os.fspath(where) if isinstance(where, os.PathLike) else str(where)
    if "://" not in text:
        return None
    scheme = _scheme(text)
    parts = urlsplit(text)
    if "@" in parts.netloc and scheme != "hf":
        return (f"{_redacted(text)}: credentials do not belong in a cache URL (they would show in logs and `ps`); "
                "set them in the environment (AWS_ACCESS_KEY_ID, ...) instead")
    if parts.query or parts.fragment:
        return (f"{_redacted(text).split('?')[0].split('#')[0]}: options in the URL ('?...') are not supported; "
                "endpoints and credentials come from the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            return f"{text}: a file:// URL names a local path: file:///absolute/path"
        return None
    if scheme in ("s3", "gs"):
        if not parts.netloc:
            return f"{text}: no bucket; write {scheme}://BUCKET/PREFIX"
        return None
    if scheme == "hf":
        path = text.split("://", 1)[1].strip("/")
        if not path.startswith("datasets/") or path.count("/") < 2:
            return (f"{text}: rlkd reads caches from Hugging Face dataset repositories: "
                    "hf://datasets/ORG/NAME[/SUBFOLDER]")
        return None
    return (f"{_redacted(text)}: unknown scheme {scheme}://; a cache location is a path, file://, s3://, gs:// or "
            "hf://datasets/...")


def s3_endpoint_and_region(bucket: str) -> tuple[str | None, str | None]:
    """``(endpoint URL or None for AWS itself, region or None)`` for ``bucket``, from the standard environment: what
    Arrow's S3 client is given here, and what the writer's lease (botocore, :mod:`rlkd.cache.lease`) uses too."""
    endpoint = _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    if endpoint and "://" not in endpoint:
        endpoint = f"https://{endpoint}"
    region = _env("AWS_REGION", "AWS_DEFAULT_REGION")
    if not region:
        # S3-compatible stores ignore the region, but the SDK signs with one; real AWS wants the bucket's own.
        region = "us-east-1" if endpoint else _bucket_region(bucket)
    return endpoint, region


def _s3_filesystem(bucket: str):
    from pyarrow import fs as pafs

    kwargs: dict = {}
    endpoint, region = s3_endpoint_and_region(bucket)
    if endpoint:
        parts = urlsplit(endpoint)
        kwargs["endpoint_override"] = parts.netloc + parts.path.rstrip("/")
        kwargs["scheme"] = parts.scheme or "https"
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


@functools.lru_cache(maxsize=64)
def _bucket_region(bucket: str) -> str | None:
    """The bucket's region (one request per bucket and process), or None to leave it to the SDK's default; the
    first real request then reports what is wrong."""
    from pyarrow import fs as pafs

    try:
        return pafs.resolve_s3_region(bucket)
    except OSError:
        return None


def _gcs_filesystem():
    from pyarrow import fs as pafs

    emulator = _env("STORAGE_EMULATOR_HOST")
    if emulator:
        parts = urlsplit(emulator if "://" in emulator else f"http://{emulator}")
        return pafs.GcsFileSystem(anonymous=True, endpoint_override=parts.netloc, scheme=parts.scheme or "http")
    return pafs.GcsFileSystem()


def _hf_filesystem():
    try:
        from huggingface_hub import HfFileSystem
    except ImportError as e:  # pragma: no cover - transformers depends on huggingface_hub
        raise StorageURLError("hf:// locations need huggingface_hub: pip install huggingface_hub") from e
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(HfFileSystem()))


class CacheLocation:
    """A cache folder on some filesystem: URL parsing, listing, reads with retries, whole-object writes.

    ``rel`` arguments are paths relative to the cache root with ``/`` separators (``shard-00000.parquet``,
    ``part-0/shard-00000.parquet``). :meth:`name` gives the full name of an object for messages.
    Build one with :meth:`parse`.
    """

    def __init__(self, url: str, scheme: str, fs, root: str, *, retry: RetryPolicy | None = None):
        self.url = url
        """The location as given (a plain path stays a plain path), without a trailing slash."""
        self.scheme = scheme
        """``local``, ``s3``, ``gs`` or ``hf``."""
        self.fs = fs
        """The ``pyarrow.fs.FileSystem`` behind it."""
        self.root = root
        """The cache root inside :attr:`fs` (``bucket/prefix``, or an absolute local path)."""
        self.retry = retry or RetryPolicy()
        self.stats = IOStats()
        """What this location read from its store (remote locations only), for progress and benchmarks."""
        self._handles: dict = {}
        self._handles_lock = threading.Lock()

    # ---- construction ------------------------------------------------------------------------------------------

    @classmethod
    def parse(cls, where, *, retry: RetryPolicy | None = None) -> CacheLocation:
        """A location from a plain path, a ``Path``, a URL, or an existing location (returned as is)."""
        if isinstance(where, CacheLocation):
            return where
        text = os.fspath(where) if isinstance(where, os.PathLike) else str(where)
        if "://" not in text:
            return cls._local(text, Path(text).expanduser(), retry)
        problem = url_problem(text)
        if problem:
            raise StorageURLError(problem)
        scheme = _scheme(text)
        parts = urlsplit(text)
        url = text.rstrip("/")
        if scheme == "file":
            return cls._local(url, Path(parts.path or "/"), retry)
        if scheme in ("s3", "gs"):
            root = f"{parts.netloc}/{parts.path.strip('/')}".rstrip("/")
            fs = _s3_filesystem(parts.netloc) if scheme == "s3" else _gcs_filesystem()
            return cls(url, scheme, fs, root, retry=retry)
        return cls(url, "hf", _hf_filesystem(), text.split("://", 1)[1].strip("/"), retry=retry)

    @classmethod
    def _local(cls, url: str, path: Path, retry) -> CacheLocation:
        from pyarrow import fs as pafs

        loc = cls(url.rstrip("/") or "/", "local", pafs.LocalFileSystem(), str(path.absolute()), retry=retry)
        loc._path = path
        return loc

    # ---- names -------------------------------------------------------------------------------------------------

    @property
    def is_local(self) -> bool:
        return self.scheme == "local"

    @property
    def read_only(self) -> bool:
        """hf:// caches are read from, never written (upload them with huggingface_hub)."""
        return self.scheme == "hf"

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"CacheLocation({self.url!r})"

    def child(self, rel: str) -> CacheLocation:
        """The location of a sub-folder (e.g. a part of a merged cache), sharing this one's filesystem."""
        rel = rel.strip("/")
        loc = CacheLocation(f"{self.url}/{rel}", self.scheme, self.fs, f"{self.root}/{rel}", retry=self.retry)
        if self.is_local:
            loc._path = self._path / rel
        loc.stats = self.stats
        return loc

    def name(self, rel: str) -> str:
        """The full name of ``rel`` for messages: ``s3://bucket/prefix/rel`` or ``cache/dolly/rel``."""
        if self.is_local:
            return str(self._path / rel)
        return f"{self.url}/{rel}"

    def path(self, rel: str = "") -> str:
        """``rel``'s path inside :attr:`fs` (what pyarrow functions taking ``filesystem=`` want)."""
        return f"{self.root}/{rel}" if rel else self.root

    def local_path(self, rel: str = "") -> Path | None:
        """``rel`` as a local ``Path`` for a local location, else None."""
        if not self.is_local:
            return None
        return self._path / rel if rel else self._path

    # ---- metadata ----------------------------------------------------------------------------------------------

    def _retrying(self, what: str, rel: str, fn, guard=None):
        """Run ``fn()``; retry transient failures per :attr:`retry`; raise StorageError naming the object.
        ``guard()`` runs before every attempt and may raise to stop (a writer that lost its lease must not send
        another upload)."""
        last: BaseException | None = None
        delays = self.retry.delays()
        attempt = 0
        while True:
            attempt += 1
            if guard is not None:
                guard()
            try:
                return fn()
            except FileNotFoundError as err:
                raise FileNotFoundError(f"{self.name(rel)} does not exist") from err
            except Exception as err:  # noqa: BLE001 - classified below
                if not is_transient(err):
                    raise StorageError(f"cannot {what} {self.name(rel)}: {err}") from err
                last = err
            delay = next(delays, None)
            if delay is None:
                raise StorageError(f"cannot {what} {self.name(rel)} after {attempt} attempts over a failing "
                                   f"connection ({last}); check that the store is reachable, then run the "
                                   "command again (it resumes)") from last
            self.stats.add_retry()
            time.sleep(delay)

    def info(self, rel: str = ""):
        """``pyarrow.fs.FileInfo`` of ``rel`` (type NotFound when absent)."""
        return self._retrying("look up", rel, lambda: self.fs.get_file_info(self.path(rel)))

    def exists(self, rel: str = "") -> bool:
        from pyarrow import fs as pafs

        return self.info(rel).type != pafs.FileType.NotFound

    def is_file(self, rel: str) -> bool:
        from pyarrow import fs as pafs

        return self.info(rel).type == pafs.FileType.File

    def is_dir(self, rel: str = "") -> bool:
        """A local folder, or (object stores have no folders) a prefix with at least one object under it."""
        from pyarrow import fs as pafs

        return self.info(rel).type == pafs.FileType.Directory

    def bucket_exists(self) -> bool:
        """Whether an object store's bucket exists (a listing of a missing bucket is merely empty); True locally."""
        from pyarrow import fs as pafs

        if self.is_local:
            return True
        bucket = self.root.split("/", 1)[0]
        info = self._retrying("look up", "", lambda: self.fs.get_file_info(bucket))
        return info.type != pafs.FileType.NotFound

    def size(self, rel: str) -> int | None:
        """Size in bytes, or None when ``rel`` does not exist (or is a folder)."""
        from pyarrow import fs as pafs

        info = self.info(rel)
        return int(info.size) if info.type == pafs.FileType.File else None

    def list_files(self, rel: str = "", *, suffix: str | None = None) -> dict[str, int]:
        """Every object (recursively) under ``rel``: ``{path relative to the cache root: size}``, sorted. One
        LIST request per 1000 objects on S3, so checking a thousand shards' sizes costs one request, not 1000."""
        from pyarrow import fs as pafs

        base = self.path(rel)
        selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
        infos = self._retrying("list", rel, lambda: self.fs.get_file_info(selector))
        out = {}
        prefix = self.root + "/"
        for info in infos:
            if info.type != pafs.FileType.File:
                continue
            name = info.path[len(prefix):] if info.path.startswith(prefix) else info.path
            if suffix is None or name.endswith(suffix):
                out[name] = int(info.size)
        return dict(sorted(out.items()))

    # ---- reads -------------------------------------------------------------------------------------------------

    def read_bytes(self, rel: str) -> bytes:
        """The whole object (small objects: the manifest; verify reads shards whole)."""
        def read():
            with self.fs.open_input_file(self.path(rel)) as f:
                return f.read()

        data = self._retrying("read", rel, read)
        if not self.is_local:
            self.stats.add(len(data))
        return data

    def read_range(self, rel: str, offset: int, length: int) -> bytes:
        """``length`` bytes of ``rel`` from ``offset`` (one ranged GET on an object store).

        The object's handle is kept open (Arrow's ``read_at`` is thread-safe and stateless on object stores), so
        only its first read pays the HEAD request that opening costs; a failed read drops it."""
        def read():
            f = self._handle(rel)
            try:
                data = f.read_at(length, offset)
            except BaseException:
                self._drop_handle(rel)
                raise
            if len(data) != length:
                raise StorageError(f"{self.name(rel)} ended at byte {offset + len(data)}, {offset + length} wanted "
                                   "(the object is shorter than the manifest says: run `rlkd verify`)")
            return data

        data = self._retrying("read", rel, read)
        if not self.is_local:
            self.stats.add(len(data))
        return data

    MAX_HANDLES = 256

    def _handle(self, rel: str):
        with self._handles_lock:
            f = self._handles.get(rel)
        if f is None:
            f = self.fs.open_input_file(self.path(rel))
            with self._handles_lock:
                self._handles[rel] = f
                while len(self._handles) > self.MAX_HANDLES:
                    self._handles.pop(next(iter(self._handles))).close()
        return f

    def _drop_handle(self, rel: str) -> None:
        with self._handles_lock:
            f = self._handles.pop(rel, None)
        if f is not None:
            try:
                f.close()
            except OSError:
                pass

    def download(self, rel: str, dest: Path, *, expected_sha256: str | None = None, chunk: int = 8 << 20) -> str:
        """Copy ``rel`` to the local file ``dest`` and return its sha256. The copy is written under a temporary name
        (``.NAME.<random>.rlkd-download``) and renamed when complete, and only if its sha256 is ``expected_sha256``
        (when given): a bad copy never appears under ``dest``. A failed transfer restarts on the next retry."""
        dest = Path(dest)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:12]}{DOWNLOAD_SUFFIX}")

        def copy():
            h = hashlib.sha256()
            n = 0
            try:
                with self.fs.open_input_stream(self.path(rel)) as src, open(tmp, "wb") as out:
                    while block := src.read(chunk):
                        h.update(block)
                        out.write(block)
                        n += len(block)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            finally:
                if not self.is_local:
                    self.stats.add(n)
            return h.hexdigest()

        digest = self._retrying("download", rel, copy)
        if expected_sha256 is not None and digest != expected_sha256:
            tmp.unlink(missing_ok=True)
        else:
            os.replace(tmp, dest)
        return digest

    def sha256(self, rel: str, *, chunk: int = 8 << 20) -> str:
        """sha256 of the object, streamed (memory stays at one chunk)."""
        def digest():
            h = hashlib.sha256()
            n = 0
            with self.fs.open_input_stream(self.path(rel)) as src:
                while block := src.read(chunk):
                    h.update(block)
                    n += len(block)
            if not self.is_local:
                self.stats.add(n)
            return h.hexdigest()

        return self._retrying("read", rel, digest)

    # ---- writes ------------------------------------------------------------------------------------------------

    def _check_writable(self, rel: str) -> None:
        if self.read_only:
            raise StorageError(f"{self.name(rel)}: hf:// caches are read-only in rlkd; write the cache to a local "
                               "folder or s3:// and upload it with `huggingface-cli upload`")

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Put ``data`` under ``rel`` as a whole: a reader sees the old object or the new one, never part of one.

        Local: a temporary file in the same folder, fsync, rename, fsync of the folder. Object stores: one
        upload, visible only once complete (S3 PutObject, or multipart above Arrow's part size, completed last).
        Transient failures are retried; re-sending the whole object is safe because writes replace.
        """
        self._check_writable(rel)
        path = self.local_path(rel)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.rlkd-tmp")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            from rlkd.cache.manifest import fsync_dir

            fsync_dir(path.parent)
            return

        def put():
            with self.fs.open_output_stream(self.path(rel)) as f:
                f.write(data)

        self._retrying("write", rel, put)

    def upload(self, rel: str, source: Path, *, guard=None, chunk: int = 8 << 20) -> None:
        """Copy the local file ``source`` to ``rel`` as a whole, streamed (memory stays at one chunk). On an object
        store the object appears only when the upload completes: one PUT for a small file, a multipart upload (parts
        sent in the background by Arrow) for a large one. A failed attempt starts again from the first byte.
        ``guard``: see :meth:`_retrying`. Meant for object stores: a local output stream writes in place, so local
        writers write a temporary and rename it instead."""
        self._check_writable(rel)

        def put():
            with open(source, "rb") as src, self.fs.open_output_stream(self.path(rel)) as out:
                while block := src.read(chunk):
                    out.write(block)

        self._retrying("upload", rel, put, guard)

    def copy(self, rel: str, new_rel: str) -> None:
        """Copy ``rel`` to ``new_rel`` inside the store (S3: one server-side CopyObject; no bytes pass through
        here). Object stores have no rename: moving an object is this copy, then :meth:`remove`."""
        self._check_writable(new_rel)
        self._retrying("copy", rel, lambda: self.fs.copy_file(self.path(rel), self.path(new_rel)))

    def remove(self, rel: str, *, missing_ok: bool = True) -> None:
        self._check_writable(rel)
        try:
            self._retrying("delete", rel, lambda: self.fs.delete_file(self.path(rel)))
        except FileNotFoundError:
            if not missing_ok:
                raise
