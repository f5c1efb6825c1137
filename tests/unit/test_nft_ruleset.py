"""The nftables documents nft/ruleset.py renders: their shape, their elements, and what
they refuse. No kernel involved; tests/integration/test_nft_apply.py applies them."""

from __future__ import annotations

import json
from ipaddress import IPv4Address

import pytest

from nft import ruleset
from nft.ruleset import SandboxElements

GW = IPv4Address("10.213.0.0")
BOX = IPv4Address("10.213.0.1")


def elements(**overrides: object) -> SandboxElements:
    fields: dict[str, object] = {
        "host_ifname": "sg0a1b2c3d",
        "sandbox_addr": BOX,
        "gateway_addr": GW,
        "gateway_port": 3128,
    }
    fields.update(overrides)
    return SandboxElements(**fields)  # type: ignore[arg-type]


def commands(doc: dict) -> list[tuple[str, str, dict]]:
    """(verb, kind, object) for every command of a document."""
    out = []
    for command in doc["nftables"]:
        ((verb, body),) = command.items()
        ((kind, obj),) = body.items()
        out.append((verb, kind, obj))
    return out


def objects(doc: dict, kind: str) -> list[dict]:
    return [obj for _, k, obj in commands(doc) if k == kind]


def rules(doc: dict, chain: str) -> list[dict]:
    return [r for r in objects(doc, "rule") if r["chain"] == chain]


def verdict(rule: dict) -> str:
    (last,) = rule["expr"][-1].keys()
    return last


# --- the host table -----------------------------------------------------------------------


def test_host_table_creates_the_table_exclusively_and_adds_the_rest():
    cmds = commands(ruleset.host_table())
    assert cmds[0] == ("create", "table", {"family": "inet", "name": "sandgate"})
    assert all(verb == "add" for verb, _, _ in cmds[1:])
    assert all(obj["family"] == "inet" for _, _, obj in cmds)
    assert all(obj.get("table", "sandgate") == "sandgate" for _, _, obj in cmds)


def test_host_table_sets_are_keyed_by_interface_name():
    sets = {s["name"]: s["type"] for s in objects(ruleset.host_table(), "set")}
    assert sets == {
        "sandbox_src": ["ifname", "ipv4_addr"],
        "gateway_ep": ["ifname", "ipv4_addr", "inet_service"],
    }


def test_host_table_chains():
    chains = {c["name"]: c for c in objects(ruleset.host_table(), "chain")}
    assert set(chains) == {"input", "from_sandbox", "forward"}
    for name in ("input", "forward"):
        assert chains[name]["type"] == "filter"
        assert chains[name]["hook"] == name
        assert chains[name]["prio"] == -10
        assert chains[name]["policy"] == "accept"
    assert "hook" not in chains["from_sandbox"]  # a regular chain, reached only by the jump


def test_input_jumps_only_for_sandbox_interfaces():
    (jump,) = rules(ruleset.host_table(), "input")
    assert jump["expr"] == [
        {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "sg*"}},
        {"jump": {"target": "from_sandbox"}},
    ]


def test_from_sandbox_order_antispoof_first_then_only_the_endpoint():
    chain = rules(ruleset.host_table(), "from_sandbox")
    assert [r["comment"] for r in chain] == [
        "sandgate: spoofed source",
        "sandgate: no ipv6",
        "sandgate: replies",
        "sandgate: gateway endpoint",
        "sandgate: everything else",
    ]
    assert [verdict(r) for r in chain] == ["drop", "drop", "accept", "accept", "drop"]
    spoof, ipv6, replies, endpoint, rest = chain
    assert spoof["expr"][0]["match"] == {
        "op": "!=",
        "left": {
            "concat": [
                {"meta": {"key": "iifname"}},
                {"payload": {"protocol": "ip", "field": "saddr"}},
            ]
        },
        "right": "@sandbox_src",
    }
    assert ipv6["expr"][0]["match"]["left"] == {"meta": {"key": "nfproto"}}
    assert ipv6["expr"][0]["match"]["right"] == "ipv6"
    assert replies["expr"][0]["match"]["right"] == ["established", "related"]
    assert endpoint["expr"][0]["match"] == {
        "op": "==",
        "left": {
            "concat": [
                {"meta": {"key": "iifname"}},
                {"payload": {"protocol": "ip", "field": "daddr"}},
                {"payload": {"protocol": "tcp", "field": "dport"}},
            ]
        },
        "right": "@gateway_ep",
    }
    assert rest["expr"] == [{"drop": None}]


