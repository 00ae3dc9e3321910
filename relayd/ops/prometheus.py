"""The Prometheus text exposition format (0.0.4), for exactly the metric kinds relayd uses.

Counters and gauges (optionally labelled, optionally computed at scrape
time), unlabelled fixed-bucket histograms, and the standard ``process_*``
metrics, with the standard library only. Hot paths hold a child and call
``inc()``; nothing is formatted until a scrape.
"""

from __future__ import annotations

import logging
import math
import os
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

log = logging.getLogger("relayd.metrics")

Callback = Callable[[], "float | None"]


def format_value(v: float) -> str:
    """A sample value as Prometheus' Go parser expects it: integral floats without ``.0``."""
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    v = float(v)
    if v != v:
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v.is_integer() and abs(v) <= 2**53:
        return str(int(v))
    return repr(v)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    return "{" + ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values)) + "}" if names else ""


class Value:
    """One sample: a number, or a function read at scrape time (``set_function``)."""

    __slots__ = ("value", "fn")

    def __init__(self) -> None:
        self.value = 0.0
        self.fn: Callback | None = None

    def inc(self, n: float = 1) -> None:
        self.value += n

    def set(self, v: float) -> None:
        self.value = v

    def set_function(self, fn: Callback | None) -> None:
        self.fn = fn

    def read(self, name: str) -> float | None:
        if self.fn is None:
            return self.value
        try:
            value = self.fn()
            return None if value is None else float(value)
        except Exception:  # a broken callback loses its sample, not the scrape
            log.exception("metric callback for %s failed", name)
            return None


class Family:
    """A counter or gauge family: a name, help, and one ``Value`` per label combination."""

    def __init__(self, kind: str, name: str, help: str, labelnames: Iterable[str] = ()) -> None:
        self.kind = kind
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Value] = {}
        self._single: Value | None = None
        """The one sample of an unlabelled family, held directly: counters on every frame's path skip a lookup."""
        if not self.labelnames:
            self._single = self._children[()] = Value()

    def labels(self, **values: str) -> Value:
        """The sample for these label values; keep it to skip the lookup on hot paths."""
        key = tuple(str(values[n]) for n in self.labelnames)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = Value()
        return child

    def _only(self) -> Value:
        if self._single is None:
            raise ValueError(f"{self.name} has labels {self.labelnames}; use .labels()")
        return self._single

    def inc(self, n: float = 1) -> None:
        (self._single or self._only()).value += n

    def set(self, v: float) -> None:
        self._only().set(v)

    def set_function(self, fn: Callback | None) -> None:
        self._only().set_function(fn)

    @property
    def value(self) -> float:
        return self._only().value

    def current(self) -> float:
        """The sample of an unlabelled family as a scrape would read it (0 when its callback fails)."""
        return self._only().read(self.name) or 0.0

    def by_label(self) -> dict[str, float]:
        """The samples of a one-label family, by that label's value."""
        return {key[0]: child.value for key, child in self._children.items() if key}

    def render(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {_escape_help(self.help)}\n# TYPE {self.name} {self.kind}\n")
        for key, child in sorted(self._children.items()):
            value = child.read(self.name)
            if value is not None:
                out.append(f"{self.name}{_labels(self.labelnames, key)} {format_value(value)}\n")


class Histogram:
    """Fixed-bucket histogram; buckets are upper bounds, ``+Inf`` is implied."""

    def __init__(self, name: str, help: str, buckets: Iterable[float] = DEFAULT_BUCKETS) -> None:
        bounds = [float(b) for b in buckets]
        if not bounds or any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"histogram buckets must be strictly increasing: {bounds}")
        if bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.name = name
        self.help = help
        self.buckets = tuple(bounds)
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        # NaN compares false with everything; it belongs only in +Inf.
        self.counts[bisect_left(self.buckets, v) if v == v else len(self.buckets) - 1] += 1
        self.sum += v
        self.count += 1

    def render(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {_escape_help(self.help)}\n# TYPE {self.name} histogram\n")
        cumulative = 0
        for bound, n in zip(self.buckets, self.counts):
            cumulative += n
            out.append(f'{self.name}_bucket{{le="{format_value(bound)}"}} {cumulative}\n')
        out.append(f"{self.name}_sum {format_value(self.sum)}\n{self.name}_count {self.count}\n")


class Registry:
    """The metric families of one process, rendered in registration order."""

    def __init__(self) -> None:
        self._families: dict[str, Family | Histogram] = {}

    def _add(self, family: Family | Histogram) -> None:
        if family.name in self._families:
            raise ValueError(f"metric {family.name!r} is registered twice")
        self._families[family.name] = family

    def counter(self, name: str, help: str, labelnames: Iterable[str] = (), *, fn: Callback | None = None) -> Family:
        if not name.endswith("_total"):
            raise ValueError(f"counter name {name!r} must end in _total")
        return self._family("counter", name, help, labelnames, fn)

    def gauge(self, name: str, help: str, labelnames: Iterable[str] = (), *, fn: Callback | None = None) -> Family:
        return self._family("gauge", name, help, labelnames, fn)

    def histogram(self, name: str, help: str, *, buckets: Iterable[float] = DEFAULT_BUCKETS) -> Histogram:
        histogram = Histogram(name, help, buckets)
        self._add(histogram)
        return histogram

    def _family(self, kind: str, name: str, help: str, labelnames: Iterable[str], fn: Callback | None) -> Family:
        family = Family(kind, name, help, labelnames)
        if fn is not None:
            family.set_function(fn)
        self._add(family)
        return family

    def render(self) -> str:
        out: list[str] = []
        for family in self._families.values():
            family.render(out)
        return "".join(out)


# The standard process metrics

def _statm(index: int) -> float | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[index]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def process_resident_memory_bytes() -> float | None:
    return _statm(1)


def process_virtual_memory_bytes() -> float | None:
    return _statm(0)


def process_cpu_seconds_total() -> float:
    t = os.times()
    return t.user + t.system


def process_open_fds() -> float | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def process_max_fds() -> float | None:
    import resource
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def _boot_start_time() -> float | None:
    """Start time from the kernel, so it survives re-imports and is exact."""
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        # comm (field 2) may contain spaces and parens; fields resume after the last ')'.
        start_ticks = int(stat[stat.rindex(b")") + 2:].split()[19])
        with open("/proc/stat", "rb") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
        return btime + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


_START_TIME = _boot_start_time() or time.time()


def register_process_metrics(registry: Registry) -> None:
    """Register the ``process_*`` metrics this platform can provide."""
    registry.counter("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.",
                     fn=process_cpu_seconds_total)
    registry.gauge("process_start_time_seconds", "Start time of the process since unix epoch in seconds.",
                   fn=lambda: _START_TIME)
    for name, help, fn in (
        ("process_resident_memory_bytes", "Resident memory size in bytes.", process_resident_memory_bytes),
        ("process_virtual_memory_bytes", "Virtual memory size in bytes.", process_virtual_memory_bytes),
        ("process_open_fds", "Number of open file descriptors.", process_open_fds),
        ("process_max_fds", "Maximum number of open file descriptors.", process_max_fds),
    ):
        if fn() is not None:
            registry.gauge(name, help, fn=fn)
