"""``iared bench-mvit``: IA-RED² on MViTv2, measured speed-up against the FLOPs-ideal one
(random weights, budget mode; :func:`iared.bench_mvit.mvit_efficiency`)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench-mvit", help="IA-RED² on MViTv2: measured vs FLOPs-ideal speed-up, per block",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mvitv2_tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--keep", type=float, default=0.7)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stages", type=int, default=3, help="interpreters (resolution stages pruned)")
    p.add_argument("--note", default="", help="recorded with the figures (e.g. machine load)")
    p.add_argument("--out", default=None, help="JSON report (written atomically)")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from iared.bench_mvit import format_report, mvit_efficiency
    from iared.files import check_output_file, write_json
    from iared.timing import use_threads

    if args.out:
        check_output_file(args.out, "--out file")
    use_threads(args.threads)
    report = mvit_efficiency(args.model, args.batch, args.keep, args.repeats, num_stages=args.stages)
    report["note"] = args.note
    print(format_report(report))
    if args.out:
        write_json(args.out, report)
    return 0
