"""How long a prompt's KV takes to reach its token machine, and how much of that the prefill hides.

Layer by layer (what the live prompt worker does for prompts of kv_layerwise_min_tokens or more), layer l's KV can go
once the prefill has computed it: the link, busy from the first layer on, finishes at the later of the prefill's end
plus one layer's transfer and the prefill's start plus the whole transfer. Otherwise the whole KV goes after the
prefill. Each transfer also pays a fixed cost (connection, handshake, completion): the residue the paper measured
is 5-8 ms.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PER_TRANSFER_S = 0.005


@dataclass(frozen=True)
class KVLink:
    bytes_per_s: float
    per_transfer_s: float = DEFAULT_PER_TRANSFER_S

    def arrival_s(self, kv_bytes: float, num_layers: int, prefill_start_s: float, prefill_end_s: float,
                  layerwise: bool) -> float:
        """When the whole KV has arrived at the token machine."""
        whole = kv_bytes / self.bytes_per_s
        if not layerwise:
            return prefill_end_s + whole + self.per_transfer_s
        return max(prefill_end_s + whole / num_layers, prefill_start_s + whole) + self.per_transfer_s
