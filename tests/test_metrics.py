"""relayd's Prometheus exposition: exact text for what relayd registers, read back by prometheus_client's parser."""

from __future__ import annotations

import math
import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import metric_families

from relayd.ops import prometheus
from relayd.ops.prometheus import CONTENT_TYPE, Histogram, Registry, format_value, register_process_metrics


def samples(text: str, family: str) -> list[tuple[str, dict, float]]:
    return metric_families(text)[family]["samples"]


def test_content_type():
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


def test_empty_registry_renders_nothing():
    assert Registry().render() == ""
    assert metric_families("") == {}


def test_golden_output():
    r = Registry()
    c = r.counter("relayd_messages_routed_total", "Messages routed.", ["direction"])
    c.labels(direction="in").inc()
    c.labels(direction="out").inc(2.5)
    g = r.gauge("relayd_connections", "Open connections.")
    g.set(3)
    h = r.histogram("relayd_latency_seconds", "Latency.", buckets=[0.1, 1])
    h.observe(0.05)
    h.observe(0.1)
    h.observe(5)
    assert r.render() == (
        "# HELP relayd_messages_routed_total Messages routed.\n"
        "# TYPE relayd_messages_routed_total counter\n"
        'relayd_messages_routed_total{direction="in"} 1\n'
        'relayd_messages_routed_total{direction="out"} 2.5\n'
        "# HELP relayd_connections Open connections.\n"
        "# TYPE relayd_connections gauge\n"
        "relayd_connections 3\n"
        "# HELP relayd_latency_seconds Latency.\n"
        "# TYPE relayd_latency_seconds histogram\n"
        'relayd_latency_seconds_bucket{le="0.1"} 2\n'
        'relayd_latency_seconds_bucket{le="1"} 2\n'
        'relayd_latency_seconds_bucket{le="+Inf"} 3\n'
        "relayd_latency_seconds_sum 5.15\n"
        "relayd_latency_seconds_count 3\n"
    )
    metric_families(r.render())


def test_counter():
    r = Registry()
    c = r.counter("relayd_frames_total", "Frames.")
    c.inc()
    c.inc(41)
    assert c.value == 42
    fam = metric_families(r.render())["relayd_frames_total"]
    assert (fam["type"], fam["help"], fam["samples"]) == ("counter", "Frames.", [("relayd_frames_total", {}, 42.0)])
    with pytest.raises(ValueError, match="_total"):
        r.counter("relayd_frames", "x")


def test_labelled_samples_are_cached_and_need_labels():
    c = Registry().counter("relayd_drops_total", "Drops.", ("reason", "peer"))
    a = c.labels(reason="full", peer="p1")
    assert c.labels(peer="p1", reason="full") is a
    assert c.labels(reason="full", peer="p2") is not a
    assert c.labels(reason=404, peer="x") is c.labels(reason="404", peer="x")
    with pytest.raises(ValueError, match="labels"):
        c.inc()
    with pytest.raises(KeyError):
        c.labels(reason="full")


def test_gauge_values_and_callbacks():
    r = Registry()
    state = {"n": 1}
    g = r.gauge("relayd_queue_depth", "Queued.", ["peer"])
    g.labels(peer="a").set(10)
    g.labels(peer="b").set(-2.25)
    r.gauge("relayd_connections", "Conns.", fn=lambda: state["n"])
    r.gauge("relayd_missing", "Unavailable.", fn=lambda: None)
    r.gauge("relayd_broken", "Raises.", fn=lambda: 1 / 0)
    r.gauge("relayd_not_number", "Bad value.", fn=lambda: "many")
    later = r.gauge("relayd_set_later", "Set function.")
    later.set_function(lambda: 3.5)
    state["n"] = 4
    out = metric_families(r.render())
    assert out["relayd_queue_depth"]["samples"] == [("relayd_queue_depth", {"peer": "a"}, 10.0),
                                                    ("relayd_queue_depth", {"peer": "b"}, -2.25)]
    assert out["relayd_connections"]["samples"] == [("relayd_connections", {}, 4.0)]
    assert out["relayd_missing"]["samples"] == []
    assert out["relayd_broken"]["samples"] == []
    assert out["relayd_not_number"]["samples"] == []
    assert out["relayd_set_later"]["samples"] == [("relayd_set_later", {}, 3.5)]


def test_counter_callback():
    r = Registry()
    r.counter("relayd_cb_total", "cb", fn=lambda: 12)
    assert samples(r.render(), "relayd_cb_total") == [("relayd_cb_total", {}, 12.0)]


def test_histogram_buckets_are_inclusive_and_cumulative():
    r = Registry()
    h = r.histogram("relayd_size_bytes", "Sizes.", buckets=(10, 100, 1000))
    for v in (1, 10, 10.5, 100, 5000, -3):
        h.observe(v)
    got = [(n, lab.get("le"), v) for n, lab, v in samples(r.render(), "relayd_size_bytes")]
    assert got == [
        ("relayd_size_bytes_bucket", "10", 3.0),
        ("relayd_size_bytes_bucket", "100", 5.0),
        ("relayd_size_bytes_bucket", "1000", 5.0),
        ("relayd_size_bytes_bucket", "+Inf", 6.0),
        ("relayd_size_bytes_sum", None, 5118.5),
        ("relayd_size_bytes_count", None, 6.0),
    ]


