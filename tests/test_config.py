"""Configuration precedence and validation through ``relayd.config.load_config``."""

from __future__ import annotations

from pathlib import Path

import pytest

from relayd.config import Config, ConfigError, load_config


def ini(tmp_path: Path, text: str) -> str:
    path = tmp_path / "relayd.conf"
    path.write_text(text)
    return str(path)


# Defaults and precedence


def test_defaults_follow_the_seed_except_where_the_app_needs_more():
    config = load_config(None, environ={})
    assert isinstance(config, Config)
    assert config.server.port == 3000
    assert config.server.allowed_origins == ("*",)
    assert config.server.trusted_proxies == ()
    assert config.limits.rate_limit_window_ms == 60000
    assert config.queue.max_offline_messages == 5000  # the seed's 1000 is a busy week away
    assert config.limits.max_message_bytes == 262144  # the app has no length limit
    assert config.queue.message_retention_hours == 168
    assert config.queue.overflow == "reject"
    assert config.log.level == "info"


def test_ini_overrides_defaults(tmp_path):
    path = ini(tmp_path, "[server]\nport = 4000  # inline comment\nauth_timeout_s = 2.5\n"
                         "allowed_origins = https://a.example, http://localhost:*\n"
                         "[queue]\noverflow = DROP_OLDEST\n[log]\nlevel = WARNING\n")
    config = load_config(path, environ={})
    assert config.server.port == 4000
    assert config.server.auth_timeout_s == 2.5
    assert config.server.allowed_origins == ("https://a.example", "http://localhost:*")
    assert config.queue.overflow == "drop_oldest"
    assert config.log.level == "warning"
    assert config.limits.rate_limit_window_ms == 60000  # untouched keys keep their defaults


def test_environment_overrides_ini(tmp_path):
    path = ini(tmp_path, "[server]\nport = 4000\n[queue]\nmax_offline_messages = 10\n")
    config = load_config(path, environ={"PORT": "5000", "RELAYD_QUEUE_MAX_OFFLINE_MESSAGES": "20"})
    assert config.server.port == 5000
    assert config.queue.max_offline_messages == 20


def test_relayd_variable_wins_over_the_legacy_name(tmp_path):
    path = ini(tmp_path, "[server]\nport = 4000\n")
    config = load_config(path, environ={"PORT": "5000", "RELAYD_SERVER_PORT": "6000"})
    assert config.server.port == 6000
    config = load_config(path, environ={"RELAYD_SERVER_PORT": "6000", "PORT": "5000"})  # order does not matter
    assert config.server.port == 6000


def test_overrides_win_over_everything(tmp_path):
    path = ini(tmp_path, "[server]\nport = 4000\n")
    config = load_config(path, environ={"PORT": "5000", "RELAYD_SERVER_PORT": "6000"},
                         overrides=[("server", "port", "7000")])
    assert config.server.port == 7000


@pytest.mark.parametrize("name,value,section,key,expected", [
    ("PORT", "3002", "server", "port", 3002),
    ("ALLOWED_ORIGINS", "https://a.example,https://b.example", "server", "allowed_origins",
     ("https://a.example", "https://b.example")),
    ("ALLOWED_ORIGINS", "*", "server", "allowed_origins", ("*",)),
    ("RATE_LIMIT_WINDOW_MS", "900000", "limits", "rate_limit_window_ms", 900000),
    ("RATE_LIMIT_MAX_REQUESTS", "100", "limits", "rate_limit_max_requests", 100),
    ("MAX_OFFLINE_MESSAGES", "5", "queue", "max_offline_messages", 5),
    ("MESSAGE_RETENTION_HOURS", "1.5", "queue", "message_retention_hours", 1.5),
    ("LOG_LEVEL", "debug", "log", "level", "debug"),
    ("LOG_LEVEL", "ERROR", "log", "level", "error"),
])
def test_legacy_environment_names(name, value, section, key, expected):
    config = load_config(None, environ={name: value})
    assert getattr(getattr(config, section), key) == expected


@pytest.mark.parametrize("name,value,section,key,expected", [
    ("RELAYD_SERVER_AUTH_TIMEOUT_S", "0.5", "server", "auth_timeout_s", 0.5),
    ("RELAYD_SERVER_TRUSTED_PROXIES", "10.0.0.0/8, 127.0.0.1", "server", "trusted_proxies",
     ("10.0.0.0/8", "127.0.0.1")),
    ("RELAYD_LIMITS_MAX_BODY_BYTES", "1024", "limits", "max_body_bytes", 1024),
    ("RELAYD_QUEUE_OVERFLOW", "drop_oldest", "queue", "overflow", "drop_oldest"),
    ("RELAYD_STORAGE_BACKEND", "memory", "storage", "backend", "memory"),
    ("RELAYD_LOG_FORMAT", "json", "log", "format", "json"),
])
def test_relayd_environment_names(name, value, section, key, expected):
    config = load_config(None, environ={name: value})
    assert getattr(getattr(config, section), key) == expected


