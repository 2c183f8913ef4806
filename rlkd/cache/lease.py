"""One writer per cache prefix on an object store: a lease object, renewed while the writer lives.

A local cache folder is guarded by ``flock`` (:class:`rlkd.cache.lock.DirLock`): the kernel drops it when its process
dies. An object store has no locks, so a writer of ``s3://bucket/prefix`` holds a *lease*: the object
``prefix/writer.lease``, a small JSON document naming the holder (``holder``, ``pid``, ``host``, a random ``id``) and
the lease's duration ``seconds`` (``--lease-seconds``, default 60). A background thread renews it every quarter of
the duration. Another writer is refused while the lease is fresh, and may take it over once the holder has not
renewed it for a whole duration (it was killed, or lost the store). A writer that releases it deletes it.

Protocol with conditional writes (``s3://`` through botocore: AWS S3, MinIO, Cloudflare R2, Ceph RGW, moto):

- **take**: read the lease. None: create it with ``If-None-Match: *``. Expired: replace it with ``If-Match: <the ETag
  just read>``. Fresh: refuse, naming the holder and when the lease expires. A ``412 Precondition Failed`` means
  another writer got there first: read again (and then refuse). The store then gets one more ``If-None-Match: *`` PUT
  of the lease, which must fail: a store that ignores conditional headers answers 200, and the lease falls back to
  the protocol below (with a warning).
- **freshness is judged on the store's clock**: the lease's age is the ``Date`` of the reading response minus the
  object's ``Last-Modified``, both stamped by the store. No machine's wall clock is compared with another's.
- **renew**: replace it with ``If-Match: <our ETag>``. A 412 (or 404) means another writer took it over (unless the
  lease read back is still ours: a retried request whose first answer was lost): this writer has lost it. The holder counts its own lease from just before each successful renewal on its monotonic clock, minus a margin
  (2 s + 2% of the duration: the store's timestamps have whole seconds), and stops writing once that runs out, even
  if the store cannot be reached to say so.
- **fencing**: the holder writes the manifest (the cache's only source of truth) through the lease
  (:meth:`Lease.put`), conditional on the manifest's ETag being the one it last read or wrote. A writer that was
  overtaken cannot replace the manifest afterwards: its write fails with 412 and it stops (:class:`LeaseLostError`).
- **release**: delete it with ``If-Match: <our ETag>`` (a lease taken over by someone else is left alone).

Protocol without conditional writes (``gs://`` through pyarrow, which exposes none; ``s3://`` without botocore
installed, or against a store that ignores the headers): take = read, refuse if fresh, plain PUT, wait 2 s, read
back and refuse unless the lease read back is ours; renew = read, and stop if it is not ours, else PUT; the age is
measured on the store's clock through a probe object's modification time. Manifest writes are not fenced.

What this guarantees:

- Two writers that start while a fresh lease exists: the second is refused, whatever the machines' clocks say.
- Two writers that start at once on a free (or expired) prefix: with conditional writes exactly one takes the lease
  (the store serialises the two conditional PUTs).
- A killed writer (SIGKILL, a lost machine) blocks the prefix for at most one lease duration after its last renewal;
  then a new run takes over and resumes. Shards the killed writer had not listed in the manifest are re-scored.
- A live writer that cannot renew (store unreachable) stops writing before its lease could expire at the store.
- With conditional writes, a writer that lost its lease never replaces the manifest again.

What it does not guarantee:

- A writer paused for longer than its lease (SIGSTOP, a suspended VM, a debugger) that wakes up in the middle of a
  shard upload finishes that one upload. The new holder starts its shard numbers one past every name it can see, so
  that upload cannot land on one of its shards; the object stays unlisted (``rlkd verify`` names it; the next resume
  deletes it) and the paused writer stops at its next manifest write, which fails.
- Without conditional writes, two writers whose read and write straddle each other's 2 s settling delay (a pause of
  more than 2 s between reading and writing the lease) can both believe they hold it, and a paused writer can replace
  the manifest after a takeover. Use a store with conditional writes for unattended runs.
- The store's clock must advance at the rate of the holder's (NTP-level drift is far inside the margin); its absolute
  time does not matter.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from rlkd.cache.manifest import CacheLockedError
from rlkd.fsutil import utc_now

log = logging.getLogger(__name__)

LEASE_NAME = "writer.lease"
"""The lease object, at the cache's root."""
DEFAULT_LEASE_SECONDS = 60.0
MIN_LEASE_SECONDS = 5.0
"""Shorter leases leave no time to renew: the store's timestamps have whole seconds."""
SETTLE_SECONDS = 2.0
"""Without conditional writes: how long a writer waits after writing the lease before reading it back."""
_CLOCK_PROBE = LEASE_NAME + ".clock-"


