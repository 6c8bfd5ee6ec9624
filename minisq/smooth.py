"""Smoothing: migrate activation outliers into the weights (SmoothQuant Section 4, Eq. 3-4).

Legend: C_in the input width of the smoothed linears, one factor s_j per input channel j.

    Y = (X diag(s)^-1) (diag(s) W),     s_j = max|X_j|^α / max|W_j|^(1-α)

The division of X by s is never a separate operation: it is folded into whatever produces
X (a LayerNorm's gain and bias, or the output columns of the linear before), and the
multiplication goes into the rows of the linears that consume X. Both are exact in real
arithmetic, so in float64 the smoothed model computes the same function to ~1e-15.

What may be folded into what is data — :data:`SMOOTHING_TABLE`, gathered from each family's
module in :mod:`minisq.families` — so a reader sees it at a glance. ``{i}`` is the layer index.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import checks
from .backend import get_array_module, to_numpy
from .conventions import activation_range, llmcompressor_factors, llmcompressor_groups
from .errors import CalibrationError, ConfigError
from .families import FAMILIES, family_for
from .families.base import Mapping  # noqa: F401  (the row type, public here)
from .nn import Linear
from .tree import get_param, replace_param

# Each family's rows (minisq/families/<family>.py: SMOOTHING, NOT_FOLDABLE), by model_type.
SMOOTHING_TABLE = {model_type: family.SMOOTHING for model_type, family in FAMILIES.items()}

# Places one might try to smooth that are NOT equivalences, and why.
NOT_FOLDABLE = {model_type: family.NOT_FOLDABLE for model_type, family in FAMILIES.items()}

DEFAULT_GROUPS = ("ln_qkv", "ln_fc1")  # what the official SmoothQuant code smooths


def smoothing_factors(act_max, w_max, alpha: float):
    """``s_j = max|X_j|^α / max|W_j|^(1-α)`` for one group of smoothed linears (Eq. 4).

    ``act_max`` ``[C_in]`` per-channel activation range, ``w_max`` ``[C_in]`` per-input-channel
    weight range (max over all output columns of all targets). As in the paper's code, the
    weight range is clamped to ≥ 1e-5 and s to ≥ 1e-5; channels whose activation range is 0
    get s = 1 (nothing to migrate, and 0^α would zero out the channel).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    xp = get_array_module(act_max)
    a = xp.asarray(act_max, dtype=xp.float64)
    w = xp.maximum(xp.asarray(w_max, dtype=xp.float64), 1e-5)
    if a.shape != w.shape or a.ndim != 1:
        raise ConfigError(f"act_max {a.shape} and w_max {w.shape} must both be [C_in]")
    if not (xp.isfinite(a).all() and xp.isfinite(w).all()):
        raise CalibrationError("activation or weight ranges hold NaN/inf; recalibrate in float32")
    s = xp.maximum(a ** alpha / w ** (1.0 - alpha), 1e-5)
    return xp.where(a > 0, s, 1.0)


def resolve_groups(config, groups=None) -> tuple:
    """The names of the smoothing groups ``groups`` selects for this model: ``None`` or
    ``"default"`` the official code's (:data:`DEFAULT_GROUPS`), ``"all"`` every row of the
    family's table, one group's name, or any sequence of names. ConfigError for a name the
    family does not have."""
    table = family_for(config).SMOOTHING
    known = tuple(dict.fromkeys(m.group for m in table))
    if groups is None or (isinstance(groups, str) and groups == "default"):
        groups = DEFAULT_GROUPS
    elif isinstance(groups, str):
        groups = known if groups == "all" else (groups,)
    try:
        groups = tuple(groups)
    except TypeError:
        raise ConfigError(f"groups must be 'default', 'all' or a sequence of group names, got {groups!r}") from None
    unknown = [g for g in groups if g not in known]
    if unknown:
        raise ConfigError(f"unknown smoothing groups {unknown} for {config.model_type}; "
                          f"this architecture has {sorted(known)}")
    return groups


def smoothing_rows(config, groups=None) -> list:
    """The rows of the family's table (``{i}`` not filled in) that ``groups`` selects and that
    are equivalences for this config; the others are left out with a warning."""
    family = family_for(config)
    groups = resolve_groups(config, groups)
    chosen = [m for m in family.SMOOTHING if m.group in groups]
    return family.foldable(config, chosen)   # e.g. post-LN OPT: no LayerNorm rows (with a warning)


