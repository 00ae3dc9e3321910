"""Command line: run the relay, show its configuration, administer its database, and talk to a relay.

Exit codes: 0 ok, 1 runtime failure (unreachable relay, failed backup, error
answer, failed check), 2 usage or configuration error (bad flag, extra word,
bad value, refusing to overwrite). Argument errors never fall through to a
default: argparse refuses unknown words, and flags that would be ignored by
the chosen command are refused too.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from ..config import CONFIG_FILE_ENV, ConfigError
from .admin import (
    cmd_backup,
    cmd_config,
    cmd_example_config,
    cmd_migrate,
    cmd_reseal,
    cmd_run,
    cmd_stats,
)
from .client_commands import cmd_check, cmd_instances, cmd_keygen, cmd_listen, cmd_send, cmd_status
from .push_command import cmd_push_test
from .options import (
    CONFIG_COMMANDS,
    EXIT_CONFIG,
    EXIT_USAGE,
    LISTENING_FLAGS,
    OFFLINE_COMMANDS,
    UsageError,
    build_parser,
    given_config_flags,
)

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run, "config": cmd_config, "example-config": cmd_example_config, "backup": cmd_backup,
    "stats": cmd_stats, "send": cmd_send, "listen": cmd_listen, "status": cmd_status, "keygen": cmd_keygen,
    "check": cmd_check, "migrate": cmd_migrate, "reseal": cmd_reseal, "instances": cmd_instances,
    "push-test": cmd_push_test,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command or "run"
    if command in CONFIG_COMMANDS and args.config is None:
        args.config = os.environ.get(CONFIG_FILE_ENV) or None
    if command not in CONFIG_COMMANDS:
        misplaced = given_config_flags(args)
        if misplaced:
            parser.error(f"{', '.join(misplaced)}: configure the relay daemon and do not apply to "
                         f"`relayd {command}`")
    if command in OFFLINE_COMMANDS:
        listening = [f"--{flag}" for flag in LISTENING_FLAGS if getattr(args, flag, None) is not None]
        if listening:
            parser.error(f"{', '.join(listening)}: say where the daemon listens and mean nothing to "
                         f"`relayd {command}`")
    if args.check_config and command != "run":
        parser.error(f"--check-config goes with run only, not with `relayd {command}` "
                     f"(`relayd config` prints the configuration)")
    try:
        return COMMANDS[command](args)
    except ConfigError as exc:
        print(f"relayd: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
