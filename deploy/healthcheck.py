"""The container's HEALTHCHECK: exit 0 when this container's relayd answers GET /health/ready with 200, else 1.

It reads the configuration the image's entrypoint gives relayd (the file /etc/relayd/relayd.conf, then the
RELAYD_* and the original's environment variables), so a port, listen address or TLS set in either is
followed. Flags appended to the entrypoint (``docker run IMAGE --port N``) are not seen: set keys by
environment or file instead. One line on stdout or stderr says why; Docker keeps it in the health log.
"""

from __future__ import annotations

import http.client
import ssl
import sys
import urllib.request

from relayd.config import Config, ConfigError, load_config

CONFIG_FILE = "/etc/relayd/relayd.conf"
TIMEOUT_S = 3.0
LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def ready_url(config: Config) -> str:
    """The URL of /health/ready on the first address relayd listens on, wildcards replaced by loopback."""
    first = config.server.host[0] if config.server.host else ""
    host = LOOPBACK.get(first, first)
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if config.tls.certfile else "http"
    return f"{scheme}://{host}:{config.server.port}/health/ready"


def main() -> int:
    try:
        config = load_config(CONFIG_FILE)
    except ConfigError as exc:
        print(f"healthcheck: configuration error: {exc}", file=sys.stderr)
        return 1
    context = None
    if config.tls.certfile:
        # The certificate names the public host, not loopback; this probe checks readiness, not identity.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    url = ready_url(config)
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S, context=context) as reply:
            print(f"healthcheck: {url} answered {reply.status}")
            return 0 if reply.status == 200 else 1
    except (OSError, http.client.HTTPException) as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
