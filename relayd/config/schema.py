"""The configuration schema: every section and key with its default, help text, bounds and reloadability.

Each section is a frozen dataclass; a field's metadata holds its help text,
bounds and the seed's legacy environment name where one exists.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "RELAYD_"
IGNORED_ENV_PREFIXES = ("RELAYD_TEST_", "RELAYD_BENCH_", "RELAYD_CI_")
"""Not the daemon's: the test suite's, benchmarks' and CI's variables (now ``RELAYDTEST_*``, ``RELAYDBENCH_*``;
the old names are ignored rather than refused, so a shell that exports them can still start relayd)."""
CONFIG_FILE_ENV = "RELAYD_CONFIG"
"""The configuration file of the commands that read one, when --config is not given (the container sets it)."""


class ConfigError(Exception):
    """A configuration problem; the message names the key."""


def opt(default: Any, help: str, *, env: str | None = None, min: float | None = None,
        max: float | None = None, choices: tuple[str, ...] | None = None, reload: bool = False,
        secret: bool = False) -> Any:
    """Declare one option. ``reload`` marks keys SIGHUP may change at run time; ``secret`` keys (or a URL's
    password in them) are redacted wherever values are printed or logged (``relayd.config.redact``)."""
    meta = {"help": help, "env": env, "min": min, "max": max, "choices": choices, "reload": reload,
            "secret": secret}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ServerSection:
    host: tuple[str, ...] = opt(("0.0.0.0",), "Addresses to listen on, comma-separated: 0.0.0.0 for every IPv4 "
                                              "interface, :: for every interface, IPv6 and IPv4 together (one "
                                              "dual-stack socket), e.g. 127.0.0.1,::1 for both loopbacks.")
    port: int = opt(3000, "TCP port for WebSocket and REST together (the original's default). The Idena P2P "
                          "app connects to ws://localhost:3002: use port = 3002 for it.", env="PORT", min=0,
                    max=65535)
    public_url: str = opt("", "URL clients use to reach this relay (e.g. wss://relay.example.org); "
                              "signed auth binds to it. Empty: derived from host and port.")
    allowed_origins: tuple[str, ...] = opt(("*",), "CORS and WebSocket Origin allow-list: comma-separated, "
                                                   "'*' for any, port wildcard like http://localhost:*.",
                                           env="ALLOWED_ORIGINS", reload=True)
    trusted_proxies: tuple[str, ...] = opt((), "Peers (IPs or CIDRs) whose X-Forwarded-For is believed.",
                                           reload=True)
    auth_timeout_s: float = opt(10.0, "Close connections that have not authenticated within this time.",
                                min=0.1, max=3600, reload=True)
    ping_interval_s: float = opt(20.0, "WebSocket protocol ping interval (0 disables pings).", min=0, max=3600)
    ping_timeout_s: float = opt(20.0, "Close a peer that does not answer a ping within this time.",
                                min=0.1, max=3600)
    shutdown_timeout_s: float = opt(5.0, "Longest graceful shutdown before exit.", min=0.1, max=600)
    head_timeout_s: float = opt(5.0, "A new connection must send its first HTTP request head within this time.",
                                min=0.1, max=600, reload=True)
    http_idle_timeout_s: float = opt(5.0, "Close a kept-alive REST connection idle this long.",
                                     min=0.1, max=600, reload=True)
    status_page: bool = opt(True, "Answer GET / with a small HTML status page (version, uptime, counts; never an "
                                  "address).", reload=True)
    status_refresh_s: float = opt(5.0, "How often the status page's figures and charts refresh in the browser.",
                                  min=0.2, max=3600, reload=True)
    key_cache_max_age_s: int = opt(5, "Seconds clients may reuse a key lookup (Cache-Control max-age; "
                                   "0: revalidate with If-None-Match every time).", min=0, max=86400, reload=True)
    max_requests_per_connection: int = opt(1000, "REST requests answered on one kept-alive connection "
                                           "(1: every answer closes the connection).",
                                           min=1, max=10_000_000, reload=True)
    stall_timeout_s: float = opt(30.0, "Cut a WebSocket, or a kept-alive REST connection, whose send buffer "
                                 "stays full this long (its peer stopped reading).", min=1, max=3600, reload=True)
    event_loop: str = opt("auto", "auto: uvloop when installed (the fast extra), else asyncio's loop; asyncio or "
                                  "uvloop to choose (uvloop when missing stops the start with an install hint).",
                          choices=("auto", "asyncio", "uvloop"))


@dataclass(frozen=True)
class LimitsSection:
    rate_limit_window_ms: int = opt(60000, "REST rate-limit window per client IP.", env="RATE_LIMIT_WINDOW_MS",
                                    min=1, max=86_400_000, reload=True)
    rate_limit_max_requests: int = opt(3000, "REST writes (key uploads and deletions, queue reads and "
                                       "clears), listings and unknown paths allowed per client IP per window "
                                       "(0: unlimited).", env="RATE_LIMIT_MAX_REQUESTS", min=0, max=10_000_000,
                                       reload=True)
    rate_limit_max_reads: int = opt(30000, "REST reads (key and status lookups, queue sizes, HEAD, "
                                    "OPTIONS; a batch counts each address) allowed per client IP per window "
                                    "(0: unlimited).", min=0, max=100_000_000, reload=True)
    rate_limit_max_probes: int = opt(600, "Health checks and metrics (/health, /health/live, /health/ready, "
                                     "/metrics) allowed per client IP per window, a budget of their own "
                                     "(0: unlimited).", min=0, max=100_000_000, reload=True)
    max_message_bytes: int = opt(262144, "Largest message content (bytes of the content string).",
                                 min=16, max=16 * 1024 * 1024, reload=True)
    max_body_bytes: int = opt(262144, "Largest REST request body.", min=64, max=64 * 1024 * 1024, reload=True)
    max_connections: int = opt(0, "Connections the relay holds at once (0: as many as the file-descriptor limit "
                               "allows, keeping a reserve).", min=0, max=10_000_000, reload=True)
    max_connections_per_ip: int = opt(2048, "Concurrent connections per client IP, counted from accept "
                                      "(IPv6: per /64; never more than half the descriptor capacity; 0: that "
                                      "half).", min=0, max=10_000_000, reload=True)
    max_pending_handshakes_per_ip: int = opt(2048, "Connections per IP that have not sent their first request "
                                             "head yet: a burst of the app's key lookups, one connection each, can "
                                             "have them all in their head at once (never more than a quarter of "
                                             "the descriptor capacity; 0: that quarter).", min=0, max=10_000_000,
                                             reload=True)
    max_pending_handshakes: int = opt(4096, "Connections in total that have not sent their first request head "
                                      "yet (never more than half the descriptor capacity; 0: that half).", min=0,
                                      max=10_000_000, reload=True)
    connections_per_ip_per_s: float = opt(100.0, "New WebSocket connections per client IP per second, "
                                          "after the burst (0: no limit).", min=0, max=1e6, reload=True)
    connection_burst_per_ip: int = opt(2000, "New WebSocket connections one client IP may open at once, "
                                       "e.g. every phone behind a carrier NAT reconnecting after a restart.",
                                       min=1, max=10_000_000, reload=True)
    auth_attempts_per_ip_per_min: int = opt(60, "Signature checks per client IP per minute (0: no limit).",
                                            min=0, max=10_000_000, reload=True)
    frames_per_s: float = opt(100.0, "Frames per connection per second (0: no limit).", min=0, max=1e6,
                              reload=True)
    frame_burst: int = opt(1000, "Frames a connection may send at once before frames_per_s applies.",
                           min=1, max=10_000_000, reload=True)
    rate_limited_close_after: int = opt(50, "Close a connection (1008) after this many rate_limited refusals "
                                        "in a row (a REST connection: after this many 429 answers in a row).",
                                        min=1, max=1_000_000, reload=True)
    max_preauth_frame_bytes: int = opt(4096, "Largest frame accepted before auth.", min=256, max=1 << 20,
                                       reload=True)
    max_outbound_bytes: int = opt(1 << 20, "Bytes a connection's peer may leave unread before it is cut off.",
                                  min=16384, max=1 << 30, reload=True)
    max_inbound_bytes: int = opt(1 << 20, "Bytes of received frames a connection may have waiting before "
                                 "relayd stops reading from it.", min=16384, max=1 << 30, reload=True)
    max_buffered_bytes_per_ip: int = opt(64 << 20, "Bytes all connections of one client IP may hold in buffers "
                                         "(unread, unsent, being stored); past it the largest are cut "
                                         "(0: no limit).", min=0, max=1 << 40, reload=True)
    max_buffered_bytes: int = opt(256 << 20, "Bytes all connections together may hold in buffers "
                                  "(0: no limit).", min=0, max=1 << 40, reload=True)
    new_queues_per_sender_per_hour: int = opt(1000, "Distinct offline recipients one sender may queue for "
                                              "per hour (0: no limit).", min=0, max=10_000_000, reload=True)
    new_queues_per_ip_per_hour: int = opt(20000, "Distinct offline recipients all senders of one client IP "
                                          "may queue for per hour (0: no limit).", min=0, max=100_000_000,
                                          reload=True)
    offline_bytes_per_sender_per_hour: int = opt(64 << 20, "Bytes of content one sender may queue for offline "
                                                 "recipients per hour (0: no limit): whoever fills the storage "
                                                 "is refused before everyone else.", min=0, max=1 << 40,
                                                 reload=True)
    key_bytes_per_ip_per_hour: int = opt(16 << 20, "Bytes of keys one client IP may upload per hour, counted "
                                         "as they count in the storage budget (0: no limit; a signed key is "
                                         "about 300 bytes, so many phones behind one carrier NAT address "
                                         "fit).", min=0, max=1 << 40, reload=True)
    offline_bytes_per_ip_per_hour: int = opt(512 << 20, "Bytes of content all senders of one client IP may queue "
                                             "for offline recipients per hour (0: no limit; sized for many "
                                             "phones behind one carrier NAT address).", min=0, max=1 << 44,
                                             reload=True)


@dataclass(frozen=True)
class QueueSection:
    max_offline_messages: int = opt(5000, "Messages held per offline recipient.", env="MAX_OFFLINE_MESSAGES",
                                    min=1, max=10_000_000, reload=True)
    max_offline_bytes: int = opt(64 * 1024 * 1024, "Content bytes held per offline recipient.",
                                 min=1024, max=1 << 40, reload=True)
    message_retention_hours: float = opt(168.0, "Queued messages older than this are removed.",
                                         env="MESSAGE_RETENTION_HOURS", min=0.001, max=24 * 365 * 10, reload=True)
    overflow: str = opt("reject", "When a queue is full: reject (sender gets queue_full) or drop_oldest.",
                        choices=("reject", "drop_oldest"), reload=True)
    expiry_interval_s: float = opt(60.0, "How often expired messages are removed.", min=0.05, max=86400)
    max_receipts_per_recipient: int = opt(10000, "Read receipts held per offline recipient; past it the oldest "
                                          "go.", min=1, max=10_000_000, reload=True)
    flush_delay_ms: int = opt(1500, "A session without ack gets its stored messages once it sends a frame, "
                              "shortly after a key upload for its address, or after this delay (the app "
                              "listens only after its key upload).", min=0, max=600_000, reload=True)
    flush_after_key_upload_ms: int = opt(500, "After a key upload for an address, its waiting sessions get "
                                         "their stored messages this much later.", min=0, max=600_000,
                                         reload=True)


@dataclass(frozen=True)
class StorageSection:
    backend: str = opt("sqlite", "sqlite (durable, default), redis (shared by several relayd instances; "
                                 "needs the optional extra redis, pip install '.[redis]' from a checkout, and [redis] url), "
                                 "postgres (durable, on a PostgreSQL server; needs the optional extra postgres and "
                                 "[postgres] url) or memory (lost on restart).",
                       choices=("sqlite", "memory", "redis", "postgres"))
    path: str = opt("./relayd-data/relayd.db", "SQLite database file.")
    synchronous: str = opt("normal", "normal survives a process crash; full also survives power loss.",
                           choices=("normal", "full"))
    commit_interval_ms: float = opt(2.0, "Longest a write waits to be grouped into one commit.",
                                    min=0, max=1000)
    max_bytes: int = opt(-1, "Bytes that queued content, stored read receipts, keys and push subscriptions "
                             "together may take; past it new offline messages, receipts, keys and push "
                             "subscriptions get storage_unavailable (-1: "
                             "SQLite half the size of the database's file system, at most what relayd holds "
                             "plus the free space less 5 % of the file system, so restarts do not move it; "
                             "Redis half of maxmemory, or 1 GiB without maxmemory; memory none. 0: no "
                             "budget).", min=-1, max=1 << 50,
                         reload=True)
    encryption_key_file: tuple[str, ...] = opt((), "Encryption at rest: file(s) of 32 random bytes (relayd keygen "
                                               "--storage-key PATH), comma-separated; the first seals new "
                                               "records, the others still open old ones (relayd reseal moves "
                                               "them to the first). Addresses, messageIds, contents and "
                                               "receipts are stored unreadable without it; needs the optional "
                                               "extra encryption. Empty: stored as sent.")
    unsigned_key_ttl_days: float = opt(90.0, "An unsigned key nobody uploaded again or looked up for this long "
                                             "is deleted (0: never); signed keys stay, they are their owners'.",
                                       min=0, max=36500, reload=True)


@dataclass(frozen=True)
class HistorySection:
    days: int = opt(0, "Message history: keep each delivered message, as stored (ciphertext and metadata), this many "
                       "days, so a signed-in session (another device of the address) can page through what it "
                       "received and delete it. 0 (default): nothing is kept after delivery. Counted in "
                       "[storage] max_bytes.", min=0, max=3650, reload=True)


@dataclass(frozen=True)
class RedisSection:
    url: str = opt("redis://127.0.0.1:6379/0", "Redis server for backend = redis: redis://[:PASSWORD@]HOST:PORT/DB, "
                                               "or rediss:// for TLS. With cluster = true, any one node of the "
                                               "cluster (database 0). The password is redacted "
                                               "wherever relayd prints the URL.", secret=True)
    key_prefix: str = opt("relayd:", "Prefix of every key relayd writes, so several relays or other "
                                     "applications can share one Redis. No { or }.")
    cluster: bool = opt(False, "true: url names a Redis Cluster node; keys are spread over the cluster's "
                               "masters, one address's keys in one hash slot.")
    min_replicas: int = opt(0, "Answer a write (e.g. queued) only after this many replicas have it too "
                               "(Redis WAIT); fewer within wait_timeout_ms is storage_unavailable. 0: the "
                               "primary's acknowledgement is enough.", min=0, max=64)
    wait_timeout_ms: int = opt(500, "Longest wait for min_replicas acknowledgements per write.",
                               min=1, max=60_000)
    socket_timeout_s: float = opt(2.0, "Longest wait for a Redis connection or answer; past it the operation "
                                       "is storage_unavailable, never a hang.", min=0.05, max=60)


@dataclass(frozen=True)
class PostgresSection:
    url: str = opt("postgresql://relayd@localhost:5432/relayd",
                   "PostgreSQL database for backend = postgres: postgresql://USER[:PASSWORD]@HOST:PORT/DATABASE "
                   "(a libpq URL; ?sslmode=... and the other libpq parameters work). Empty: libpq's PG* "
                   "environment variables say everything. A password left out comes from PGPASSWORD or "
                   "~/.pgpass (PGPASSFILE). Give relayd a database of its own.", secret=True)
    pool_size: int = opt(10, "Most connections this instance opens to PostgreSQL; operations past it wait up to "
                             "connect_timeout_s for one.", min=1, max=1000)
    pool_min: int = opt(1, "Connections kept open while idle.", min=0, max=1000)
    connect_timeout_s: float = opt(5.0, "Longest wait for a connection (a new one, or a free one from the pool); "
                                        "past it the operation is storage_unavailable.", min=0.1, max=300)
    command_timeout_s: float = opt(5.0, "Longest wait for PostgreSQL to answer one statement; past it a write is "
                                        "storage_timeout (it may have been applied), never a hang.",
                                   min=0.1, max=300)
    cluster: bool = opt(False, "true: several relayd instances on this database act as one relay (presence with "
                               "heartbeats, notices over LISTEN/NOTIFY; see [cluster]). false: one instance per "
                               "database, which a second one is refused.")


@dataclass(frozen=True)
class ClusterSection:
    node_id: str = opt("", "This instance's name among several relayd sharing one Redis (backend = redis) or "
                           "one PostgreSQL database ([postgres] cluster = true). Empty: hostname:port at start.")
    heartbeat_s: float = opt(1.0, "How often this instance renews its heartbeat in Redis or PostgreSQL.", min=0.1,
                             max=3600)
    presence_ttl_s: float = opt(4.0, "An instance whose heartbeat is older than this counts as gone: its "
                                     "sessions are offline everywhere within presence_ttl_s + heartbeat_s "
                                     "(e.g. after a kill -9). Above heartbeat_s.", min=0.2, max=86400)
    reply_timeout_ms: int = opt(1000, "Longest wait for another instance to answer an offer of a message; "
                                      "no answer counts as not delivered there (the message is stored).",
                                min=10, max=60_000)

    def resolved_node_id(self, port: int) -> str:
        """``node_id``, or hostname:port when it is empty."""
        import socket
        return self.node_id or f"{socket.gethostname()}:{port}"


@dataclass(frozen=True)
class AuthSection:
    mode: str = opt("mixed", "open: the original (no proof); mixed: signatures optional, but an address that "
                             "ever signed must always sign; signed: every session and key must be signed.",
                    choices=("open", "mixed", "signed"))
    crypto: str = opt("auto", "auto uses coincurve/pycryptodome/OpenSSL Keccak when present and self-tested; "
                              "pure forces the built-in Python code.", choices=("auto", "pure"))
    challenge_ttl_s: float = opt(120.0, "How long a sign-in nonce is valid.", min=5, max=3600)
    token_ttl_s: float = opt(86400.0, "How long a REST bearer token is valid.", min=10, max=365 * 86400)
    key_clock_skew_s: float = opt(600.0, "Signed key statements must be issued within this many seconds of now.",
                                  min=10, max=86400)


@dataclass(frozen=True)
class PrivacySection:
    expose_online_list: str = opt("auto", "GET /api/status/online/all: auto (on in open mode only), true, false.",
                                  choices=("auto", "true", "false"), reload=True)


@dataclass(frozen=True)
class MetricsSection:
    enabled: bool = opt(True, "Serve Prometheus metrics at GET /metrics.")
    listen: str = opt("", "Serve /metrics on this separate host:port instead of the main port "
                          "(e.g. 127.0.0.1:9101), so metrics need not be public.")


@dataclass(frozen=True)
class TlsSection:
    certfile: str = opt("", "PEM certificate chain: serve wss:// and https:// on the same port. "
                            "Empty: plain ws:// (put a reverse proxy in front for public use).", reload=True)
    keyfile: str = opt("", "PEM private key for certfile.", reload=True)


@dataclass(frozen=True)
class AccessSection:
    deny: tuple[str, ...] = opt((), "Clients refused, comma-separated: IPs (203.0.113.7), networks (198.51.100.0/24, "
                                    "2001:db8::/32) and Idena addresses (0x...). A denied IP gets HTTP 403 "
                                    "access_denied on every request; a denied address is refused at sign-in "
                                    "(error access_denied, close 4003) and on key writes. Behind a reverse proxy, "
                                    "IPs are the clients' only with [server] trusted_proxies. Reloading closes "
                                    "the sessions it newly denies.", reload=True)
    status_token: str = opt("", "Bearer token that opens GET /health/instances (connection counts per instance "
                                "on Redis; `relayd instances --token-file FILE`). Empty: that route is off.",
                            reload=True, secret=True)


@dataclass(frozen=True)
class LogSection:
    level: str = opt("info", "debug, info, warning or error.", env="LOG_LEVEL",
                     choices=("debug", "info", "warning", "warn", "error", "critical"), reload=True)
    format: str = opt("text", "text or json.", choices=("text", "json"), reload=True)
    summary_interval_s: float = opt(300.0, "Log one info line of activity counts (sessions, messages, refusals "
                                    "by reason; never addresses) this often (0: never).", min=0, max=86400,
                                    reload=True)


@dataclass(frozen=True)
class PushSection:
    enabled: bool = opt(False, "Wake offline devices with push notifications (Web Push, FCM, APNs); needs the "
                               "optional extra relayd[push]. A push carries only {type: wake, queued: N}.")
    require_verified: bool = opt(True, "Only a signed-in (verified) session may subscribe its address to pushes; "
                                       "false lets anyone claiming an address learn when its owner gets messages.",
                                 reload=True)
    vapid_subject: str = opt("", "Web Push contact of the operator (RFC 8292): a mailto: or https: URL; required "
                                 "when enabled.")
    vapid_key_file: str = opt("", "PEM P-256 private key signing Web Push requests. Empty: vapid.pem next to the "
                                  "SQLite database, made at first start (mode 0600).")
    allow_private_endpoints: bool = opt(False, "Accept Web Push endpoints on loopback, private and link-local "
                                               "addresses, and http: ones (a distributor on the same host or "
                                               "network; tests). Off: https: on public addresses only.")
    min_interval_s: float = opt(30.0, "At most one push per subscription this often: a burst of messages wakes "
                                      "a device once.", min=0, max=86400, reload=True)
    subscription_days: float = opt(60.0, "A subscription is forgotten once no session of its address has signed "
                                         "in for this many days.", min=0.001, max=3650)
    max_subscriptions_per_address: int = opt(10, "Subscriptions kept per address; past it the oldest go.",
                                             min=1, max=1000)
    subscribes_per_ip_per_hour: int = opt(5000, "push_subscribe frames one client IP may send per hour (each is "
                                                "stored; sized for many phones behind one carrier NAT address; "
                                                "0: no limit).", min=0, max=100_000_000, reload=True)
    queue_size: int = opt(10000, "Pushes waiting to be sent, in memory; past it the oldest are dropped "
                                 "(counted in relayd_push_dropped_total).", min=1, max=10_000_000)
    concurrency: int = opt(8, "Pushes sent at once.", min=1, max=1000)
    timeout_s: float = opt(10.0, "Longest a push service may take to answer one request.", min=0.1, max=300)
    max_response_bytes: int = opt(65536, "Largest answer read from a push service.", min=1024, max=1 << 24)
    max_attempts: int = opt(5, "Attempts per push (retries back off exponentially, or as Retry-After says).",
                            min=1, max=100)
    max_backoff_s: float = opt(600.0, "Longest wait before a retry, whatever Retry-After asks.", min=0.01,
                               max=86400)
    ca_file: str = opt("", "Extra PEM CA certificates trusted for push services (a TLS-inspecting proxy, "
                           "tests). Empty: the system's.")
    fcm_project: str = opt("", "Firebase project id: enables FCM (Android) subscriptions.")
    fcm_key_file: str = opt("", "Service-account key file (JSON) of the Firebase project.")
    fcm_url: str = opt("https://fcm.googleapis.com", "FCM HTTP v1 API base URL.")
    apns_key_file: str = opt("", "APNs authentication key (.p8, PEM P-256): enables APNs (iOS) subscriptions.")
    apns_key_id: str = opt("", "Key ID of the APNs authentication key.")
    apns_team_id: str = opt("", "Apple developer team ID.")
    apns_topic: str = opt("", "The app's bundle ID (apns-topic).")
    apns_url: str = opt("https://api.push.apple.com", "APNs base URL (https://api.sandbox.push.apple.com for "
                                                      "development builds).")


SECTIONS: dict[str, type] = {
    "server": ServerSection,
    "limits": LimitsSection,
    "queue": QueueSection,
    "storage": StorageSection,
    "history": HistorySection,
    "redis": RedisSection,
    "postgres": PostgresSection,
    "cluster": ClusterSection,
    "auth": AuthSection,
    "privacy": PrivacySection,
    "metrics": MetricsSection,
    "tls": TlsSection,
    "access": AccessSection,
    "log": LogSection,
    "push": PushSection,
}


@dataclass(frozen=True)
class Config:
    server: ServerSection = field(default_factory=ServerSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    queue: QueueSection = field(default_factory=QueueSection)
    storage: StorageSection = field(default_factory=StorageSection)
    history: HistorySection = field(default_factory=HistorySection)
    redis: RedisSection = field(default_factory=RedisSection)
    postgres: PostgresSection = field(default_factory=PostgresSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    auth: AuthSection = field(default_factory=AuthSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    tls: TlsSection = field(default_factory=TlsSection)
    access: AccessSection = field(default_factory=AccessSection)
    log: LogSection = field(default_factory=LogSection)
    push: PushSection = field(default_factory=PushSection)

    @property
    def expose_online_list(self) -> bool:
        setting = self.privacy.expose_online_list
        return self.auth.mode == "open" if setting == "auto" else setting == "true"

    @property
    def max_frame_bytes(self) -> int:
        """The largest WebSocket frame accepted: the largest content twice over (JSON escapes) plus the fields."""
        return 2 * self.limits.max_message_bytes + 16384

    @property
    def effective_public_url(self) -> str:
        if self.server.public_url:
            return self.server.public_url
        host = self.server.host[0] if self.server.host else ""
        if host in ("0.0.0.0", "::", ""):
            host = "localhost"
        elif ":" in host:
            host = f"[{host}]"
        scheme = "wss" if self.tls.certfile else "ws"
        return f"{scheme}://{host}:{self.server.port}"

    def replace(self, section: str, **values: Any) -> "Config":
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **values)})


ALL_IPV6 = "::"
ALL_IPV4 = "0.0.0.0"


def listen_hosts(hosts: tuple[str, ...]) -> tuple[str, ...]:
    """The hosts to bind for ``[server] host``: ``::`` brings ``0.0.0.0`` with it (asyncio makes every IPv6
    listening socket IPv6-only); duplicates go."""
    out: list[str] = []
    for host in hosts:
        for one in (host, ALL_IPV4) if host == ALL_IPV6 else (host,):
            if one not in out:
                out.append(one)
    return tuple(out)


def env_name(section: str, key: str) -> str:
    """The environment variable of one key: ``RELAYD_<SECTION>_<KEY>``."""
    return f"{ENV_PREFIX}{section.upper()}_{key.upper()}"
