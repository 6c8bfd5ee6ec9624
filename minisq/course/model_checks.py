"""The course's checks of smoothing, calibration and static scales (assignments a3, a4):
one answer against minisq's own, with a diagnosis of the classic mistake when they differ.

Legend: C the width of a LayerNorm's output = the input width C_in of the linears it feeds;
weights ``[C_in, C_out]`` (``y = x @ w``).
"""

from __future__ import annotations

import numpy as np

from ..backend import to_numpy
from ..diagnostics import EquivalenceReport
from .asserts import _fmt_index


def check_smoothing_factors(name: str, s, act_max, w_max, alpha: float, rtol: float = 1e-10) -> None:
    """Check smoothing factors ``s`` against ``minisq.smooth.smoothing_factors`` (paper Eq. 4).

    ``s_j = max(max|X_j|^α / max(max|W_j|, 1e-5)^(1-α), 1e-5)``, and 1 where ``max|X_j| = 0``;
    ``s`` must be float64 ``[C_in]`` within ``rtol``. Names the rule a wrong channel broke.
    """
    # [C_in] float64, [C_in], [C_in], float -> None
    from ..smooth import smoothing_factors

    a = np.asarray(to_numpy(act_max), np.float64)
    w = np.asarray(to_numpy(w_max), np.float64)
    exp = smoothing_factors(a, w, alpha)
    if s is None or not hasattr(s, "shape"):
        raise AssertionError(f"{name} returned {type(s).__name__}: return the [C_in] float64 array s")
    s = np.asarray(to_numpy(s))
    if s.shape != exp.shape:
        raise AssertionError(f"{name}: s has shape {s.shape}, expected {exp.shape}: one factor per input channel")
    if s.dtype != np.float64:
        raise AssertionError(f"{name}: s has dtype {s.dtype}, expected float64: compute the factors in float64 "
                             f"(powers of ranges spanning many decades lose precision in float32)")
    bad = ~(np.abs(s - exp) <= rtol * np.abs(exp))
    if bad.any():
        j = int(np.argwhere(bad)[0][0])
        yours, want, aj, wj = float(s[j]), float(exp[j]), float(a[j]), float(w[j])
        formula = f"max|X_j|^α / max|W_j|^(1-α) with α = {alpha}"
        if aj == 0:
            hint = ("act_max is 0 (a channel that never fires): expected s = 1 — there is nothing to migrate, "
                    "and 0^α would zero the channel out")
        elif want == 1e-5:
            hint = f"{formula} is below 1e-5 here: s is clamped to at least 1e-5 (as in the paper's code)"
        elif wj < 1e-5:
            hint = (f"w_max is {wj:.3g} < 1e-5: the weight range is clamped to 1e-5 before the power, so "
                    f"that an all-zero weight row does not divide by zero")
        elif abs(yours - aj ** (1 - alpha) / wj ** alpha) <= rtol * abs(yours):
            hint = f"your exponents are swapped: s_j = {formula}"
        elif abs(yours * want - 1.0) <= 1e-8:
            hint = f"yours is 1/s: s_j = {formula} (activation range in the numerator)"
        else:
            hint = f"s_j = {formula} = {aj:.6g}^{alpha} / {max(wj, 1e-5):.6g}^{1 - alpha:g}"
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.size} factors are wrong; channel {j}: yours "
                             f"{yours:.6g}, expected {want:.6g}; act_max[{j}] = {aj:.6g}, "
                             f"w_max[{j}] = {wj:.6g}: {hint}")


