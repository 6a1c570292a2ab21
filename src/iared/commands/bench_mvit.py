"""``iared bench-mvit``: IA-RED² on MViTv2, measured speed-up against the FLOPs-ideal one
(random weights, budget mode; :func:`iared.bench_mvit.mvit_efficiency`)."""

from __future__ import annotations

import argparse

from iared.commands import add_config_file_argument, add_json_argument, check_json_path, write_report


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench-mvit", help="IA-RED² on MViTv2: measured vs FLOPs-ideal speed-up, per block",
                              description=__doc__.split("\n\n")[0])
    add_config_file_argument(p)
    p.add_argument("--model", default="mvitv2_tiny", metavar="NAME")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--keep", type=float, default=0.7)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stages", type=int, default=3, help="interpreters (resolution stages pruned)")
    p.add_argument("--note", default="", help="recorded with the figures (e.g. machine load)")
    add_json_argument(p, "write the report as JSON to PATH", old=("--out",))
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from iared.bench_mvit import format_report, mvit_efficiency
    from iared.timing import use_threads

    check_json_path(args.json)
    use_threads(args.threads)
    report = mvit_efficiency(args.model, args.batch, args.keep, args.repeats, num_stages=args.stages)
    report["note"] = args.note
    write_report(report, format_report(report), args.json)
    return 0
