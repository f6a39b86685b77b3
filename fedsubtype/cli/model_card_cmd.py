"""`fedsubtype model-card`: write a model card (Markdown) from a model.pt."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model-card", help="write a model card (Markdown) from a model.pt", description=__doc__)
    p.add_argument("--model", type=Path, required=True, help="model.pt from `fedsubtype train` or a federation")
    p.add_argument("--out", type=Path, default=None, help="output file (default: print to the terminal)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedsubtype.train.checkpoint import read_bundle
    from fedsubtype.configio import atomic_write_text
    from fedsubtype.inference.model_card import render_model_card

    _, bundle = read_bundle(args.model)
    text = render_model_card(bundle)
    if args.out is None:
        print(text)
    else:
        atomic_write_text(args.out, text)
        print(f"wrote {args.out}")
    return 0
