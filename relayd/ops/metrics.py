"""relayd's metric families, created once and shared by every module.

Hot paths hold a reference to a counter child and call ``inc()``; nothing is
formatted until /metrics is scraped.
"""

from __future__ import annotations

import gc
from typing import Callable

from .. import __version__
from .prometheus import Registry, register_process_metrics

COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class RelayMetrics:
    def __init__(self) -> None:
        r = self.registry = Registry()
        build = r.gauge("relayd_build_info", "relayd version.", ("version",))
        build.labels(version=__version__).set(1)
        self.connections = r.gauge("relayd_connections", "Open WebSocket connections.")
        self.sessions = r.gauge("relayd_authenticated_sessions", "Authenticated WebSocket sessions.")
        self.online = r.gauge("relayd_online_addresses", "Addresses with at least one session.")
        self.routed_live = r.counter("relayd_messages_routed_live_total", "Messages delivered to an online recipient.")
        self.queued = r.counter("relayd_messages_queued_total", "Messages stored for an offline recipient.")
        self.flushed = r.counter("relayd_messages_delivered_from_queue_total",
                                 "Stored messages written to a recipient on reconnect.")
        self.acked = r.counter("relayd_messages_acknowledged_total", "Stored messages removed by a client ack.")
        self.expired = r.counter("relayd_messages_expired_total", "Stored messages removed by retention.")
        self.restored = r.counter("relayd_messages_kept_total", "Messages written to a connection that ended "
                                  "before they reached the peer, stored again for its next connection.")
        self.receipts_stored = r.counter("relayd_receipts_stored_total", "Read receipts stored for an offline "
                                         "sender.")
        self.receipts_dropped = r.counter("relayd_receipts_dropped_total", "Stored read receipts dropped over "
                                          "the per-recipient cap.")
        self.refused = r.counter("relayd_messages_refused_total", "Messages refused, by error code.", ("code",))
        self.frames = r.counter("relayd_frames_total", "Client frames handled, by outcome.", ("outcome",))
        self.http = r.counter("relayd_http_requests_total", "REST requests, by status class.", ("status",))
        self.rate_limited = r.counter("relayd_rate_limit_hits_total", "Requests or frames refused by a limit.",
                                      ("limit",))
        self.auth_failures = r.counter("relayd_auth_failures_total", "Failed or refused authentications.",
                                       ("reason",))
        self.access_denied = r.counter("relayd_access_denied_total", "Requests, upgrades, sign-ins and key "
                                       "writes refused by [access] deny, by what matched (ip or address).",
                                       ("kind",))
        self.queue_depth = r.gauge("relayd_queue_messages", "Messages waiting in offline queues.")
        self.queue_bytes = r.gauge("relayd_queue_bytes", "Content bytes waiting in offline queues "
                                   "(refreshed every few seconds).")
        self.queue_recipients = r.gauge("relayd_queue_recipients", "Recipients with a non-empty offline queue "
                                        "(refreshed every few seconds).")
        self.commit_latency = r.histogram("relayd_storage_commit_seconds",
                                          "Time to run and commit one grouped write transaction.", buckets=COMMIT_BUCKETS)
        self.loop_lag = r.histogram("relayd_event_loop_lag_seconds",
                                    "How late the housekeeping timer fired.", buckets=LAG_BUCKETS)
        self.gc_full_pause = r.histogram("relayd_gc_full_pause_seconds", "How long each full pass of Python's "
                                         "cyclic garbage collector stopped the loop.", buckets=LAG_BUCKETS)
        r.gauge("relayd_gc_frozen_objects", "Objects frozen out of the collector's full passes (what a full "
                "pass left alive, thawed hourly; none past start-up behind relayd's own TLS on asyncio; see "
                "docs/scaling.md).", fn=gc.get_freeze_count)
        self.queue_receipts = r.gauge("relayd_queue_receipts", "Read receipts waiting for offline senders "
                                      "(refreshed every few seconds).")
        self.storage_bytes = r.gauge("relayd_storage_bytes", "Bytes the storage budget counts: queued content, "
                                     "stored read receipts, keys and push subscriptions.")
        self.storage_budget = r.gauge("relayd_storage_budget_bytes", "Bytes queued content, stored read receipts, "
                                      "keys and push subscriptions may take together (0: no budget).")
        self.storage_healthy = r.gauge("relayd_storage_healthy", "1 when storage accepts writes.")
        self.ready = r.gauge("relayd_ready", "1 when /health/ready answers 200: storage accepts writes and the "
                             "listener accepts connections.")
        self.certificate_expiry = r.gauge("relayd_tls_certificate_expiry_timestamp_seconds",
                                          "When the certificate relayd serves TLS with stops being valid "
                                          "(notAfter, Unix time); absent without [tls] certfile.")
        self.certificate_expiry.set_function(lambda: None)
        self.pushes = r.counter("relayd_push_total", "Push notifications, by provider and outcome (sent, "
                                "collapsed, gone, retry, failed, refused).", ("provider", "outcome"))
        self.push_dropped = r.counter("relayd_push_dropped_total", "Pushes dropped because the outgoing push "
                                      "queue was full (the oldest go).")
        register_process_metrics(r)
        self.frame_ok = self.frames.labels(outcome="ok")
        self.frame_error = self.frames.labels(outcome="error")

    def bind(self, *, connections: Callable[[], float], sessions: Callable[[], float],
             online: Callable[[], float], queue_depth: Callable[[], float], storage_bytes: Callable[[], float],
             storage_budget: Callable[[], float], storage_healthy: Callable[[], float],
             ready: Callable[[], float]) -> None:
        self.ready.set_function(ready)
        self.storage_bytes.set_function(storage_bytes)
        self.storage_budget.set_function(storage_budget)
        self.connections.set_function(connections)
        self.sessions.set_function(sessions)
        self.online.set_function(online)
        self.queue_depth.set_function(queue_depth)
        self.storage_healthy.set_function(storage_healthy)

    def render(self) -> str:
        return self.registry.render()
