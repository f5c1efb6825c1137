"""The legacy-xtables backstop: drops forwarding from and to sandboxes, and input from them
other than to the gateway port, in the legacy iptables filter table (python-iptables).

It exists for the case the host table is gone: a foreign `nft flush ruleset` removes every
nftables table but not legacy xtables rules, and a drop in either is final.

What is ours: the chains SANDGATE-FWD and SANDGATE-IN in table filter, and the one rule
in each of FORWARD and INPUT that jumps to them (comment "sandgate"). Nothing else in a
built-in chain is ever read for its content, moved or deleted. Every change is made on a
private libiptc handle and committed once, so the filter table changes atomically.

python-iptables and libxtables keep process-wide state: call these functions from one
thread at a time. They act on the netns of the calling thread.
"""

from __future__ import annotations

import contextlib
import os
import sys
import sysconfig
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from nft.ruleset import check_port

FORWARD_CHAIN = "SANDGATE-FWD"
INPUT_CHAIN = "SANDGATE-IN"
COMMENT = "sandgate"
SANDBOX_IFACES = "sg+"  # xtables' spelling of nft's "sg*"

# (built-in chain, our chain it jumps to)
_HOOKS = (("FORWARD", FORWARD_CHAIN), ("INPUT", INPUT_CHAIN))
_OURS = (FORWARD_CHAIN, INPUT_CHAIN)
_BUILTINS = ("INPUT", "FORWARD", "OUTPUT")  # of table filter


class BackstopError(Exception):
    """The backstop could not be read or changed."""


class BackstopUnavailable(BackstopError):
    """This kernel or these libraries have no legacy xtables (ip_tables) to put it in."""


def _xtables_libdir() -> str | None:
    """Where libxtables' extensions are; without it, `import iptc` runs ldconfig (~100 ms)."""
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    for candidate in (f"/usr/lib/{multiarch}/xtables", "/usr/lib64/xtables", "/usr/lib/xtables"):
        if os.path.isdir(candidate):
            return candidate
    return None


def _load_iptc() -> ModuleType:
    if "XTABLES_LIBDIR" not in os.environ and (libdir := _xtables_libdir()):
        os.environ["XTABLES_LIBDIR"] = libdir
    # iptc.util tries `distutils.sysconfig` first and falls back to `sysconfig` on
    # ModuleNotFoundError; importing distutils costs ~90 ms of the ~145 ms import.
    # A None entry in sys.modules makes that import fail fast with exactly that error.
    hide_distutils = "distutils" not in sys.modules
    if hide_distutils:
        sys.modules["distutils"] = None  # type: ignore[assignment]
    try:
        import iptc
    except Exception as exc:  # ImportError, OSError or XTablesError from its ctypes loading
        raise BackstopUnavailable(
            f"python-iptables cannot load libip4tc/libxtables: {exc}"
        ) from exc
    finally:
        if hide_distutils:
            del sys.modules["distutils"]
    return iptc


class _ChainRef:
    """What iptc.Rule needs of a chain when decoding an entry: the table it is in.

    iptc.Chain objects are cached process-wide by name and rebound to whichever table
    object was passed last, so they are not used here.
    """

    def __init__(self, table: Any, name: str) -> None:
        self.table = table
        self.name = name


@contextlib.contextmanager
def _filter_table() -> Iterator[tuple[ModuleType, Any]]:
    """A private libiptc handle on the filter table of the calling thread's netns.

    iptc.Table(name) returns one object per name for the whole process, whose handle
    belongs to the netns that first opened it and which autocommits every change. A
    handle of our own belongs to this thread's netns and commits only when told to;
    closing it without a commit discards every change.
    """
    iptc = _load_iptc()
    table = object.__new__(iptc.Table)
    try:
        table._init(iptc.Table.FILTER, False)
    except iptc.IPTCError as exc:
        raise BackstopUnavailable(f"legacy xtables table filter cannot be opened: {exc}") from exc
    try:
        yield iptc, table
    finally:
        table.close()


def _legacy_filter_loaded() -> bool:
    """True if the calling thread's netns has a legacy filter table already.

    /proc/thread-self, not /proc/self: the thread may have joined another netns than the
    process's main thread. Looking here first keeps remove/present from creating the
    legacy table (and loading ip_tables) on a host that never had one.
    """
    try:
        with open("/proc/thread-self/net/ip_tables_names") as f:
            return "filter" in f.read().split()
    except FileNotFoundError:
        return False


# --- rules as data ------------------------------------------------------------------------


def _rule_key(rule: Any) -> tuple[Any, ...]:
    """A rule reduced to what it does: interfaces, addresses, protocol, matches, target."""
    matches = tuple(
        sorted(
            (m.name, tuple(sorted((k, tuple(v)) for k, v in m.get_all_parameters().items())))
            for m in rule.matches
        )
    )
    return (
        rule.in_interface,
        rule.out_interface,
        rule.src,
        rule.dst,
        rule.protocol,
        matches,
        rule.target.name if rule.target else None,
    )


def _build(
    iptc: ModuleType,
    target: str,
    *,
    in_iface: str | None = None,
    out_iface: str | None = None,
    tcp_dport: int | None = None,
    comment: str | None = None,
) -> Any:
    rule = iptc.Rule()
    if in_iface:
        rule.in_interface = in_iface
    if out_iface:
        rule.out_interface = out_iface
    if tcp_dport is not None:
        rule.protocol = "tcp"
        rule.create_match("tcp").dport = str(tcp_dport)
    if comment:
        rule.create_match("comment").comment = comment
    if target in ("DROP", "RETURN", "ACCEPT"):
        rule.target = iptc.Target(rule, target)
    else:
        # A jump to a user chain is a standard target carrying the chain's name (libiptc
        # resolves it on insert). iptc.Target(rule, chain) would look the chain up in
        # every process-wide cached table instead of ours, so name it directly.
        rule.target = iptc.Target(rule, "DROP")
        rule.target.standard_target = target
    return rule