def check_smoothing_fold(name: str, new_ln: dict, new_targets, ln: dict, targets, s, ulps: float = 4.0) -> None:
    """Check a smoothing fold: a LayerNorm ``{"g", "b"}`` and the linears it feeds, with ``s`` folded in.

    Expected: ``g / s`` and ``b / s`` (the LayerNorm now outputs X / s; a missing g or b counts
    as ones or zeros), every target's weight rows times s (``w * s[:, None]``) and its bias
    untouched, all in the parameters' own dtype and within ``ulps`` roundings. ``ln`` and
    ``targets`` are the *original* parameters (pass copies taken before the call). Names the
    side that was multiplied instead of divided, columns scaled instead of rows, and dtype drift.
    """
    # {"g": [C], "b": [C]}, [Linear [C, C_out_i]], {"g": [C] | None, "b": [C] | None}, [Linear], [C] -> None
    targets = list(targets)
    dtype = np.asarray(to_numpy(targets[0].w)).dtype
    s64 = np.asarray(to_numpy(s), np.float64)
    sd = np.asarray(to_numpy(s)).astype(dtype)
    C = s64.shape[0]
    tol = ulps * np.finfo(dtype).eps

    def arr(v, fill):
        return np.full(C, fill, dtype) if v is None else np.asarray(to_numpy(v))

    def check(what, got, want, old, mistakes, per_input_channel=True, otherwise=""):
        if got is None or not hasattr(got, "shape"):
            raise AssertionError(f"{name}: {what} is {type(got).__name__}, expected a {want.shape} {want.dtype} array")
        got = np.asarray(to_numpy(got))
        if got.shape != want.shape:
            raise AssertionError(f"{name}: {what} has shape {got.shape}, expected {want.shape}")
        if got.dtype != want.dtype:
            raise AssertionError(f"{name}: {what} has dtype {got.dtype}, expected {want.dtype} (the parameter's "
                                 f"dtype): cast s to it first (s.astype({want.dtype.name}))")
        g64, w64 = got.astype(np.float64), want.astype(np.float64)
        bad = ~(np.abs(g64 - w64) <= tol * np.abs(w64))
        if bad.any():
            idx = tuple(np.argwhere(bad)[0])
            hint = next((why for why, v in mistakes if v is not None and v.shape == got.shape
                         and np.allclose(g64, v, rtol=tol, atol=0)), otherwise)
            s_at = f", s = {float(s64[idx[0]]):.6g}" if per_input_channel else ""
            raise AssertionError(f"{name}: {what} at {_fmt_index(idx)} is {float(g64[idx]):.6g}, expected "
                                 f"{float(w64[idx]):.6g} (was {float(np.asarray(old, np.float64)[idx]):.6g}{s_at})"
                                 + (f": {hint}" if hint else ""))

    if not isinstance(new_ln, dict) or set(new_ln) != {"g", "b"}:
        raise AssertionError(f"{name}: the new LayerNorm must be a dict with keys 'g' and 'b', got {new_ln!r:.80}")
    for key, fill in (("g", 1.0), ("b", 0.0)):
        old = arr(ln[key], fill).astype(np.float64)
        want = (arr(ln[key], fill) / sd)
        check(f"LayerNorm {key}", new_ln[key], want, old, [
            (f"you multiplied the LayerNorm's {key} by s; divide it (the LayerNorm must now output X / s, "
             f"and the next weights take the s)", old * s64),
            (f"{key} is unchanged: the LayerNorm's {key} is part of its output too, divide it by s as well", old),
        ])
    new_targets = list(new_targets) if isinstance(new_targets, (list, tuple)) else new_targets
    if not isinstance(new_targets, list) or len(new_targets) != len(targets):
        raise AssertionError(f"{name}: expected a list of {len(targets)} new linear(s), one per target, got "
                             f"{type(new_targets).__name__}")
    for i, (new, old) in enumerate(zip(new_targets, targets)):
        w_old = np.asarray(to_numpy(old.w))
        w64 = w_old.astype(np.float64)
        check(f"target {i} weight", getattr(new, "w", None), w_old * sd[:, None], w64, [
            ("you divided the weight; multiply its rows by s (the weights absorb what the LayerNorm gave up)",
             w64 / s64[:, None]),
            ("you scaled the columns (output channels); s belongs to the input channels, the rows of "
             "[C_in, C_out]: w * s[:, None]", w64 * s64[None, :] if w64.shape[1] == C else None),
            ("the weight is unchanged: multiply its rows by s", w64),
        ])
        if old.b is not None:
            b_old = np.asarray(to_numpy(old.b))
            check(f"target {i} bias", getattr(new, "b", None), b_old, b_old, [], per_input_channel=False,
                  otherwise="leave the linear's bias as it was: it is added after x @ w, which smoothing "
                            "does not change")
        elif getattr(new, "b", None) is not None:
            raise AssertionError(f"{name}: target {i} had no bias but yours has one: leave the linear's bias as it was")


def check_channel_absmax(name: str, got: dict, expected: dict) -> None:
    """Check per-layer, per-channel activation ranges ``{layer: [C_in]}`` against ``expected``
    (e.g. ``minisq.calibrate(...).channel_absmax``): same layers, shapes, and exact maxima."""
    # {name: [C_in] float}, {name: [C_in] float64} -> None
    if not isinstance(got, dict):
        raise AssertionError(f"{name} returned {type(got).__name__}: return a dict {{layer name: [C_in] array}}")
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing:
        raise AssertionError(f"{name}: no entry for {len(missing)} layer(s), e.g. {missing[0]!r}: record the input "
                             f"of every linear leaf (model.linears() lists them)")
    if extra:
        raise AssertionError(f"{name}: unexpected key(s) {extra[:3]}: use the dotted layer names of model.linears()")
    for layer, want in expected.items():
        mine = got[layer]
        want = np.asarray(to_numpy(want), np.float64)
        if mine is None or not hasattr(mine, "shape") or np.shape(mine) != want.shape:
            raise AssertionError(f"{name}: {layer!r} has shape {np.shape(mine)}, expected {want.shape}: one range per "
                                 f"input channel, max over every token of every batch")
        mine = np.asarray(to_numpy(mine), np.float64)
        bad = ~(mine == want)
        if bad.any():
            j = int(np.argwhere(bad)[0][0])
            hint = ("yours is smaller: take max(|x|), not max(x) (negative outliers count), over every batch, "
                    "not only the last one" if mine[j] < want[j] else
                    "yours is larger: take the max (not a sum) of the layer's input (not its output)")
            raise AssertionError(f"{name}: {layer!r} channel {j}: yours {mine[j]:.6g}, expected {want[j]:.6g} "
                                 f"(wrong in {int(bad.sum())} of {bad.size} channels); {hint}")


