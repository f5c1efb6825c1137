"""The in-process gateway: egress proxy, git smart-HTTP gateway, policy, credentials,
rate limits and audit log (asyncio + uvloop).

Until the gateway lands, a sandbox's gateway endpoint (host end of its veth, the
gateway port) has no listener: the sandbox can reach nothing at all.
"""
