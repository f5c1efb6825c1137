"""Runner configuration: where state lives, which address pool and gateway port to use.

One frozen dataclass; the daemon's /etc/sandgate/sandgate.toml (later) and the CLI
both build one of these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path

from netns.addressing import DEFAULT_POOL

DEFAULT_GATEWAY_PORT = 3128
# In /run itself (root-only), not /run/lock (anyone may create files there).
HOST_LOCK = Path("/run/sandgate.lock")


@dataclass(frozen=True)
class RunnerConfig:
    pool: IPv4Network = DEFAULT_POOL
    gateway_port: int = DEFAULT_GATEWAY_PORT
    state_dir: Path = Path("/var/lib/sandgate")
    run_dir: Path = Path("/run/sandgate")
    audit_path: Path = Path("/var/log/sandgate/audit.jsonl")
    table: str = "sandgate"
    # Per-sandbox records live here, one JSON file each.
    sandboxes_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.gateway_port <= 65535:
            raise ValueError(f"gateway port {self.gateway_port} is not in 1..65535")
        object.__setattr__(self, "sandboxes_dir", self.state_dir / "sandboxes")

    @property
    def lock_path(self) -> Path:
        """One lock for the whole host, whatever the run directory: addresses, sandbox
        ids and the shared table are the host's, and two runners with different
        directories (a test's, the daemon's) must not take the same /31."""
        return HOST_LOCK