def assert_equivalent(name: str, report: EquivalenceReport) -> None:
    """Raise AssertionError unless ``report`` (from :func:`check_equivalence`) passed; the message
    gives the verdict and the first block whose output already differs beyond the tolerance."""
    if report.passed:
        return
    first = next(((block, rel) for block, (_, rel) in report.layers.items() if rel > report.tol), None)
    where = (f"; the first block that differs is {first[0]!r} (rel diff {first[1]:.3e}): look inside it"
             if first else "; every block output agrees, so look after the last block (final norm, lm_head)")
    raise AssertionError(f"{name}: {report}{where}")


def check_static_scale(name: str, scale, channel_absmax, dtype=np.float32) -> None:
    """Check a static (O3) activation scale against ``minisq.quantize_linear``'s, exactly: the
    0-d ``max_k absmax[k] / 127`` computed in ``dtype``, and 1 (the quantizers' zero-range
    guard) where that would be 0 or subnormal."""
    # [] float, [C_in] float -> None
    from ..nn import Linear
    from ..qlinear import quantize_linear

    absmax = np.asarray(to_numpy(channel_absmax), np.float64)
    dtype = np.dtype(dtype)
    leaf = Linear(np.ones((absmax.shape[0], 1), dtype))
    want = quantize_linear(leaf, "per_tensor", "static", x_absmax=float(absmax.max())).x_scale
    if scale is None or not hasattr(scale, "dtype"):
        raise AssertionError(f"{name} returned {type(scale).__name__}: return a 0-d {dtype} array "
                             f"(np.asarray(..., dtype))")
    got = np.asarray(to_numpy(scale))
    if got.shape != ():
        raise AssertionError(f"{name}: the scale has shape {got.shape}, expected () — one scale for the whole layer "
                             f"(per-tensor), the max over channels")
    if got.dtype != dtype:
        raise AssertionError(f"{name}: the scale has dtype {got.dtype}, expected {dtype} (the model's dtype)")
    if got == want:
        return
    yours, top = float(got), float(absmax.max())
    candidates = {
        "a layer whose inputs were all zero still needs a positive scale: use 1, as the quantizers do":
            0.0 if top == 0 else None,
        "yours is the mean of the channel ranges / 127: use their max, or the outlier channels clip":
            absmax.mean() / 127,
        "yours is max / 128: the symmetric int8 range is [-127, 127], divide by 127": top / 128,
        "yours is 127 / max, the inverse: Δ = max / 127": 127 / top if top else None,
    }
    hint = next((why for why, v in candidates.items() if v is not None
                 and abs(yours - v) <= 1e-6 * abs(v)), "")
    if top > 0 and yours == float(np.asarray(top / 127, dtype)):   # one rounding too many, in the wrong dtype
        hint = (f"yours is max / 127 divided in float64 and then cast to {dtype}: cast the max to {dtype} first, "
                f"then divide by 127 in {dtype} (np.asarray(absmax.max(), dtype) / 127); the two differ in the last "
                f"bit for about a quarter of ranges, and the scale is compared exactly")
    if not np.isfinite(yours):
        hint = "a NaN/inf scale: an all-zero range gets scale 1 instead of 0/127"
    raise AssertionError(f"{name}: yours {yours:.7g}, expected {float(want):.7g} = max absmax / 127 "
                         f"= {top:.6g} / 127 (computed in {dtype}; 1 if that is 0 or subnormal)"
                         + (f"; {hint}" if hint else ""))