def layer_mapping(row: Mapping, i: int) -> Mapping:
    """A table row with the layer index ``i`` filled in."""
    return dataclasses.replace(row, source=row.source.format(i=i), targets=tuple(t.format(i=i) for t in row.targets))


def mappings_for(config, groups=DEFAULT_GROUPS) -> list:
    """The concrete mappings (layer index filled in) of ``groups`` for this model, layer by
    layer (see :func:`resolve_groups`).

    Mappings that would not be equivalences for this config are left out with a warning.
    """
    rows = smoothing_rows(config, groups)
    return [layer_mapping(m, i) for i in range(config.num_layers) for m in rows]


def _float_leaf(params, name: str) -> Linear:
    leaf = get_param(params, name)
    if not isinstance(leaf, Linear):
        raise ConfigError(f"layer {name!r} is {type(leaf).__name__}, not a float Linear: smooth before quantizing")
    return leaf


def weight_absmax(params, targets) -> np.ndarray:
    """``max|W_j|`` per input channel j over all targets' output columns: ``[C_in]``."""
    maxima = [to_numpy(abs(_float_leaf(params, t).w).max(axis=1)) for t in targets]
    return np.max(np.stack(maxima), axis=0)


def smooth(model, stats, alpha=0.5, groups=DEFAULT_GROUPS, convention: str = "smoothquant"):
    """A new, smoothed model that computes the same function as ``model``.

    ``stats`` come from :func:`minisq.calibrate` on ``model``. ``alpha`` is one float, or a
    dict ``{source name: α}`` (e.g. from :func:`minisq.search_alpha`) with a default under
    ``"*"``. ``groups`` picks rows of :data:`SMOOTHING_TABLE` (:func:`resolve_groups`:
    ``"default"``, ``"all"``, or names). Each layer is smoothed by :func:`smooth_layer`.
    ``convention="llm-compressor"`` computes the factors by llm-compressor's definitions and,
    with the default ``groups``, smooths its mappings (:mod:`minisq.conventions`).
    The factors used are kept in ``model.info["smoothing"]["factors"]``.
    """
    if convention not in FACTORS:
        raise ConfigError(f"convention={convention!r} is not one of {tuple(FACTORS)}")
    if convention == "llm-compressor" and groups == DEFAULT_GROUPS:
        groups = llmcompressor_groups(model.config)
    if model.info.get("quantization"):
        raise ConfigError("smooth the float model, then quantize it (this model is already quantized)")
    if model.lazy:
        raise ConfigError("a lazy (memory-mapped) model is smoothed layer by layer by minisq.quantize_checkpoint; "
                          "to smooth it in memory, load it with lazy=False")
    alpha = checks.alpha(alpha)
    stats.check_matches(model)
    if model.stored:   # float16/bfloat16 weights: smooth in the compute dtype (exact, and held in memory)
        model = model.astype(model.dtype).evolve(info=model.info)
    groups = resolve_groups(model.config, groups)
    rows = smoothing_rows(model.config, groups)
    params, factors = model.params, {}
    for i in range(model.config.num_layers):
        prefix = model.family.LAYER_PREFIX.format(i=i)
        layer, layer_factors = smooth_layer(model.config, i, get_param(params, prefix), stats, alpha, rows,
                                            convention)
        params = replace_param(params, prefix, layer)
        factors.update(layer_factors)
    info = {**smoothing_info(alpha, groups), "factors": factors,
            **({"convention": convention} if convention != "smoothquant" else {})}
    return model.evolve(params=params, info={**model.info, "smoothing": info})


def smoothing_info(alpha, groups: tuple) -> dict:
    """What ``model.info["smoothing"]`` records besides the factors: α and the groups."""
    return dict(alpha=alpha if not isinstance(alpha, dict) else dict(alpha), groups=list(groups))


