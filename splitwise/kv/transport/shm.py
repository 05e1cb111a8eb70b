"""The shm transport: the sender writes each layer straight into the receiver's staging segment in /dev/shm.

Segments come from a pool that the receiver keeps: one is created (and its pages allocated) once, then serves
request after request. A segment goes back to the pool only after a clean commit, when its sender has provably
stopped writing; after any other end it is unlinked, so a late write can land only in memory nobody reads. The
sender keeps its mappings of the receiver's segments, so a reused segment costs no new mapping either.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import uuid
from collections import OrderedDict
from pathlib import Path

import torch

from splitwise.kv.transport.base import TransportOffer

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # map every page at once instead of one fault per page


def host_id() -> str:
    """Who can open this process's shared memory: same kernel boot and the same /dev/shm mount."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        shm = os.stat(SHM_DIR)
    except OSError:
        return ""
    return f"{boot}/{shm.st_dev}:{shm.st_ino}"


class SharedSegment:
    """A file in /dev/shm mapped into this process, as a uint8 tensor. The receiver creates and unlinks it."""

    def __init__(self, name: str, size: int, create: bool):
        self.name = name
        self.size = size
        self.path = SHM_DIR / name
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                # Allocate the pages now (at reservation, while the sender's prefill runs), not on first write.
                os.posix_fallocate(fd, 0, size)
            elif os.fstat(fd).st_size != size:
                raise ValueError(f"shared memory {name} holds {os.fstat(fd).st_size} bytes, expected {size}")
            self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE)
        finally:
            os.close(fd)
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)
        self.owner = create

    @classmethod
    def create(cls, size: int) -> "SharedSegment":
        return cls(f"splitwise-kv-{os.getpid()}-{uuid.uuid4().hex[:12]}", size, create=True)

    @classmethod
    def open(cls, name: str, size: int) -> "SharedSegment":
        if "/" in name or not name.startswith("splitwise-kv-"):
            raise ValueError(f"not a splitwise KV segment: {name!r}")
        return cls(name, size, create=False)

    def close(self) -> None:
        """Lets go of the mapping (and, for its creator, removes the segment's name).

        Never munmaps explicitly: torch.frombuffer keeps a reference to the mmap but not a buffer export, so
        mmap.close() would succeed under a thread still writing a layer through a view, which would then
        crash. The mapping goes when its last tensor view does; a peer that still maps it keeps its own."""
        if self.owner:
            self.path.unlink(missing_ok=True)
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
    """The receiver's staging segments: taken for one request, given back only after that request's clean commit."""

    def __init__(self, max_free_bytes: int = POOL_MAX_FREE_BYTES):
        self.max_free_bytes = max_free_bytes
        self._free: dict[int, list[SharedSegment]] = {}
        self._free_bytes = 0
        self._lock = threading.Lock()
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
        return SharedSegment.create(wanted)

    def give_back(self, segment: SharedSegment) -> None:
        with self._lock:
            if self._free_bytes + segment.size <= self.max_free_bytes:
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
        for segment in segments:
            segment.close()


class ShmStaging:
    """Receiver side: a pooled segment holding one request's KV from its reservation to its commit or end."""

    transport = "shm"

    def __init__(self, pool: SegmentPool, host: str, size: int):
        self.pool = pool
        self.host = host
        self.segment = pool.take(size)
        self.tensor = self.segment.tensor

    def offer(self) -> TransportOffer:
        return TransportOffer("shm", host_id=self.host, shm_name=self.segment.name, buffer_bytes=self.segment.size)

    def close(self, clean: bool = False) -> None:
        segment, self.segment, self.tensor = self.segment, None, None
        if segment is None:
            return
        if clean:
            self.pool.give_back(segment)
        else:  # the sender may still write: the segment is never handed to another request
            segment.close()


class ShmWriter:
    """Sender side: the receiver's segment mapped here; staging a layer writes it there (no flush needed)."""

    transport = "shm"
    remote = False

    def __init__(self, segment: SharedSegment):
        self.buffer = segment.tensor

    def flush(self, ranges: list[tuple[int, int]]) -> None:
        pass

    def close(self) -> None:
        self.buffer = None  # the mapping stays in the backend's cache, for the segment's next request


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
