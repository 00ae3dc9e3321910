"""``relayd push-test``: send one test push to a subscription with this relay's [push] configuration, no relay
running; and reading a subscription given on the command line (also for ``relayd listen --push``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..config.loader import MISSING_PUSH_EXTRA
from ..errors import RelayError
from .admin import load_from
from .options import EXIT_FAILURE, EXIT_OK, UsageError


def read_subscription(spec: str, flag: str) -> dict[str, Any]:
    """A JSON object given inline (``{...}``) or as a file: a W3C ``PushSubscription`` or
    ``{"provider": "fcm"|"apns", "token": "..."}``."""
    try:
        text = spec if spec.lstrip().startswith("{") else Path(spec).read_text(encoding="utf-8")
        value = json.loads(text)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{flag}: not a JSON subscription or a readable file ({exc})") from None
    if not isinstance(value, dict):
        raise UsageError(f"{flag}: a subscription is a JSON object")
    return value


def as_frame(subscription: dict[str, Any]) -> dict[str, Any]:
    """The ``push_subscribe`` fields for a subscription as given on the command line."""
    if "provider" in subscription and "endpoint" not in subscription:
        return {"provider": subscription["provider"], "token": subscription.get("token")}
    return {"subscription": subscription}


def cmd_push_test(args: argparse.Namespace) -> int:
    config, _ = load_from(args)
    if not config.push.enabled:
        raise ConfigError("[push] enabled = false: nothing to test")
    try:
        from ..push.service import build_providers
        from ..push.subscriptions import check_url, parse_request, subscription_id
    except ImportError:
        raise ConfigError(MISSING_PUSH_EXTRA) from None
    from ..storage.store import PushSubscription
    try:
        request = parse_request(as_frame(read_subscription(args.subscription, "--subscription")))
        if request.provider == "webpush":
            check_url(request.target, config.push.allow_private_endpoints)
    except RelayError as err:
        print(f"relayd push-test: {err.code.value}: {err.message}", file=sys.stderr)
        return EXIT_FAILURE
    _, providers = build_providers(config)
    provider = providers.get(request.provider)
    if provider is None:
        print(f"relayd push-test: {request.provider} is not configured in [push]", file=sys.stderr)
        return EXIT_FAILURE
    sub = PushSubscription(subscription_id("", request.provider, request.target), "", request.provider,
                           request.target, request.p256dh, request.auth)

    async def send() -> int:
        try:
            answer = await provider.send(sub, {"type": "wake", "queued": 0}, "wake")
        except RelayError as err:
            print(f"relayd push-test: {err.code.value}: {err.message}", file=sys.stderr)
            return EXIT_FAILURE
        except (OSError, TimeoutError) as exc:
            print(f"relayd push-test: no answer from the push service: {exc or type(exc).__name__}",
                  file=sys.stderr)
            return EXIT_FAILURE
        print(json.dumps({"provider": request.provider, "status": answer.status,
                          "body": answer.body[:500].decode("utf-8", "replace")}))
        return EXIT_OK if 200 <= answer.status < 300 else EXIT_FAILURE

    async def send_once() -> int:
        try:
            return await send()
        finally:
            await provider.close()
    return asyncio.run(send_once())