def test_unrelated_environment_variables_are_ignored():
    config = load_config(None, environ={"HOME": "/root", "RELAY_PORT": "1", "NODE_ENV": "production"})
    assert config.server.port == 3000


# Refusals: every message names the key


@pytest.mark.parametrize("text,needle", [
    ("[server]\nport = abc\n", "[server] port"),
    ("[server]\nport = 70000\n", "[server] port"),
    ("[server]\nport = -1\n", "[server] port"),
    ("[server]\nport = 3000.5\n", "[server] port"),
    ("[server]\nauth_timeout_s = soon\n", "[server] auth_timeout_s"),
    ("[server]\nauth_timeout_s = 0\n", "[server] auth_timeout_s"),
    ("[server]\nauth_timeout_s = nan\n", "[server] auth_timeout_s"),
    ("[limits]\nrate_limit_max_requests = -5\n", "[limits] rate_limit_max_requests"),
    ("[limits]\nmax_message_bytes = 1\n", "[limits] max_message_bytes"),
    ("[queue]\nmax_offline_messages = 0\n", "[queue] max_offline_messages"),
    ("[queue]\noverflow = maybe\n", "[queue] overflow"),
    ("[log]\nlevel = loud\n", "[log] level"),
    ("[storage]\nbackend = mongo\n", "[storage] backend"),
    ("[server]\nnope = 1\n", "[server] nope"),
    ("[limits]\nport = 3000\n", "[limits] port"),
    ("[bogus]\nport = 3000\n", "[bogus]"),
    ("[server]\ntrusted_proxies = not-an-ip\n", "[server] trusted_proxies"),
    ("[server]\nallowed_origins = app.example\n", "[server] allowed_origins"),
])
def test_bad_ini_is_a_config_error_naming_the_key(tmp_path, text, needle):
    with pytest.raises(ConfigError) as info:
        load_config(ini(tmp_path, text), environ={})
    assert needle in str(info.value)


@pytest.mark.parametrize("environ,needle", [
    ({"PORT": "abc"}, "[server] port"),
    ({"PORT": "99999"}, "[server] port"),
    ({"RELAYD_SERVER_PORT": "x"}, "[server] port"),
    ({"RATE_LIMIT_WINDOW_MS": "0"}, "[limits] rate_limit_window_ms"),
    ({"RATE_LIMIT_MAX_REQUESTS": "many"}, "[limits] rate_limit_max_requests"),
    ({"MAX_OFFLINE_MESSAGES": "0"}, "[queue] max_offline_messages"),
    ({"MESSAGE_RETENTION_HOURS": "forever"}, "[queue] message_retention_hours"),
    ({"LOG_LEVEL": "verbose"}, "[log] level"),
    ({"RELAYD_SERVER_PORTX": "1"}, "RELAYD_SERVER_PORTX"),
    ({"RELAYD_NOPE_KEY": "1"}, "RELAYD_NOPE_KEY"),
])
def test_bad_environment_is_a_config_error_naming_the_key(environ, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, environ=environ)
    assert needle in str(info.value)


@pytest.mark.parametrize("override,needle", [
    (("server", "port", "x"), "[server] port"),
    (("server", "nope", "1"), "[server] nope"),
    (("nosuch", "port", "1"), "[nosuch] port"),
    (("queue", "overflow", "sometimes"), "[queue] overflow"),
])
def test_bad_override_is_a_config_error_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={}, overrides=[override])
    assert needle in str(info.value)


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "absent.conf"), environ={})
    assert "absent.conf" in str(info.value)


def test_malformed_ini_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(ini(tmp_path, "port = 3000\n"), environ={})  # a key outside any section
    assert "relayd.conf" in str(info.value)


def test_default_section_is_refused_like_any_unknown_section(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(ini(tmp_path, "[DEFAULT]\nport = 4000\n"), environ={})
    assert "[DEFAULT]" in str(info.value)


def test_a_sealed_store_may_be_shared_by_instances_on_postgresql(tmp_path):
    key = tmp_path / "storage.key"
    key.write_bytes(b"k" * 32)
    path = ini(tmp_path, f"[storage]\nbackend = postgres\nencryption_key_file = {key}\n[postgres]\ncluster = true\n")
    config = load_config(path, environ={})
    assert config.postgres.cluster and config.storage.encryption_key_file == (str(key),)
