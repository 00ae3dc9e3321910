"""A tiny Prometheus registry rendering text exposition format 0.0.4.

Written against the standard library so the relay has no client-library
dependency; only what relayd needs: counters, gauges (optionally computed at
scrape time) and fixed-bucket histograms.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_BUCKETS",
    "Counter",
    "Gauge",
    "Histogram",
    "Registry",
    "format_value",
    "process_cpu_seconds_total",
    "process_max_fds",
    "process_open_fds",
    "process_resident_memory_bytes",
    "process_start_time_seconds",
    "process_virtual_memory_bytes",
    "register_process_metrics",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

log = logging.getLogger("relayd.metrics")

_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
_INF = math.inf

LabelKey = tuple[str, ...]
# Unlabelled: returns a number (None omits the sample). Labelled: returns
# {label values tuple: number} or (key, number) pairs; a bare string key is
# fine for one label.
Callback = Callable[[], Any]


def format_value(v: float) -> str:
    """Format a sample value the way Prometheus' Go parser expects.

    Integral floats print as integers (no ``.0``, no exponent) as long as
    they are exact; beyond 2**53 Python's shortest repr is clearer.
    """
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    v = float(v)
    if v != v:
        return "NaN"
    if v == _INF:
        return "+Inf"
    if v == -_INF:
        return "-Inf"
    if v.is_integer() and abs(v) <= 2**53:
        return str(int(v))
    return repr(v)


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _first(pair: tuple) -> Any:
    return pair[0]


def _label_str(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, n: float = 1) -> None:
        if n < 0:
            raise ValueError("counters only go up")
        self.value += n


class _GaugeChild:
    __slots__ = ("value", "fn")

    def __init__(self) -> None:
        self.value = 0.0
        self.fn: Callable[[], float | None] | None = None

    def set(self, v: float) -> None:
        self.value = v

    def inc(self, n: float = 1) -> None:
        self.value += n

    def dec(self, n: float = 1) -> None:
        self.value -= n

    def set_function(self, fn: Callable[[], float | None] | None) -> None:
        """Compute the value at scrape time instead of tracking it."""
        self.fn = fn


class _HistogramChild:
    __slots__ = ("_bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        # NaN compares false with everything; it belongs only in +Inf.
        i = bisect_left(self._bounds, v) if v == v else len(self._bounds) - 1
        self.counts[i] += 1
        self.sum += v
        self.count += 1


class _Metric:
    """A metric family: a name, help text and children keyed by label values."""

    type_name = ""
    __slots__ = ("name", "help", "labelnames", "_children", "_default", "_fn")

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Iterable[str] = (),
        *,
        fn: Callback | None = None,
        registry: Registry | None = None,
    ) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        labelnames = tuple(labelnames)
        for ln in labelnames:
            if not _LABEL_RE.match(ln) or ln.startswith("__"):
                raise ValueError(f"invalid label name {ln!r}")
        if len(set(labelnames)) != len(labelnames):
            raise ValueError(f"duplicate label names in {labelnames!r}")
        self.name = name
        self.help = help
        self.labelnames = labelnames
        self._children: dict[LabelKey, object] = {}
        self._fn = fn
        self._default = None if labelnames else self._child(())
        if registry is not None:
            registry.register(self)

    def _new_child(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _child(self, key: LabelKey):
        child = self._new_child()
        self._children[key] = child
        return child

    def _key(self, values: tuple, kw: dict) -> LabelKey:
        names = self.labelnames
        if not names:
            raise ValueError(f"{self.name} has no labels")
        if kw:
            if values:
                raise ValueError("pass label values either by position or by name, not both")
            try:
                values = tuple(map(kw.__getitem__, names))
            except KeyError:
                values = ()
            if len(kw) != len(names) or not values:
                raise ValueError(f"{self.name} expects labels {names}, got {tuple(kw)}") from None
        elif len(values) != len(names):
            raise ValueError(f"{self.name} expects {len(names)} label values, got {len(values)}")
        return tuple(map(str, values))

    def labels(self, *values: object, **kw: object) -> Any:
        """The child for these label values; keep it to skip the lookup on hot paths."""
        if kw:
            values = self._key(values, kw)
        elif not values:
            self._key(values, kw)
        child = self._children.get(values)  # type: ignore[arg-type]
        if child is None:
            key = self._key(values, {})
            child = self._children.get(key) or self._child(key)
        return child

    def remove(self, *values: object, **kw: object) -> None:
        """Forget one child, e.g. when the peer it counted goes away."""
        self._children.pop(self._key(values, kw), None)

    def clear(self) -> None:
        if self.labelnames:
            self._children.clear()

    def _unlabelled(self):
        if self._default is None:
            raise ValueError(f"{self.name} has labels {self.labelnames}; use .labels()")
        return self._default

    def sample_names(self) -> tuple[str, ...]:
        return (self.name,)

    def _callback_values(self) -> list[tuple[LabelKey, float]]:
        """Evaluate ``fn``; a broken callback loses its samples, not the scrape."""
        try:
            result = self._fn()  # type: ignore[misc]
            if result is None:
                return []
            if not self.labelnames:
                return [((), float(result))]
            out = []
            for key, value in result.items() if hasattr(result, "items") else result:
                key = (key,) if isinstance(key, str) else tuple(map(str, key))
                if len(key) != len(self.labelnames):
                    raise ValueError(f"label values {key!r} do not match {self.labelnames!r}")
                if value is not None:
                    out.append((key, float(value)))
            return out
        except Exception:
            log.exception("metric callback for %s failed", self.name)
            return []

    def _samples(self) -> Iterator[tuple[str, str, float]]:
        """(sample name, rendered labels, value) in output order."""
        if self._fn is not None:
            items = sorted(self._callback_values(), key=_first)
        else:
            items = [(k, self._child_value(c)) for k, c in sorted(self._children.items(), key=_first)]
        for key, value in items:
            if value is not None:
                yield self.name, _label_str(self.labelnames, key), value

    def _child_value(self, child) -> float | None:
        return child.value

    def render(self, out: list[str]) -> None:
        samples = list(self._samples())
        out.append(f"# HELP {self.name} {_escape_help(self.help)}\n")
        out.append(f"# TYPE {self.name} {self.type_name}\n")
        for name, labels, value in samples:
            out.append(f"{name}{labels} {format_value(value)}\n")


class _Scalar(_Metric):
    """Counters and gauges: one number per child."""

    __slots__ = ()

    def inc(self, n: float = 1) -> None:
        self._unlabelled().inc(n)

    @property
    def value(self) -> float:
        return self._unlabelled().value


class Counter(_Scalar):
    """Monotonic count; the name must end in ``_total`` and is used as-is for TYPE."""

    type_name = "counter"
    __slots__ = ()

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Iterable[str] = (),
        *,
        fn: Callback | None = None,
        registry: Registry | None = None,
    ) -> None:
        if not name.endswith("_total"):
            raise ValueError(f"counter name {name!r} must end in _total")
        super().__init__(name, help, labelnames, fn=fn, registry=registry)

    def _new_child(self) -> _CounterChild:
        return _CounterChild()



class Gauge(_Scalar):
    """A value that goes up and down, or is computed by ``fn`` at scrape time."""

    type_name = "gauge"
    __slots__ = ()

    def _new_child(self) -> _GaugeChild:
        return _GaugeChild()

    def _child_value(self, child: _GaugeChild) -> float | None:
        if child.fn is None:
            return child.value
        try:
            value = child.fn()
            return None if value is None else float(value)
        except Exception:
            log.exception("metric callback for %s failed", self.name)
            return None

    def set(self, v: float) -> None:
        self._unlabelled().set(v)

    def dec(self, n: float = 1) -> None:
        self._unlabelled().dec(n)

    def set_function(self, fn: Callable[[], float | None] | None) -> None:
        self._unlabelled().set_function(fn)


class Histogram(_Metric):
    """Fixed-bucket histogram; buckets are upper bounds, ``+Inf`` is implied."""

    type_name = "histogram"
    __slots__ = ("buckets",)

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Iterable[str] = (),
        *,
        buckets: Iterable[float] = DEFAULT_BUCKETS,
        registry: Registry | None = None,
    ) -> None:
        bounds = [float(b) for b in buckets]
        if not bounds or any(b != b for b in bounds):
            raise ValueError("histogram needs at least one numeric bucket")
        if any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"histogram buckets must be strictly increasing: {bounds}")
        if bounds[-1] != _INF:
            bounds.append(_INF)
        self.buckets = tuple(bounds)
        labelnames = tuple(labelnames)
        if "le" in labelnames:
            raise ValueError("'le' is reserved for histogram buckets")
        super().__init__(name, help, labelnames, registry=registry)

    def _new_child(self) -> _HistogramChild:
        return _HistogramChild(self.buckets)

    def observe(self, v: float) -> None:
        self._unlabelled().observe(v)

    def sample_names(self) -> tuple[str, ...]:
        return (self.name + "_bucket", self.name + "_sum", self.name + "_count")

    def render(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {_escape_help(self.help)}\n")
        out.append(f"# TYPE {self.name} histogram\n")
        les = [f'le="{format_value(b)}"' for b in self.buckets]
        for key, child in sorted(self._children.items(), key=_first):
            cumulative = 0
            for le, n in zip(les, child.counts):
                cumulative += n
                out.append(f"{self.name}_bucket{_label_str(self.labelnames, key, le)} {cumulative}\n")
            labels = _label_str(self.labelnames, key)
            out.append(f"{self.name}_sum{labels} {format_value(child.sum)}\n")
            out.append(f"{self.name}_count{labels} {child.count}\n")


class Registry:
    """An ordered set of metric families that renders one scrape."""

    __slots__ = ("_metrics", "_sample_names")

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._sample_names: dict[str, str] = {}

    def register(self, metric: _Metric) -> _Metric:
        names = {metric.name, *metric.sample_names()}
        for s in names:
            if s in self._sample_names:
                raise ValueError(f"metric {metric.name!r} collides with {self._sample_names[s]!r}")
        self._metrics[metric.name] = metric
        for s in names:
            self._sample_names[s] = metric.name
        return metric

    def unregister(self, metric: _Metric) -> None:
        if self._metrics.get(metric.name) is metric:
            del self._metrics[metric.name]
            self._sample_names = {s: f for s, f in self._sample_names.items() if f != metric.name}

    def get(self, name: str) -> _Metric | None:
        return self._metrics.get(name)

    def counter(self, name: str, help: str, labelnames: Iterable[str] = (), *, fn: Callback | None = None) -> Counter:
        return Counter(name, help, labelnames, fn=fn, registry=self)

    def gauge(self, name: str, help: str, labelnames: Iterable[str] = (), *, fn: Callback | None = None) -> Gauge:
        return Gauge(name, help, labelnames, fn=fn, registry=self)

    def histogram(
        self, name: str, help: str, labelnames: Iterable[str] = (), *, buckets: Iterable[float] = DEFAULT_BUCKETS
    ) -> Histogram:
        return Histogram(name, help, labelnames, buckets=buckets, registry=self)

    def render(self) -> str:
        out: list[str] = []
        for metric in list(self._metrics.values()):
            metric.render(out)
        return "".join(out)


# --- process metrics -------------------------------------------------------

_PROC = "/proc/self"


def _page_size() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 4096


def _statm(index: int) -> float | None:
    try:
        with open(f"{_PROC}/statm", "rb") as f:
            return int(f.read().split()[index]) * _page_size()
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
        return len(os.listdir(f"{_PROC}/fd"))
    except OSError:
        return None


def process_max_fds() -> float | None:
    try:
        import resource
    except ImportError:
        return None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def _boot_start_time() -> float | None:
    """Start time from the kernel, so it survives re-imports and is exact."""
    try:
        with open(f"{_PROC}/stat", "rb") as f:
            stat = f.read()
        # comm (field 2) may contain spaces and parens; fields resume after the last ')'.
        start_ticks = int(stat[stat.rindex(b")") + 2 :].split()[19])
        with open("/proc/stat", "rb") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
        return btime + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration, AttributeError):
        return None


_IMPORT_TIME = time.time()
_start_time: float | None = None


def process_start_time_seconds() -> float:
    global _start_time
    if _start_time is None:
        _start_time = _boot_start_time() or _IMPORT_TIME
    return _start_time


def register_process_metrics(registry: Registry) -> None:
    """Register the standard ``process_*`` metrics this platform can provide."""
    registry.counter(
        "process_cpu_seconds_total", "Total user and system CPU time spent in seconds.", fn=process_cpu_seconds_total
    )
    registry.gauge(
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds.",
        fn=process_start_time_seconds,
    )
    optional: list[tuple[str, str, Callable[[], float | None]]] = [
        ("process_resident_memory_bytes", "Resident memory size in bytes.", process_resident_memory_bytes),
        ("process_virtual_memory_bytes", "Virtual memory size in bytes.", process_virtual_memory_bytes),
        ("process_open_fds", "Number of open file descriptors.", process_open_fds),
        ("process_max_fds", "Maximum number of open file descriptors.", process_max_fds),
    ]
    for name, help, fn in optional:
        if fn() is not None:
            registry.gauge(name, help, fn=fn)

