"""Configuration: one source of truth, applied in order (defaults, the INI file, the environment, flags).

``schema`` declares every key; ``loader`` reads and validates them (every
error names the key); ``reload`` decides what SIGHUP may change; ``example``
renders ``relayd.conf.example``.
"""

from .example import describe
from .loader import COMMAND_LINE_SOURCE, DEFAULT_SOURCE, Sources, load_config, load_config_with_sources
from .redact import redact_url, redacted
from .reload import merge_reload
from .schema import (
    CONFIG_FILE_ENV,
    ENV_PREFIX,
    SECTIONS,
    AccessSection,
    AuthSection,
    ClusterSection,
    Config,
    ConfigError,
    LimitsSection,
    LogSection,
    MetricsSection,
    PrivacySection,
    QueueSection,
    RedisSection,
    ServerSection,
    StorageSection,
    TlsSection,
    env_name,
)

__all__ = [
    "COMMAND_LINE_SOURCE", "CONFIG_FILE_ENV", "DEFAULT_SOURCE", "ENV_PREFIX", "SECTIONS", "AccessSection", "AuthSection",
    "ClusterSection", "Config", "ConfigError", "LimitsSection", "LogSection", "MetricsSection", "PrivacySection",
    "QueueSection", "RedisSection", "ServerSection", "Sources", "StorageSection", "TlsSection", "describe",
    "env_name", "load_config", "load_config_with_sources", "merge_reload", "redact_url", "redacted",
]
