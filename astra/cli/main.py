"""Astra: one Transformer inference spread over several weakly connected devices (ASTRA).

Start with `astra run` (the main job on a built-in default), `astra models list`, or
`astra COMMAND --help`.
"""

from __future__ import annotations

import argparse
import os
import sys

from astra.cli.astra_cmds import add_calibrate_parser, add_eval_parser, add_finetune_parser
from astra.cli.bench_cmd import add_bench_parser
from astra.cli.common import check_outputs, fail
from astra.cli.models_cmd import add_models_parser
from astra.cli.models_cmd import run as run_models
from astra.cli.run_cmd import add_run_parser
from astra.cli.serve_cmd import add_serve_parser


class AstraParser(argparse.ArgumentParser):
    """argparse, with a bad flag reported as one line (and where to read more), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = AstraParser(prog="astra", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_models_parser(sub).set_defaults(runner=run_models)
    add_run_parser(sub)
    add_serve_parser(sub)
    add_bench_parser(sub)
    add_calibrate_parser(sub)
    add_finetune_parser(sub)
    add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_outputs(args)
    except ValueError as exc:
        return fail(str(exc))
    try:
        return args.runner(args)
    except KeyboardInterrupt:
        # workers and servers are ended by the finally blocks this unwound; one line, no trace
        print("astra: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`astra models list | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    raise SystemExit(main())
