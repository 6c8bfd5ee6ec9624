"""Mutation testing, by hand: do the tests notice a single-point mistake in the numeric core?

Each entry of :data:`MUTATIONS` names a file, an exact snippet of its text, what to put in its
place (one realistic mistake: a wrong axis, a flipped comparison, a swapped scale), and the
tests that should catch it. For each one this script copies the repository into a temporary
folder once, writes the mutated file *in the copy*, runs the listed tests there with a
timeout, and puts the file back. The working tree is never touched. It prints one row per
mutation and the score, killed / (killed + survived).

    python3 tools/mutate.py                      # every mutation, stops starting new ones after 20 min
    python3 tools/mutate.py --list               # what the mutations are
    python3 tools/mutate.py --only gqa,lambada   # the mutations whose name contains a word
    python3 tools/mutate.py --budget 600 --timeout 120

A snippet that is no longer in its file (the code moved) is reported "not found", not an
error: refresh the entry. Outcomes: ``killed`` (a listed test failed), ``survived`` (all
passed: a mistake the tests let through), ``timeout`` (counted as killed), ``error`` (the
listed tests were not found, or with ``--baseline`` fail unmutated: refresh the entry),
``skipped`` (the time budget ran out). The tests are expected to pass on the working tree
as it is (``--baseline`` checks it, at twice the time); a killed mutation's row names the
first failing test. Run by hand, not in CI: 10-40 s per mutation on 2 shared cores.
(mutmut and cosmic-ray generate their own operators over whole modules; hand-picked,
snippet-located mutations stay readable, and are easy to refresh when code moves: the
entry names the snippet, not a line number.)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str            # short, unique
    path: str            # file, relative to the repository root
    old: str             # exact text, found exactly once in the file
    new: str             # what replaces it
    tests: tuple         # pytest arguments: files or node ids, then at most one -k (it filters them all)
    what: str            # the mistake it stands for


M = Mutation
BE = "tests/test_beyond_equivalence.py"
BF = "tests/test_brute_force.py"

MUTATIONS = (
    # --- seven mistakes that once went unnoticed: each has a test of its own now ------------------
    M("gqa-heads-mod-G", "minisq/smooth.py",
      ".reshape(G, rep, D).max(axis=1)", ".reshape(rep, G, D).max(axis=0)",
      (f"{BE}::test_gqa_vo_factors_equal_brute_force_max_over_reading_heads",
       "tests/test_llama.py", "-k", "gqa_vo or (smoothing_is_an_equivalence and v_out)"),
      "GQA v->o factors: query heads grouped by h % G instead of h // (H/G)"),
    M("static-pv-delta-k", "minisq/attnquant.py",
      "v_s0 = self.static[layer][2]", "v_s0 = self.static[layer][1]",
      (f"{BE}::test_static_int8_attention_equals_its_definition_with_delta_v_on_pv",
       "tests/test_batch_independence.py::test_static_attention_path_int_equals_fake_and_depends_on_no_context"),
      "static int8 P·V epilogue scaled by Δk instead of Δv"),
    M("stream-stale-carry", "minisq/pipeline.py",
      "        if not self.smooth:\n            self.float_xs = self.smooth_xs\n",
      "        if not self.smooth:\n            pass\n",
      (f"{BE}::test_streamed_unsmoothed_o3_equals_in_memory_and_resumes_to_it",),
      "streamed run without smoothing: the carried unsmoothed activations are not advanced"),
    M("lambada-keeps-first", "minisq/eval/evaluate.py",
      "seq = np.concatenate([ctx, tgt[:-1]])[-P:]", "seq = np.concatenate([ctx, tgt[:-1]])[:P]",
      (f"{BE}::test_lambada_keeps_the_last_context_tokens_of_an_over_long_passage",
       "tests/test_evaluate.py", "-k", "last_word or last_context"),
      "LAMBADA: an over-long passage cut at its end instead of its start"),
    M("llm-int8-strict", "minisq/baselines.py",
      "keepdims=True) >= threshold", "keepdims=True) > threshold",
      (f"{BE}", "tests/test_baselines.py", "-k", "llm_int8"),
      "LLM.int8(): an outlier is |x| > threshold instead of >="),
    M("safetensors-header-order", "minisq/io/checkpoint.py",
      "spans = sorted((begin, end, name) for name, (_, _, begin, end) in specs.items() if end > begin)",
      "spans = [(begin, end, name) for name, (_, _, begin, end) in specs.items() if end > begin]",
      (f"{BE}::test_safetensors_header_out_of_offset_order_loads_and_an_overlap_is_refused",
       "tests/test_lazy_checkpoint.py"),
      "safetensors overlap check over neighbours in header order, not offset order"),
    M("tied-memo-key", "minisq/io/storage.py",
      "key = id(node.data)", "key = id(node)",
      (f"{BE}::test_tied_lm_head_shares_memory_with_the_embedding_on_lazy_and_stored_models",),
      "stored tensors memoised per wrapper instead of per buffer: a tied lm_head widened twice"),

    # --- quant: the quantizers --------------------------------------------------------------------
    M("scale-over-128", "minisq/quant.py", '"smoothquant": Convention(127.0, -127, 127)',
      '"smoothquant": Convention(128.0, -127, 127)',
      ("tests/test_quant.py", "-k", "dynamic_scale or definition"),
      "dynamic scale max|x| / 128"),
    M("round-half-up", "minisq/quant.py", "xp.rint(t, out=t)", "xp.floor(t + 0.5, out=t)",
      ("tests/test_quant.py", f"{BF}", "-k", "half_to_even or codes"),
      "round half up instead of half to even"),
    M("clip-allows-128", "minisq/quant.py", '"smoothquant": Convention(127.0, -127, 127)',
      '"smoothquant": Convention(127.0, -128, 127)',
      ("tests/test_quant.py", f"{BF}", "-k", "static_scale_clips or clip"),
      "static codes may reach -128"),
    M("zero-guard-misses-subnormals", "minisq/quant.py",
      "xp.where(s < xp.finfo(s.dtype).tiny, xp.ones_like(s), s)", "xp.where(s <= 0, xp.ones_like(s), s)",
      ("tests/test_quant.py", "-k", "zero_and_tiny or idempotent"),
      "zero-range guard only for exact zeros, not for subnormal scales"),
    M("per-sequence-ignores-mask", "minisq/quant.py",
      "token_max = xp.where(mask > 0, token_max, xp.zeros_like(token_max))",
      "token_max = xp.where(mask >= 0, token_max, xp.zeros_like(token_max))",
      (f"{BF}", "tests/test_batch_independence.py", "-k", "per_sequence"),
      "per-sequence scales taken over padding too"),
    M("per-input-channel-axis", "minisq/quant.py",
      "s = dynamic_scale(xp, xp.max(a, axis=-2, keepdims=True))",
      "s = dynamic_scale(xp, xp.max(a, axis=-1, keepdims=True))",
      (f"{BF}", "tests/test_baselines.py", "-k", "per_input_channel or per_channel_activations"),
      "per-input-channel activation scales reduced over channels instead of tokens"),
    M("per-channel-weight-axis", "minisq/quant.py",
      's = dynamic_scale(xp, _absmax_checked(xp, w, "w", axis=0), convention)',
      's = dynamic_scale(xp, _absmax_checked(xp, w, "w", axis=1).T, convention)',
      ("tests/test_quant.py", f"{BF}", "-k", "per_channel or per_tensor_token_and_channel"),
      "per-channel weight scales per input channel (square weights do not crash)"),

    # --- gemm: the integer GEMM and its epilogue -------------------------------------------------------
    M("epilogue-drops-col-scale", "minisq/kernels/int8_cpu.py", "    y *= r * c  #", "    y *= r  #",
      ("tests/test_gemm.py", "tests/test_kernels.py", "-k", "epilogue or int8_linear"),
      "epilogue forgets the weight scale"),
    M("epilogue-bias-sign", "minisq/kernels/int8_cpu.py", "    if b is not None:\n        y += b\n",
      "    if b is not None:\n        y -= b\n",
      ("tests/test_gemm.py", "tests/test_kernels.py", "-k", "epilogue or int8_linear"), "epilogue subtracts the bias"),
    M("blocked-k-drops-last", "minisq/kernels/int8_cpu.py", "kb = min(BLOCK_K, K - k0)",
      "kb = min(BLOCK_K, K - k0 - (K - k0 <= BLOCK_K))",
      ("tests/test_gemm.py", "tests/test_kernels.py", "-k", "largest_k or extreme or reference or k_blocks"),
      "K-blocked GEMM drops the last column"),
    M("reference-int8-accumulator", "minisq/gemm.py",
      "acc = xp.matmul(a_q.astype(xp.int64), b_q.astype(xp.int64))",
      "acc = xp.matmul(a_q.astype(xp.int16), b_q.astype(xp.int16))",
      ("tests/test_gemm.py", "-k", "references_agree or extreme"), "the GEMM oracle accumulates in int16"),

    # --- qlinear: W8A8 leaves, static scales, attention ------------------------------------------------
    M("o3-uses-output-range", "minisq/qlinear.py",
      "x_absmax = stats.input_absmax_of(name) if spec.acts == \"static\" else None",
      "x_absmax = stats.output_absmax[name] if spec.acts == \"static\" else None",
      ("tests/test_qlinear.py", "-k", "o3_leaf_scale"), "static x_scale from the output range"),
    M("qkv-scales-reversed", "minisq/attnquant.py", "for m in maxima)", "for m in maxima[::-1])",
      ("tests/test_batch_independence.py", f"{BF}", "-k", "static_qkv"),
      "Δq and Δv swapped"),
    M("qk-epilogue-drops-1/sqrt-d", "minisq/attnquant.py",
      "((q_s * dtype.type(scale)) * k_s.swapaxes(-1, -2))", "(q_s * k_s.swapaxes(-1, -2))",
      ("tests/test_batch_independence.py", "tests/test_qlinear.py", "-k", "int_equals_fake or attention_bmm"),
      "Q·Kᵀ epilogue forgets 1/√D"),
    M("probs-floor", "minisq/attnquant.py", "xp.clip(xp.rint(p * dtype.type(QMAX)), 0, QMAX)",
      "xp.clip(xp.floor(p * dtype.type(QMAX)), 0, QMAX)",
      (f"{BE}::test_static_int8_attention_equals_its_definition_with_delta_v_on_pv",
       "tests/test_batch_independence.py", "-k", "static_attention or static_int8_attention"),
      "P̄ = floor(127 P) instead of round"),
    M("per-tensor-acts-see-padding", "minisq/qlinear.py", "return quantize_per_sequence(x, mask, self.convention)\n",
      "return quantize_per_sequence(x, None, self.convention)\n",
      ("tests/test_batch_independence.py", "-k", "alone_equals"), "per-tensor activation scales set by padding"),
    M("o1-is-per-tensor", "minisq/qlinear.py", '"O1": dict(weights="per_tensor", acts="per_token")',
      '"O1": dict(weights="per_tensor", acts="per_tensor")',
      ("tests/test_families.py", "-k", "pinned"), "preset O1 with per-tensor activations"),

    # --- smooth: Eq. 4, the folds, the α search --------------------------------------------------------
    M("eq4-exponent", "minisq/smooth.py", "a ** alpha / w ** (1.0 - alpha)", "a ** alpha / w ** alpha",
      ("tests/test_smooth.py", "-k", "factors"), "Eq. 4 with max|W|^α"),
    M("w-clamp-1e-2", "minisq/smooth.py", "xp.maximum(xp.asarray(w_max, dtype=xp.float64), 1e-5)",
      "xp.maximum(xp.asarray(w_max, dtype=xp.float64), 1e-2)", ("tests/test_smooth.py", "-k", "factors"),
      "weight range clamped at 1e-2"),
    M("zero-act-channel-not-1", "minisq/smooth.py", "return xp.where(a > 0, s, 1.0)", "return s",
      ("tests/test_smooth.py", f"{BF}", "-k", "factors"), "zero-range channels keep the clamped s"),
    M("weight-absmax-axis", "minisq/smooth.py", "abs(_float_leaf(params, t).w).max(axis=1)",
      "abs(_float_leaf(params, t).w).max(axis=0)", ("tests/test_smooth.py", "-k", "square_weights"),
      "max|W_j| over the wrong axis"),
    M("ln-bias-not-divided", "minisq/smooth.py", '{"g": g / s, "b": b / s}', '{"g": g / s, "b": b}',
      ("tests/test_smooth.py", "-k", "equivalence"), "LayerNorm bias not divided by s"),
    M("alpha-search-static-range", "minisq/smooth.py", "x_absmax=float(np.abs(Xs).max())",
      "x_absmax=float(np.abs(X).max())", ("tests/test_smooth.py", f"{BF}", "-k", "alpha or alpha_search"),
      "α search's static scale from the unsmoothed inputs"),
    M("alpha-search-abs-error", "minisq/smooth.py", "num += float(((Y - q(Xs)) ** 2).sum())",
      "num += float(np.abs(Y - q(Xs)).sum())", ("tests/test_smooth.py", f"{BF}", "-k", "alpha or alpha_search"),
      "α search's error: absolute instead of squared"),
    M("alpha-tie-break", "minisq/smooth.py", "(errors[m.source][a], abs(a - global_alpha))",
      "(errors[m.source][a], a)", ("tests/test_smooth.py", "-k", "alpha"), "α ties broken towards the smallest α"),

    # --- calibrate: the statistics -------------------------------------------------------------------
    M("channel-max-no-abs", "minisq/calibrate.py", "ax = np.abs(x2).max(axis=0).astype(np.float64)",
      "ax = x2.max(axis=0).astype(np.float64)", ("tests/test_smooth.py", "-k", "calibration_equals"),
      "channel max without |.|"),
    M("channel-max-last-batch", "minisq/calibrate.py",
      "self.channel[name] = ax if prev is None else np.maximum(prev, ax)", "self.channel[name] = ax",
      ("tests/test_smooth.py", "-k", "calibration_equals"), "channel max of the last batch only"),
    M("out-channel-last-batch", "minisq/calibrate.py",
      "self.out_channel[name] = ay if prev is None else np.maximum(prev, ay)", "self.out_channel[name] = ay",
      ("tests/test_batch_independence.py", f"{BF}", "-k", "static_qkv or calibration_statistics"),
      "output-channel max of the last batch only"),
    M("calibration-counts-padding", "minisq/calibrate.py", "real = to_numpy(mask).reshape(-1) > 0",
      "real = to_numpy(mask).reshape(-1) >= 0",
      ("tests/test_mixtral.py", "tests/test_smooth.py", f"{BF}", "-k", "calibration or expert_statistics"),
      "calibration statistics over padding tokens too"),
    M("qkv-part-whole-output", "minisq/calibrate.py", "ch[part * width:(part + 1) * width]", "ch",
      ("tests/test_batch_independence.py", f"{BF}", "-k", "static_qkv"),
      "GPT-2's q, k, v ranges from the whole c_attn output"),

    # --- the families ---------------------------------------------------------------------------------
    M("gpt2-k-v-thirds-swapped", "minisq/families/gpt2.py",
      '("h.{i}.attn.c_attn", 1, 3), ("h.{i}.attn.c_attn", 2, 3)', '("h.{i}.attn.c_attn", 2, 3), ("h.{i}.attn.c_attn", 1, 3)',
      ("tests/test_batch_independence.py", f"{BF}", "-k", "static_qkv"),
      "GPT-2's k and v thirds swapped for static scales"),
    M("llama-qk-range-pre-rope", "minisq/families/llama.py", "return float(np.sqrt((pairs ** 2).sum(axis=1)).max())",
      "return float(a.max())", ("tests/test_llama.py", f"{BF}", "-k", "rotated"),
      "Llama's static q/k range before RoPE (may clip)"),
    M("llama-rms-no-eps", "minisq/kernels/cpu.py", "1 / xp.sqrt(mean_sq + x.dtype.type(eps))",
      "1 / xp.sqrt(mean_sq)", ("tests/test_kernels.py", "tests/test_llama.py", "-k", "rms_norm or logits_match"),
      "RMSNorm without eps (the kernel the model runs)"),
    M("llama-rotate-half-sign", "minisq/nn.py", "xp.concatenate([-h[..., half:], h[..., :half]], axis=-1)",
      "xp.concatenate([h[..., half:], -h[..., :half]], axis=-1)",
      ("tests/test_kernels.py", "tests/test_llama.py", "-k", "apply_rotary or logits_match"),
      "rotate_half with the sign on the wrong half"),
    M("quantized-gqa-head-order", "minisq/families/base.py",
      "xp.broadcast_to(x.reshape(B, T, G, 1, D), (B, T, G, n_rep, D))",
      "xp.broadcast_to(x.reshape(B, T, 1, G, D), (B, T, n_rep, G, D))",
      ("tests/test_llama.py", "-k", "quantized_paths"),
      "quantized attention repeats kv heads in h % G order"),
    M("opt-attention-scale", "minisq/families/opt.py", "cache, i, bias, cfg.head_dim ** -0.5, m)",
      "cache, i, bias, cfg.head_dim ** -0.25, m)", ("tests/test_model.py", "-k", "logits_match and opt"),
      "OPT attention scaled by D^-1/4"),

    # --- baselines and the KV cache ---------------------------------------------------------------------
    M("group-scale-no-abs", "minisq/baselines.py", "xp.max(xp.abs(wg), axis=1)", "xp.max(wg, axis=1)",
      ("tests/test_baselines.py", f"{BF}", "-k", "group or per_group"), "ZeroQuant group scale without |.|"),
    M("group-epilogue-mean", "minisq/baselines.py", "w_scale[:, None, :])).sum(axis=0)",
      "w_scale[:, None, :])).mean(axis=0)", ("tests/test_baselines.py", "-k", "zeroquant"),
      "ZeroQuant's group partial sums averaged"),
    M("llm-int8-outliers-in-int8-too", "minisq/baselines.py",
      "x_reg = xp.where(out, xp.zeros((), x.dtype), x)", "x_reg = x",
      ("tests/test_baselines.py", "-k", "llm_int8"), "LLM.int8() outlier columns also go through int8"),
    M("kv-cache-v-with-k-scale", "minisq/kvquant.py", "return dequantize(k_q, k_s), dequantize(v_q, v_s)",
      "return dequantize(k_q, k_s), dequantize(v_q, k_s)",
      ("tests/test_baselines.py", "-k", "kv_cache"), "int8 KV cache: values dequantized with the keys' scales"),

    # --- conventions other than the paper's: llm-compressor's factors, compressed-tensors' rounding ------
    M("llmc-weight-range-no-2", "minisq/conventions.py", "w = 2.0 * np.asarray(w_absmax, np.float64)",
      "w = np.asarray(w_absmax, np.float64)", ("tests/test_conventions.py", "-k", "oracle or edge_cases"),
      "llm-compressor's weight statistic max|W| instead of 2·max|W|"),
    M("llmc-act-range-max-only", "minisq/conventions.py",
      "np.asarray(stats.channel_max[name], np.float64) - np.asarray(stats.channel_min[name], np.float64)",
      "np.asarray(stats.channel_max[name], np.float64)", ("tests/test_conventions.py", "-k", "oracle"),
      "llm-compressor's activation statistic max X instead of max X − min X"),
    M("ct-divisor-127", "minisq/quant.py", '"compressed-tensors": Convention(127.5, -128, 127)',
      '"compressed-tensors": Convention(127.0, -128, 127)',
      ("tests/test_compressed_tensors.py", "-k", "convention_equals"),
      "compressed-tensors' scale max|x| / 127 instead of / 127.5"),

    # --- the newer families: BLOOM's ALiBi, Mixtral's routing ------------------------------------------
    M("bloom-alibi-slopes-from-0", "minisq/families/bloom.py",
      "slopes = base ** np.arange(1, n + 1, dtype=np.float32)", "slopes = base ** np.arange(0, n, dtype=np.float32)",
      ("tests/test_bloom.py", "-k", "alibi_slopes or logits_match"),
      "ALiBi slopes b^h from h = 0 (the first head gets slope 1)"),
    M("mixtral-top-k-not-renormalised", "minisq/families/mixtral.py",
      "return top / top.sum(axis=-1, keepdims=True), chosen", "return top, chosen",
      ("tests/test_mixtral.py", "-k", "routing or logits_match"),
      "Mixtral's top-k routing weights left as softmax probabilities, not renormalised over the k"),
)


def copy_repo(dst: Path) -> None:
    """The working tree's files (tracked and untracked, not ignored) into ``dst``."""
    try:
        names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                               capture_output=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts]
    for name in filter(None, names):
        src = ROOT / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)