def test_forward_drops_both_directions():
    chain = rules(ruleset.host_table(), "forward")
    assert [(r["expr"][0]["match"]["left"], verdict(r)) for r in chain] == [
        ({"meta": {"key": "iifname"}}, "drop"),
        ({"meta": {"key": "oifname"}}, "drop"),
    ]
    assert all(r["expr"][0]["match"]["right"] == "sg*" for r in chain)


def test_every_rule_has_a_distinct_comment_in_its_chain():
    for doc in (ruleset.host_table(), ruleset.sandbox_table(GW, 3128)):
        seen = [(r["chain"], r["comment"]) for r in objects(doc, "rule")]
        assert all(comment.startswith("sandgate: ") for _, comment in seen)
        assert len(seen) == len(set(seen))


def test_table_name_is_used_everywhere():
    for doc in (
        ruleset.host_table("sg_other"),
        ruleset.add_sandbox(elements(), "sg_other"),
        ruleset.delete_sandbox(elements(), "sg_other"),
        ruleset.sandbox_table(GW, 3128, "sg_other"),
        ruleset.delete_table("sg_other"),
    ):
        for _, kind, obj in commands(doc):
            assert obj.get("table", obj.get("name")) == "sg_other", (kind, obj)


def test_documents_are_json_and_never_share_objects():
    one, two = ruleset.host_table(), ruleset.host_table()
    assert json.loads(json.dumps(one)) == one
    one["nftables"][-1]["add"]["rule"]["expr"].clear()
    assert one != two == ruleset.host_table()


# --- per-sandbox elements -----------------------------------------------------------------


def test_add_sandbox_adds_one_element_to_each_set():
    doc = ruleset.add_sandbox(elements())
    assert doc == {
        "nftables": [
            {
                "add": {
                    "element": {
                        "family": "inet",
                        "table": "sandgate",
                        "name": "sandbox_src",
                        "elem": [{"concat": ["sg0a1b2c3d", "10.213.0.1"]}],
                    }
                }
            },
            {
                "add": {
                    "element": {
                        "family": "inet",
                        "table": "sandgate",
                        "name": "gateway_ep",
                        "elem": [{"concat": ["sg0a1b2c3d", "10.213.0.0", 3128]}],
                    }
                }
            },
        ]
    }


def test_delete_sandbox_adds_then_deletes_the_same_elements():
    added = [cmd["add"] for cmd in ruleset.add_sandbox(elements())["nftables"]]
    doc = ruleset.delete_sandbox(elements())
    assert doc["nftables"] == [{"add": el} for el in added] + [{"delete": el} for el in added]


def test_per_sandbox_documents_touch_only_elements():
    for doc in (ruleset.add_sandbox(elements()), ruleset.delete_sandbox(elements())):
        assert {kind for _, kind, _ in commands(doc)} == {"element"}


# --- the table inside a sandbox -----------------------------------------------------------


def test_sandbox_table_chains_default_to_drop():
    chains = {c["name"]: c for c in objects(ruleset.sandbox_table(GW, 3128), "chain")}
    assert set(chains) == {"output", "input"}
    for name, chain in chains.items():
        assert (chain["type"], chain["hook"], chain["policy"]) == ("filter", name, "drop")


