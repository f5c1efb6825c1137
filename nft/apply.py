"""Applying sandgate's nftables documents through libnftables, and reading them back.

Owns the one place that talks to libnftables (`Nft`), the per-sandbox element changes,
and the drift check: the tables are read back after every change and compared, rule by
rule, with what nft/ruleset.py renders. Every change is one libnftables transaction.

libnftables binds its netlink socket to the network namespace of the thread that creates
the context, so an `Nft` belongs to one thread and one netns: make it inside the netns.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

import nftables

from nft import ruleset
from nft.ruleset import FAMILY, GATEWAY_EP, SANDBOX_SRC, TABLE, Doc, SandboxElements


class NftError(Exception):
    """A libnftables command failed, or the kernel does not hold what sandgate applied."""


class NftDrift(NftError):
    """A table of sandgate's exists but differs from what sandgate renders for it."""


def _describe(doc: Doc) -> str:
    """A short name for what a document does, e.g. 'add element inet sandgate sandbox_src'."""
    parts: list[str] = []
    for command in doc.get("nftables", []):
        for verb, body in command.items():
            for kind, obj in body.items():
                obj = obj if isinstance(obj, dict) else {}
                words = [verb, kind, obj.get("family"), obj.get("table")]
                words.append(obj.get("chain") or obj.get("name"))
                part = " ".join(str(w) for w in words if w)
                if part not in parts:
                    parts.append(part)
    if len(parts) > 3:
        return ", ".join(parts[:3]) + f" (+{len(parts) - 3} more)"
    return ", ".join(parts)


# libnftables (1.0.6) is not thread-safe: two threads listing at once get corrupted set
# types, three abort on an assertion in json.c. Every call in this process takes this.
_LIBNFTABLES = threading.RLock()


class Nft:
    """A libnftables context speaking JSON, bound to the netns of the thread that made it.

    Its netlink socket is select()ed by libnftables, so its descriptor must stay below
    FD_SETSIZE (1024): a process with many descriptors (the daemon: two per sandbox)
    makes one context early and keeps it."""

    def __init__(self) -> None:
        with _LIBNFTABLES:
            self._ctx = nftables.Nftables()
            self._ctx.set_json_output(True)

    def run(self, doc: Doc, what: str | None = None) -> Doc:
        """Run a document as one transaction; return libnftables' JSON output ({} if none)."""
        with _LIBNFTABLES:
            rc, output, error = self._ctx.json_cmd(doc)
        if rc != 0:
            text = " ".join(line.strip() for line in (error or "").splitlines() if line.strip())
            text = text.replace("internal:0:0-0: ", "")
            raise NftError(f"nft: {what or _describe(doc)} failed: {text or f'rc={rc}'}")
        return output or {}

    def table(self, name: str = TABLE, elements: bool = True) -> Doc | None:
        """`list table inet NAME` as parsed JSON, or None when there is no such table.

        elements=False lists it tersely (no set elements): the cost then stays that of
        the rules, however many sandboxes the sets hold.
        """
        ruleset.check_table(name)
        listing = {"nftables": [{"list": {"table": {"family": FAMILY, "name": name}}}]}
        with _LIBNFTABLES:
            return self._table(listing, name, elements)

    def _table(self, listing: Doc, name: str, elements: bool) -> Doc | None:
        self._ctx.set_terse_output(not elements)
        try:
            return self.run(listing, what=f"list table {FAMILY} {name}")
        except NftError:
            # The error text for an absent table is a bare ENOENT; tell it apart from every
            # other failure by asking which tables exist.
            tables = self.run({"nftables": [{"list": {"tables": {"family": FAMILY}}}]})
            found = [obj.get("table", {}) for obj in _objects(tables)]
            if not any((t.get("family"), t.get("name")) == (FAMILY, name) for t in found):
                return None
            raise
        finally:
            self._ctx.set_terse_output(False)


def _objects(listing: Doc) -> list[Doc]:
    return [obj for obj in listing.get("nftables", []) if "metainfo" not in obj]