class LeaseLostError(CacheLockedError):
    """This writer's lease expired or was taken over: it stops writing. Its listed shards are kept; a later run
    resumes from the manifest."""


class _Conflict(Exception):
    """A conditional write failed (412): the object is not the one this writer last saw."""


class _Unsupported(Exception):
    """The store refused the conditional headers themselves (501 NotImplemented and the like)."""


@dataclass
class _Seen:
    data: bytes
    etag: str | None
    age: float | None
    """Seconds since the object was last written, on the store's clock (None when not asked for)."""


def _parse(data: bytes) -> dict:
    try:
        body = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return body if isinstance(body, dict) else {}


# ---- stores: where the lease object lives ---------------------------------------------------------------------------


class _S3Store:
    """The lease's requests to S3 through botocore, which sends the conditional headers pyarrow cannot."""

    def __init__(self, loc):
        import botocore.session
        from botocore.config import Config

        from rlkd.cache.storage import s3_endpoint_and_region

        self.loc = loc
        self.bucket, _, self.prefix = loc.root.partition("/")
        endpoint, region = s3_endpoint_and_region(self.bucket)
        config = Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=10, read_timeout=30,
                        s3={"addressing_style": "path"} if endpoint else {})
        self.client = botocore.session.get_session().create_client("s3", endpoint_url=endpoint, region_name=region,
                                                                   config=config)
        self.conditional = True

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _call(self, what: str, rel: str, fn):
        """``fn()`` with botocore's errors sorted out: 412/409 -> _Conflict, 501 -> _Unsupported, a missing object
        -> None, anything else -> StorageError naming the object (botocore has retried transient ones)."""
        from botocore.exceptions import BotoCoreError, ClientError

        from rlkd.cache.storage import StorageError

        try:
            return fn()
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                raise _Conflict(code) from None
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                return None
            if code in ("NotImplemented", "InvalidArgument") or status == 501:
                raise _Unsupported(code) from None
            raise StorageError(f"cannot {what} {self.loc.name(rel)}: {code or status}: {e}") from None
        except BotoCoreError as e:
            raise StorageError(f"cannot {what} {self.loc.name(rel)}: {e}") from None

    def get(self, rel: str, *, age: bool = True) -> _Seen | None:
        def get():
            r = self.client.get_object(Bucket=self.bucket, Key=self._key(rel))
            data = r["Body"].read()
            date = r["ResponseMetadata"]["HTTPHeaders"].get("date")
            now = parsedate_to_datetime(date).timestamp() if date else time.time()
            return _Seen(data, r["ETag"], now - r["LastModified"].timestamp())

        return self._call("read", rel, get)

    def etag(self, rel: str) -> str | None:
        r = self._call("look up", rel, lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(rel)))
        return None if r is None else r["ETag"]

    def put(self, rel: str, data: bytes, *, etag: str | None = None, create: bool = False) -> str | None:
        """Write ``data``; with ``create`` only if absent, with ``etag`` only if the object still has it."""
        kwargs = {}
        if self.conditional and create:
            kwargs["IfNoneMatch"] = "*"
        elif self.conditional and etag is not None:
            kwargs["IfMatch"] = etag
        r = self._call("write", rel, lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(rel),
                                                                     Body=data, **kwargs))
        if r is None:  # If-Match on an object that is gone (404): it is not the one we saw either
            raise _Conflict("NoSuchKey")
        return r["ETag"]

    def delete(self, rel: str, *, etag: str | None = None) -> None:
        kwargs = {"IfMatch": etag} if self.conditional and etag is not None else {}
        self._call("delete", rel, lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(rel),
                                                                     **kwargs))