def test_sandbox_table_accepts_only_loopback_replies_and_the_gateway():
    doc = ruleset.sandbox_table(IPv4Address("10.213.4.8"), 8080)
    accepted = {
        (r["chain"], json.dumps(r["expr"][:-1], sort_keys=True))
        for r in objects(doc, "rule")
        if verdict(r) == "accept"
    }

    def key(chain: str, *matches: tuple[dict, object]) -> tuple[str, str]:
        expr = [{"match": {"op": "==", "left": left, "right": right}} for left, right in matches]
        return chain, json.dumps(expr, sort_keys=True)

    replies = [
        {
            "match": {
                "op": "in",
                "left": {"ct": {"key": "state"}},
                "right": ["established", "related"],
            }
        }
    ]
    assert accepted == {
        key("output", ({"meta": {"key": "oif"}}, "lo")),
        key("input", ({"meta": {"key": "iif"}}, "lo")),
        ("output", json.dumps(replies, sort_keys=True)),
        ("input", json.dumps(replies, sort_keys=True)),
        key(
            "output",
            ({"meta": {"key": "oifname"}}, "eth0"),
            ({"payload": {"protocol": "ip", "field": "daddr"}}, "10.213.4.8"),
            ({"payload": {"protocol": "tcp", "field": "dport"}}, 8080),
        ),
    }


def test_sandbox_table_drops_ipv6_before_accepting_replies():
    doc = ruleset.sandbox_table(GW, 3128)
    for chain in ("output", "input"):
        comments = [r["comment"] for r in rules(doc, chain)]
        assert comments.index("sandgate: no ipv6") < comments.index("sandgate: replies")
        (ipv6,) = [r for r in rules(doc, chain) if r["comment"] == "sandgate: no ipv6"]
        assert ipv6["expr"] == [
            {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv6"}},
            {"drop": None},
        ]


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"host_ifname": "sg" + "x" * 14}, "host_ifname"),  # 16 characters
        ({"host_ifname": "eth1"}, "host_ifname"),  # not sg*: no rule would look at it
        ({"host_ifname": "sg"}, "host_ifname"),
        ({"host_ifname": 'sg"x'}, "host_ifname"),
        ({"host_ifname": "sg x"}, "host_ifname"),
        ({"host_ifname": None}, "host_ifname"),
        ({"sandbox_addr": "10.213.0.1"}, "sandbox_addr"),
        ({"sandbox_addr": IPv4Address("0.0.0.0")}, "sandbox_addr"),
        ({"gateway_addr": IPv4Address("127.0.0.1")}, "gateway_addr"),
        ({"gateway_addr": IPv4Address("224.0.0.1")}, "gateway_addr"),
        ({"gateway_addr": BOX}, "gateway_addr"),  # same as sandbox_addr
        ({"gateway_port": 0}, "gateway_port"),
        ({"gateway_port": 65536}, "gateway_port"),
        ({"gateway_port": -1}, "gateway_port"),
        ({"gateway_port": "3128"}, "gateway_port"),
        ({"gateway_port": True}, "gateway_port"),
    ],
)
def test_sandbox_elements_reject_bad_fields(overrides, field):
    with pytest.raises(ValueError, match=field):
        elements(**overrides)


def test_fifteen_character_ifname_is_fine():
    assert elements(host_ifname="sg" + "x" * 13).host_ifname == "sg" + "x" * 13


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((GW, 0), "gateway_port"),
        ((GW, 70000), "gateway_port"),
        (("10.213.0.0", 3128), "gateway_addr"),
        ((IPv4Address("255.255.255.255"), 3128), "gateway_addr"),
    ],
)
def test_sandbox_table_rejects_bad_input(args, field):
    with pytest.raises(ValueError, match=field):
        ruleset.sandbox_table(*args)


@pytest.mark.parametrize("table", ["", "1abc", "a b", "x" * 65, "sand;gate", None])
def test_bad_table_names_are_refused(table):
    with pytest.raises(ValueError, match="table"):
        ruleset.host_table(table)
    with pytest.raises(ValueError, match="table"):
        ruleset.add_sandbox(elements(), table)
