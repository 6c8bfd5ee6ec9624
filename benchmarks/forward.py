"""minisq's float forward vs transformers' on the CPU, same process, same weights.

Builds a random GPT-2-small-shaped checkpoint (random weights: this measures speed, not
quality), checks that both give the same logits, then times one forward of 1 x 1024 tokens
(fp32) several times and prints the best times and their ratio (minisq / torch; lower is
better, target <= 1.0).

    python benchmarks/forward.py [--tokens 1024] [--repeats 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


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

    t_ours = best_time(lambda: model(ids), args.repeats)
    t_torch = best_time(run_torch, args.repeats)
    import os

    print(f"GPT-2 small shapes (random weights), 1 x {args.tokens} tokens, fp32, CPU, "
          f"torch threads={torch.get_num_threads()}, "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}")
    print(f"max |logits diff| = {err:.2e}")
    print(f"{'minisq (NumPy)':<18}{t_ours * 1e3:9.1f} ms")
    print(f"{'transformers':<18}{t_torch * 1e3:9.1f} ms")
    print(f"ratio minisq / torch = {t_ours / t_torch:.2f}x  (target <= 1.0)")


if __name__ == "__main__":
    main()
