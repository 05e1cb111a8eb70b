"""Machine types (cost, power, memory, links), model shapes (weights, GQA KV size), and a machine's profile by name.

A profile name is `MODEL@MACHINE` (`llama2-70b@dgx-a100`: the paper's measured points for that pair), or the path
of a CSV that `splitwise profile` wrote (one model on one machine, measured here).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from splitwise.sim.perf_model import PAPER_PROFILES, PerfModel, load_profile

GB = 1e9


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    weights_bytes: float
    dtype_bytes: int = 2

    @property
    def kv_bytes_per_token(self) -> int:
        """Keys and values of every layer for one token, with grouped-query attention's KV heads."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes


@dataclass(frozen=True)
class MachineType:
    """One server (a DGX: 8 GPUs serving one model instance with tensor parallelism)."""

    name: str
    hardware: str  # the profile's hardware key
    cost_per_hour: float  # dollars
    power_kw: float  # rated (provisioned) power
    gpus: int = 8
    gpu_memory_bytes: float = 80 * GB
    link_bytes_per_s: float = 8 * 200e9 / 8  # InfiniBand, all GPUs together
    memory_utilization: float = 0.9  # the share of GPU memory the engine may take (weights + KV)

    def kv_capacity_tokens(self, model: ModelSpec) -> int:
        free = self.gpus * self.gpu_memory_bytes * self.memory_utilization - model.weights_bytes
        if free <= 0:
            raise ValueError(f"{model.name} ({model.weights_bytes / GB:.0f} GB) does not fit on a {self.name}")
        return int(free // model.kv_bytes_per_token)


MODELS: dict[str, ModelSpec] = {
    "llama2-70b": ModelSpec("llama2-70b", num_layers=80, num_kv_heads=8, head_dim=128, weights_bytes=138e9),
    "bloom-176b": ModelSpec("bloom-176b", num_layers=70, num_kv_heads=112, head_dim=128, weights_bytes=352e9),
}

# The paper's machines: DGX-A100 and DGX-H100, and a DGX-H100 with its GPUs capped at 70% power (prompt
# steps 1.3x slower, as its profile rows show; token steps unchanged).
MACHINES: dict[str, MachineType] = {
    "dgx-a100": MachineType("dgx-a100", "a100-80gb", cost_per_hour=17.6, power_kw=6.5, link_bytes_per_s=8 * 200e9 / 8),
    "dgx-h100": MachineType("dgx-h100", "h100-80gb", cost_per_hour=38.0, power_kw=10.2, link_bytes_per_s=8 * 400e9 / 8),
    "dgx-h100-pcap": MachineType("dgx-h100-pcap", "h100-80gb-pcap", cost_per_hour=38.0, power_kw=7.14,
                                 link_bytes_per_s=8 * 400e9 / 8),
}


@dataclass(frozen=True)
class MachineProfile:
    """What a machine of one type serving one model does: its step times, KV size and capacity, cost and power."""

    machine: MachineType
    model: ModelSpec
    perf: PerfModel

    @property
    def name(self) -> str:
        return f"{self.model.name}@{self.machine.name}"

    @property
    def kv_capacity_tokens(self) -> int:
        return self.machine.kv_capacity_tokens(self.model)


def machine(name: str) -> MachineType:
    try:
        return MACHINES[name]
    except KeyError:
        raise ValueError(f"unknown machine type {name!r}; choose from {', '.join(MACHINES)}") from None


def model_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}") from None


@lru_cache(maxsize=64)
def paper_profile(model: str, machine_name: str, tensor_parallel: int = 8,
                  decode_curve: str = "batch_size") -> MachineProfile:
    """The paper's profile of a model on a machine type (tensor parallel over its 8 GPUs by default); read once
    (profiles are immutable, and a plan builds hundreds of designs)."""
    m = machine(machine_name)
    return MachineProfile(m, model_spec(model),
                          load_profile(PAPER_PROFILES, model, m.hardware, tensor_parallel, decode_curve))


def resolve_profile(name: str, measured_machine: MachineType | None = None,
                    measured_model: ModelSpec | None = None) -> MachineProfile:
    """`MODEL@MACHINE` from the paper's profiles, or a profile CSV of `splitwise profile` (whose machine and model
    shape are given, or read from the CSV's sidecar written beside it)."""
    if "@" in name and not Path(name).exists():
        model, _, machine_name = name.partition("@")
        return paper_profile(model, machine_name)
    path = Path(name)
    if not path.exists():
        raise ValueError(f"profile {name!r} is neither MODEL@MACHINE (models: {', '.join(MODELS)}; machines: "
                         f"{', '.join(MACHINES)}) nor a profile CSV that exists")
    from splitwise.sim.measured import measured_profile  # the sidecar format belongs to `splitwise profile`
    return measured_profile(path, measured_machine, measured_model)
