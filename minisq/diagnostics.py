"""Diagnostics: does model B compute what model A computes, and how far off is it?

* :func:`check_equivalence` runs two models on the same tokens (float64 by default) and
  reports the max absolute / relative difference of the logits and of every block's
  output, with a pass/fail against a tolerance.
* :func:`layer_errors` measures, for every linear, how much a quantization preset perturbs
  its output on real calibration inputs (SQNR in dB and relative error).
* :func:`sqnr_db` and :func:`logit_error` compare two arrays of outputs.

The course's grading assertions, built on these, are in :mod:`minisq.course.grading`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .backend import to_device, to_numpy
from .errors import CalibrationError, ConfigError
from .nn import log_softmax


@dataclasses.dataclass
class EquivalenceReport:
    """Differences between two models' outputs on the same input."""

    max_abs: float                 # max |logits_a - logits_b|
    max_rel: float                 # max_abs / max |logits_a|
    layers: dict                   # block name -> (max abs, max rel) of its output
    tol: float                     # relative tolerance the check used
    dtype: str

    @property
    def passed(self) -> bool:
        return self.max_rel <= self.tol

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        lines = [f"{verdict}: logits max abs diff {self.max_abs:.3e}, max rel diff {self.max_rel:.3e} "
                 f"(tolerance {self.tol:.0e} relative, {self.dtype})"]
        worst = max(self.layers.items(), key=lambda kv: kv[1][1], default=None)
        if worst:
            lines.append(f"  worst block output: {worst[0]} rel diff {worst[1][1]:.3e}")
        return "\n".join(lines)


def _rel(a: np.ndarray, b: np.ndarray) -> tuple:
    diff = float(np.abs(a - b).max())
    return diff, diff / max(float(np.abs(a).max()), 1e-300)


def check_equivalence(model_a, model_b, input_ids, attention_mask=None, dtype="float64",
                      tol: float = 1e-10) -> EquivalenceReport:
    """Run both models in ``dtype`` on ``input_ids`` and compare logits and block outputs.

    ``tol`` bounds the relative logits difference ``max|a - b| / max|a|``. For quantized
    models the dtype is applied to the activations (their int8 weights stay int8).
    """
    ids = np.asarray(to_numpy(input_ids))
    outs = []
    for model in (model_a, model_b):
        m = _in_dtype(model, dtype)
        trace: list = []
        logits, _ = m.forward(ids, attention_mask, trace=trace)
        outs.append((to_numpy(logits), {name: to_numpy(h) for name, h in trace}))
    (la, ta), (lb, tb) = outs
    if la.shape != lb.shape:
        raise ConfigError(f"the models give logits of different shapes {la.shape} and {lb.shape}")
    layers = {name: _rel(ta[name], tb[name]) for name in ta if name in tb}
    max_abs, max_rel = _rel(la, lb)
    return EquivalenceReport(max_abs, max_rel, layers, tol, str(np.dtype(dtype)))


def _in_dtype(model, dtype):
    if model.dtype == np.dtype(dtype):
        return model
    if model.info.get("quantization"):
        raise ConfigError(f"a quantized model runs in the dtype it was quantized in ({model.dtype}); "
                          f"quantize a {dtype} model to compare in {dtype}")
    return model.astype(dtype)


def sqnr_db(reference, approx) -> float:
    """Signal-to-quantization-noise ratio, ``10 log10(Σ ref² / Σ (ref - approx)²)`` in dB."""
    ref = np.asarray(to_numpy(reference), np.float64)
    err = ref - np.asarray(to_numpy(approx), np.float64)
    noise = float((err * err).sum())
    return float("inf") if noise == 0 else 10.0 * np.log10(float((ref * ref).sum()) / noise)


def layer_errors(model, stats, preset: str = "O1", weights: str | None = None, acts: str | None = None) -> dict:
    """Per-linear quantization diagnostic on calibration inputs.

    For every linear with kept samples X (``calibrate(..., keep_samples=n)``), compares the
    float output ``leaf(X)`` with the W8A8 output under ``preset`` (or explicit
    ``weights``/``acts``). Returns ``{name: {"sqnr_db": .., "rel_err": ..}}``. Run it on the
    plain and on the smoothed model (each with its own stats) to see what smoothing buys.
    """
    from .qlinear import PRESETS, quantize_linear

    if not stats.samples:
        raise CalibrationError("layer_errors needs input samples: calibrate(model, batches, keep_samples=256)")
    cfg = dict(PRESETS[preset]) if preset else {}
    cfg.update({k: v for k, v in dict(weights=weights, acts=acts).items() if v is not None})
    out = {}
    for name, leaf in model.linears().items():
        if name not in stats.samples:
            continue
        x = to_device(stats.samples[name].astype(model.dtype), model.device)
        y = to_numpy(leaf(x))
        q = quantize_linear(leaf, cfg["weights"], cfg["acts"], stats.input_absmax.get(name), path="fake")
        yq = to_numpy(q(x))
        out[name] = dict(sqnr_db=sqnr_db(y, yq), rel_err=float(np.linalg.norm(y - yq) / max(np.linalg.norm(y), 1e-300)))
    return out


def logit_error(reference_logits, logits) -> dict:
    """How far quantized logits are from float ones: relative error and mean KL(p_ref || p)."""
    a = np.asarray(to_numpy(reference_logits), np.float64)
    b = np.asarray(to_numpy(logits), np.float64)
    la, lb = log_softmax(a), log_softmax(b)
    kl = float((np.exp(la) * (la - lb)).sum(-1).mean())
    return dict(rel_err=float(np.linalg.norm(a - b) / np.linalg.norm(a)), kl=kl)
