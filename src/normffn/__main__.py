"""Command line: ``python -m normffn bench`` (speed) and ``python -m normffn compare`` (accuracy)."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from . import __version__, bench, compare

    parser = argparse.ArgumentParser(prog="python -m normffn",
                                     description="normffn: benchmarks and numerical comparisons")
    parser.add_argument("--version", action="version", version=f"normffn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_bench = sub.add_parser("bench", help="time normffn vs torch (each in its own process)")
    bench.add_arguments(p_bench)
    p_cmp = sub.add_parser("compare", help="errors of normffn and torch vs the float64 reference")
    compare.add_arguments(p_cmp)
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench.main(args)
    return compare.main(args)


if __name__ == "__main__":
    sys.exit(main())