def smooth_layer(config, i: int, layer, stats, alpha, rows, convention: str = "smoothquant") -> tuple:
    """Decoder layer ``i`` smoothed: ``(new layer parameters, {source name: s [C_in]})``.

    ``layer`` is the layer's parameter subtree (names relative to ``LAYER_PREFIX``), ``stats``
    any :class:`~minisq.calibrate.CalibrationStats` that holds this layer's inputs (of the
    whole model, or of this layer alone), ``rows`` from :func:`smoothing_rows`, ``convention``
    a key of :data:`FACTORS` (whose factor rule: the paper's, or llm-compressor's). The mappings
    are folded in table order, each computing its factors (Eq. 4, :func:`smoothing_factors`,
    with the grouped-query rule of ``_factors``) from the layer as the rows before it left it.
    The in-memory :func:`smooth` and the streamed :func:`minisq.quantize_checkpoint` both
    call it. What it holds in memory: one layer.
    """
    prefix = family_for(config).LAYER_PREFIX.format(i=i)
    factors = {}
    for row in rows:
        m = layer_mapping(row, i)
        local = _relative(m, prefix)                      # names inside the layer's subtree
        a = alpha.get(m.source, alpha.get("*", 0.5)) if isinstance(alpha, dict) else alpha
        stats.check_observed(m.targets[0])                                       # e.g. an expert no token reached
        w_max = weight_absmax(layer, local.targets)                                  # [C_in]
        s = FACTORS[convention](config, layer, local, stats, m.targets[0], w_max, a)  # [C_in] float64
        factors[m.source] = s
        layer = apply_smoothing(layer, local, s, config.head_dim)
    return layer, factors


def _relative(m: Mapping, prefix: str) -> Mapping:
    # a mapping of layer `prefix` with its names relative to the layer's subtree
    def cut(name):
        if not name.startswith(prefix + "."):
            raise ConfigError(f"smoothing row {m.group!r} names {name!r}, which is outside layer {prefix!r}")
        return name[len(prefix) + 1:]
    return dataclasses.replace(m, source=cut(m.source), targets=tuple(cut(t) for t in m.targets))


def _factors(config, params, mapping: Mapping, act_max, w_max, alpha: float):
    """Eq. 4 for one mapping: ``[C_in]`` factors of the targets' input channels.

    Under grouped-query attention (``v_proj -> o_proj`` with G < H heads) v_proj has G·D
    output channels and o_proj H·D input channels: o_proj's channel (h, d) reads kv channel
    (h // (H/G), d). One factor per kv channel is computed from the ranges of all the
    channels that read it (their max), and repeated for each of them.
    """
    if mapping.kind != "linear" or _float_leaf(params, mapping.source).out_features == len(act_max):
        return smoothing_factors(act_max, w_max, alpha)
    G, D = config.kv_heads, config.head_dim
    rep = config.num_heads // G                     # query heads per kv head
    group = lambda a: np.asarray(to_numpy(a)).reshape(G, rep, D).max(axis=1).reshape(-1)  # noqa: E731
    s = smoothing_factors(group(act_max), group(w_max), alpha)                             # [G*D]
    return np.broadcast_to(s.reshape(G, 1, D), (G, rep, D)).reshape(-1)                   # [H*D]


# convention -> (config, layer params, mapping, stats, the first target's full name, w_max, α) -> [C_in] factors
FACTORS = {
    "smoothquant": lambda cfg, params, m, stats, name, w_max, a: _factors(cfg, params, m, stats.channel_absmax[name],
                                                                           w_max, a),
    "llm-compressor": lambda cfg, params, m, stats, name, w_max, a: llmcompressor_factors(
        activation_range(stats, name), w_max, a),
}


def apply_smoothing(params, mapping: Mapping, s, head_dim: int | None = None) -> dict:
    """A new parameter tree with ``mapping``'s source divided by s and targets' rows times s.

    A source narrower than its targets (v_proj under GQA) is divided by one factor per kv
    channel (``head_dim`` D is needed to find them in s)."""
    xp = get_array_module(_float_leaf(params, mapping.targets[0]).w)
    dtype = _float_leaf(params, mapping.targets[0]).w.dtype
    s = xp.asarray(s, dtype=dtype)                                     # [C_in]
    if mapping.kind == "layernorm":
        ln = get_param(params, mapping.source)
        C = s.shape[0]
        g = ln["g"] if ln["g"] is not None else xp.ones(C, dtype)      # no affine: materialize g=1, b=0
        b = ln["b"] if ln["b"] is not None else xp.zeros(C, dtype)
        params = replace_param(params, mapping.source, {"g": g / s, "b": b / s})
    elif mapping.kind == "rmsnorm":                                    # a gain only
        params = replace_param(params, mapping.source, {"g": get_param(params, mapping.source)["g"] / s})
    else:
        src = _float_leaf(params, mapping.source)                      # its output columns are our channels
        if src.out_features != s.shape[0] and head_dim is None:
            raise ConfigError(f"{mapping.source} has {src.out_features} output channels for {s.shape[0]} factors "
                              "(grouped-query attention): pass head_dim to find one factor per kv channel")
        s_src = s if src.out_features == s.shape[0] else _kv_factors(s, src.out_features, head_dim)
        params = replace_param(params, mapping.source,
                      Linear(src.w / s_src, None if src.b is None else src.b / s_src))
    for t in mapping.targets:
        leaf = _float_leaf(params, t)
        params = replace_param(params, t, Linear(leaf.w * s[:, None], leaf.b))  # rows (input channels) times s
    return params