# --- comparing what is there with what should be there -----------------------------------


@dataclass
class _Shape:
    """A table reduced to what verification compares: no handles, counters or elements."""

    sets: dict[str, Doc] = field(default_factory=dict)
    chains: dict[str, Doc] = field(default_factory=dict)
    rules: dict[str, list[tuple[str | None, list[Any]]]] = field(default_factory=dict)
    other: list[str] = field(default_factory=list)


_IDENTITY = ("family", "table", "name", "handle")


def _shape(objects: list[Doc]) -> _Shape:
    shape = _Shape()
    for obj in objects:
        ((kind, body),) = obj.items()
        if kind == "table":
            continue
        if kind == "set":
            shape.sets[body["name"]] = {
                k: v for k, v in body.items() if k not in _IDENTITY and k != "elem"
            }
        elif kind == "chain":
            shape.chains[body["name"]] = {k: v for k, v in body.items() if k not in _IDENTITY}
            shape.rules.setdefault(body["name"], [])
        elif kind == "rule":
            expr = [stmt for stmt in body.get("expr", []) if "counter" not in stmt]
            shape.rules.setdefault(body["chain"], []).append((body.get("comment"), expr))
        else:
            shape.other.append(f"{kind} {body.get('name', '?')}")
    return shape


def _rendered(doc: Doc) -> list[Doc]:
    """The objects a rendered document creates, in the form a listing would show them."""
    return [obj for command in doc["nftables"] for obj in command.values()]


def _rule_name(comment: str | None, expr: list[Any]) -> str:
    return repr(comment) if comment else f"without comment {expr}"


def _rule_diff(chain: str, want: list[Any], have: list[Any]) -> list[str]:
    if want == have:
        return []
    want_by = dict(want)
    have_comments = [comment for comment, _ in have]
    found: list[str] = []
    for comment, expr in want:
        if comment not in have_comments:
            found.append(f"chain {chain}: rule {comment!r} missing")
        elif have_comments.count(comment) > 1:
            found.append(f"chain {chain}: rule {comment!r} duplicated")
        elif dict(have)[comment] != expr:
            found.append(f"chain {chain}: rule {comment!r} altered to {dict(have)[comment]}")
    for comment, expr in have:
        if comment not in want_by:
            found.append(f"chain {chain}: unexpected rule {_rule_name(comment, expr)}")
    return found or [f"chain {chain}: rules reordered"]


def _diff(want: _Shape, have: _Shape) -> list[str]:
    found: list[str] = []
    for kind, want_part, have_part in (
        ("set", want.sets, have.sets),
        ("chain", want.chains, have.chains),
    ):
        for name, props in want_part.items():
            if name not in have_part:
                found.append(f"{kind} {name} missing")
            elif have_part[name] != props:
                found.append(f"{kind} {name} is {have_part[name]}, expected {props}")
        found += [f"unexpected {kind} {name}" for name in have_part if name not in want_part]
    for chain, rules in want.rules.items():
        if chain in have.rules:
            found += _rule_diff(chain, rules, have.rules[chain])
    found += [f"unexpected {other}" for other in have.other]
    return found


def _verify(nft: Nft, doc: Doc, table: str, what: str) -> None:
    listing = nft.table(table, elements=False)
    if listing is None:
        raise NftDrift(f"{what} (table {FAMILY} {table}) is missing")
    problems = _diff(_shape(_rendered(doc)), _shape(_objects(listing)))
    if problems:
        raise NftDrift(f"{what} (table {FAMILY} {table}) drifted: " + "; ".join(problems))


# --- the host table -----------------------------------------------------------------------


