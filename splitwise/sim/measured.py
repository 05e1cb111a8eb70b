"""A machine measured by `splitwise profile`: its profile CSV, the sidecar JSON beside it, and the MachineProfile of both.

The CSV holds the step times in the paper's columns; the sidecar (same stem, `.json`) what the simulator needs
besides: the model's shape, the KV capacity of a worker with the profiled config, and where it was measured.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from splitwise.sim.machines import MachineProfile, MachineType, ModelSpec
from splitwise.sim.perf_model import load_profile

# KV between two workers on one host goes over shared memory: about 1 GB/s for 64 MB of KV on the 2-core VM
# (docs/benchmarks.md, KV transfer). Used where a sidecar records no link bandwidth.
LOCAL_SHM_BYTES_PER_S = 1.0e9


@dataclass(frozen=True)
class MeasuredMachine:
    """The sidecar of a measured profile: the model's shape, the profiled worker's config, and the host."""

    model: str
    hardware: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    dtype_bytes: int
    weights_bytes: int
    max_context_tokens: int
    kv_memory_bytes: int
    kv_capacity_tokens: int  # of a token (or mixed) worker with this config
    prompt_worker_kv_capacity_tokens: int  # of a prompt worker (its own KV budget) with this config
    block_size: int
    max_batch_tokens: int
    max_decode_batch: int
    num_threads: int  # torch compute threads of the engine (the worker's SPLITWISE_NUM_THREADS, resolved)
    device: str
    host: str
    cpu_count: int
    platform: str
    torch_version: str
    repeats: int
    measured_at: str  # ISO 8601, UTC
    link_bytes_per_s: float | None = None  # the KV link to another worker, where measured or given
    load_average: tuple[float, float] | None = None  # the host's 1-minute load before and after: was it quiet?

    @property
    def model_spec(self) -> ModelSpec:
        return ModelSpec(self.model, self.num_layers, self.num_kv_heads, self.head_dim, self.weights_bytes,
                         self.dtype_bytes)

    def machine_type(self, cost_per_hour: float = 0.0, power_kw: float = 0.0) -> MachineType:
        """One worker of the profiled config as a machine: memory for its weights and exactly its KV capacity."""
        kv_bytes = self.kv_capacity_tokens * self.model_spec.kv_bytes_per_token
        return MachineType(self.hardware, self.hardware, cost_per_hour, power_kw, gpus=1,
                           gpu_memory_bytes=float(self.weights_bytes + kv_bytes),
                           link_bytes_per_s=self.link_bytes_per_s or LOCAL_SHM_BYTES_PER_S, memory_utilization=1.0)

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, path: str | Path) -> MeasuredMachine:
        try:
            fields = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: the profile's sidecar is missing (`splitwise profile` writes it beside the "
                             f"CSV; or give the machine and the model shape)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a profile sidecar ({e})") from None
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        if not isinstance(fields, dict) or required - set(fields):
            missing = sorted(required - set(fields)) if isinstance(fields, dict) else sorted(required)
            raise ValueError(f"{path}: not a profile sidecar; fields {missing} are missing")
        if fields.get("load_average") is not None:
            fields["load_average"] = tuple(fields["load_average"])
        return cls(**{k: v for k, v in fields.items() if k in names})


def sidecar_path(csv_path: str | Path) -> Path:
    return Path(csv_path).with_suffix(".json")


def measured_profile(path: str | Path, machine: MachineType | None = None,
                     model: ModelSpec | None = None) -> MachineProfile:
    """The MachineProfile of a `splitwise profile` CSV: step times from the CSV, the model's shape and the machine
    (cost and power 0, its KV capacity the profiled worker's) from the sidecar, unless given."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such profile CSV (`splitwise profile --out {path}` makes one)")
    sidecar = None if machine is not None and model is not None else MeasuredMachine.read(sidecar_path(path))
    if sidecar is None:
        return MachineProfile(machine, model, load_profile(path, decode_curve="batch_context"))
    perf = load_profile(path, sidecar.model, sidecar.hardware, decode_curve="batch_context")
    return MachineProfile(machine or sidecar.machine_type(), model or sidecar.model_spec, perf)
