"""Hosts as Linux network namespaces on one virtual LAN, for multi-host tests without Docker (root and iproute2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass

LAN_DEVICE = "eth0"  # every host's one interface, as on a real machine


class NetnsError(Exception):
    """An `ip` or `tc` command failed; the message carries its stderr."""


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (run the tests as root)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not on PATH (apt-get install iproute2)"
    return None


def run(*argv: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired as e:
        raise NetnsError(f"{' '.join(argv)}: no answer within 10 s") from e
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


@dataclass(frozen=True)
class Host:
    name: str
    namespace: str
    address: str  # its private IP on the LAN

    def argv(self, *command: str) -> list[str]:
        """`command` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *command]

    def shape_egress(self, rate_bytes_per_s: int, burst_bytes: int, latency_ms: int = 400) -> None:
        """Limits what this host sends with a token bucket (tbf; no netem, so no added delay)."""
        run(*self.argv("tc", "qdisc", "replace", "dev", LAN_DEVICE, "root", "tbf", "rate", f"{rate_bytes_per_s * 8}bit",
                       "burst", f"{burst_bytes}b", "latency", f"{latency_ms}ms"))

    def shaped_bytes(self) -> int:
        """Bytes the token bucket has let out so far."""
        qdiscs = json.loads(run(*self.argv("tc", "-s", "-j", "qdisc", "show", "dev", LAN_DEVICE)))
        return next(q["bytes"] for q in qdiscs if q["kind"] == "tbf")

    def interface_bytes(self, direction: str) -> int:
        """Bytes the LAN interface has sent ("tx") or received ("rx")."""
        link = json.loads(run("ip", "-n", self.namespace, "-s", "-j", "link", "show", "dev", LAN_DEVICE))[0]
        return link["stats64"][direction]["bytes"]


class Lan:
    """A bridge with one veth port for the root namespace (the gateway address) and one per host namespace.

    The bridge lives in a namespace of its own, so the root namespace's firewall (Docker sets FORWARD to
    DROP) never filters traffic between hosts. Names carry `tag` so concurrent runs do not collide.
    """

    def __init__(self, tag: str, subnet: str = "10.213.0"):
        self.tag = tag
        self.subnet = subnet
        self.switch = f"sw-lan-{tag}"
        self.gateway_device = f"swgw{tag}"[:15]
        self.gateway = f"{subnet}.1"  # the root namespace's address on the LAN
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []

    def _add_namespace(self, name: str) -> None:
        run("ip", "netns", "add", name)
        self._namespaces.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")

    def create(self) -> None:
        self._add_namespace(self.switch)
        run("ip", "-n", self.switch, "link", "add", "name", "br0", "type", "bridge")
        run("ip", "-n", self.switch, "link", "set", "br0", "up")
        run("ip", "link", "add", "name", self.gateway_device, "type", "veth",
            "peer", "name", "gw", "netns", self.switch)
        run("ip", "-n", self.switch, "link", "set", "dev", "gw", "master", "br0", "up")
        run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.gateway_device)
        run("ip", "link", "set", self.gateway_device, "up")

    def add_host(self, name: str) -> Host:
        host = Host(name, f"sw-{name}-{self.tag}", f"{self.subnet}.{len(self.hosts) + 2}")
        self._add_namespace(host.namespace)
        port = f"p{len(self.hosts)}"
        run("ip", "-n", self.switch, "link", "add", "name", port, "type", "veth", "peer", "name", LAN_DEVICE,
            "netns", host.namespace)
        run("ip", "-n", self.switch, "link", "set", "dev", port, "master", "br0", "up")
        run("ip", "-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", LAN_DEVICE)
        run("ip", "-n", host.namespace, "link", "set", LAN_DEVICE, "up")
        self.hosts[name] = host
        return host

    def destroy(self) -> None:
        """Deletes every namespace (their veths go with them) and the gateway veth; safe after a partial create."""
        for name in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
        self._namespaces.clear()
        # Namespaces are torn down asynchronously; do not leave the root end of the gateway pair behind.
        subprocess.run(["ip", "link", "del", self.gateway_device], capture_output=True, timeout=10)
