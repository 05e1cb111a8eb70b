"""The shm transport: the sender writes each layer straight into the receiver's staging segment in /dev/shm.

Segments come from a pool that the receiver keeps: one is created once, then serves request after request. A
segment goes back to the pool only after a clean commit, when its sender has provably stopped writing; after any
other end it is unlinked, so a late write can land only in memory nobody reads. The sender keeps its mappings of the
receiver's segments, so a reused segment costs no new mapping either.

A new segment's pages are allocated off the request's path: the receiver creates the file at its full size (sparse)
and offers it at once, and a thread allocates its pages while the sender's prefill runs (about 0.5 ms a MB, which
the reservation used to wait for: 9-50 ms before a long prompt's prefill could start). A write into a page tmpfs
cannot allocate kills the writer (SIGBUS), so the sender writes only once the whole segment is allocated (its
st_blocks say so), and a segment whose allocation failed says so to its peer (its mode becomes 0).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from splitwise.kv.transport.base import TransportOffer

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
# madvise(MADV_POPULATE_WRITE) (Linux 5.14): maps every page of the allocated segment in the receiver at once, so its
# reads fault none. Python 3.11 does not name it.
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
# How long a sender waits, at its first write, for the receiver to finish allocating a new segment (it takes about
# 0.5 ms a MB, while the prefill's first layer computes); longer means the receiver's host is in trouble.
ALLOCATION_WAIT_S = 5.0
_NOT_WHOLE_MODE = 0  # the mode of a segment whose allocation failed: it will never be whole


class SegmentUnusable(OSError):
    """The receiver's segment cannot be written: its allocation failed, or did not end in time."""


