"""Assignment 4 written from HANDOUT.md alone (see README.md here)."""

import dataclasses
import fnmatch

import numpy as np

from minisq import (dequant_epilogue, dequantize, int8_gemm, quantize_per_channel, quantize_per_sequence,
                    quantize_per_tensor, quantize_per_token)

QMAX = 127
WEIGHT_QUANTIZERS = {"per_channel": quantize_per_channel, "per_tensor": quantize_per_tensor}
ACTS = ("per_token", "per_tensor", "static")


def calibrate_channel_absmax(model, batches):
    if not batches:
        raise ValueError("no batches")
    seen = {}

    def wrap(name, leaf):
        def call(x, mask=None):
            m = np.abs(x).reshape(-1, x.shape[-1]).max(axis=0).astype(np.float64)
            seen[name] = m if name not in seen else np.maximum(seen[name], m)
            return leaf(x, mask)
        return call

    wrapped = model.replace_linears(wrap)
    for ids in batches:
        wrapped(np.asarray(ids))
    return seen


def static_scale(channel_absmax, dtype=np.float32):
    a = np.asarray(channel_absmax, np.float64)
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise ValueError("ranges must be finite and >= 0")
    scale = np.asarray(a.max(), dtype) / np.asarray(QMAX, dtype)     # cast first, divide in dtype
    if scale < np.finfo(dtype).tiny:
        scale = np.ones((), dtype)
    return np.asarray(scale, dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class QLinear:
    w_q: np.ndarray
    w_scale: np.ndarray
    b: object = None
    acts: str = "per_token"
    x_scale: object = None
    path: str = "int"

    @property
    def in_features(self) -> int:
        return self.w_q.shape[0]

    @property
    def out_features(self) -> int:
        return self.w_q.shape[1]

    def __call__(self, x, mask=None):
        if self.acts == "per_token":
            x_q, x_s = quantize_per_token(x)                       # [..., T, 1]
        elif self.acts == "per_tensor":
            x_q, x_s = quantize_per_sequence(x, mask)              # one scale per sequence
        else:
            x_q, x_s = quantize_per_tensor(x, self.x_scale)        # the static scale
        x_q = x_q.reshape(-1, self.in_features)
        if np.ndim(x_s) > 0:                                       # one scale per flattened row
            x_s = np.broadcast_to(x_s, x.shape[:-1] + (1,)).reshape(-1, 1)
        w_s = self.w_scale.astype(x.dtype)
        if self.path == "int":
            y = dequant_epilogue(int8_gemm(x_q, self.w_q), x_s, w_s, self.b, out_dtype=x.dtype)
        else:
            y = dequantize(x_q, x_s) @ dequantize(self.w_q, w_s)
            if self.b is not None:
                y = y + self.b
        return y.reshape(x.shape[:-1] + (self.out_features,))


def quantize_leaf(leaf, weights="per_channel", acts="per_token", x_scale=None, path="int"):
    if weights not in WEIGHT_QUANTIZERS or acts not in ACTS or path not in ("int", "fake"):
        raise ValueError("unknown choice")
    if acts == "static" and x_scale is None:
        raise ValueError("static needs x_scale")
    w_q, w_s = WEIGHT_QUANTIZERS[weights](leaf.w)
    return QLinear(w_q, w_s, leaf.b, acts, x_scale, path)


def quantize_model(model, weights="per_channel", acts="per_token", channel_absmax=None, path="int",
                   skip=("lm_head",)):
    if acts == "static" and channel_absmax is None:
        raise ValueError("static needs channel_absmax")

    def replace(name, leaf):
        if any(fnmatch.fnmatchcase(name, pat) for pat in skip):
            return leaf
        scale = static_scale(channel_absmax[name], leaf.w.dtype) if acts == "static" else None
        return quantize_leaf(leaf, weights, acts, scale, path)

    return model.replace_linears(replace, quantization={"weights": weights, "acts": acts, "path": path,
                                                         "skip": list(skip)})
