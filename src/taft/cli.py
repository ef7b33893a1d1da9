"""The `taft` command. Errors the user can cause print one line and exit with status 2."""

from __future__ import annotations

import argparse
import sys

import taft
from taft.errors import TaftError


def cmd_backbones(args: argparse.Namespace) -> None:
    """List the bundled backbones and whether their asset package is installed."""
    from taft.backbones import BUNDLED, dinov2_onnx

    for name, what in BUNDLED.items():
        try:
            dinov2_onnx.onnx_file()
            state = "installed"
        except TaftError as e:
            state = f"missing ({e})"
        print(f"{name}: {what} [{state}]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taft", description="Tangent Attention Fine-Tuning.")
    parser.add_argument("--version", action="version", version=f"taft {taft.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("backbones", help="list the bundled pretrained backbones")
    p.set_defaults(func=cmd_backbones)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except TaftError as e:
        print(f"taft: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
