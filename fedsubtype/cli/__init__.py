"""`fedsubtype` command line: one subcommand per module, errors as one line (exit 1), usage errors exit 2."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Sequence

from fedsubtype import __version__
from fedsubtype.errors import UserError

# subcommand name -> module under fedsubtype.cli that defines `register(subparsers)`
COMMANDS: dict[str, str] = {
    "phantom": "phantom_cmd",
    "validate": "validate_cmd",
    "import": "import_cmd",
    "train": "train_cmd",
    "evaluate": "evaluate_cmd",
    "predict": "predict_cmd",
    "benchmark": "benchmark_cmd",
    "model-card": "model_card_cmd",
}


def run_guarded(prog: str, func: Callable[[], int | None]) -> int:
    """Run a CLI body: a UserError becomes one line on stderr and exit 1; Ctrl-C exits 130."""
    try:
        return int(func() or 0)
    except UserError as exc:
        print(f"{prog}: error: {exc.line()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedsubtype",
        description="Federated spatial multi-task learning of ER, PR, HER2 and Ki-67 from single-phase DCE-MRI.",
    )
    parser.add_argument("--version", action="version", version=f"fedsubtype {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        try:
            mod = importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{module}":
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_guarded(f"fedsubtype {args.command}", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
