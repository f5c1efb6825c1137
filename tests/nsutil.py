"""Test-side helpers for running code in a network namespace the test made itself.

Test-only namespaces are named `sgtest-<hex>` so the suite's residue check finds
any that a test leaves behind.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
from collections.abc import Iterator

from pyroute2 import netns as pr_netns

from netns.namespace import run_in_netns

__all__ = ["netns_exec", "run_in_netns", "scratch_netns"]


def netns_exec(name: str, argv: list[str], **kw: object) -> subprocess.CompletedProcess:
    """Run a command inside the named netns (test side only: `ip netns exec`)."""
    return subprocess.run(["ip", "netns", "exec", name, *argv], **kw)  # type: ignore[arg-type]


@contextlib.contextmanager
def scratch_netns(prefix: str = "sgtest") -> Iterator[str]:
    """A throwaway network namespace, removed on exit whatever happens."""
    name = f"{prefix}-{secrets.token_hex(4)}"
    pr_netns.create(name)
    try:
        yield name
    finally:
        pr_netns.remove(name)
