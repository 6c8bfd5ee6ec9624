"""The course's checks of a model family's smoothing rows and factor rule (assignment a5).

Legend: C_in the input width of a row's targets (one factor s_j per channel j), H query heads,
G key/value heads, D head dim; weights ``[C_in, C_out]`` (``y = x @ w``). A *row* is a
``minisq.smooth.Mapping(group, source, kind, targets, why)`` with ``{i}`` for the layer index.

The oracle for the factors is written here from the paper's Eq. 4 and the grouped-query rule
(one factor per kv channel from the max over the query heads that read it), independently of
minisq's ``smooth``; ``tests/test_assignments.py`` holds it to ``minisq.smooth``'s factors.
"""

from __future__ import annotations

import re

import numpy as np

from ..backend import to_numpy


def reference_row_factors(act_max, w_max, alpha: float, source_width: int, head_dim: int) -> np.ndarray:
    """Eq. 4 per channel, grouped when the source is narrower than the targets' input (GQA)."""
    # [C_in], [C_in], float, int, int -> [C_in] float64
    from ..smooth import smoothing_factors

    a, w = np.asarray(to_numpy(act_max), np.float64), np.asarray(to_numpy(w_max), np.float64)
    if source_width == a.shape[0]:
        return np.asarray(to_numpy(smoothing_factors(a, w, alpha)))
    G, rep = source_width // head_dim, a.shape[0] // source_width
    s = np.asarray(to_numpy(smoothing_factors(*(v.reshape(G, rep, head_dim).max(axis=1).reshape(-1) for v in (a, w)),
                                              alpha)))
    return np.repeat(s.reshape(G, 1, head_dim), rep, axis=1).reshape(-1)


def _factor_hint(mine, act_max, w_max, alpha, source_width, head_dim) -> str:
    """The classic mistake ``mine`` matches, or ''."""
    from ..smooth import smoothing_factors

    a, w = np.asarray(act_max, np.float64), np.asarray(w_max, np.float64)
    want = reference_row_factors(a, w, alpha, source_width, head_dim)
    close = lambda v: v.shape == mine.shape and np.allclose(mine, v, rtol=1e-9, atol=0)  # noqa: E731
    if close(1 / want):
        return ("yours is 1/s, a factor from the wrong side: the source's output (activations) is divided by s "
                "and the targets' rows (weights) multiplied, s_j = max|X_j|^α / max|W_j|^(1-α), activations in "
                "the numerator; 1/s makes the outliers larger")
    if source_width != a.shape[0]:
        G, rep, D = source_width // head_dim, a.shape[0] // source_width, head_dim
        per_channel = np.asarray(to_numpy(smoothing_factors(a, w, alpha)))
        if close(per_channel):
            return (f"yours has one factor per query channel; the source makes only {source_width} channels "
                    f"(G = {G} kv heads of D = {D}) read by {rep} query heads each: they must share one factor, "
                    f"from the max of their ranges (activations and weights)")
        for how, reduce in (("the mean", lambda v: v.mean(axis=1)), ("the first query head's", lambda v: v[:, 0])):
            grouped = np.asarray(to_numpy(smoothing_factors(*(reduce(v.reshape(G, rep, D)).reshape(-1) for v in (a, w)),
                                                            alpha)))
            if close(np.repeat(grouped.reshape(G, 1, D), rep, axis=1).reshape(-1)):
                return (f"yours takes {how} range over the {rep} query heads that read a kv channel: take their max, "
                        f"or the largest of them clips")
    return ""


def check_row_factors(name: str, s, act_max, w_max, alpha: float, source_width: int, head_dim: int,
                      rtol: float = 1e-10) -> None:
    """Check one row's factors ``s`` against :func:`reference_row_factors`, naming the mistake."""
    # [C_in] float64, [C_in], [C_in], float, int, int -> None
    want = reference_row_factors(act_max, w_max, alpha, source_width, head_dim)
    if s is None or not hasattr(s, "shape"):
        raise AssertionError(f"{name} returned {type(s).__name__}: return the [C_in] float64 array s")
    s = np.asarray(to_numpy(s))
    if s.shape != want.shape:
        raise AssertionError(f"{name}: s has shape {s.shape}, expected {want.shape}: one factor per input channel "
                             f"of the targets (repeated per query head under grouped-query attention)")
    if s.dtype != np.float64:
        raise AssertionError(f"{name}: s has dtype {s.dtype}, expected float64")
    bad = ~(np.abs(s - want) <= rtol * np.abs(want))
    if bad.any():
        j = int(np.argwhere(bad)[0][0])
        hint = _factor_hint(s, act_max, w_max, alpha, source_width, head_dim) or (
            "s_j = max|X_j|^α / max|W_j|^(1-α) per channel (Assignment 3's rule), grouped per kv channel when "
            "the source is narrower than the targets' input")
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.size} factors are wrong; channel {j}: yours "
                             f"{float(s[j]):.6g}, expected {float(want[j]):.6g}; {hint}")