def _kv_factors(s, n_kv: int, head_dim: int):
    # [H*D] factors, repeated per kv channel by _factors -> [G*D] (n_kv = G*D), one per kv channel
    G = n_kv // head_dim
    return s.reshape(G, -1, head_dim)[:, 0].reshape(-1)


ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(21))   # 0, 0.05, ..., 1


@dataclasses.dataclass
class AlphaSearch:
    """Result of :func:`search_alpha`: the chosen α per smoothed source and every error seen."""

    alpha: dict                  # source name -> chosen α (pass to smooth(model, stats, alpha=...))
    errors: dict                 # source name -> {α: relative squared error of the targets' outputs}
    global_alpha: float

    def table(self) -> str:
        rows = [f"{'source':<40}{'best α':>8}{'error':>12}{'error at α=' + str(self.global_alpha):>20}"]
        for src, a in self.alpha.items():
            e = self.errors[src]
            rows.append(f"{src:<40}{a:>8.2f}{e[a]:>12.3e}{e[self.global_alpha]:>20.3e}")
        return "\n".join(rows)


def search_alpha(model, stats, grid=ALPHA_GRID, preset: str = "O1", groups=DEFAULT_GROUPS,
                 global_alpha: float = 0.5) -> AlphaSearch:
    """Choose α per smoothed source by minimizing its targets' quantized-output error.

    For each mapping, on the kept calibration inputs X of its targets (``calibrate(...,
    keep_samples=n)``), tries every α of ``grid`` (plus ``global_alpha``): smooths X and W
    with that α, quantizes with ``preset`` and measures ``Σ‖Y - Ŷ‖² / Σ‖Y‖²`` over the
    targets. Each mapping is judged on its own, with the original model's inputs (the
    approach Intel Neural Compressor calls SmoothQuant auto-tuning, simplified). Since
    ``global_alpha`` is always tried, every chosen α does at least as well as it.
    """
    from .qlinear import PRESETS, quantize_linear

    if not stats.samples:
        raise CalibrationError("search_alpha needs input samples: calibrate(model, batches, keep_samples=256)")
    stats.check_matches(model)
    granularity = PRESETS[preset]
    global_alpha = checks.alpha(global_alpha, "global_alpha")
    grid = sorted({checks.alpha(a, "every alpha of grid") for a in grid} | {global_alpha})
    chosen, errors = {}, {}
    for m in mappings_for(model.config, groups):
        X = stats.samples[m.targets[0]].astype(np.float64)                  # [n, C_in]
        leaves = [_float_leaf(model.params, t) for t in m.targets]
        Ws = [to_numpy(leaf.w).astype(np.float64) for leaf in leaves]       # [C_in, C_out] each
        bs = [None if leaf.b is None else to_numpy(leaf.b).astype(np.float64) for leaf in leaves]
        Ys = [X @ W + (0 if b is None else b) for W, b in zip(Ws, bs)]
        w_max = np.max(np.stack([np.abs(W).max(axis=1) for W in Ws]), axis=0)
        errors[m.source] = {}
        for a in grid:
            s = _factors(model.config, model.params, m, stats.channel_absmax[m.targets[0]], w_max, a)
            Xs = X / s
            num = den = 0.0
            for W, b, Y in zip(Ws, bs, Ys):
                q = quantize_linear(Linear(W * s[:, None], b), granularity["weights"], granularity["acts"],
                                    x_absmax=float(np.abs(Xs).max()), path="fake")
                num += float(((Y - q(Xs)) ** 2).sum())
                den += float((Y ** 2).sum())
            errors[m.source][a] = num / max(den, 1e-300)
        chosen[m.source] = min(grid, key=lambda a: (errors[m.source][a], abs(a - global_alpha)))
    return AlphaSearch(chosen, errors, float(global_alpha))
