"""`pdserve`: one console script, one subcommand per role. Each module registers its own subcommand.

User errors (PdserveError, bad flags) print one line and exit 2; only bugs print tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from wire.errors import PdserveError

# Modules that provide `register_cli(subparsers)`; a role whose package is absent is simply not offered.
SUBCOMMAND_MODULES = (
    "tools.make_model",
    "launch.generate",
    "launch.cluster",
    "proxy.cli",
    "prefill_node.cli",
    "decode_node.cli",
    "bench.serving_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # that role is not part of this install
            raise
        module.register_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv[argv.index(args.command) :] if args.command in argv else argv  # for results files
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        return int(args.func(args) or 0)
    except PdserveError as exc:
        print(f"pdserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