def host_id() -> str:
    """Who can open this process's shared memory: same kernel boot and the same /dev/shm mount."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        shm = os.stat(SHM_DIR)
    except OSError:
        return ""
    return f"{boot}/{shm.st_dev}:{shm.st_ino}"


class SharedSegment:
    """A file in /dev/shm mapped into this process, as a uint8 tensor. The receiver creates and unlinks it; its
    pages are allocated by `allocate` (the receiver's pool runs it in a thread), and a peer writes only after
    `wait_whole`."""

    def __init__(self, name: str, size: int, create: bool):
        self.name = name
        self.size = size
        self.path = SHM_DIR / name
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)  # sparse: no page is allocated yet
            elif os.fstat(fd).st_size != size:
                raise ValueError(f"shared memory {name} holds {os.fstat(fd).st_size} bytes, expected {size}")
            self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            if create:
                self.path.unlink(missing_ok=True)
            raise
        self._fd = fd  # kept until the segment is known to be whole (or given up)
        self._fd_lock = threading.Lock()
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)
        self.owner = create
        self.allocated = threading.Event()  # creator: allocate() has ended, well or not
        self.allocation_error: OSError | None = None
        self._unusable: SegmentUnusable | None = None  # peer: why this segment cannot be written

    @classmethod
    def create(cls, size: int) -> "SharedSegment":
        """A new segment of `size` bytes, not allocated yet. OSError when /dev/shm has not that much room left
        (then the transfer goes over gRPC)."""
        room = os.statvfs(SHM_DIR)
        if room.f_bavail * room.f_frsize < size:
            raise OSError(errno.ENOSPC, f"/dev/shm has {room.f_bavail * room.f_frsize} bytes free, the KV needs {size}")
        return cls(f"splitwise-kv-{os.getpid()}-{uuid.uuid4().hex[:12]}", size, create=True)

    @classmethod
    def open(cls, name: str, size: int) -> "SharedSegment":
        if "/" in name or not name.startswith("splitwise-kv-"):
            raise ValueError(f"not a splitwise KV segment: {name!r}")
        return cls(name, size, create=False)

    def allocate(self) -> None:
        """Creator, in a thread: allocates every page of the segment (a peer's write then never needs one), then maps
        them here. A failure (/dev/shm full) is kept in `allocation_error` and shown to the peer as mode 0."""
        mapping = self._map
        try:
            with self._fd_lock:
                if self._fd >= 0 and mapping is not None:  # (not for a segment closed before its turn came)
                    os.posix_fallocate(self._fd, 0, self.size)
        except OSError as e:
            self.allocation_error = e
            log.warning("cannot allocate the %d-byte KV segment %s: %s", self.size, self.name, e)
            with self._fd_lock:
                if self._fd >= 0:
                    os.fchmod(self._fd, _NOT_WHOLE_MODE)
        finally:
            self._close_fd()
            self.allocated.set()
        if self.allocation_error is None and mapping is not None:
            try:
                mapping.madvise(_MADV_POPULATE_WRITE)
            except (OSError, ValueError):  # an older kernel: the receiver's first reads fault the pages in instead
                pass

    def wait_whole(self, timeout_s: float = ALLOCATION_WAIT_S) -> None:
        """Peer: returns once every page of the segment is allocated (at once for a segment that served before);
        raises SegmentUnusable when its allocation failed or did not end within timeout_s."""
        if self._unusable is not None:
            raise self._unusable
        if self._fd < 0:
            return
        deadline = time.monotonic() + timeout_s
        while True:
            with self._fd_lock:
                if self._fd < 0:
                    return
                stat = os.fstat(self._fd)
            if stat.st_mode & 0o777 == _NOT_WHOLE_MODE:
                self._unusable = SegmentUnusable(errno.ENOSPC, f"the receiver could not allocate the KV segment "
                                                               f"{self.name} (/dev/shm full?)")
            elif stat.st_blocks * 512 >= self.size:
                self._close_fd()
                return
            elif time.monotonic() > deadline:
                self._unusable = SegmentUnusable(errno.ETIMEDOUT, f"the receiver's KV segment {self.name} was not "
                                                                  f"allocated within {timeout_s}s")
            if self._unusable is not None:
                self._close_fd()
                raise self._unusable
            time.sleep(0.0002)

    def _close_fd(self) -> None:
        with self._fd_lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def close(self) -> None:
        """Lets go of the mapping (and, for its creator, removes the segment's name).

        Never munmaps explicitly: torch.frombuffer keeps a reference to the mmap but not a buffer export, so
        mmap.close() would succeed under a thread still writing a layer through a view, which would then
        crash. The mapping goes when its last tensor view does; a peer that still maps it keeps its own."""
        if self.owner:
            self.path.unlink(missing_ok=True)
        if self.allocated.is_set() or not self.owner:
            self._close_fd()  # (a pending allocate() closes its own)
        self.tensor = None
        self._map = None


def remove_stale_segments() -> int:
    """Unlinks the staging segments whose creator is dead: a worker killed with requests in flight (SIGKILL, OOM)
    never removed its own, and /dev/shm is memory. Workers call it as they start; returns how many went."""
    removed = 0
    for path in SHM_DIR.glob("splitwise-kv-*"):
        pid = path.name.split("-")[2]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True



# Free segments the receiver keeps for reuse, in bytes of /dev/shm (which is memory). Power-of-two sizes from
# 1 MiB: a request's KV takes the smallest that holds it, so one segment serves prompts of similar length.
POOL_MAX_FREE_BYTES = 512 << 20
MIN_SEGMENT_BYTES = 1 << 20
# Mappings of receivers' segments a sender keeps open: a mapping of a segment its receiver has unlinked holds that
# memory until it is evicted here, so the cache is small.
WRITER_MAPPINGS = 16


def segment_size(size: int) -> int:
    return max(MIN_SEGMENT_BYTES, 1 << (size - 1).bit_length())


class SegmentPool:
    """The receiver's staging segments: taken for one request, given back only after that request's clean commit.
    A new segment's pages are allocated by the pool's thread, while its request's prefill runs."""

    def __init__(self, max_free_bytes: int = POOL_MAX_FREE_BYTES):
        self.max_free_bytes = max_free_bytes
        self._free: dict[int, list[SharedSegment]] = {}
        self._free_bytes = 0
        self._lock = threading.Lock()
        self._allocator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shm-allocate")
        self.created = self.reused = 0

    def take(self, size: int) -> SharedSegment:
        wanted = segment_size(size)
        with self._lock:
            free = self._free.get(wanted)
            if free:
                self._free_bytes -= wanted
                self.reused += 1
                return free.pop()
            self.created += 1
        segment = SharedSegment.create(wanted)
        try:
            self._allocator.submit(segment.allocate)
        except RuntimeError:  # the pool is closing
            segment.allocate()
        return segment

    def give_back(self, segment: SharedSegment) -> None:
        # After a clean commit the allocation has ended (the sender waited for it before its first write).
        whole = segment.allocated.wait(ALLOCATION_WAIT_S) and segment.allocation_error is None
        with self._lock:
            if whole and self._free_bytes + segment.size <= self.max_free_bytes:
                self._free.setdefault(segment.size, []).append(segment)
                self._free_bytes += segment.size
                return
        segment.close()

    @property
    def free_names(self) -> list[str]:
        """The segments waiting here for their next request."""
        with self._lock:
            return [s.name for free in self._free.values() for s in free]

    def close(self) -> None:
        with self._lock:
            segments = [s for free in self._free.values() for s in free]
            self._free.clear()
            self._free_bytes = 0
        self._allocator.shutdown(wait=False)
        for segment in segments:
            segment.close()


class ShmStaging:
    """Receiver side: a pooled segment holding one request's KV from its reservation to its commit or end."""

    transport = "shm"

    def __init__(self, pool: SegmentPool, host: str, size: int):
        self.pool = pool
        self.host = host
        self.segment = pool.take(size)

    @property
    def tensor(self) -> torch.Tensor | None:
        """The segment's bytes, to read what the sender announced. Raises SegmentUnusable when its allocation failed
        (an honest sender writes nothing then, so there is nothing to read) or is still running after
        ALLOCATION_WAIT_S (a sender announcing bytes it cannot have written)."""
        segment = self.segment
        if segment is None:
            return None
        if not segment.allocated.wait(ALLOCATION_WAIT_S):
            raise SegmentUnusable(errno.ETIMEDOUT, f"KV segment {segment.name} not allocated yet")
        if segment.allocation_error is not None:
            raise SegmentUnusable(errno.ENOSPC, f"KV segment {segment.name}: {segment.allocation_error}")
        return segment.tensor

    def offer(self) -> TransportOffer:
        return TransportOffer("shm", host_id=self.host, shm_name=self.segment.name, buffer_bytes=self.segment.size)

    def close(self, clean: bool = False) -> None:
        segment, self.segment = self.segment, None
        if segment is None:
            return
        if clean:
            self.pool.give_back(segment)
        else:  # the sender may still write: the segment is never handed to another request
            segment.close()


class ShmWriter:
    """Sender side: the receiver's segment mapped here; staging a layer writes it there (no flush needed). The first
    write waits until the receiver has allocated the whole segment (`buffer` raises SegmentUnusable when it cannot
    be)."""

    transport = "shm"
    remote = False

    def __init__(self, segment: SharedSegment):
        self._segment = segment
        self._buffer = segment.tensor

    @property
    def buffer(self) -> torch.Tensor | None:
        buffer = self._buffer  # a reference keeps the mapping alive even if the writer closes meanwhile
        if buffer is not None:
            self._segment.wait_whole()
        return buffer

    def flush(self, ranges: list[tuple[int, int]]) -> None:
        pass

    def close(self) -> None:
        self._buffer = None  # the mapping stays in the backend's cache, for the segment's next request


class ShmBackend:
    name = "shm"
    rank = 0
    needs_same_host = True

    def __init__(self, host: str):
        if not (host and SHM_DIR.is_dir()):
            raise OSError("no /dev/shm here")
        self.host = host
        self.pool = SegmentPool()
        self._mappings: OrderedDict[str, SharedSegment] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def start(cls, host: str, advertise_host: str, mooncake_protocol: str) -> "ShmBackend":
        return cls(host)

    def staging(self, size: int) -> ShmStaging:
        return ShmStaging(self.pool, self.host, size)

    def writer(self, offer: TransportOffer, size: int) -> ShmWriter:
        if offer.host_id != self.host:
            raise ValueError("the receiver's segment is on another host")
        if offer.buffer_bytes < size:
            raise ValueError(f"the receiver's segment holds {offer.buffer_bytes} bytes, the KV {size}")
        with self._lock:
            segment = self._mappings.pop(offer.shm_name, None)
        if segment is None or segment.size != offer.buffer_bytes:
            segment = SharedSegment.open(offer.shm_name, offer.buffer_bytes)
        with self._lock:
            self._mappings[offer.shm_name] = segment
            while len(self._mappings) > WRITER_MAPPINGS:
                self._mappings.popitem(last=False)[1].close()
        return ShmWriter(segment)

    def close(self) -> None:
        self.pool.close()
        with self._lock:
            mappings, self._mappings = list(self._mappings.values()), OrderedDict()
        for segment in mappings:
            segment.close()
