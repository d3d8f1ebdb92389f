"""`pdserve`: one console script, one subcommand per role. Each module registers its own subcommand.

User errors (PdserveError, bad flags) print one line and exit 2; only bugs print tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pdserve.wire.errors import PdserveError

# Each subcommand and the module whose `register_cli(subparsers)` adds it. `pdserve X ...` imports X's module
# only, so `pdserve proxy` and `pdserve bench` never load torch; `pdserve --help` imports them all. A role
# whose package is absent from this install is simply not offered.
SUBCOMMANDS = {
    "make-model": "pdserve.tools.make_model",
    "generate": "pdserve.launch.generate",
    "up": "pdserve.launch.cluster",
    "proxy": "pdserve.proxy.cli",
    "prefill": "pdserve.prefill_node.cli",
    "decode": "pdserve.decode_node.cli",
    "bench": "pdserve.benchmarks.serving_cli",
    "profile": "pdserve.launch.profile",
    "plan": "pdserve.planner.cli",
}
# A node of either command may run both roles' parts (kv_both), so both role packages register with the
# runtime.
NODE_COMMANDS = ("prefill", "decode")


def _chosen(argv: list[str]) -> str | None:
    """The subcommand argv names (its first word that is not an option or --log-level's value), if any."""
    words = iter(argv)
    for word in words:
        if word == "--log-level":
            next(words, None)
        elif not word.startswith("-"):
            return word if word in SUBCOMMANDS else None
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = _chosen(argv) if argv is not None else None
    wanted = NODE_COMMANDS if chosen in NODE_COMMANDS else (chosen,)
    for command, name in SUBCOMMANDS.items():
        if chosen is not None and command not in wanted:
            continue
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # that role is not part of this install
            raise
        module.register_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
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
