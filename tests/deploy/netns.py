"""A throw-away multi-host network for tests: one Linux bridge and one network namespace per host, each
joined to the bridge by a veth pair and given its own address on a random 10.x.y.0/24 (the bridge itself
takes .1, so the test process reaches the hosts). Names carry a per-run suffix so parallel runs don't clash;
`close()` removes everything it made. Needs root and iproute2."""

from __future__ import annotations

import os
import random
import subprocess
from dataclasses import dataclass, field


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


@dataclass
class HostNetwork:
    suffix: str = field(default_factory=lambda: f"{os.getpid() % 10000:04d}{random.randrange(36**2):03x}")
    subnet: str = field(default_factory=lambda: f"10.{random.randrange(100, 250)}.{random.randrange(0, 250)}")
    hosts: dict[str, str] = field(default_factory=dict)  # name → address
    _namespaces: list[str] = field(default_factory=list)
    _links: list[str] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"br{self.suffix}"  # interface names: at most 15 characters

    def __enter__(self) -> HostNetwork:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._links.append(self.bridge)
        _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        return self

    def add_host(self, name: str) -> str:
        """A namespace named for `name` with the next address; returns the address."""
        index = len(self.hosts) + 2
        ns, outside, inside = f"ad{self.suffix}{name}", f"v{self.suffix}{index}", f"p{self.suffix}{index}"
        address = f"{self.subnet}.{index}"
        _ip("netns", "add", ns)
        self._namespaces.append(ns)
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        self._links.append(outside)
        _ip("link", "set", inside, "netns", ns)
        _ip("link", "set", outside, "master", self.bridge, "up")
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", inside)
        _ip("-n", ns, "link", "set", inside, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        self.hosts[name] = address
        return address

    def namespace(self, name: str) -> str:
        return f"ad{self.suffix}{name}"

    def exec_prefix(self, name: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(name)]

    def close(self) -> None:
        for link in reversed(self._links):
            subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=30)
        for ns in self._namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._links.clear()
        self._namespaces.clear()

    def __exit__(self, *exc) -> None:
        self.close()
