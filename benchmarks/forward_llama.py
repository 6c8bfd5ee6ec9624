"""minisq's float Llama forward vs transformers' on the CPU, same process, same weights.

Builds a random checkpoint of SmolLM-135M's shape (C=576, H=9 query / 3 kv heads, F=1536,
V=49152, tied embeddings) with fewer layers (random weights: this measures speed, not
quality), checks that both give the same logits, then times one forward of 1 x T tokens
(fp32) several times and prints the best times and their ratio (minisq / torch; lower is better).

    python benchmarks/forward_llama.py [--tokens 512] [--layers 6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
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
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch
    import transformers

    import minisq

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                   max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
                                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    hf = transformers.LlamaForCausalLM(cfg).eval()
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, args.tokens))
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model = minisq.load(tmp)

    def run_torch():
        with torch.no_grad():
            return hf(torch.from_numpy(ids)).logits.numpy()

    def run_minisq():
        return model(ids)

    diff = float(np.abs(run_minisq() - run_torch()).max())
    assert diff < 1e-3, f"logits differ by {diff}: fix correctness before timing"
    t_torch, t_minisq = best_time(run_torch, args.repeats), best_time(run_minisq, args.repeats)
    print(f"SmolLM-135M shape, {args.layers} layers, 1 x {args.tokens} tokens, fp32, "
          f"torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}")
    print(f"max |logits diff| {diff:.2e}")
    print(f"transformers {t_torch * 1e3:.0f} ms, minisq {t_minisq * 1e3:.0f} ms, ratio {t_minisq / t_torch:.2f}")


if __name__ == "__main__":
    main()
