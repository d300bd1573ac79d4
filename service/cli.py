"""The `phalanx` command: one entry point for the trainer's and the service's subcommands.

It lives on the service side because the service may import the trainer, never the reverse.
"""

from __future__ import annotations

import argparse
import os
import sys


def installed_version() -> str:
    """The installed package's version; "unknown" when running from a source tree that was never installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("phalanx")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    from trainer import cli as trainer_cli

    parser = argparse.ArgumentParser(
        prog="phalanx",
        description="One shared unit-control policy for every unit of an RTS army: simulate, train, serve.")
    parser.add_argument("--version", action="version", version=f"phalanx {installed_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    trainer_cli.register(sub)
    try:
        from service import commands as service_commands
    except ImportError as e:  # the service's own dependencies are missing: say so only when they are used
        _missing = str(e)

        def _unavailable(args):
            raise SystemExit(f"phalanx: the service commands need their dependencies: {_missing}")

        for name in ("serve", "play"):
            p = sub.add_parser(name, help="(unavailable: service dependencies missing)")
            p.set_defaults(func=_unavailable)
    else:
        service_commands.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`phalanx scenarios --json | head`): stop quietly, as other command-line tools do;
        # stdout goes to /dev/null so that Python's final flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool ended by a closed pipe


if __name__ == "__main__":
    sys.exit(main())