def check_smoothed_layernorms(name: str, smoothed, model, stats, alpha: float) -> None:
    """The factor each LayerNorm of ``smoothed`` was divided by (``g_old / g_new``) against
    ``minisq.smooth(model, stats, alpha)``'s, naming the classic mistakes: ``w_max`` from one
    target only (of q, k and v), and 1/s."""
    # Model, Model, CalibrationStats, float -> None
    from ..smooth import mappings_for, smooth, smoothing_factors
    from ..tree import get_param

    factors = smooth(model, stats, alpha=alpha).info["smoothing"]["factors"]
    rtol = 1e-12 if model.dtype == np.float64 else 1e-6
    for m in mappings_for(model.config):
        if m.kind != "layernorm":
            continue
        old = np.asarray(to_numpy(get_param(model.params, m.source)["g"]), np.float64)
        new_ln = get_param(smoothed.params, m.source)
        if not isinstance(new_ln, dict) or new_ln.get("g") is None:
            raise AssertionError(f"{name}: {m.source} is {type(new_ln).__name__}, expected a LayerNorm {{'g', 'b'}}")
        mine = old / np.asarray(to_numpy(new_ln["g"]), np.float64)
        want = np.asarray(to_numpy(factors[m.source]), np.float64)
        bad = ~(np.abs(mine - want) <= rtol * np.abs(want))
        if not bad.any():
            continue
        j = int(np.argwhere(bad)[0][0])
        act = stats.channel_absmax[m.targets[0]]
        leaves = [np.abs(np.asarray(to_numpy(get_param(model.params, t).w), np.float64)).max(axis=1)
                  for t in m.targets]
        candidates = [(f"w_max must be the max over every linear {m.source} feeds ({', '.join(m.targets)}): "
                       f"max |w[j, :]| over all {len(leaves)} of them; yours matches w_max from {t} only",
                       np.asarray(to_numpy(smoothing_factors(act, wm, alpha))))
                      for t, wm in zip(m.targets, leaves)] if len(leaves) > 1 else []
        candidates.append(("yours is 1/s: divide the LayerNorm by s = max|X_j|^α / max|W_j|^(1-α)", 1 / want))
        hint = next((why for why, v in candidates if np.allclose(mine, v, rtol=max(rtol, 1e-9), atol=0)), "")
        raise AssertionError(f"{name}: {m.source} was divided by {mine[j]:.6g} at channel {j} (g before / g after), "
                             f"expected s = {want[j]:.6g} (wrong in {int(bad.sum())} of {bad.size} channels)"
                             + (f"; {hint}" if hint else ""))


def check_w8a8_leaf(name: str, got, leaf, x, weights: str, acts: str, path: str, x_absmax=None, mask=None) -> None:
    """A W8A8 leaf's output ``got`` on ``(x, mask)`` against ``minisq.quantize_linear(leaf, weights,
    acts, x_absmax, path)``'s, within 1e-5 relative plus 1e-6 · max|y|; names a left-out bias, one
    per-tensor scale for the whole batch instead of one per sequence, and padding that set a scale."""
    # [..., T, C_out] float, Linear [C_in, C_out], [..., T, C_in] float, ..., [..., T] | None -> None
    from ..qlinear import quantize_linear
    from .asserts import assert_close

    want = np.asarray(to_numpy(quantize_linear(leaf, weights, acts, x_absmax, path)(x, mask)))
    atol = 1e-6 * float(np.abs(want).max())
    got_np = np.asarray(to_numpy(got)) if hasattr(got, "shape") else got
    candidates = []
    if leaf.b is not None:
        candidates.append(("your leaf leaves out the bias: add leaf.b after scaling back (the epilogue's bias on "
                           "the int path, + b after the float matmul on the fake path)",
                           want - np.asarray(to_numpy(leaf.b))))
    if acts == "per_tensor" and np.ndim(x) >= 3:
        candidates.append(("yours uses one scale for the whole batch: per-tensor dynamic means one scale per "
                           "sequence, over its real tokens (minisq.quantize_per_sequence(x, mask) gives [B, 1, 1] "
                           "scales; each row of the flattened [B·T, C_in] codes takes its sequence's)",
                           quantize_linear(leaf, weights, "static", float(np.abs(x).max()), path)(x)))
    if mask is not None and acts == "per_tensor":
        candidates.append(("padding tokens set your scales: take each sequence's max over its real tokens only "
                           "(mask == 1), e.g. minisq.quantize_per_sequence(x, mask)",
                           quantize_linear(leaf, weights, acts, x_absmax, path)(x)))
    hint = ""
    if getattr(got_np, "shape", None) == want.shape:
        for why, v in candidates:
            v = np.asarray(to_numpy(v), np.float64)
            if np.all(np.abs(got_np.astype(np.float64) - v) <= 1e-5 * np.abs(v) + atol) and not np.allclose(
                    v, want, rtol=1e-5, atol=atol):
                hint = why
                break
    assert_close(name, got, want.astype(np.asarray(x).dtype), rtol=1e-5, atol=atol,
                 explain=hint or f"quantize x {acts}, then the {path} path (see the module docstring)")
