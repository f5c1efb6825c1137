"""500 create/destroy cycles in a tight loop: no failure, and nothing left at all."""

from __future__ import annotations

import os
import subprocess

import pytest

from nft.apply import Nft, sandbox_elements
from runner.sandbox import create_sandbox, destroy_sandbox

pytestmark = [pytest.mark.root, pytest.mark.slow]

CYCLES = 500


def sandgate_objects() -> dict[str, object]:
    netns = (
        sorted(n for n in os.listdir("/run/netns") if n.startswith("sg-"))
        if os.path.isdir("/run/netns")
        else []
    )
    links = sorted(n for n in os.listdir("/sys/class/net") if n.startswith("sg"))
    nft = Nft()
    elements = sandbox_elements(nft) if nft.table() is not None else []
    xt = subprocess.run(["iptables-legacy-save"], capture_output=True, text=True, check=False)
    xtables = [line for line in xt.stdout.splitlines() if "SANDGATE" in line or "sg+" in line]
    return {"netns": netns, "links": links, "elements": elements, "xtables": xtables}


def test_500_cycles_leave_nothing(config):
    before = sandgate_objects()
    for i in range(CYCLES):
        sandbox = create_sandbox(config)
        try:
            assert os.path.exists(sandbox.network.netns_path), i
        finally:
            destroy_sandbox(config, sandbox.id)
    assert sandgate_objects() == before
    assert not list(config.sandboxes_dir.glob("*.json"))
