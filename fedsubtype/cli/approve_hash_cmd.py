"""`fedsubtype-client approve-hash [--fab FILE] [--app-dir DIR]`: the app hash a site puts in `approved_apps`.

Without options: the hash of the app this site's installed fedsubtype would build, i.e. what a coordinator
running the same fedsubtype submits. The consortium compares it out of band before a site approves it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from fedsubtype.cli import run_guarded
from fedsubtype.errors import UserError

PROG = "fedsubtype-client approve-hash"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Print the sha256 app hash a site lists under approved_apps "
                                "in site.yaml: of a FAB file, or of the app the installed fedsubtype would build.")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--fab", type=Path, help="a FAB file (e.g. from `flwr build`) shared by the coordinator")
    group.add_argument("--app-dir", type=Path, help="a Flower app folder (default: the installed fedsubtype's)")
    return p


def run(args: argparse.Namespace) -> int:
    from fedsubtype.federation.approval import app_hash, fab_file_hash, installed_app_dir

    if args.fab is not None:
        digest, what = fab_file_hash(args.fab), f"FAB {args.fab}"
    else:
        app_dir = args.app_dir or installed_app_dir()
        if app_dir is None:
            raise UserError("the installed fedsubtype has no app folder (pyproject.toml) to build from",
                            "install fedsubtype from its source tree, or pass --fab FILE", where="--app-dir")
        digest, what = app_hash(app_dir), f"the app built from {app_dir}"
    print(digest)
    print(f"sha256 of {what}; to approve it, add under approved_apps in site.yaml:\n  approved_apps:\n    - {digest}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(PROG, lambda: run(args))
