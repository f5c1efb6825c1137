"""The gateway for an embedded `sandgate run`: one uvloop event loop in a thread of
the runner process, serving the sandbox's TCP and Unix endpoints while the main
thread waits for the command.

Owns: starting and stopping that loop, the gateway's view of the host (which
addresses are its own), the sandbox's socket path on the host, and the environment
that points ordinary tools inside the sandbox at the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from pathlib import Path

import uvloop

from gateway.policy import Policy
from gateway.proxy import Gateway, GatewayConfig, Resolver

IPAddress = IPv4Address | IPv6Address

# Where the sandbox finds its Unix endpoint (bind-mounted from the host).
SOCKET_IN_SANDBOX = "/run/sandgate/gateway.sock"


def socket_path(run_dir: Path, sandbox_id: str) -> Path:
    """The host side of a sandbox's Unix endpoint: in the directory that is bound at
    /run/sandgate inside it (runner.workload.gateway_dir), under a root-only parent."""
    return run_dir / "gateways" / sandbox_id / Path(SOCKET_IN_SANDBOX).name


def remove_socket_dir(run_dir: Path, sandbox_id: str) -> None:
    """The sandbox's gateway directory and socket, once the sandbox is gone."""
    path = socket_path(run_dir, sandbox_id)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    with contextlib.suppress(FileNotFoundError, OSError):
        os.rmdir(path.parent)


def proxy_env(gateway: IPv4Address, port: int, git_hosts: Iterable[str] = ()) -> dict[str, str]:
    """Variables that make curl, pip, npm, git and most HTTP libraries use the gateway.

    There is no DNS inside a sandbox; every name is resolved by the gateway, so even
    local names go through it except the loopback ones in NO_PROXY. The gateway's own
    address is in NO_PROXY too: requests to it (the git gateway) go to it directly.

    git reads its configuration from the environment (GIT_CONFIG_COUNT, _KEY_n,
    _VALUE_n; git >= 2.31): http.proxy, and for every host in `git_hosts` (the hosts
    of the sandbox's [[git.repos]]) `url.http://GATEWAY:PORT/git/HOST/.insteadOf =
    https://HOST/`, so that `git clone https://HOST/org/repo` talks to the git gateway,
    which holds the credential. Nothing inside the sandbox holds one.
    """
    url = f"http://{gateway}:{port}"
    env = {}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env[name] = env[name.lower()] = url
    env["NO_PROXY"] = env["no_proxy"] = f"localhost,127.0.0.1,::1,{gateway}"
    env["PIP_PROXY"] = url
    env["npm_config_proxy"] = env["npm_config_https_proxy"] = url
    config = [("http.proxy", url)]
    for host in sorted(set(git_hosts)):
        config.append((f"url.{url}/git/{host}/.insteadOf", f"https://{host}/"))
    env["GIT_CONFIG_COUNT"] = str(len(config))
    for i, (key, value) in enumerate(config):
        env[f"GIT_CONFIG_KEY_{i}"] = key
        env[f"GIT_CONFIG_VALUE_{i}"] = value
    env["SANDGATE_GATEWAY_SOCKET"] = SOCKET_IN_SANDBOX
    return env


class GatewayThread:
    """A Gateway on its own uvloop loop in a daemon thread; blocking wrappers for the
    runner's main thread."""

    def __init__(self, config: GatewayConfig) -> None:
        self._loop = uvloop.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sandgate-gateway", daemon=True)
        self._thread.start()
        self.gateway: Gateway = self._call(self._make(config))

    async def _make(self, config: GatewayConfig) -> Gateway:
        return Gateway(config)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def add_sandbox(
        self, sandbox_id: str, policy: Policy, tcp: tuple[str, int], unix_path: Path
    ) -> None:
        unix_path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        self._call(self.gateway.add_sandbox(sandbox_id, policy, tcp=tcp, unix_path=str(unix_path)))

    def remove_sandbox(self, sandbox_id: str, unix_path: Path) -> None:
        self._call(self.gateway.remove_sandbox(sandbox_id))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(unix_path)
        with contextlib.suppress(OSError):
            os.rmdir(unix_path.parent)

    def close(self) -> None:
        try:
            self._call(self.gateway.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()


def pinned_resolver(pins: Mapping[str, list[IPAddress]], fallback: Resolver) -> Resolver:
    """A resolver that answers the pinned names itself (like curl's --resolve) and asks
    `fallback` (the host's resolver) for the rest. Pinned answers are checked like any.
    Its `local` method (gateway.addr.Resolver) gives the gateway the pinned answers
    without a trip through the resolver thread pool."""
    return _PinnedResolver(pins, fallback)


class _PinnedResolver:
    def __init__(self, pins: Mapping[str, list[IPAddress]], fallback: Resolver) -> None:
        # Tuples, given out as they are: the gateway reuses its verdict on answers it
        # has seen (the same object) without checking them again.
        self._pins = {host: tuple(addrs) for host, addrs in pins.items()}
        self._fallback = fallback

    def local(self, host: str, port: int) -> tuple[IPAddress, ...] | None:
        return self._pins.get(host)

    def __call__(self, host: str, port: int) -> list[IPAddress]:
        pinned = self.local(host, port)
        return list(pinned) if pinned is not None else self._fallback(host, port)


def own_networks(pool: IPv4Network, host_addrs: Iterable[IPv4Address]) -> frozenset:
    """What the gateway must never dial whatever a policy allows: every sandbox (the
    pool) and this host's own addresses."""
    return frozenset({pool, *host_addrs})