def run_tests(repo: Path, tests: tuple, timeout: float) -> tuple:
    """(outcome, detail) of ``pytest -x`` on ``tests`` in ``repo``: "pass", "fail", "timeout",
    or "error" (nothing collected, a test not found, pytest misused)."""
    # no third-party pytest plugins: the tests need none, and loading them costs ~9 s of CPU per run
    env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg",
           "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", *tests]
    try:
        done = subprocess.run(cmd, check=False, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", f"over {timeout:.0f} s"
    out = done.stdout + done.stderr
    first = next((line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))), "")
    why = next((line[1:].strip() for line in out.splitlines() if line.startswith("E ")), "")
    first = f"{first.split(' - ')[0]}: {why}" if first and why else first
    if done.returncode == 0:
        return "pass", ""
    if done.returncode == 1:
        return "fail", first
    last = out.strip().splitlines()[-1] if out.strip() else ""
    return "error", first or last or f"pytest exit {done.returncode}"


def run_mutation(repo: Path, m: Mutation, timeout: float) -> tuple:
    """(result, detail) of one mutation, applied in ``repo`` and undone."""
    path = repo / m.path
    if not path.is_file():
        return "not found", f"{m.path} is gone"
    text = path.read_text()
    n = text.count(m.old)
    if n != 1:
        return "not found", f"snippet found {n} times in {m.path}"
    path.write_text(text.replace(m.old, m.new))
    try:
        outcome, detail = run_tests(repo, m.tests, timeout)
    finally:
        path.write_text(text)
    return {"pass": "survived", "fail": "killed", "timeout": "timeout", "error": "error"}[outcome], detail


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated words: run the mutations whose name contains one")
    ap.add_argument("--skip", help="comma-separated words: leave out the mutations whose name contains one")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--budget", type=float, default=1200, help="seconds after which no new mutation starts")
    ap.add_argument("--timeout", type=float, default=180, help="seconds per test run")
    ap.add_argument("--baseline", action="store_true",
                    help="first check that each mutation's tests pass unmutated (twice the time)")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if (not args.only or any(w in m.name for w in args.only.split(",")))
              and not (args.skip and any(w in m.name for w in args.skip.split(",")))]
    if args.list:
        for m in chosen:
            print(f"{m.name:<32} {m.path:<28} {m.what}")
        return 0
    start = time.monotonic()
    rows = []
    with tempfile.TemporaryDirectory(prefix="minisq-mutate-") as tmp:
        repo = Path(tmp)
        copy_repo(repo)
        for m in chosen:
            if time.monotonic() - start > args.budget:
                rows.append((m, "skipped", "time budget spent", 0.0))
                continue
            t0 = time.monotonic()
            if args.baseline and (repo / m.path).is_file() and m.old in (repo / m.path).read_text():
                outcome, detail = run_tests(repo, m.tests, args.timeout)
                if outcome != "pass":
                    rows.append((m, "error", f"unmutated: {outcome} {detail}", time.monotonic() - t0))
                    print(f"{m.name:<32} error (the tests fail unmutated: {detail})", flush=True)
                    continue
            result, detail = run_mutation(repo, m, args.timeout)
            rows.append((m, result, detail, time.monotonic() - t0))
            print(f"{m.name:<32} {result:<10} {time.monotonic() - t0:6.1f} s  {detail[:160]}", flush=True)
    print_table(rows)
    return 0


def print_table(rows) -> None:
    print(f"\n{'mutation':<32} {'file':<28} {'result':<10} what")
    for m, result, _, _ in rows:
        print(f"{m.name:<32} {m.path.removeprefix('minisq/'):<28} {result:<10} {m.what}")
    killed = sum(r in ("killed", "timeout") for _, r, _, _ in rows)
    survived = [m.name for m, r, _, _ in rows if r == "survived"]
    other = {r: sum(x == r for _, x, _, _ in rows) for r in ("not found", "error", "skipped")}
    tried = killed + len(survived)
    score = f"{killed}/{tried} = {100 * killed / tried:.0f}%" if tried else "n/a"
    print(f"\nscore: {score} killed; survivors: {', '.join(survived) or 'none'}; "
          + ", ".join(f"{k}: {v}" for k, v in other.items()))


if __name__ == "__main__":
    sys.exit(main())
