"""Calibration: run the float model over sample text and record what flows into every linear.

Legend: N calibration tokens (all sequences together), C_in a linear's input width.

For every linear leaf ``name`` the statistics hold

* ``channel_absmax[name]`` ``[C_in]``: max over the N tokens of |x[:, k]| — the per-channel
  activation range ``max|X_j|`` in SmoothQuant's ``s_j = max|X_j|^α / max|W_j|^(1-α)``;
* ``input_absmax[name]`` and ``output_absmax[name]``: per-tensor max |x| and max |y|, for
  static (O3) activation scales ``Δ = max|x| / 127``;
* ``output_channel_absmax[name]`` ``[C_out]``: max |y[:, j]| per output channel, from which
  the static scales of attention's q, k and v come (GPT-2's fused ``c_attn`` holds all three);
* ``channel_min[name]`` and ``channel_max[name]`` ``[C_in]``: the signed per-channel extremes
  of the input, whose difference is llm-compressor's activation range (:mod:`minisq.conventions`);
* optionally the first ``keep_samples`` input rows ``[n, C_in]``, for the α search and the
  per-layer quantization diagnostics.

Calibration *wraps* the linear leaves with an observer (:class:`Observed`) instead of
hooking into the forward pass, so it works unchanged for every architecture. Only real
tokens count: the observer drops the rows that the forward pass marks as padding. The paper
calibrates on 512 random sentences of the Pile validation set; minisq defaults to
WikiText-2 text, since any real English text serves to find activation ranges.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
from pathlib import Path

import numpy as np

from .backend import to_numpy
from .errors import CalibrationError
from .families import FAMILIES, family_for
from .layerwise import apply_layer, forward_layerwise
from .progress import progress as show_progress
from .tree import _map

_FORMAT = "minisq-calibration-v1"

# Where attention's q, k and v come from, per model_type (each family's QKV_OUTPUTS):
# (leaf name, part, parts) — the output of leaf ``name`` cut into ``parts`` equal pieces
# along C_out, piece ``part``.
QKV_OUTPUTS = {model_type: family.QKV_OUTPUTS for model_type, family in FAMILIES.items()}


@dataclasses.dataclass
class CalibrationStats:
    """Per-linear activation ranges of one model (see the module docstring)."""

    channel_absmax: dict           # name -> [C_in] float64
    input_absmax: dict             # name -> float
    output_absmax: dict            # name -> float
    samples: dict                  # name -> [n, C_in] float32 (may be empty)
    n_tokens: int
    signature: dict                # name -> [C_in, C_out]; plus "model_type"
    output_channel_absmax: dict = dataclasses.field(default_factory=dict)   # name -> [C_out] float64
    channel_min: dict = dataclasses.field(default_factory=dict)             # name -> [C_in] float64
    channel_max: dict = dataclasses.field(default_factory=dict)             # name -> [C_in] float64

    def input_absmax_of(self, name: str) -> float:
        """max |x| over the calibration tokens of leaf ``name``'s input."""
        self.check_observed(name)
        return self.input_absmax[name]

    def check_observed(self, name: str) -> None:
        """CalibrationError when no calibration token reached leaf ``name`` (an expert of a
        mixture of experts that no token was routed to)."""
        if name not in self.channel_absmax:
            raise CalibrationError(f"these stats hold no input range of {name!r}: no calibration token reached it "
                                   "(an expert no token was routed to? calibrate on more text), or they were taken "
                                   "on another model or layer (calibrate the one that holds it)")

    def qkv_absmax(self, model, layer: int) -> tuple:
        """Calibrated ``(max|q|, max|k|, max|v|)`` of layer ``layer``'s q, k, v projection
        outputs, read from ``QKV_OUTPUTS`` (which leaf, which part of its output)."""
        out = []
        family = family_for(model.config)
        for which, (template, part, parts) in enumerate(family.QKV_OUTPUTS):
            name = template.format(i=layer)
            ch = self.output_channel_absmax.get(name)
            if ch is None:
                raise CalibrationError(
                    f"these stats have no per-channel output ranges for {name!r} (calibrated by an older "
                    "minisq?): recalibrate with minisq.calibrate to use static attention scales"
                )
            width = len(ch) // parts
            out.append(family.attention_input_absmax(model.config, which, ch[part * width:(part + 1) * width]))
        return tuple(out)

    def check_matches(self, model) -> None:
        """Raise CalibrationError unless these stats were taken on a model of this shape."""
        theirs = signature(model)
        if theirs != self.signature:
            if theirs.get("smoothing") != self.signature.get("smoothing"):
                raise CalibrationError(
                    "these calibration stats were taken on the model before (or with other) smoothing; "
                    "smoothing changes every smoothed layer's inputs: calibrate the smoothed model itself "
                    "(stats = minisq.calibrate(smoothed, batches))"
                )
            missing = sorted(set(theirs) - set(self.signature))
            differ = sorted(k for k in set(theirs) & set(self.signature) if theirs[k] != self.signature[k])
            detail = (f"layers without stats: {missing[:3]}" if missing else
                      f"layer {differ[0]!r} is {theirs[differ[0]]} in the model but {self.signature[differ[0]]} "
                      f"in the stats" if differ else "the stats have layers the model lacks")
            raise CalibrationError(
                f"these calibration stats come from another model ({detail}); "
                "run minisq.calibrate on this model"
            )

    def save(self, path) -> Path:
        """Write the stats to an ``.npz`` file."""
        path = Path(path)
        arrays = {f"channel/{k}": v for k, v in self.channel_absmax.items()}
        arrays.update({f"sample/{k}": v for k, v in self.samples.items()})
        arrays.update({f"outchannel/{k}": v for k, v in self.output_channel_absmax.items()})
        arrays.update({f"chmin/{k}": v for k, v in self.channel_min.items()})
        arrays.update({f"chmax/{k}": v for k, v in self.channel_max.items()})
        meta = dict(format=_FORMAT, input_absmax=self.input_absmax, output_absmax=self.output_absmax,
                    n_tokens=self.n_tokens, signature=self.signature)
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        with open(path, "wb") as f:
            np.savez(f, **arrays)
        return path

    @classmethod
    def load(cls, path, model=None) -> "CalibrationStats":
        """Read stats written by :meth:`save`; with ``model``, check they belong to it."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                channel = {k[len("channel/"):]: z[k] for k in z.files if k.startswith("channel/")}
                samples = {k[len("sample/"):]: z[k] for k in z.files if k.startswith("sample/")}
                out_ch = {k[len("outchannel/"):]: z[k] for k in z.files if k.startswith("outchannel/")}
                ch_min, ch_max = ({k[6:]: z[k] for k in z.files if k.startswith(tag)} for tag in ("chmin/", "chmax/"))
        except FileNotFoundError:
            raise CalibrationError(f"calibration file {path} not found") from None
        except Exception as exc:  # zip, JSON, key errors: a damaged or foreign file
            raise CalibrationError(f"{path} is not a minisq calibration file ({type(exc).__name__}: {exc})") from None
        if meta.get("format") != _FORMAT:
            raise CalibrationError(f"{path} is not a minisq calibration file (format {meta.get('format')!r})")
        signature_ = {k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["signature"].items()}
        stats = cls(channel, meta["input_absmax"], meta["output_absmax"], samples, meta["n_tokens"], signature_,
                    out_ch, ch_min, ch_max)
        if model is not None:
            stats.check_matches(model)
        return stats


def signature(model) -> dict:
    """What calibration stats must match: the model type, every linear's shape, and which
    smoothing was applied (a smoothed model's inputs differ from the float model's, so its
    static scales must come from calibrating it, not the model it was smoothed from)."""
    sig = {name: (leaf.in_features, leaf.out_features) for name, leaf in model.linears().items()}
    sig["model_type"] = model.config.model_type
    sig["smoothing"] = _smoothing_fingerprint(model)
    return sig


def _smoothing_fingerprint(model) -> str | None:
    factors = model.info.get("smoothing", {}).get("factors")
    if not factors:
        return None
    digest = hashlib.sha256()
    for name in sorted(factors):
        digest.update(name.encode())
        digest.update(np.asarray(to_numpy(factors[name]), np.float64).tobytes())
    return digest.hexdigest()[:16]


class Recorder:
    """Accumulates the statistics of every observed leaf (see :class:`Observed`)."""

    def __init__(self, keep_samples: int):
        self.keep = keep_samples
        self.channel, self.inp, self.out, self.out_channel, self.samples = {}, {}, {}, {}, {}
        self.lo, self.hi = {}, {}

    def record(self, name: str, x, y, mask=None) -> None:
        # [..., C_in], [..., C_out] (NumPy or CuPy), [...] 0/1 -> updated running maxima
        x2 = to_numpy(x).reshape(-1, x.shape[-1])                       # [N, C_in]
        y2 = to_numpy(y).reshape(-1, y.shape[-1])                       # [N, C_out]
        if mask is not None:                                            # real tokens only
            real = to_numpy(mask).reshape(-1) > 0
            x2, y2 = x2[real], y2[real]
            if x2.shape[0] == 0:
                return
        if not np.isfinite(x2).all():
            raise CalibrationError(
                f"non-finite activations (NaN/inf) flow into layer {name!r}: the model or its inputs "
                "overflow (e.g. float16); calibrate in float32"
            )
        lo, hi = x2.min(axis=0).astype(np.float64), x2.max(axis=0).astype(np.float64)     # [C_in] signed
        ax = np.abs(np.maximum(hi, -lo))                                # [C_in] max|x| (abs: never -0.0)
        ay = np.abs(y2).max(axis=0).astype(np.float64)                  # [C_out]
        prev = self.channel.get(name)
        self.channel[name] = ax if prev is None else np.maximum(prev, ax)
        prev = self.out_channel.get(name)
        self.out_channel[name] = ay if prev is None else np.maximum(prev, ay)
        self.lo[name] = lo if name not in self.lo else np.minimum(self.lo[name], lo)
        self.hi[name] = hi if name not in self.hi else np.maximum(self.hi[name], hi)
        self.inp[name] = max(self.inp.get(name, 0.0), float(ax.max()))
        self.out[name] = max(self.out.get(name, 0.0), float(ay.max()))
        if self.keep:
            have = self.samples.get(name)
            n = 0 if have is None else have.shape[0]
            if n < self.keep:
                take = x2[: self.keep - n].astype(np.float32)
                self.samples[name] = take if have is None else np.concatenate([have, take])

    def stats(self, n_tokens: int, signature_: dict) -> "CalibrationStats":
        """What was recorded, as :class:`CalibrationStats`."""
        return CalibrationStats(self.channel, self.inp, self.out, self.samples, n_tokens, signature_,
                                self.out_channel, self.lo, self.hi)


@dataclasses.dataclass(frozen=True, eq=False)
class Observed:
    """A linear leaf wrapped to record its input/output ranges; computes exactly as ``leaf``."""

    leaf: object
    name: str
    recorder: Recorder

    in_features = property(lambda self: self.leaf.in_features)
    out_features = property(lambda self: self.leaf.out_features)

    def __call__(self, x, mask=None):
        y = self.leaf(x, mask)
        self.recorder.record(self.name, x, y, mask)
        return y


def observe(tree, recorder: Recorder, prefix: str = ""):
    """A new parameter (sub)tree whose linear leaves record into ``recorder`` under their
    dotted names (``prefix`` is the subtree's own name, e.g. ``"h.3"`` for one layer)."""
    return _map(tree, lambda name, leaf: Observed(leaf, name, recorder), f"{prefix}." if prefix else "")


def calibrate_layer(outer, i: int, layer, xs: list, inputs) -> CalibrationStats:
    """The statistics of decoder layer ``i``'s linears (its parameters ``layer``) over every
    batch's hidden states ``xs``, which move on through the layer (see
    :func:`minisq.layerwise.apply_layer`). What :func:`calibrate` records for these leaves,
    one layer at a time: the streamed driver (:func:`minisq.quantize_checkpoint`) calls it."""
    recorder = Recorder(0)
    apply_layer(outer, i, observe(layer, recorder, outer.family.LAYER_PREFIX.format(i=i)), xs, inputs)
    return recorder.stats(sum(int(inp.new_mask.sum()) for inp in inputs), {})


def as_sequences(model, batches) -> list:
    """The calibration batches (texts, or id arrays ``[T]`` / ``[B, T]``) as a list of
    id arrays ``[B, T]``, each run on its own (no padding); empty ones are dropped."""
    if isinstance(batches, (str, np.ndarray)) or hasattr(batches, "__array__"):
        batches = [batches]
    if batches is None or isinstance(batches, (bytes, dict)) or not hasattr(batches, "__iter__"):
        raise CalibrationError(f"the calibration set (calib) must be texts or token-id arrays, got "
                               f"{type(batches).__name__}")
    seqs = []
    for item in batches:
        if item is None or isinstance(item, (bytes, dict, numbers.Number)):
            raise CalibrationError(f"a calibration batch must be a text or a token-id array, got "
                                   f"{type(item).__name__}")
        if isinstance(item, str):
            if model.tokenizer is None:
                raise CalibrationError("text calibration batches need the model's tokenizer; pass token ids")
            ids = np.asarray(model.tokenizer.encode(item), dtype=np.int64)[: model.config.max_positions]
        else:
            ids = np.asarray(to_numpy(item))
        if ids.size == 0:
            continue
        seqs.append(ids[None] if ids.ndim == 1 else ids)
    if not seqs:
        raise CalibrationError("the calibration set is empty: pass at least one non-empty text or id array")
    return seqs


def calibrate(model, batches, progress: bool = True, keep_samples: int = 0) -> CalibrationStats:
    """Run ``model`` over ``batches`` (texts, or id arrays ``[T]``/``[B, T]``) and return the
    activation ranges of every linear layer's input (and output).

    Each batch runs on its own, unpadded, so padding never enters the statistics. A lazy
    (memory-mapped) model runs layer-outer: each layer over every batch before the next is
    read, holding one layer and every batch's activations.
    ``keep_samples`` > 0 also keeps that many input rows per layer.
    """
    seqs = as_sequences(model, batches)
    recorder = Recorder(keep_samples)
    observed = model.evolve(params=observe(model.params, recorder))
    n_tokens = sum(int(ids.size) for ids in seqs)
    if model.lazy:   # memory-mapped: every layer over every sequence, each layer read once
        for _ in forward_layerwise(observed, [(ids, None) for ids in seqs], progress, "calibrating"):
            pass
    else:
        for ids in show_progress(seqs, progress, "calibrating"):
            observed(ids)
    return recorder.stats(n_tokens, signature(model))

