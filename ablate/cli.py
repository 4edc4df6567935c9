"""The ``ablate`` command: one dispatch table of every subcommand.

    ablate study --trials 20
    ablate figures --study runs/default --out paper/figures
    ablate SUB --help

Each subcommand is the ``main(argv, prog=...)`` of one module; ``python -m ablate.study`` and the
other ``python -m ablate.X`` forms run the same ``main`` directly and keep working as aliases.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ablate.errors import UserError, cli

__all__ = ["COMMANDS", "main"]

# subcommand -> (module whose ``main(argv, prog=...)`` runs it, one line for ``ablate --help``).
# The modules are imported only when their command runs (importlib below), so ``ablate --help``
# and an unknown command answer at once, without importing torch, transformers or optuna.
COMMANDS: dict[str, tuple[str, str]] = {
    "study": ("ablate.study", "run or continue a study"),
    "figures": ("ablate.figures", "write a study's figures (PDF+PNG) and tables"),
    "check": ("ablate.check", "check that a study's records agree"),
    "upscale": ("ablate.upscale", "grow/prune a checkpoint by a layer plan, plus mergekit YAML"),
    "moe": ("ablate.moe", "write a Mixtral-style MoE upcycle and its mergekit-moe YAML"),
    "zoo": ("ablate.zoobuild", "list or build the built-in base models"),
    "plan-memory": ("ablate.memory", "memory per GPU of a study's largest arms, from its config"),
}


class _Formatter(argparse.HelpFormatter):
    """argparse measures command names two columns left of where it prints them, so the longest
    (plan-memory) would push its summary onto a line of its own; give it the two columns."""

    def add_argument(self, action):
        super().add_argument(action)
        if action.help is not argparse.SUPPRESS and getattr(action, "_choices_actions", None):
            self._action_max_length += 2


def _parser() -> argparse.ArgumentParser:
    """The top-level parser, for ``ablate --help`` only: the subcommands parse their own arguments."""
    parser = argparse.ArgumentParser(
        prog="ablate", description="Layer-count ablations of Depth Up-Scaling against MoE upcycling.",
        epilog="run 'ablate COMMAND --help' for a command's options", formatter_class=_Formatter)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        sub.add_parser(name, help=summary)
    return parser


@cli
def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        if not args:
            raise UserError(f"no command given; choose one of {', '.join(COMMANDS)} (ablate --help)")
        _parser().print_help()
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        raise UserError(f"unknown command {name!r}; choose one of {', '.join(COMMANDS)} (ablate --help)")
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest, prog=f"ablate {name}")