def ensure_host_table(nft: Nft, table: str = TABLE) -> bool:
    """Create the host table if it is absent (one transaction), then verify it.

    Returns True if this call created it. Raises NftDrift if it exists but differs.
    """
    created = False
    # Tersely (no set elements): this runs on every create, and a listing with the
    # elements would cost more with every sandbox.
    if nft.table(table, elements=False) is None:
        try:
            nft.run(ruleset.host_table(table), what=f"creating table {FAMILY} {table}")
            created = True
        except NftError:
            # The document creates the table exclusively: if another sandgate process won
            # the race, the table is there now and it is verified like any other.
            if nft.table(table, elements=False) is None:
                raise
    verify_host_table(nft, table)
    return created


def verify_host_table(nft: Nft, table: str = TABLE) -> None:
    """Raise NftDrift naming every difference between the host table and host_table().

    Sets, chains and rules (by comment, expression and order) are compared; handles,
    counters and set elements are not.
    """
    _verify(nft, ruleset.host_table(table), table, "the host table")


def restore_host_table(nft: Nft, table: str = TABLE) -> None:
    """Put the host table back in shape after drift, keeping every sandbox's set elements.

    In one transaction: delete every chain in the table and any set that is not ours,
    add a missing set, and re-add our chains and rules. A set of ours whose type changed
    cannot be repaired without losing its elements: that raises NftDrift, and the caller
    must delete the table and re-add each sandbox.
    """
    listing = nft.table(table)
    if listing is None:
        ensure_host_table(nft, table)
        return
    doc = ruleset.host_table(table)
    want, have = _shape(_rendered(doc)), _shape(_objects(listing))
    for name, props in want.sets.items():
        if name in have.sets and have.sets[name] != props:
            raise NftDrift(
                f"the host table (table {FAMILY} {table}): set {name} is {have.sets[name]}, "
                f"expected {props}; it cannot be repaired in place: delete the table and "
                "re-add every sandbox"
            )
    # Flush every chain before deleting any, so no jump between them keeps one busy.
    chains = [{"chain": {"family": FAMILY, "table": table, "name": n}} for n in have.chains]
    commands: list[Doc] = [{"flush": c} for c in chains] + [{"delete": c} for c in chains]
    for name in have.sets:
        if name not in want.sets:
            commands.append({"delete": {"set": {"family": FAMILY, "table": table, "name": name}}})
    for command in doc["nftables"]:
        body = next(iter(command.values()))
        ((kind, obj),) = body.items()
        if kind == "table" or (kind == "set" and obj["name"] in have.sets):
            continue
        commands.append({"add": body})
    nft.run({"nftables": commands}, what=f"restoring table {FAMILY} {table}")
    verify_host_table(nft, table)


def sandbox_sets(nft: Nft, e: SandboxElements, table: str = TABLE) -> list[str]:
    """The names of the sets (of the two) that hold e's element."""
    want = {
        SANDBOX_SRC: [e.host_ifname, str(e.sandbox_addr)],
        GATEWAY_EP: [e.host_ifname, str(e.gateway_addr), e.gateway_port],
    }
    present = []
    # One set per command: libnftables 1.0.6 fails a batch of two `list set` with ENOENT.
    for name, value in want.items():
        listing = nft.run(
            {"nftables": [{"list": {"set": {"family": FAMILY, "table": table, "name": name}}}]},
            what=f"reading back set {FAMILY} {table} {name}",
        )
        if value in _set_values(_objects(listing)).get(name, []):
            present.append(name)
    return present


def _set_values(objects: list[Doc]) -> dict[str, list[list[Any]]]:
    """Each set's elements as lists of values: {"sandbox_src": [["sg1", "10.213.0.1"]]}."""
    values: dict[str, list[list[Any]]] = {}
    for obj in objects:
        body = obj.get("set")
        if body is None:
            continue
        found = values.setdefault(body["name"], [])
        for elem in body.get("elem", []):
            if isinstance(elem, dict) and "elem" in elem:  # an element with a timeout/comment
                elem = elem["elem"]["val"]
            if isinstance(elem, dict) and "concat" in elem:
                found.append(list(elem["concat"]))
    return values