def _wanted(iptc: ModuleType, port: int) -> dict[str, list[Any]]:
    """Our chains' rules for a gateway port, in order."""
    return {
        FORWARD_CHAIN: [
            _build(iptc, "DROP", in_iface=SANDBOX_IFACES),
            _build(iptc, "DROP", out_iface=SANDBOX_IFACES),
        ],
        INPUT_CHAIN: [
            _build(iptc, "RETURN", in_iface=SANDBOX_IFACES, tcp_dport=port),
            _build(iptc, "DROP", in_iface=SANDBOX_IFACES),
        ],
    }


def _jump(iptc: ModuleType, chain: str) -> Any:
    return _build(iptc, chain, comment=COMMENT)


def _rules(iptc: ModuleType, table: Any, chain: str) -> list[Any]:
    """The rules of a chain, decoded. Valid only until the table is next changed."""
    ref = _ChainRef(table, chain)
    rules = []
    entry = table.first_rule(chain)
    while entry:
        rules.append(iptc.Rule(entry, ref))
        entry = table.next_rule(entry)
    return rules


def _jump_positions(table: Any, chain: str) -> list[int]:
    """Positions in chain of rules jumping to one of our chains (read without decoding)."""
    positions = []
    entry, i = table.first_rule(chain), 0
    while entry:
        target = table.get_target(entry)
        if target and target.decode() in _OURS:
            positions.append(i)
        entry, i = table.next_rule(entry), i + 1
    return positions


def _installed_port(iptc: ModuleType, table: Any) -> int | None:
    """The gateway port of a complete, untampered backstop in table, or None."""
    if not all(table.is_chain(chain) for chain in _OURS):
        return None
    in_rules = _rules(iptc, table, INPUT_CHAIN)
    tcp = [m for m in (in_rules[0].matches if in_rules else []) if m.name == "tcp"]
    try:
        port = int(tcp[0].get_all_parameters()["dport"][0])
        check_port(port, "dport")
    except (IndexError, KeyError, ValueError):
        return None
    for chain, wanted in _wanted(iptc, port).items():
        have = _rules(iptc, table, chain)
        if [_rule_key(r) for r in have] != [_rule_key(r) for r in wanted]:
            return None
    for builtin, ours in _HOOKS:
        if _jump_positions(table, builtin) != [0]:
            return None
        if _rule_key(_rules(iptc, table, builtin)[0]) != _rule_key(_jump(iptc, ours)):
            return None
    return port


def _remove(iptc: ModuleType, table: Any) -> bool:
    """Delete (uncommitted) every jump to our chains and the chains; True if any existed."""
    changed = False
    for name in _BUILTINS:
        # Re-read after each delete: decoded rules point into libiptc's cache.
        while positions := _jump_positions(table, name):
            rule = _rules(iptc, table, name)[positions[0]]
            table.delete_entry(name, rule.rule, rule.mask)
            changed = True
    for chain in _OURS:
        if table.is_chain(chain):
            table.flush_entries(chain)
            table.delete_chain(chain)
            changed = True
    return changed


# --- the interface ------------------------------------------------------------------------


def backstop_available() -> tuple[bool, str]:
    """(True, "") if legacy xtables can be used here, else (False, why not).

    Opening the table is the only real test; where the kernel has ip_tables this creates
    an empty legacy filter table in the calling thread's netns if there was none.
    """
    try:
        with _filter_table():
            pass
    except BackstopUnavailable as exc:
        return False, str(exc)
    return True, ""


def ensure_backstop(gateway_port: int) -> None:
    """Install the backstop for gateway_port, or rewrite it if it differs in any way.

    Idempotent: when the backstop is already exactly in place, nothing is committed.
    Our jump rules go first in FORWARD and INPUT.
    """
    check_port(gateway_port, "gateway_port")
    with _filter_table() as (iptc, table):
        try:
            if _installed_port(iptc, table) == gateway_port:
                return
            _remove(iptc, table)
            for chain, rules in _wanted(iptc, gateway_port).items():
                table.create_chain(chain)
                for rule in rules:
                    table.append_entry(chain, rule.rule)
            for builtin, ours in _HOOKS:
                table.insert_entry(builtin, _jump(iptc, ours).rule, 0)
            table.commit()
        except iptc.IPTCError as exc:
            raise BackstopError(
                f"legacy xtables filter: installing the sandgate backstop failed: {exc}"
            ) from exc


def remove_backstop() -> None:
    """Remove everything ensure_backstop made. Idempotent; touches nothing else."""
    if not _legacy_filter_loaded():
        return
    with _filter_table() as (iptc, table):
        try:
            if _remove(iptc, table):
                table.commit()
        except iptc.IPTCError as exc:
            raise BackstopError(
                f"legacy xtables filter: removing the sandgate backstop failed: {exc}"
            ) from exc


def backstop_present() -> bool:
    """True if the backstop is complete and untampered (for any gateway port)."""
    if not _legacy_filter_loaded():
        return False
    with _filter_table() as (iptc, table):
        return _installed_port(iptc, table) is not None


def installed_port() -> int | None:
    """The gateway port of the backstop in place, or None if it is absent or tampered."""
    if not _legacy_filter_loaded():
        return None
    with _filter_table() as (iptc, table):
        return _installed_port(iptc, table)
