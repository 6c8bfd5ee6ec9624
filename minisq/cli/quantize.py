"""``minisq quantize SRC DST``: SmoothQuant a checkpoint layer by layer (models bigger than memory).

Reads SRC (a checkpoint folder or hub id) memory-mapped, calibrates on WikiText-2 text,
and writes the smoothed W8A8 model to DST one decoder layer at a time, with a progress bar
per layer (see :func:`minisq.quantize_checkpoint`). Killed, run the same command again: it
resumes after the last finished layer, with the same result. Reload the result with
``minisq.load(DST)``.

Exit status: 0 done; 1 an error, printed as one line saying what and what to do (--debug
adds the traceback); 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import InputError, MinisqError, load, quantize_checkpoint
from .common import add_debug_option, run_program, say
from .texts import calibration_ids


def parse_args(argv=None, prog: str = "minisq quantize") -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Example:\n  minisq quantize facebook/opt-6.7b opt-6.7b-sq-o3 "
                                        "--preset O3 --alpha 0.5 --calib-samples 128 --seq-len 512\n")
    ap.add_argument("src", help="checkpoint folder or hub id (GPT-2 / OPT / Llama family)")
    ap.add_argument("dst", help="output folder (new or empty, or an unfinished run of the same arguments)")
    ap.add_argument("--preset", default="O3", choices=["naive", "O1", "O2", "O3"], help="W8A8 preset (default O3)")
    ap.add_argument("--alpha", type=float, default=0.5, help="migration strength α in [0, 1] (default 0.5)")
    ap.add_argument("--no-smooth", action="store_true", help="quantize without smoothing (naive W8A8)")
    ap.add_argument("--calib-samples", type=int, default=128, help="WikiText-2 paragraphs to calibrate on (default 128)")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens kept per calibration paragraph (default 512)")
    ap.add_argument("--data-dir", default=None, help="folder with wikitext-2-raw/ (default $MINISQ_DATA_DIR, else download)")
    ap.add_argument("--seed", type=int, default=0, help="which paragraphs are drawn (default 0)")
    ap.add_argument("--no-resume", action="store_true", help="refuse to continue an unfinished run in DST")
    add_debug_option(ap)
    ap.add_argument("--format", default="minisq", choices=["minisq", "compressed-tensors"],
                    help="what DST holds: minisq's format (default) or a compressed-tensors int-quantized W8A8 "
                         "checkpoint (vLLM, transformers), quantized with that format's rounding")
    args = ap.parse_args(argv)
    if not 0.0 <= args.alpha <= 1.0:
        ap.error(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.calib_samples < 1 or args.seq_len < 2:
        ap.error("--calib-samples must be >= 1 and --seq-len >= 2")
    return args


def run(args) -> None:
    dst = Path(args.dst)
    made = not dst.exists()
    try:
        dst.mkdir(parents=True, exist_ok=True)   # an unwritable DST fails here, before SRC is read
    except OSError as exc:
        raise InputError(f"cannot make the output folder {dst}: {exc.strerror or exc}") from exc
    try:
        model = load(args.src, lazy=True)
        calib, _ = calibration_ids(model, args.calib_samples, args.seq_len, args.data_dir, args.seed)
    except MinisqError:
        if made and not any(dst.iterdir()):  # leave no empty folder behind for a bad SRC
            dst.rmdir()
        raise
    say(f"quantizing {args.src} -> {args.dst}: preset {args.preset}, "
        f"{'no smoothing' if args.no_smooth else f'alpha {args.alpha}'}, "
        f"{len(calib)} calibration sequences ({sum(len(c) for c in calib)} tokens), layer by layer")
    quantize_checkpoint(args.src, args.dst, calib, preset=args.preset, alpha=args.alpha,
                        smooth=not args.no_smooth, resume=not args.no_resume, format=args.format)
    say(f"done: minisq.load({args.dst!r})")


def main(argv=None, prog: str = "minisq quantize") -> int:
    args = parse_args(argv, prog)  # exits with status 2 on bad arguments
    return run_program(prog, run, args)


if __name__ == "__main__":
    sys.exit(main())