def test_histogram_nan_explicit_inf_and_bad_buckets():
    r = Registry()
    h = r.histogram("relayd_h", "h", buckets=[1, math.inf])
    assert h.buckets == (1.0, math.inf)
    h.observe(math.nan)
    got = samples(r.render(), "relayd_h")
    assert [v for _, _, v in got[:2]] == [0.0, 1.0]
    assert math.isnan(got[2][2])
    for bad in ([], [2, 1], [1, 1]):
        with pytest.raises(ValueError):
            Histogram("relayd_bad", "b", buckets=bad)
    assert Histogram("relayd_d", "d").buckets == (*prometheus.DEFAULT_BUCKETS, math.inf)


def test_escaping():
    r = Registry()
    g = r.gauge("relayd_esc", 'Help with \\ backslash,\nnewline and "quotes".', ["v"])
    g.labels(v='a\\b"c\nd').set(1)
    text = r.render()
    assert '# HELP relayd_esc Help with \\\\ backslash,\\nnewline and "quotes".\n' in text
    assert 'relayd_esc{v="a\\\\b\\"c\\nd"} 1\n' in text
    fam = metric_families(text)["relayd_esc"]
    assert fam["help"] == 'Help with \\ backslash,\nnewline and "quotes".'
    assert fam["samples"][0][1] == {"v": 'a\\b"c\nd'}


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (1.0, "1"),
        (-3.0, "-3"),
        (0.5, "0.5"),
        (2.0**53, "9007199254740992"),
        (1e15 + 0.5, "1000000000000000.5"),
        (1e20, "1e+20"),
        (2**70, str(2**70)),
        (1e300, "1e+300"),
        (1e-7, "1e-07"),
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
        (math.nan, "NaN"),
    ],
)
def test_format_value(value, text):
    assert format_value(value) == text


def test_a_name_registers_once():
    r = Registry()
    r.histogram("relayd_lat", "l")
    with pytest.raises(ValueError, match="twice"):
        r.gauge("relayd_lat", "x")


_label_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)


@settings(max_examples=200, deadline=None)
# prometheus_client's parser trims the HELP text, so the help text here has no whitespace at either end
@given(help_text=_label_text.map(str.strip), values=st.lists(_label_text, min_size=1, max_size=5, unique=True))
def test_escaping_round_trip(help_text, values):
    r = Registry()
    g = r.gauge("relayd_rt", help_text, ["v"])
    for i, v in enumerate(values):
        g.labels(v=v).set(i)
    fam = metric_families(r.render())["relayd_rt"]
    assert fam["help"] == help_text
    assert sorted((s[1]["v"], s[2]) for s in fam["samples"]) == sorted((v, float(i)) for i, v in enumerate(values))


@settings(max_examples=200, deadline=None)
@given(
    bounds=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=8, unique=True).map(sorted),
    obs=st.lists(st.floats(-2e6, 2e6) | st.sampled_from([math.inf, -math.inf]), max_size=50),
)
def test_histogram_matches_reference(bounds, obs):
    r = Registry()
    h = r.histogram("relayd_hyp", "h", buckets=bounds)
    for v in obs:
        h.observe(v)
    got = samples(r.render(), "relayd_hyp")
    buckets = [(float(lab["le"]), v) for n, lab, v in got if n.endswith("_bucket")]
    assert buckets == [(b, float(sum(1 for v in obs if v <= b))) for b in (*bounds, math.inf)]
    assert got[-1] == ("relayd_hyp_count", {}, float(len(obs)))


def test_process_metrics():
    r = Registry()
    register_process_metrics(r)
    before = time.time()
    fams = metric_families(r.render())
    assert fams["process_cpu_seconds_total"]["type"] == "counter"
    assert fams["process_cpu_seconds_total"]["samples"][0][2] >= 0
    start = fams["process_start_time_seconds"]["samples"][0][2]
    assert before - 86400 * 365 < start <= before
    assert fams["process_resident_memory_bytes"]["samples"][0][2] > 1_000_000
    assert fams["process_virtual_memory_bytes"]["samples"][0][2] > 1_000_000
    assert fams["process_open_fds"]["samples"][0][2] >= 3
    assert fams["process_max_fds"]["samples"][0][2] >= fams["process_open_fds"]["samples"][0][2]
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        assert prometheus.process_open_fds() == fams["process_open_fds"]["samples"][0][2] + 1
    finally:
        os.close(fd)


def test_process_start_time_is_the_kernels():
    """The kernel's start time of this process, at most a little before this module was imported."""
    boot = prometheus._boot_start_time()
    assert boot is not None and boot == prometheus._START_TIME
