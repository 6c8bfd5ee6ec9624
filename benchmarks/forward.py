"""minisq's float forward vs transformers' on the CPU, same process, same weights.

Builds a random GPT-2-small-shaped checkpoint (random weights: this measures speed, not
quality), checks that both give the same logits, then times one forward of 1 x 1024 tokens
(fp32), minisq and torch taking turns (so a change in the machine's load hits both), and
prints each one's best and median time, their ratio (minisq / torch; lower is better,
target <= 1.0), the CPU model, NumPy's BLAS kernel and the load average.

    python benchmarks/forward.py [--tokens 1024] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _machine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import torch
    import transformers

    import minisq

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()  # GPT-2 small shapes
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model = minisq.load(tmp)
    ids = np.random.default_rng(0).integers(0, 50257, (1, args.tokens))
    ids_t = torch.from_numpy(ids)

    with torch.no_grad():
        ref = hf(ids_t).logits.numpy()
    ours = model(ids)
    err = float(np.abs(ours - ref).max())
    assert ours.dtype == np.float32, ours.dtype
    assert err < 1e-3, f"logits differ by {err}: not timing a wrong forward"

    def run_torch():
        with torch.no_grad():
            hf(ids_t)

    load_before = _machine.load()
    t = _machine.interleaved({"minisq": lambda: model(ids), "torch": run_torch}, args.repeats)
    print(f"GPT-2 small shapes (random weights), 1 x {args.tokens} tokens, fp32, same process, "
          f"{args.repeats} interleaved repeats")
    print(f"CPU: {_machine.cpu_model()}; BLAS: {_machine.blas_kernel()}; torch {torch.__version__} "
          f"threads={torch.get_num_threads()}")
    print(f"{load_before} before, {_machine.load()} after")
    print(f"max |logits diff| = {err:.2e}")
    _machine.print_ratio(t, {"minisq": "minisq (NumPy)", "torch": "transformers"}, "minisq", "torch", "<= 1.0")

if __name__ == "__main__":
    main()