# --- the rows ----------------------------------------------------------------------------------

ROW_FIELDS = ("group", "source", "kind", "targets", "why")


def _not_foldable_reason(row, not_foldable: dict) -> str:
    """The reason the family's NOT_FOLDABLE table gives for smoothing ``row``'s source, or ''."""
    for key, why in not_foldable.items():
        producers = re.findall(r"[\w.{}]+", key.split("->")[0])
        if any(row.source == p or row.source.endswith("." + p) for p in producers):
            return why
    return ""


def check_rows(name: str, rows, reference: tuple, not_foldable: dict, linears: set, norms: set) -> None:
    """Check a family's smoothing rows against the reference rows (by source).

    ``linears`` and ``norms`` are the layer names of the model with ``{i}`` for the index.
    Names the row that smooths through a nonlinearity, leaves out a consumer of its source,
    lists a layer that does not read it, has the wrong kind, or the producer with no row.
    """
    if not isinstance(rows, (tuple, list)) or not rows:
        raise AssertionError(f"{name} returned {type(rows).__name__}: return a tuple of "
                             f"Mapping(group, source, kind, targets, why)")
    by_source = {r.source: r for r in reference}
    for row in rows:
        if not all(hasattr(row, f) for f in ROW_FIELDS):
            raise AssertionError(f"{name}: {row!r:.80} is not a row: use minisq.smooth.Mapping{ROW_FIELDS}")
        label = f"row {row.group!r} ({row.source} -> {', '.join(row.targets)})"
        if "{i}" not in row.source or not all("{i}" in t for t in row.targets):
            raise AssertionError(f"{name}: {label}: write the layer index as '{{i}}' (layers.{{i}}.mlp.up_proj)")
        unknown = [n for n in (row.source, *row.targets) if n not in linears | norms]
        if unknown:
            raise AssertionError(f"{name}: {label}: {unknown[0]!r} is not a layer of the block; its linears are "
                                 f"{sorted(linears)} and its norms {sorted(norms)}")
        why = _not_foldable_reason(row, not_foldable)
        if row.source not in by_source and why:
            raise AssertionError(f"{name}: {label} is not foldable: {why}")
        ref = by_source.get(row.source)
        if ref is None:
            raise AssertionError(f"{name}: {label}: dividing {row.source}'s output by s does not reach "
                                 f"{', '.join(row.targets)} unchanged (it goes through the residual, an "
                                 f"attention score or a nonlinearity): this row is not an equivalence")
        if row.kind != ref.kind:
            raise AssertionError(f"{name}: {label}: the source is a{'n' if ref.kind[0] in 'aeiou' else ''} "
                                 f"{ref.kind!r}, not kind {row.kind!r}")
        missing = [t for t in ref.targets if t not in row.targets]
        extra = [t for t in row.targets if t not in ref.targets]
        if missing:
            raise AssertionError(f"{name}: {label} forgets {', '.join(missing)}, which also reads {row.source}'s "
                                 f"output: every consumer of the source must take s in its rows, or it sees X / s")
        if extra:
            raise AssertionError(f"{name}: {label}: {', '.join(extra)} does not read {row.source}'s output")
    have = {row.source for row in rows}
    for ref in reference:
        if ref.source not in have:
            raise AssertionError(f"{name}: no row for {ref.source} (a {ref.kind}): its output can be divided by s "
                                 f"too; find the linears that read it")


