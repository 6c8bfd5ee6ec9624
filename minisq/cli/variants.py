"""The variants the programs compare, and one way to build and evaluate each.

:data:`VARIANTS` is the one table: the float model, W8A8 with and without smoothing
(the paper's Table 2 presets O1/O2/O3 and naive), and the paper's baselines. ``minisq demo``
runs every row; ``minisq reproduce`` and the demo on a lazy model run :data:`CORE`, the
rows :func:`minisq.quantize_checkpoint` can write layer by layer.

:class:`Builder` makes a row's model from one float model: eagerly with
:func:`minisq.smooth` and :func:`minisq.quantize`, or, for a lazy (memory-mapped) model,
streamed layer by layer into a folder by :func:`minisq.quantize_checkpoint` and loaded from
there (bit for bit the same model). :func:`evaluate` gives a model's perplexity and LAMBADA
accuracy.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from .. import BASELINES, PRESETS, calibrate, lambada_accuracy, load, perplexity, quantize, quantize_checkpoint, smooth
from ..baselines import largest_group_size
from ..errors import ConfigError
from ..qlinear import DEFAULT_SKIP


@dataclasses.dataclass(frozen=True)
class Variant:
    label: str          # the row's name
    smoothed: bool      # smoothed (α) before quantizing?
    preset: str         # minisq.quantize's preset; "float": the float model; "custom": options only
    options: dict = dataclasses.field(default_factory=dict)   # more minisq.quantize options
    short: str = ""     # the row's name beside the paper's in `minisq reproduce` (default: label)

    def granularity(self) -> tuple[str, str]:
        """``(weights, acts)``: how the row quantizes weights and activations."""
        if self.preset == "float":
            return "fp32", "fp32"
        cfg = {**PRESETS, **BASELINES}.get(self.preset, dict(weights="per_channel", acts="per_token"))
        return self.options.get("weights", cfg["weights"]), self.options.get("acts", cfg["acts"])


VARIANTS = {
    "fp32": Variant("FP32 (float)", False, "float", short="FP32 (CPU; paper: FP16)"),
    "naive": Variant("W8A8 naive (= O2 without smoothing)", False, "naive", short="W8A8 naive"),
    "O1-unsmoothed": Variant("W8A8 O1 without smoothing", False, "O1"),
    "O3-unsmoothed": Variant("W8A8 O3 without smoothing", False, "O3"),
    "O1": Variant("SmoothQuant-O1", True, "O1"),
    "O2": Variant("SmoothQuant-O2", True, "O2"),
    "O3": Variant("SmoothQuant-O3", True, "O3"),
    # the paper's baselines (Tables 1 and 4, minisq.baselines), and an int8 KV cache
    "per-channel": Variant("W8A8 per-channel acts (fake, no GEMM)", False, "custom",
                           dict(acts="per_channel", path="fake")),
    "w8a16": Variant("W8A16 (weight-only INT8)", False, "w8a16"),
    "zeroquant": Variant("ZeroQuant (group W, per-token A)", False, "zeroquant"),
    "llm.int8": Variant("LLM.int8() (threshold 6)", False, "llm.int8"),
    "O3-kv8": Variant("SmoothQuant-O3 + INT8 KV cache", True, "O3", dict(kv_cache="int8")),
}
# The float row and the rows quantize_checkpoint writes layer by layer: all a lazy model gets.
CORE = ("fp32", "naive", "O1", "O2", "O3")


def smoothing_groups(model) -> tuple:
    """The official code's LayerNorm mappings; for post-LN OPT (opt-350m), where folding into
    a LayerNorm is not an equivalence, the two in-block mappings instead."""
    return model.family.default_groups(model.config)


class Builder:
    """Builds the variants of one float model on demand. The float model's calibration, the
    smoothed model and its calibration are each computed once, when a variant first needs
    them (a calibration only for static activation scales).

    What it holds: the float model, at most one smoothed copy and the two calibrations
    (with ``keep_samples`` raw rows per leaf); a variant's model belongs to the caller.
    """

    def __init__(self, model, folder, calib, alpha: float, attn_bmm=False, keep_samples: int = 0,
                 progress: bool = False):
        self.model, self.folder, self.calib, self.alpha = model, folder, calib, alpha
        self.attn_bmm, self.keep_samples, self.progress = attn_bmm, keep_samples, progress
        self._stats = self._smoothed = self._s_stats = None

    def with_alpha(self, alpha: float) -> Builder:
        """The same builder at another α, sharing the float model's calibration."""
        other = Builder(self.model, self.folder, self.calib, alpha, self.attn_bmm, self.keep_samples, self.progress)
        other._stats = self._stats
        return other

    def stats(self):
        """The float model's calibration."""
        if self._stats is None:
            self._stats = calibrate(self.model, self.calib, progress=self.progress, keep_samples=self.keep_samples)
        return self._stats

    def smoothed(self):
        """The float model smoothed at α, with the model family's default groups."""
        if self._smoothed is None:
            self._smoothed = smooth(self.model, self.stats(), alpha=self.alpha, groups=smoothing_groups(self.model))
        return self._smoothed

    def smoothed_stats(self):
        """The smoothed model's calibration (what its static scales come from)."""
        if self._s_stats is None:
            self._s_stats = calibrate(self.smoothed(), self.calib, progress=self.progress,
                                      keep_samples=self.keep_samples)
        return self._s_stats

    def options(self, key: str) -> dict:
        """The :func:`minisq.quantize` options of a row beyond its preset: ZeroQuant's group is
        its 128 or the largest power of two dividing every quantized C_in."""
        opts = dict(VARIANTS[key].options)
        if VARIANTS[key].preset == "zeroquant":
            opts["group_size"] = largest_group_size(self.model, 128, skip=DEFAULT_SKIP)
        return opts

    def build(self, key: str, work: Path | None = None):
        """The row's model: the float model itself, quantized in memory, or, for a lazy model,
        streamed into the folder ``work`` and loaded (see :meth:`streamed`)."""
        v = VARIANTS[key]
        if v.preset == "float":
            return self.model
        if self.model.lazy:
            return self.streamed(key, work)
        opts = self.options(key)
        static = v.granularity()[1] == "static"
        base = self.smoothed() if v.smoothed else self.model
        stats = (self.smoothed_stats() if v.smoothed else self.stats()) if static else None
        return quantize(base, None if v.preset == "custom" else v.preset, stats=stats, attn_bmm=self.attn_bmm, **opts)

    def streamed(self, key: str, work: Path):
        """The row's model written layer by layer by :func:`minisq.quantize_checkpoint` into
        ``work`` (a finished run of the same arguments there is a no-op; an unfinished one
        resumes) and loaded from it. Holds one float layer at a time, then the int8 model."""
        v = VARIANTS[key]
        if v.preset not in PRESETS or v.options:
            raise ConfigError(f"{v.label!r} cannot be made from a lazy model: minisq.quantize_checkpoint writes "
                              f"SmoothQuant's presets {sorted(PRESETS)} only; load the model eagerly for this row")
        quantize_checkpoint(self.folder, work, self.calib, preset=v.preset, alpha=self.alpha, smooth=v.smoothed,
                            groups=smoothing_groups(self.model), attn_bmm=self.attn_bmm, progress=self.progress)
        return load(work)


def evaluate(model, data, metric: str = "last_word", progress: bool = False) -> dict:
    """WikiText-2 perplexity (``data.eval_ids`` in windows of ``data.seq_len``) and LAMBADA
    accuracy (None without passages) of one model, and the seconds they took."""
    t0 = time.perf_counter()
    ppl = perplexity(model, data.eval_ids, seq_len=data.seq_len, progress=progress)
    acc = lambada_accuracy(model, data.passages, progress=progress, metric=metric) if data.passages else None
    return dict(perplexity=ppl, lambada_acc=acc, seconds=time.perf_counter() - t0)
