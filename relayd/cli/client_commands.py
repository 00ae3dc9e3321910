"""Commands that talk to a relay over the network: send, listen, status, keygen, check."""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import sys
from typing import Any, Awaitable

from ..client.display import json_line, shown, terminal_line
from .check import RelayCheck
from .options import DEFAULT_CLIENT_TIMEOUT, EXIT_FAILURE, EXIT_OK, UsageError

# Client commands


def _identity(spec: str, flag: str) -> Any:
    from ..client import Identity
    from ..identity.signing import KeyFileError
    try:
        return Identity.parse(spec)
    except (ValueError, KeyFileError) as exc:
        raise UsageError(f"{flag}: {exc}") from None


def _tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The TLS context of ``--cafile``, or None for the system's trust store."""
    if not args.cafile:
        return None
    try:
        return ssl.create_default_context(cafile=args.cafile)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"--cafile {args.cafile}: {getattr(exc, 'strerror', None) or exc}") from None


def _client(args: argparse.Namespace, identity: Any = None, **kw: Any) -> Any:
    from ..client import RelayClient
    try:
        return RelayClient(args.relay, identity, timeout=kw.pop("timeout", None) or args.timeout
                           or DEFAULT_CLIENT_TIMEOUT, ssl=_tls(args), **kw)
    except ValueError as exc:
        raise UsageError(f"--relay: {exc}") from None


def _address(value: str, flag: str) -> str:
    from ..addresses import is_address
    if not is_address(value):
        raise UsageError(f"{flag}: not an Idena address (0x followed by 40 hex digits): {value!r}")
    return value.lower()


def _run_client(command: str, coro: Awaitable[int]) -> int:
    from ..client import ClientError

    async def guarded() -> int:
        try:
            return await coro
        except ClientError as exc:
            print(terminal_line(f"relayd {command}: {exc}"), file=sys.stderr)
            return EXIT_FAILURE
    try:
        return asyncio.run(guarded())
    except KeyboardInterrupt:
        return EXIT_OK


def _print_json(frame: Any) -> None:
    print(json_line(frame), flush=True)


def cmd_send(args: argparse.Namespace) -> int:
    to = _address(args.to, "--to")
    client = _client(args, _identity(args.sender, "--from"))

    async def send() -> int:
        async with client:
            answer = await client.send(to, args.text, message_id=args.message_id)
        _print_json(answer)
        return EXIT_FAILURE if answer.get("type") == "error" else EXIT_OK
    return _run_client("send", send())


def cmd_listen(args: argparse.Namespace) -> int:
    from ..client import ClientTimeout
    push = None
    if args.push is not None:
        from .push_command import as_frame, read_subscription
        push = as_frame(read_subscription(args.push, "--push"))
    client = _client(args, _identity(args.identity, "--as"), ack=args.ack, timeout=DEFAULT_CLIENT_TIMEOUT)

    async def listen() -> int:
        messages = 0
        loop = asyncio.get_running_loop()
        deadline = None if args.timeout is None else loop.time() + args.timeout
        sign_in = await client.connect()
        how = "verified" if sign_in.verified else "unverified"
        print(f"relayd listen: signed in as {shown(sign_in.address, 60)} ({how})", file=sys.stderr, flush=True)
        if push is not None:
            answer = await client.push_subscribe(**push)
            _print_json(answer)
            if answer.get("type") != "push_subscribed":
                await client.close()
                return EXIT_FAILURE
        frames = aiter(client)
        try:
            while args.count is None or messages < args.count:
                if deadline is None:
                    frame = await anext(frames, None)
                    if frame is None:
                        print(f"relayd listen: the relay closed the connection (code {client.close_code})",
                              file=sys.stderr)
                        return EXIT_FAILURE
                else:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        frame = await client.recv(remaining)
                    except ClientTimeout:
                        break
                _print_json(frame)
                if frame.get("type") == "message":
                    messages += 1
                    if args.ack and isinstance(frame.get("messageId"), str):
                        await client.ack([frame["messageId"]])
        finally:
            await client.close()
        if args.count is not None and messages < args.count:
            print(f"relayd listen: timeout after {args.timeout:g} s with {messages} of {args.count} messages",
                  file=sys.stderr)
            return EXIT_FAILURE
        return EXIT_OK
    return _run_client("listen", listen())


def cmd_status(args: argparse.Namespace) -> int:
    address = _address(args.address, "ADDRESS")
    client = _client(args)

    async def status() -> int:
        presence = await client.status(address)
        key = await client.get_key(address)
        _print_json({"address": address, "online": presence.get("online"),
                     "queueSize": await client.queue_size(address),
                     "key": None if key is None else {k: key.get(k) for k in
                                                      ("publicKey", "verified", "updatedAt", "keyType", "issuedAt")
                                                      if k in key}})
        return EXIT_OK
    return _run_client("status", status())


def cmd_instances(args: argparse.Namespace) -> int:
    """Connection counts per instance from ``/health/instances``; the token is read from a file, never argv."""
    try:
        with open(args.token_file, encoding="utf-8") as fh:
            token = fh.read().strip()
    except OSError as exc:
        raise UsageError(f"--token-file {args.token_file}: {exc.strerror or exc}") from None
    if not token:
        raise UsageError(f"--token-file {args.token_file}: the file is empty")
    client = _client(args)

    async def instances() -> int:
        _print_json(await client.request("GET", "/health/instances", token=token))
        return EXIT_OK
    return _run_client("instances", instances())


def cmd_keygen(args: argparse.Namespace) -> int:
    if args.storage_key is not None:
        return _storage_keygen(args.storage_key)
    from ..identity.signing import KeyFileError, SigningKey, write_key_file
    key = SigningKey.generate()
    if args.out is None:
        _print_json({"address": key.address, "privateKey": key.hex()})
        return EXIT_OK
    if os.path.lexists(args.out):
        raise UsageError(f"relayd keygen: {args.out} already exists; not overwriting a key file")
    try:
        write_key_file(args.out, key)
    except KeyFileError as exc:
        print(f"relayd keygen: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    _print_json({"address": key.address, "keyFile": args.out})
    return EXIT_OK


def _storage_keygen(path: str) -> int:
    from ..storage.sealing import generate_key_file
    if os.path.lexists(path):
        raise UsageError(f"relayd keygen: {path} already exists; not overwriting a key file")
    try:
        generate_key_file(path)
    except OSError as exc:
        print(f"relayd keygen: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    _print_json({"storageKeyFile": path})
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    client = _client(args)  # validates --relay before anything runs
    return _run_client("check", RelayCheck(client.url, args.timeout or DEFAULT_CLIENT_TIMEOUT,
                                           plain=args.plain, tls=client.endpoint.ssl).run())