def check_row_is_equivalence(name: str, model, row, layer: int = 0, seed: int = 0, tol: float = 1e-10) -> None:
    """Smooth ``row`` alone, in layer ``layer`` of a float64 ``model``, with random positive
    factors (one per source channel); the logits must not move beyond ``tol`` (relative)."""
    from dataclasses import replace

    from ..diagnostics import check_equivalence
    from ..smooth import apply_smoothing
    from ..tree import get_param

    concrete = replace(row, source=row.source.format(i=layer), targets=tuple(t.format(i=layer) for t in row.targets))
    C_in = get_param(model.params, concrete.targets[0]).w.shape[0]
    D = model.config.head_dim
    width = C_in if concrete.kind != "linear" else get_param(model.params, concrete.source).w.shape[1]
    rng = np.random.default_rng(seed)
    s = rng.uniform(0.25, 4.0, width)
    if width != C_in:   # a narrower source (GQA): one factor per source channel, repeated per query head
        s = np.repeat(s.reshape(width // D, 1, D), C_in // width, axis=1).reshape(-1)
    label = f"row {row.group!r} ({concrete.source} -> {', '.join(concrete.targets)})"
    try:
        params = apply_smoothing(model.params, concrete, s, D)
    except Exception as err:   # noqa: BLE001  -- a row that cannot even be applied: say why
        raise AssertionError(f"{name}: {label} cannot be applied ({type(err).__name__}: {err})") from None
    ids = np.random.default_rng(seed + 1).integers(0, model.config.vocab_size, (2, 12))
    report = check_equivalence(model, model.evolve(params=params), ids, dtype="float64", tol=tol)
    if not report.passed:
        raise AssertionError(f"{name}: {label} is not an equivalence: smoothing it alone with random s > 0 moves "
                             f"the logits by {report.max_rel:.2e} relative (> {tol:g}); every linear that reads "
                             f"the source's output must be a target, and nothing but per-channel linear steps may "
                             f"lie between")


def check_smoothed_family(name: str, smoothed, model, stats, alpha: float, rtol: float = 1e-12) -> None:
    """Every factor the smoothed model's targets were multiplied by, and every weight and norm,
    against ``minisq.smooth(model, stats, alpha, groups="all")``."""
    from ..smooth import mappings_for, smooth, weight_absmax
    from ..tree import get_param

    reference = smooth(model, stats, alpha=alpha, groups="all")
    factors = reference.info["smoothing"]["factors"]
    rtol = rtol if model.dtype == np.float64 else 1e-6   # a float32 model: its own roundings
    for m in mappings_for(model.config, "all"):
        old = np.asarray(to_numpy(get_param(model.params, m.targets[0]).w), np.float64)
        new = np.asarray(to_numpy(get_param(smoothed.params, m.targets[0]).w), np.float64)
        k = np.abs(old).argmax(axis=1)                                       # the largest weight of each row
        rows = np.arange(old.shape[0])
        mine = new[rows, k] / old[rows, k]
        want = np.asarray(to_numpy(factors[m.source]), np.float64)
        bad = ~(np.abs(mine - want) <= rtol * np.abs(want))
        if bad.any():
            j = int(np.argwhere(bad)[0][0])
            width = len(want) if m.kind != "linear" else get_param(model.params, m.source).w.shape[1]
            hint = _factor_hint(mine, stats.channel_absmax[m.targets[0]], weight_absmax(model.params, m.targets),
                                alpha, width, model.config.head_dim)
            raise AssertionError(f"{name}: the rows of {m.targets[0]} were multiplied by {mine[j]:.6g} at channel "
                                 f"{j}, expected s = {want[j]:.6g} (row {m.group!r} from {m.source})"
                                 + (f"; {hint}" if hint else ""))
    for leaf_name, leaf in reference.linears().items():
        got = np.asarray(to_numpy(smoothed.linears()[leaf_name].w))
        if got.dtype != leaf.w.dtype:
            raise AssertionError(f"{name}: {leaf_name} has dtype {got.dtype}, expected {leaf.w.dtype} (the model's)")
        want = np.asarray(to_numpy(leaf.w), np.float64)
        if not np.allclose(got, want, rtol=rtol, atol=0):
            raise AssertionError(f"{name}: {leaf_name}'s weight differs from minisq.smooth's: each source is divided "
                                 f"by its row's s (columns and bias for a linear source) and each target's rows "
                                 f"multiplied by it, once")
