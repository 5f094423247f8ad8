"""Command line: ``python -m normffn bench`` (speed) and ``python -m normffn compare`` (accuracy)."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m normffn",
                                     description="normffn: benchmarks and numerical comparisons")
    sub = parser.add_subparsers(dest="command", required=True)
    from . import bench, compare
    p_bench = sub.add_parser("bench", help="time normffn vs numpy reference vs torch")
    bench.add_arguments(p_bench)
    p_cmp = sub.add_parser("compare", help="errors of normffn and torch vs the float64 reference")
    compare.add_arguments(p_cmp)
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench.main(args)
    if args.command == "compare":
        return compare.main(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
