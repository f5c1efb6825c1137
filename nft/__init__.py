"""nftables rulesets rendered from data (ruleset.py, pure), applied atomically and read
back through libnftables' JSON API (apply.py), and the legacy-xtables backstop
(backstop.py, python-iptables).
"""
