"""Cluster designs: how many machines of which type serve each phase, and what they cost and draw.

Written `baseline:N*dgx-a100` (colocated: every machine serves both phases) or
`splitwise:P*dgx-h100+T*dgx-a100` (P prompt machines, T token machines; a mixed pool is borrowed from them under
load), optionally followed by `@MODEL` (default llama2-70b).
"""

from __future__ import annotations

from dataclasses import dataclass

from splitwise.sim.machines import MachineProfile, paper_profile

DEFAULT_MODEL = "llama2-70b"
# name: (prompt machine, token machine), or (machine, None) for a colocated baseline.
FAMILIES: dict[str, tuple[str, str | None]] = {
    "Baseline-A100": ("dgx-a100", None),
    "Baseline-H100": ("dgx-h100", None),
    "Splitwise-AA": ("dgx-a100", "dgx-a100"),
    "Splitwise-HH": ("dgx-h100", "dgx-h100"),
    "Splitwise-HA": ("dgx-h100", "dgx-a100"),
    "Splitwise-HHcap": ("dgx-h100", "dgx-h100-pcap"),
}


@dataclass(frozen=True)
class Pool:
    profile: MachineProfile
    role: str  # prompt, token or mixed
    count: int


@dataclass(frozen=True)
class ClusterDesign:
    name: str
    pools: tuple[Pool, ...]

    @property
    def machines(self) -> int:
        return sum(p.count for p in self.pools)

    @property
    def cost_per_hour(self) -> float:
        return sum(p.count * p.profile.machine.cost_per_hour for p in self.pools)

    @property
    def power_kw(self) -> float:
        """Provisioned power: every machine at its rated power."""
        return sum(p.count * p.profile.machine.power_kw for p in self.pools)

    @property
    def split(self) -> bool:
        return any(p.role != "mixed" for p in self.pools)

    def count(self, role: str) -> int:
        return sum(p.count for p in self.pools if p.role == role)

    @property
    def short(self) -> str:
        """`54P+10T` or `113` (colocated)."""
        if not self.split:
            return str(self.machines)
        return f"{self.count('prompt')}P+{self.count('token')}T"


def baseline(machine: str, count: int, model: str = DEFAULT_MODEL, decode_curve: str = "batch_size") -> ClusterDesign:
    return ClusterDesign(f"baseline:{count}*{machine}",
                         (Pool(paper_profile(model, machine, decode_curve=decode_curve), "mixed", count),))


def splitwise(prompt_machine: str, prompts: int, token_machine: str, tokens: int, model: str = DEFAULT_MODEL,
              decode_curve: str = "batch_size") -> ClusterDesign:
    return ClusterDesign(f"splitwise:{prompts}*{prompt_machine}+{tokens}*{token_machine}",
                         (Pool(paper_profile(model, prompt_machine, decode_curve=decode_curve), "prompt", prompts),
                          Pool(paper_profile(model, token_machine, decode_curve=decode_curve), "token", tokens)))


def parse_design(text: str, decode_curve: str = "batch_size") -> ClusterDesign:
    """`baseline:N*MACHINE[@MODEL]` or `splitwise:P*MACHINE+T*MACHINE[@MODEL]`."""
    body, _, model = text.partition("@")
    kind, _, counts = body.partition(":")
    model = model or DEFAULT_MODEL
    try:
        parts = [(int(n), m) for n, m in (part.split("*", 1) for part in counts.split("+"))]
    except ValueError:
        parts = []
    if kind == "baseline" and len(parts) == 1 and parts[0][0] > 0:
        return baseline(parts[0][1], parts[0][0], model, decode_curve)
    if kind == "splitwise" and len(parts) == 2 and parts[0][0] > 0 and parts[1][0] > 0:
        (p, pm), (t, tm) = parts
        return splitwise(pm, p, tm, t, model, decode_curve)
    raise ValueError(f"cannot read the cluster design {text!r}: write baseline:N*MACHINE or "
                     f"splitwise:P*MACHINE+T*MACHINE, optionally @MODEL (e.g. splitwise:54*dgx-a100+10*dgx-a100)")
