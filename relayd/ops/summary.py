"""The periodic activity line: what the relay did lately, in counts, never addresses.

Clients such as the Idena P2P app never show an ``error`` frame, so a
message refused by a limit is invisible to its sender. The operator sees
those refusals here at info level (and in ``/metrics``) without turning on
debug logging.
"""

from __future__ import annotations

from .metrics import RelayMetrics


def _counts(values: dict[str, float]) -> str:
    return ", ".join(f"{name} {int(n)}" for name, n in sorted(values.items()) if n)


class ActivitySummary:
    """Turns the growth of relayd's counters since the last call into one log line."""

    def __init__(self, metrics: RelayMetrics) -> None:
        self.metrics = metrics
        self._last = self._snapshot()

    def _snapshot(self) -> dict[str, dict[str, float]]:
        m = self.metrics
        return {
            "messages": {"live": m.routed_live.value, "stored": m.queued.value, "from storage": m.flushed.value,
                         "expired": m.expired.value},
            "rest": m.http.by_label(),
            "refused": m.refused.by_label(),
            "limits": m.rate_limited.by_label(),
        }

    def line(self, seconds: float) -> str:
        """The activity since the previous call, ``seconds`` ago; starts the next period."""
        now = self._snapshot()
        delta = {group: {k: v - self._last[group].get(k, 0.0) for k, v in values.items()}
                 for group, values in now.items()}
        self._last = now
        m = self.metrics
        moved = delta["messages"]
        refused = sum(delta["refused"].values())
        limited = sum(delta["limits"].values())
        return (f"activity in the last {seconds:.0f} s: {int(m.sessions.current())} sessions "
                f"({int(m.online.current())} addresses online); messages: {int(moved['live'])} live, "
                f"{int(moved['stored'])} stored, {int(moved['from storage'])} delivered from storage, "
                f"{int(moved['expired'])} expired; {int(sum(delta['rest'].values()))} REST requests; "
                f"refused: {int(refused)} messages" + (f" ({_counts(delta['refused'])})" if refused else "")
                + f", {int(limited)} by limits" + (f" ({_counts(delta['limits'])})" if limited else "")
                + f"; {int(m.queue_depth.current())} messages stored")
