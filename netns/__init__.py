"""Network namespaces, point-to-point veth pairs and /31 addressing (pyroute2).

addressing.py is pure (names, pool, allocation); namespace.py does the netlink work.
"""
