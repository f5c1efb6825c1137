"""The daemon's metrics, in the Prometheus text format (prometheus-client).

Owns the metric definitions (one registry per daemon, no module-level state) and
turning the gateway's summed audit records into request, byte and rate-limit counts. Served
on a root-only Unix socket (and, if configured, a loopback TCP port) by runner/daemon.py:
`curl --unix-socket /run/sandgate/metrics.sock http://sandgate/metrics`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class DaemonMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sandboxes = Gauge("sandgate_sandboxes", "Live sandboxes", registry=r)
        self.creates = Counter(
            "sandgate_creates", "Sandbox creations by result", ["result"], registry=r
        )
        self.destroys = Counter(
            "sandgate_destroys", "Sandbox removals by reason", ["reason"], registry=r
        )
        self.create_seconds = Histogram(
            "sandgate_create_seconds",
            "Time to create a sandbox",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.destroy_seconds = Histogram(
            "sandgate_destroy_seconds",
            "Time to remove a sandbox",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "sandgate_gateway_requests",
            "Gateway decisions by kind (egress, git, api), decision and rule or reason",
            ["kind", "decision", "reason"],
            registry=r,
        )
        self.bytes = Counter(
            "sandgate_gateway_bytes", "Bytes through the gateway", ["direction"], registry=r
        )
        self.rate_limited = Counter(
            "sandgate_gateway_rate_limited",
            "Requests refused by a rate or size limit (429)",
            registry=r,
        )
        self.drift_repairs = Counter(
            "sandgate_drift_repairs",
            "Firewall state restored after another tool changed it",
            ["what"],
            registry=r,
        )
        self.reconcile_removals = Counter(
            "sandgate_reconcile_removals",
            "Sandboxes removed by reconciling (no live owner)",
            registry=r,
        )
        self.execs = Counter("sandgate_execs", "Commands started in sandboxes", registry=r)
        self.control_errors = Counter(
            "sandgate_control_errors",
            "Control requests answered with an error",
            ["code"],
            registry=r,
        )

    def observe_counts(self, counts) -> None:
        """The gateway's records summed (GatewayConfig.on_counts; gateway.audit.Count),
        on the gateway's loop."""
        for c in counts:
            self.requests.labels(c.kind, c.decision, c.label[:80]).inc(c.requests)
            if c.bytes_up:
                self.bytes.labels("up").inc(c.bytes_up)
            if c.bytes_down:
                self.bytes.labels("down").inc(c.bytes_down)
            if c.status == 429:
                self.rate_limited.inc(c.requests)

    def render(self) -> bytes:
        return generate_latest(self.registry)
