"""The receiver's staging buffer for one request's KV, written by the sender over shared memory or Mooncake.

Layout: for each layer, its keys as [num_tokens, num_kv_heads, head_dim], then its values, so that any
token range of a layer is two contiguous byte ranges, and what the receiver reads is already shaped the
way its cache takes it. The buffer belongs to one request: a late or stray write can only land there,
never in another request's KV blocks.
"""

from __future__ import annotations

import mmap
import os
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from splitwise.kv.layout import KVLayout

SHM_DIR = Path("/dev/shm")
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # map every page at once instead of one fault per page


@dataclass(frozen=True)
class StagedLayout:
    layout: KVLayout
    num_tokens: int

    @property
    def row_bytes(self) -> int:
        """Keys (or values) of one token in one layer."""
        return self.layout.bytes_per_token_per_layer // 2

    @property
    def layer_bytes(self) -> int:
        return 2 * self.num_tokens * self.row_bytes

    @property
    def total_bytes(self) -> int:
        return self.layout.num_layers * self.layer_bytes

    def ranges(self, layer: int, token_start: int, token_count: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(offset, length) of the keys and of the values of tokens [token_start, +token_count) of `layer`."""
        length = token_count * self.row_bytes
        keys = layer * self.layer_bytes + token_start * self.row_bytes
        return (keys, length), (keys + self.num_tokens * self.row_bytes, length)


def byte_view(buffer: torch.Tensor, offset: int, length: int, layout: KVLayout) -> torch.Tensor:
    """[tokens, kv_heads, head_dim] over `length` bytes of a uint8 buffer, without a copy."""
    return buffer[offset:offset + length].view(layout.torch_dtype).view(-1, layout.num_kv_heads, layout.head_dim)


def stage_layer(buffer: torch.Tensor, staged: StagedLayout, layer: int, token_start: int,
                keys: torch.Tensor, values: torch.Tensor) -> int:
    """Copies keys/values ([kv_heads, tokens, head_dim]) into their place in `buffer`; returns their checksum."""
    (k_off, length), (v_off, _) = staged.ranges(layer, token_start, keys.shape[1])
    byte_view(buffer, k_off, length, staged.layout).copy_(keys.transpose(0, 1))
    byte_view(buffer, v_off, length, staged.layout).copy_(values.transpose(0, 1))
    return region_checksum(buffer, k_off, v_off, length)


def region_checksum(buffer: torch.Tensor, k_off: int, v_off: int, length: int) -> int:
    """CRC-32 over the keys' bytes then the values' bytes (the inline chunks' checksum, on staged bytes)."""
    data = buffer.numpy()
    return zlib.crc32(data[v_off:v_off + length], zlib.crc32(data[k_off:k_off + length]))


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


class ShmStaging:
    """Receiver side: a request's staging segment in /dev/shm, created at reservation, removed at release."""

    transport = "shm"

    def __init__(self, size: int):
        self.segment = SharedSegment.create(size)
        self.tensor = self.segment.tensor

    @property
    def name(self) -> str:
        return self.segment.name

    def close(self) -> None:
        self.tensor = None
        self.segment.close()


class ShmWriter:
    """Sender side: the receiver's segment mapped here; staging a layer writes it there (no flush needed)."""

    transport = "shm"
    remote = False

    def __init__(self, name: str, size: int):
        self.segment = SharedSegment.open(name, size)
        self.buffer = self.segment.tensor

    def flush(self, ranges: list[tuple[int, int]]) -> None:
        pass

    def close(self) -> None:
        self.buffer = None
        self.segment.close()
