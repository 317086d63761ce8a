"""Single-writer lease on an output: `lease.json` with an owner id and a heartbeat.

A second extract on the same output is refused while the lease's heartbeat is fresh. A writer that died
leaves a stale lease (no heartbeat for `stale_after` seconds, default 60): the next run takes it over; a holder
on the same host whose process no longer exists is taken over at once. To take over sooner in other cases,
delete `<output>/lease.json` by hand — only when you are sure the other run is gone.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from types import TracebackType

from actstore.schemas import layout
from actstore.schemas.errors import LeaseError  # noqa: F401  (defined with its siblings; raised here)
from actstore.workers import storage


class Lease:
    """Context manager: acquire on enter, heartbeat in a daemon thread, release on exit."""

    def __init__(self, fs, root: str, url: str, stale_after: float = 60.0, beat: float = 5.0,
                 what: str = "extract") -> None:
        self.fs, self.path, self.url, self.what = fs, storage.join(root, layout.LEASE), url, what
        self.stale_after, self.beat = stale_after, beat
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps({"owner": self.owner, "heartbeat": time.time()}).encode()

    def _current(self) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except (FileNotFoundError, ValueError, OSError):
            return None

    def _alive(self, cur: dict) -> bool:
        """A holder is alive while its heartbeat is fresh, unless it is a process of this host that is gone."""
        if time.time() - float(cur.get("heartbeat", 0)) >= self.stale_after:
            return False
        host, _, rest = str(cur.get("owner", "")).partition(":")
        pid = rest.partition(":")[0]
        if host == socket.gethostname() and pid.isdigit():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return False  # killed (e.g. SIGKILL) without releasing: take over at once
            except PermissionError:
                pass
        return True

    def check_free(self) -> dict | None:
        """Raise LeaseError when another live writer holds the lease; returns the current record (or None).

        Called first by every writer, before it looks at anything else in the output: what a running writer
        leaves there for a moment (temporary names, a half-cleared folder, a run record) must never turn a
        second writer's refusal into some other error."""
        cur = self._current()
        if cur and cur.get("owner") != self.owner and self._alive(cur):
            raise LeaseError(f"output {self.url!r} is being written by another {self.what} ({cur.get('owner')}); "
                             f"wait for it, or if it died, retry after {self.stale_after:.0f}s without heartbeat")
        return cur

    def __enter__(self) -> Lease:
        cur = self.check_free()
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        if not (cur is None and self._create_exclusive()):
            self._claim_by_overwrite()
        self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="actstore-lease")
        self._thread.start()
        return self

    def _create_exclusive(self) -> bool:
        """Local disks: create lease.json only if absent (O_EXCL), which settles a race without waiting."""
        if not storage.is_local(self.fs):
            return False
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            cur = self._current()  # someone created it since we looked
            # unreadable: its creator is between creating and writing it (a record left half-written by a crash
            # counts as held until it is stale_after old, like any silent holder)
            if (cur is None and self._age() < self.stale_after) or (cur is not None and self._alive(cur)):
                owner = cur.get("owner") if cur else "being written"
                raise LeaseError(f"output {self.url!r} was claimed by another {self.what} ({owner})") from None
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(self._record())
        return True

    def _age(self) -> float:
        """Seconds since lease.json was last written (local disks; 0 when it cannot be told)."""
        try:
            return time.time() - os.path.getmtime(self.path)
        except OSError:
            return 0.0

    def _claim_by_overwrite(self) -> None:
        """Object stores and take-overs of a dead holder's lease: write, wait, and check we were the last writer."""
        storage.put_atomic(self.fs, self.path, self._record())
        time.sleep(min(0.2, self.beat))  # last writer wins on a race: check we are that writer
        cur = self._current()
        if not cur or cur.get("owner") != self.owner:
            raise LeaseError(f"output {self.url!r} was claimed by another {self.what} ({cur and cur.get('owner')})")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.beat):
            try:
                storage.put_atomic(self.fs, self.path, self._record())
            except OSError:
                pass  # transient storage trouble: the next beat retries

    def __exit__(self, et: type | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=self.beat + 1)
        cur = self._current()
        if cur and cur.get("owner") == self.owner:
            self.fs.rm(self.path)