class _PlainStore:
    """The lease's requests through the cache's own filesystem layer (pyarrow): no conditional writes."""

    conditional = False

    def __init__(self, loc):
        self.loc = loc

    def get(self, rel: str, *, age: bool = True) -> _Seen | None:
        try:
            data = self.loc.read_bytes(rel)
        except FileNotFoundError:
            return None
        if not age:
            return _Seen(data, None, None)
        info = self.loc.info(rel)
        return _Seen(data, None, self._store_now() - info.mtime.timestamp())

    def _store_now(self) -> float:
        """The store's current time: the modification time it stamps on a probe object (removed again)."""
        probe = _CLOCK_PROBE + uuid.uuid4().hex[:12]
        self.loc.write_bytes(probe, b"")
        try:
            return self.loc.info(probe).mtime.timestamp()
        finally:
            self.loc.remove(probe)

    def etag(self, rel: str) -> None:
        return None

    def put(self, rel: str, data: bytes, *, etag: str | None = None, create: bool = False) -> None:
        self.loc.write_bytes(rel, data)

    def delete(self, rel: str, *, etag: str | None = None) -> None:
        self.loc.remove(rel)


def _store_for(loc):
    if loc.scheme == "s3":
        try:
            return _S3Store(loc)
        except ImportError:
            log.warning("botocore is not installed: the writer's lease on %s uses plain writes, which two writers "
                        "starting within 2 s of each other can both pass; `pip install 'rlkd[s3]'` for conditional "
                        "writes (docs/design.md, 'The writer's lease')", loc)
    return _PlainStore(loc)


# ---- the lease ------------------------------------------------------------------------------------------------------


