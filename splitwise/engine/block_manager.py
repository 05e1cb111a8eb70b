"""Paged KV memory: fixed-size blocks, a free list, and per-sequence block tables with exact accounting."""

from __future__ import annotations

from collections import deque


class KVCapacityError(Exception):
    """The request does not fit in the KV cache now (or ever, when `ever` is set)."""

    def __init__(self, message: str, ever: bool):
        super().__init__(message)
        self.ever = ever


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def can_grow(self, block_table: list[int], tokens: int) -> bool:
        return self.blocks_for(tokens) - len(block_table) <= self.num_free

    def grow(self, block_table: list[int], tokens: int) -> None:
        """Extends block_table in place so that it holds `tokens` tokens."""
        needed = self.blocks_for(tokens) - len(block_table)
        if needed > self.num_free:
            raise KVCapacityError(f"KV cache full: {needed} blocks needed, {self.num_free} free", ever=False)
        for _ in range(needed):
            block_table.append(self._free.popleft())

    def free(self, block_table: list[int]) -> None:
        self._free.extend(block_table)
        block_table.clear()

    def slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        """Cache slot of each position in [start, end)."""
        size = self.block_size
        return [block_table[p // size] * size + p % size for p in range(start, end)]
