"""`fedsubtype-client keygen --out DIR --site NAME`: a site makes its own SuperNode key pair.

The private key (`NAME.key`, mode 0600 from the first byte) never leaves the site; only `NAME.pub` goes to the
coordinator, who lists it in federation.yaml. Both sides can compare the printed fingerprint out of band.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

PROG = "fedsubtype-client keygen"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Make this site's SuperNode authentication key pair (EC P-384, OpenSSH format). Keep NAME.key "
                    "here (auth_private_key in site.yaml); send only NAME.pub to the coordinator.")
    p.add_argument("--out", type=Path, required=True, help="folder for NAME.key (mode 0600) and NAME.pub")
    p.add_argument("--site", required=True, help="the site's name, as the coordinator lists it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing key pair (re-register the .pub)")
    return p


def run(args: argparse.Namespace) -> int:
    from fedsubtype.federation.credentials import create_site_keypair, public_key_fingerprint

    private, public = create_site_keypair(args.out, args.site, overwrite=args.overwrite)
    print(f"site {args.site}: private key {private} (mode 0600: keep it here, set auth_private_key to it)")
    print(f"  send only {public} to the coordinator; fingerprint {public_key_fingerprint(public)} "
          "(compare it with the coordinator by phone or another channel)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from fedsubtype.cli import run_guarded

    args = build_parser().parse_args(argv)
    return run_guarded(PROG, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
