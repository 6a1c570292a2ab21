"""``iared make-dataset``: render an embedded task's split to files (:func:`iared.data.natural.write_dataset`;
video: :func:`iared.data.moving.write_videos`).

Image tasks write ``OUT/images/<label>/NNNNN.png`` (an ImageFolder that ``iared eval --task OUT/images``
reads) and the matching digit masks ``OUT/masks/<label>/NNNNN.png`` (0 / 255, same file names; what
``iared explain-eval --images/--masks`` reads). ``moving-digits`` writes ``OUT/videos/<label>/NNNNN.mp4``
(lossless H.264 RGB, a VideoFolder that ``iared eval --task OUT/videos`` reads) and the digit mask of
every frame, ``OUT/masks/<label>/NNNNN/<frame>.png``.
"""

from __future__ import annotations

import argparse
import sys

from iared.commands import add_option, add_out_argument


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("make-dataset", help="write an embedded task's images and digit masks as PNG folders",
                              description=__doc__.split("\n\n")[0])
    from iared.data import DEFAULT_TASK

    # `iared make-dataset TASK --out DIR` was the form before --task; it still works, with a note
    add_option(p, "--task", old=("TASK",), default=DEFAULT_TASK, metavar="TASK",
               help=f"digits-natural, digits-clutter or moving-digits (video) (default: {DEFAULT_TASK})")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="source split (default: test)")
    p.add_argument("--n", type=int, default=1000, help="number of images or clips (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="sample seed (default: 0, the canonical samples)")
    p.add_argument("--backgrounds", metavar="DIR",
                   help="digits-natural, moving-digits: photographs (searched recursively) to draw on instead of "
                        "the split's bundled ones")
    add_out_argument(p, help="output folder (must be absent or empty)", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty OUT")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from iared.data.natural import write_dataset
    from iared.files import check_output_dir

    check_output_dir(args.out, "--out folder")
    if args.task == "moving-digits":
        from iared.data.moving import write_videos

        out = write_videos(args.split, args.n, args.out, seed=args.seed, overwrite=args.overwrite,
                           progress=args.progress, backgrounds=args.backgrounds)
        print(f"wrote {args.n} clips to {out / 'videos'} and their per-frame masks to {out / 'masks'}",
              file=sys.stderr)
        return 0
    out = write_dataset(args.task, args.split, args.n, args.out, seed=args.seed, backgrounds=args.backgrounds,
                        overwrite=args.overwrite, progress=args.progress)
    print(f"wrote {args.n} images to {out / 'images'} and their masks to {out / 'masks'}", file=sys.stderr)
    return 0