class Lease:
    """``with Lease(loc, "who I am"):`` holds ``loc/writer.lease`` (see the module docstring), or raises
    :class:`CacheLockedError` naming the holder and when its lease expires.

    While held: :meth:`check` raises :class:`LeaseLostError` once the lease is lost or may have expired (writers call
    it before every row group and upload); :meth:`read` / :meth:`put` / :meth:`remove` read and write objects guarded
    by the lease (the manifest): with conditional writes a ``put`` succeeds only if the object is still the one this
    writer last read or wrote. ``took_over`` is the expired lease this one replaced (None when the prefix was free).
    """

    def __init__(self, loc, holder: str, *, seconds: float = DEFAULT_LEASE_SECONDS):
        if seconds < MIN_LEASE_SECONDS:
            raise ValueError(f"lease_seconds must be >= {MIN_LEASE_SECONDS:g}, got {seconds}")
        self.loc = loc
        self.holder = holder
        self.seconds = float(seconds)
        self.margin = 2.0 + 0.02 * self.seconds
        self.id = uuid.uuid4().hex
        self.took_over: dict | None = None
        self._store = None
        self._etag: str | None = None
        self._etags: dict[str, str | None] = {}
        self._valid_until = 0.0
        self._lost: str | None = None
        self._acquired = ""
        self._held = False
        self._mu = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return self.loc.name(LEASE_NAME)

    @property
    def held(self) -> bool:
        return self._held

    @property
    def conditional(self) -> bool:
        """Whether this lease uses conditional writes (else the weaker protocol of the module docstring)."""
        return bool(self._store is not None and self._store.conditional)

    def _body(self) -> bytes:
        return json.dumps({"holder": self.holder, "id": self.id, "pid": os.getpid(), "host": socket.gethostname(),
                           "seconds": self.seconds, "acquired": self._acquired, "renewed": utc_now()}).encode()

    # ---- taking it ------------------------------------------------------------------------------------------------

    def acquire(self) -> Lease:
        self._store = _store_for(self.loc)
        self._acquired = utc_now()
        for _ in range(5):
            seen = self._store.get(LEASE_NAME)
            started = time.monotonic()
            other = _parse(seen.data) if seen is not None else None
            if other is not None and other.get("id") == self.id:
                etag = seen.etag  # our own write, whose answer was lost (the client retried it and got a 412)
                started -= max(0.0, seen.age)  # counted from when it was written
            else:
                if other is not None:
                    left = float(other.get("seconds", DEFAULT_LEASE_SECONDS)) - seen.age
                    if left > 0:
                        raise CacheLockedError(self._refusal(other, left))
                try:
                    etag = self._write_lease(create=seen is None, etag=seen.etag if seen is not None else None)
                except _Conflict:
                    continue  # another writer took it between our read and our write: read again (and refuse)
                if not self._store.conditional and not self._settled():
                    continue
                self.took_over = other
            with self._mu:
                self._etag, self._valid_until, self._held = etag, started + self.seconds - self.margin, True
            self._thread = threading.Thread(target=self._renew_loop, name="rlkd-lease", daemon=True)
            self._thread.start()
            return self
        raise CacheLockedError(f"{self.loc}: could not take the writer's lease ({self.name}): other writers keep "
                               "taking it. Only one writer may change a cache at a time: stop the others")

    def _write_lease(self, *, create: bool, etag: str | None) -> str | None:
        body = self._body()
        try:
            new = self._store.put(LEASE_NAME, body, create=create, etag=etag)
        except _Unsupported:
            self._fall_back("refuses conditional headers")
            return self._store.put(LEASE_NAME, body)
        if self._store.conditional:
            try:  # a store that honours If-None-Match refuses this: the lease exists now
                self._store.put(LEASE_NAME, body, create=True)
            except (_Conflict, _Unsupported):
                return new
            self._fall_back("ignores If-None-Match")
        return new

    def _fall_back(self, why: str) -> None:
        log.warning("the store behind %s %s: the writer's lease falls back to plain writes, which two writers "
                    "starting within %g s of each other can both pass (docs/design.md, 'The writer's lease')",
                    self.loc, why, SETTLE_SECONDS)
        self._store.conditional = False

    def _settled(self) -> bool:
        """Without conditional writes: wait, then check that the lease read back is still ours."""
        time.sleep(SETTLE_SECONDS)
        back = self._store.get(LEASE_NAME, age=False)
        return back is not None and _parse(back.data).get("id") == self.id

    def _refusal(self, other: dict, left: float) -> str:
        who = (f"{other.get('holder', 'an rlkd writer')}, pid {other.get('pid', '?')} on {other.get('host', '?')} "
               f"since {other.get('acquired', '?')}")
        until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(time.time() + left))
        return (f"{self.loc} is being written by another rlkd process ({who}): its lease ({self.name}) expires in "
                f"{left:.0f} s, at about {until}, unless that process renews it. Only one writer may change a cache at "
                "a time: wait for it to finish, stop it, or write to another prefix. If that process is gone (killed, "
                "its machine lost), run this command again after that time: it takes the lease over and resumes.")

    # ---- keeping it -----------------------------------------------------------------------------------------------

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.seconds / 4):
            try:
                self._renew()
            except LeaseLostError:
                return
            except Exception as e:  # noqa: BLE001 - the store may be back at the next tick; check() times out
                log.debug("renewing %s failed: %s", self.name, e)
            if self._lost is not None:
                return

    def _renew(self) -> None:
        started = time.monotonic()
        if self._store.conditional:
            try:
                etag = self._store.put(LEASE_NAME, self._body(), etag=self._etag)
            except _Conflict:
                seen = self._store.get(LEASE_NAME, age=False)
                if seen is None or _parse(seen.data).get("id") != self.id:
                    self._lose(self._overtaken(seen))
                    return
                etag = seen.etag  # our own renewal landed, its answer was lost and the retry found a new ETag
        else:
            seen = self._store.get(LEASE_NAME, age=False)
            if seen is None or _parse(seen.data).get("id") != self.id:
                self._lose(self._overtaken(seen))
                return
            etag = self._store.put(LEASE_NAME, self._body())
        with self._mu:
            if self._lost is None:
                self._etag, self._valid_until = etag, started + self.seconds - self.margin

    def _overtaken(self, seen: _Seen | None = None) -> str:
        try:
            seen = seen or self._store.get(LEASE_NAME, age=False)
        except Exception:  # noqa: BLE001 - only for the message
            seen = None
        other = _parse(seen.data) if seen is not None else {}
        who = f"{other.get('holder', '?')}, pid {other.get('pid', '?')} on {other.get('host', '?')}" if other else \
            "nobody now"
        return (f"this run lost its lease on {self.loc} (taken over by {who}) after failing to renew it for "
                f"{self.seconds:g} s (was it paused?); it stops writing. Its listed shards are kept in the manifest")

    def _lose(self, why: str) -> None:
        with self._mu:
            if self._lost is None:
                self._lost = why
                log.warning("%s", why)

    def check(self) -> None:
        """Raise :class:`LeaseLostError` unless this writer surely still holds its lease."""
        with self._mu:
            if self._lost is None and self._held and time.monotonic() > self._valid_until:
                self._lost = (f"this run could not renew its lease on {self.loc} for {self.seconds:g} s (is the store "
                              "reachable?), so another writer may take the cache over: it stops writing. Its listed "
                              "shards are kept; run the command again to resume")
            lost = self._lost
        if lost is not None:
            raise LeaseLostError(lost)

    # ---- objects it guards ----------------------------------------------------------------------------------------

    def read(self, rel: str) -> bytes | None:
        """``rel``'s bytes (None when absent), remembering its ETag for the next :meth:`put`."""
        seen = self._store.get(rel, age=False)
        self._etags[rel] = seen.etag if seen is not None else None
        return seen.data if seen is not None else None

    def put(self, rel: str, data: bytes) -> None:
        """Replace ``rel`` while holding the lease; with conditional writes, only if ``rel`` is still what this
        writer last read or wrote (else :class:`LeaseLostError`: another writer has changed the cache)."""
        self.check()
        if not self._store.conditional:
            self.loc.write_bytes(rel, data)
            return
        etag = self._etags[rel] if rel in self._etags else self._store.etag(rel)
        try:
            self._etags[rel] = self._store.put(rel, data, etag=etag, create=etag is None)
        except _Conflict:
            seen = self._store.get(rel, age=False)
            if seen is not None and seen.data == data:  # our own write, retried after a lost response
                self._etags[rel] = seen.etag
                return
            self._lose(f"{self.loc.name(rel)} was changed by another writer while this run held its lease (this run "
                       "was paused past its lease, and another run took over): it stops writing")
            self.check()

    def remove(self, rel: str) -> None:
        """Delete ``rel`` while holding the lease."""
        self.check()
        self.loc.remove(rel)
        self._etags[rel] = None

    # ---- giving it back -------------------------------------------------------------------------------------------

    def release(self) -> None:
        """Stop renewing and delete the lease, unless another writer holds it now. Never raises: a lease that cannot
        be deleted expires by itself."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        if not self._held:
            return
        self._held = False
        try:
            if self._store.conditional:
                try:
                    self._store.delete(LEASE_NAME, etag=self._etag)
                except _Conflict:
                    pass  # taken over: not ours to delete
                except _Unsupported:
                    self._store.conditional = False
            if not self._store.conditional:
                seen = self._store.get(LEASE_NAME, age=False)
                if seen is not None and _parse(seen.data).get("id") == self.id:
                    self._store.delete(LEASE_NAME)
        except Exception as e:  # noqa: BLE001
            log.warning("could not delete the lease %s (%s); it expires by itself in %g s", self.name, e, self.seconds)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        if getattr(self, "_held", False):
            self.release()
