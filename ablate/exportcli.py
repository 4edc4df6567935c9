"""The command line shared by the export operators (``ablate upscale``, ``ablate moe``).

Each operator writes a transformed copy of a checkpoint by streaming its tensors, so their
commands share the source argument, the output options (``--out``, ``--force``,
``--max-shard-size`` and, for an operator with random initialisation, ``--seed``) and the report
line ``wrote OUT: ...``. An operator's ``main`` adds only its own options, the export call and
what its report says::

    parser = export_parser(prog, description="...", example="./mistral-7b --m 8 --out ./solar-like",
                           options=lambda p: p.add_argument("--m", type=int, required=True))
    return run_export(parser, argv, export=lambda a: export_upscaled(a.src, a.m, a.out, ...),
                      report=lambda a, record: f"{record['n']} -> {record['s']} layers")

Pure argparse: importing it imports nothing heavy, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["export_parser", "run_export"]


def export_parser(prog: str, *, description: str, example: str,
                  options: Callable[[argparse.ArgumentParser], Any],
                  seed_help: str | None = None) -> argparse.ArgumentParser:
    """The parser of an export command: ``src``, the operator's ``options``, then the output options.

    ``example`` is the arguments of the epilog's example, after ``prog``. ``seed_help`` adds
    ``--seed`` (default 0), with that help, for an operator whose output has a random part.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=f"example: {prog} {example}")
    parser.add_argument("src", help="a local Hugging Face checkpoint folder, or a hub id when online")
    options(parser)
    parser.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
    if seed_help is not None:
        parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--max-shard-size", default="2GB", help="largest output shard (default 2GB)")
    return parser


def run_export(parser: argparse.ArgumentParser, argv: Sequence[str] | None, *,
               export: Callable[[argparse.Namespace], Mapping[str, Any]],
               report: Callable[[argparse.Namespace, Mapping[str, Any]], str]) -> int:
    """Parse ``argv``, run ``export(args)`` and print ``wrote OUT: <report(args, record)>``; return 0."""
    args = parser.parse_args(argv)
    record = export(args)
    print(f"wrote {args.out}: {report(args, record)}")
    return 0