def add_sandbox(nft: Nft, e: SandboxElements, table: str = TABLE) -> None:
    """Add a sandbox's elements to both sets in one transaction.

    The transaction's success is the kernel's confirmation: a batch commits whole or not
    at all. No read-back here, because libnftables can read an element back only by
    dumping its whole set, which would make the 1000th sandbox cost more than the first
    (sandbox_sets does that read-back where it is wanted: tests, reconciliation).
    """
    try:
        nft.run(ruleset.add_sandbox(e, table), what=f"adding sandbox {e.host_ifname}")
    except NftError as exc:
        if nft.table(table) is None:
            raise NftError(
                f"{exc} (there is no table {FAMILY} {table}: ensure_host_table creates it)"
            ) from exc
        raise


def delete_sandbox(nft: Nft, e: SandboxElements, table: str = TABLE) -> None:
    """Delete a sandbox's elements from both sets. Absent elements, sets or table are fine."""
    what = f"deleting sandbox {e.host_ifname}"
    try:
        nft.run(ruleset.delete_sandbox(e, table), what=what)
        return
    except NftError:
        listing = nft.table(table)
        if listing is None:
            return
        sets = {obj["set"]["name"] for obj in _objects(listing) if "set" in obj}
        if {SANDBOX_SRC, GATEWAY_EP} <= sets:
            raise
    # A set is gone (drift): delete from whichever one is left.
    commands = [
        command
        for command in ruleset.delete_sandbox(e, table)["nftables"]
        if next(iter(command.values()))["element"]["name"] in sets
    ]
    if commands:
        nft.run({"nftables": commands}, what=what)


def sandbox_elements(nft: Nft, table: str = TABLE) -> list[SandboxElements]:
    """Every sandbox in the host table: the two sets' elements joined by interface name.

    An element without a partner in the other set, or one sandgate could not have written
    (a name or address that fails validation), is left out: neither grants any traffic.
    """
    listing = nft.table(table)
    if listing is None:
        return []
    values = _set_values(_objects(listing))
    sources: dict[str, list[str]] = {}
    for ifname, addr in (v for v in values.get(SANDBOX_SRC, []) if len(v) == 2):
        sources.setdefault(ifname, []).append(addr)
    found: list[SandboxElements] = []
    for ep in values.get(GATEWAY_EP, []):
        if len(ep) != 3:
            continue
        ifname, gateway_addr, port = ep
        for sandbox_addr in sources.get(ifname, []):
            try:
                found.append(
                    SandboxElements(
                        ifname, IPv4Address(sandbox_addr), IPv4Address(gateway_addr), port
                    )
                )
            except ValueError:
                continue
    return sorted(found, key=lambda s: (s.host_ifname, s.sandbox_addr, s.gateway_addr))


def delete_host_table_if_unused(nft: Nft, table: str = TABLE) -> bool:
    """Delete the host table iff both sets are empty; True if it was deleted.

    Not atomic with a concurrent add_sandbox (nft has no "delete if empty"): call it under
    the same lock that serialises sandbox creation and removal.
    """
    listing = nft.table(table)
    if listing is None:
        return False
    sets = {obj["set"]["name"]: obj["set"] for obj in _objects(listing) if "set" in obj}
    if any(sets.get(name, {}).get("elem") for name in (SANDBOX_SRC, GATEWAY_EP)):
        return False
    nft.run(ruleset.delete_table(table), what=f"deleting unused table {FAMILY} {table}")
    return True


# --- inside a sandbox ---------------------------------------------------------------------


def apply_sandbox_table(
    nft: Nft, gateway_addr: IPv4Address, gateway_port: int, table: str = TABLE
) -> None:
    """Create the in-sandbox table (if absent) and verify it; nft must be made in that netns."""
    doc = ruleset.sandbox_table(gateway_addr, gateway_port, table)
    if nft.table(table) is None:
        nft.run(doc, what=f"creating sandbox table {FAMILY} {table}")
    _verify(nft, doc, table, "the sandbox table")
