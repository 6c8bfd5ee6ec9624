"""Layer by layer: models bigger than memory (the loop over layers outermost).

Legend: N calibration/evaluation batches, B batch, T tokens, C hidden.

A forward pass is ``embed → block 0 → … → block L-1 → head``. Running it batch by batch
reads every layer once per batch; swapping the two loops — *for each layer, for each
batch* — reads every layer once in total, so only one layer's weights (widened to float32)
need to be in memory, plus the activations of all batches ``N · [B, T, C]``. That is how
production tools quantize models larger than a GPU (llm-compressor's "sequential
onloading", NVIDIA ModelOpt's layerwise calibration), and what :func:`forward_layerwise`,
:func:`quantize_checkpoint` and the lazy paths of calibration and evaluation do here.

:func:`quantize_checkpoint` is SmoothQuant as a streamed pipeline: for each decoder layer
in turn it calibrates the layer on the activations that reach it, smooths it, calibrates
the smoothed layer (static scales), quantizes it and writes it, carrying the activations
on. It computes exactly what the in-memory pipeline computes,

    stats = calibrate(m, calib); sm = smooth(m, stats, α)
    q = quantize(sm, preset, stats=calibrate(sm, calib))

bit for bit: the same batches go through the same block functions in the same order (the
unsmoothed activations are carried beside the smoothed ones for that), and smoothing and
quantization act on one layer at a time anyway. Killed at any point, it resumes after the
last finished layer with the same result.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from .calibrate import CalibrationStats
from .errors import CheckpointError, ConfigError
from .progress import progress as show_progress

RUN_FILE = "quantize_run.json"
FORMAT = "minisq-quantize-run-v1"


def forward_layerwise(model, batches, progress: bool = False, desc: str = "layers"):
    """Logits of every ``(ids [B, T], mask [B, T] or None)`` batch, computed layer-outer.

    Each layer is widened once (see :meth:`minisq.Model.layer`) and applied to every batch
    before the next is read. Yields ``logits [B, T, V]`` batch by batch at the end (the head
    runs per batch, so all the logits are never held at once). What it holds in memory:
    one layer in the compute dtype, every batch's hidden states ``[B, T, C]``, and one
    batch's logits.
    """
    family, outer = model.family, model.outer()
    inputs = [model.prepare(ids, mask) for ids, mask in batches]
    xs = embed_all(outer, inputs)                                                          # N x [B, T, C]
    for i in show_progress(range(model.config.num_layers), progress, desc):
        apply_layer(outer, i, model.layer(i), xs, inputs)
    for n, inp in enumerate(inputs):
        logits = family.head(outer, xs[n], inp.new_mask)
        xs[n] = None
        model.check_logits(logits)
        yield logits[0] if inp.squeeze else logits


def embed_all(outer, inputs) -> list:
    """The embeddings of every prepared batch (``outer``: see :meth:`minisq.Model.outer`)."""
    # N x Inputs -> N x [B, T, C]
    return [outer.family.embed(outer, inp.ids, inp.positions, inp.new_mask) for inp in inputs]


def apply_layer(outer, i: int, layer, xs: list, inputs) -> None:
    """Decoder layer ``i`` (its parameters ``layer``) applied to every batch's hidden states,
    in place: each batch's old states are freed as soon as its new ones exist."""
    # N x [B, T, C] -> N x [B, T, C]
    for n, inp in enumerate(inputs):
        xs[n] = outer.family.block(outer, i, layer, xs[n], inp.bias, inp.new_mask, None, inp.positions)


def logits_of(model, batches, progress: bool = False, desc: str = "batches"):
    """``model(ids, mask)`` for every batch: batch by batch for a model in memory, layer-outer
    (:func:`forward_layerwise`) for a lazy one, whose layers are then read once."""
    if model.lazy:
        yield from forward_layerwise(model, batches, progress, desc + " (layer by layer)")
        return
    for ids, mask in show_progress(batches, progress, desc):
        yield model(ids, mask)


# --------------------------------------------------------------------------------------------
# quantize_checkpoint


def _calib_digest(seqs) -> str:
    h = hashlib.sha256()
    for ids in seqs:
        h.update(str(ids.shape).encode())
        h.update(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def quantize_checkpoint(src, dst, calib, preset: str = "O3", alpha=0.5, smooth: bool = True, groups=None,
                        skip=None, attn_bmm=False, resume: bool = True, progress: bool = True,
                        format: str = "minisq"):
    """SmoothQuant a checkpoint layer by layer into ``dst``, a folder ``minisq.load`` reads.

    ``src``: a checkpoint folder or hub id, read lazily (memory-mapped). ``calib``: texts or
    token-id arrays, as for :func:`minisq.calibrate`. For each decoder layer in turn:
    calibrate it, smooth it (``alpha``, ``groups``), calibrate the smoothed layer, quantize
    it with ``preset`` (``skip``, ``attn_bmm`` as in :func:`minisq.quantize`; the integer
    path), write it, and carry the activations on. The result is bit-identical to the
    in-memory pipeline (see the module docstring).

    With ``resume`` (default), a ``dst`` holding an unfinished run *of the same arguments*
    continues after its last finished layer, with the same result as an uninterrupted run;
    a ``dst`` holding anything else is refused, so a later run never trusts foreign files.

    What it holds in memory: one layer in float32, the calibration activations (twice when
    smoothing: the unsmoothed ones give the smoothing statistics), and one layer's stats.

    ``format="compressed-tensors"`` quantizes with the format's rounding and writes a
    compressed-tensors int-quantized checkpoint (:mod:`minisq.io.compressed_tensors`): the
    layers are written to ``.<dst>.minisq-run`` beside it first (and resumed from there), then
    converted, holding the int8 model in memory once.
    """
    from .calibrate import _as_sequences
    from .io.loading import load
    from .qlinear import ATTN_BMM_MODES, DEFAULT_SKIP, PRESETS
    from .smooth import DEFAULT_GROUPS

    groups = tuple(DEFAULT_GROUPS if groups is None else groups)
    skip = tuple(DEFAULT_SKIP if skip is None else skip)
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: choose one of {sorted(PRESETS)}")
    if not any(attn_bmm is m or (isinstance(attn_bmm, str) and attn_bmm == m) for m in ATTN_BMM_MODES):
        raise ConfigError(f"attn_bmm={attn_bmm!r} is not one of {ATTN_BMM_MODES}")
    if attn_bmm == "static" and PRESETS[preset]["acts"] != "static":
        raise ConfigError("attn_bmm='static' is the official int8 O3 path: it needs preset 'O3'")
    if format not in ("minisq", "compressed-tensors"):
        raise ConfigError(f"format={format!r} is not one of ('minisq', 'compressed-tensors')")
    convention = "compressed-tensors" if format == "compressed-tensors" else "smoothquant"
    model = load(src, lazy=True)
    if format == "compressed-tensors":      # refuse what the format cannot express before any work
        from .io.compressed_tensors import CHECKPOINT_PREFIX
        if attn_bmm is not False or model.config.model_type not in CHECKPOINT_PREFIX:
            raise ConfigError(f"compressed-tensors holds {sorted(CHECKPOINT_PREFIX)} models without attention-BMM "
                              f"quantization (this is {model.config.model_type}, attn_bmm={attn_bmm!r})")
    seqs = _as_sequences(model, calib)
    final, dst = Path(dst), Path(dst)
    if format == "compressed-tensors":
        dst = final.with_name(f".{final.name}.minisq-run")
    key = dict(format=FORMAT, src=str(src), preset=preset, alpha=alpha, smooth=bool(smooth), groups=list(groups),
               skip=list(skip), attn_bmm=attn_bmm, calib=_calib_digest(seqs), layers=model.config.num_layers,
               **({"convention": convention} if convention != "smoothquant" else {}))
    done = _prepare_dst(dst, key, resume)
    run = _Run(model, dst, preset, alpha, smooth, groups, skip, attn_bmm, seqs)
    run.convention = convention
    run.start(done)
    bar = show_progress(range(done, model.config.num_layers), progress, "quantizing layers")
    n_tokens = sum(int(ids.size) for ids in seqs)
    for i in bar:
        t0 = time.perf_counter()
        run.layer(i)
        _mark_done(dst, key, i + 1)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(tokens_per_s=f"{(2 if smooth else 1) * n_tokens / (time.perf_counter() - t0):.0f}")
    run.finish(src)
    _write_json(dst / RUN_FILE, {"key": key, "layers_done": model.config.num_layers, "finished": True})
    run.clean_up()
    if format == "compressed-tensors":
        from .io.compressed_tensors import save_compressed_tensors
        save_compressed_tensors(load(dst), final)
        shutil.rmtree(dst)
    return final


def _prepare_dst(dst: Path, key: dict, resume: bool) -> int:
    """How many layers of this very run ``dst`` already holds (0 for a new or empty folder);
    refuses a folder holding anything else."""
    run_file = dst / RUN_FILE
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"{dst} is a file: pass a new or empty folder")
    if dst.exists() and any(dst.iterdir()):
        if not run_file.is_file():
            raise CheckpointError(
                f"{dst} is not empty and holds no {RUN_FILE}, so it is not a quantize_checkpoint run "
                "to resume: pass a new or empty folder")
        try:
            run = json.loads(run_file.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{run_file} is unreadable ({e}); delete {dst} and start again") from None
        if not isinstance(run, dict) or run.get("key") != key:
            theirs = run.get("key") if isinstance(run, dict) else None
            raise CheckpointError(
                f"{dst} holds a quantize_checkpoint run of other arguments ({_diff(theirs, key)}); "
                "pass another folder, or delete this one to start again")
        if run.get("finished"):
            raise CheckpointError(f"{dst} already holds the finished result of this run: minisq.load({str(dst)!r})")
        if not resume:
            raise CheckpointError(f"{dst} holds an unfinished run of these arguments and resume=False: "
                                  "pass resume=True to continue it, or delete the folder")
        done = run.get("layers_done", 0)
        if not (isinstance(done, int) and 0 <= done <= key["layers"]):
            raise CheckpointError(f"{run_file} is damaged (layers_done={done!r}); delete {dst} and start again")
        return done
    dst.mkdir(parents=True, exist_ok=True)
    _write_json(run_file, {"key": key, "layers_done": 0, "finished": False})
    return 0


def _diff(theirs, ours) -> str:
    if not isinstance(theirs, dict):
        return "unreadable"
    keys = [k for k in ours if theirs.get(k) != ours[k]]
    return "; ".join(f"{k}: {theirs.get(k)!r} there, {ours[k]!r} now" for k in keys[:3]) or "format"


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)          # atomic: a kill leaves the old file or the new one


def _mark_done(dst: Path, key: dict, layers_done: int) -> None:
    _write_json(dst / RUN_FILE, {"key": key, "layers_done": layers_done, "finished": False})


def _save_file(tensors: dict, path: Path) -> None:
    """safetensors, written to a temporary name and renamed: a kill never leaves half a file
    under the real name."""
    from safetensors.numpy import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


class _Run:
    """The state of one quantize_checkpoint run: the model, the carried activations, and
    what is written per layer (see :func:`quantize_checkpoint`)."""

    def __init__(self, model, dst, preset, alpha, smooth, groups, skip, attn_bmm, seqs):
        self.model, self.dst, self.preset, self.alpha = model, dst, preset, alpha
        self.smooth, self.groups, self.skip, self.attn_bmm = smooth, groups, skip, attn_bmm
        self.family, self.outer = model.family, model.outer()
        self.inputs = [model.prepare(ids) for ids in seqs]           # each calibration batch unpadded
        self.key = self.family.LAYER_PREFIX.split(".")[0]            # "h", "layers"
        self.convention = "smoothquant"                               # the W8A8 leaves' rounding

    # --- the carried activations ------------------------------------------------------------
    def start(self, done: int) -> None:
        """The activations entering layer ``done``: embedded afresh, or read back from disk."""
        if done == 0:
            xs = embed_all(self.outer, self.inputs)
            self.float_xs, self.smooth_xs = xs, list(xs)
            return
        from .io.checkpoint import read_safetensors

        path = self.dst / f"carry-{done - 1:05d}.safetensors"
        if not path.is_file():
            raise CheckpointError(f"{self.dst}: the run says {done} layers are done but {path.name} is missing; "
                                  "delete the folder and start again")
        arrays = read_safetensors(path)
        n = len(self.inputs)
        self.float_xs = [arrays[f"float.{j}"] for j in range(n)]
        self.smooth_xs = [arrays[f"smoothed.{j}"] for j in range(n)] if self.smooth else list(self.float_xs)

    def _save_carry(self, i: int) -> None:
        tensors = {f"float.{j}": x for j, x in enumerate(self.float_xs)}
        if self.smooth:
            tensors.update({f"smoothed.{j}": x for j, x in enumerate(self.smooth_xs)})
        _save_file(tensors, self.dst / f"carry-{i:05d}.safetensors")
        old = self.dst / f"carry-{i - 1:05d}.safetensors"
        if old.exists():
            old.unlink()

    # --- one layer --------------------------------------------------------------------------
    def _observe(self, i: int, layer, xs: list):
        """Run layer i over every batch with observers; updates ``xs`` in place."""
        from .calibrate import Observed, _Recorder
        from .tree import _map

        recorder = _Recorder(0)
        prefix = self.family.LAYER_PREFIX.format(i=i)
        apply_layer(self.outer, i, _map(layer, lambda name, leaf: Observed(leaf, f"{prefix}.{name}", recorder), ""),
                    xs, self.inputs)
        return recorder

    def layer(self, i: int) -> None:
        """Layer i: calibrate, smooth, calibrate again, quantize, write; carry the activations."""
        from .io.export import _encode
        from .qlinear import PRESETS, quantize_linear
        from .smooth import apply_smoothing, mappings_for, smoothing_factors, weight_absmax
        from .tree import _map

        prefix = self.family.LAYER_PREFIX.format(i=i)
        layer = self.model.layer(i)                                           # float32 arrays
        factors = {}
        if self.smooth:
            stats = self._observe(i, layer, self.float_xs)                    # the unsmoothed layer's ranges
            tree = {self.key: [None] * i + [layer]}                           # dotted names as in the model
            for m in mappings_for(self.model.config, self.groups):
                if not m.source.startswith(prefix + "."):
                    continue
                a = self.alpha.get(m.source, self.alpha.get("*", 0.5)) if isinstance(self.alpha, dict) else self.alpha
                s = smoothing_factors(stats.channel[m.targets[0]], weight_absmax(tree, m.targets), a)
                factors[m.source] = s
                tree = apply_smoothing(tree, m, s)
            layer = tree[self.key][i]
        stats = self._observe(i, layer, self.smooth_xs)                        # the smoothed layer's ranges
        if not self.smooth:
            self.float_xs = self.smooth_xs
        granularity = PRESETS[self.preset]

        def swap(name, leaf):
            full = f"{prefix}.{name}"
            if any(fnmatch.fnmatchcase(full, pattern) for pattern in self.skip):
                return leaf
            x_absmax = stats.inp[full] if granularity["acts"] == "static" else None
            return quantize_linear(leaf, granularity["weights"], granularity["acts"], x_absmax, "int",
                                   convention=self.convention)

        quantized = _map(layer, swap, "")
        tensors: dict = {}
        skeleton = _encode(quantized, prefix, tensors)
        tensors.update({f"smoothing.{src}": s for src, s in factors.items()})
        note = {"skeleton": skeleton, "factors": sorted(factors)}
        if self.attn_bmm is not False and granularity["acts"] == "static":
            # max |q|, |k|, |v| of this layer's projections, read as calibrate() reads them
            ranges = CalibrationStats({}, {}, {}, {}, 0, {}, stats.out_channel)
            note["qkv_absmax"] = list(ranges.qkv_absmax(self.model, i))
        _save_file(tensors, self.dst / f"layer-{i:05d}.safetensors")
        _write_json(self.dst / f"layer-{i:05d}.json", note)
        self._save_carry(i)

    # --- the end ----------------------------------------------------------------------------
    def finish(self, src) -> None:
        """Write the parameters outside the layers, the tokenizer and, last, ``minisq.json``
        (a folder without it is no model). Run again after a kill, it writes the same."""
        from .io.export import FORMAT as MODEL_FORMAT
        from .io.export import _encode
        from .qlinear import PRESETS, qkv_scales

        model, L = self.model, self.model.config.num_layers
        embedding = self.outer._embedding()
        outer_params = {self.family.EMBEDDING: embedding,
                        **{k: v for k, v in self.outer.params.items() if v is not embedding and k != self.key}}
        tensors: dict = {}
        outer_skeleton = _encode(outer_params, "", tensors, embedding)["dict"]
        _save_file(tensors, self.dst / "model.safetensors")
        notes = [json.loads((self.dst / f"layer-{i:05d}.json").read_text()) for i in range(L)]
        layer_skeletons = [note["skeleton"] for note in notes]
        factor_names = [name for note in notes for name in note["factors"]]
        order = [self.family.EMBEDDING] + [k for k in model.params if k != self.family.EMBEDDING]
        skeleton = {"dict": {k: ({"list": layer_skeletons} if k == self.key else outer_skeleton[k]) for k in order}}
        granularity = PRESETS[self.preset]
        info = {"source": str(src)}
        info_tensors: dict = {}
        if self.smooth:
            info["smoothing"] = {"alpha": self.alpha if not isinstance(self.alpha, dict) else dict(self.alpha),
                                 "groups": list(self.groups)}
        info["quantization"] = dict(preset=self.preset, weights=granularity["weights"], acts=granularity["acts"],
                                    path="int", skip=list(self.skip), attn_bmm=self.attn_bmm)
        if self.convention != "smoothquant":
            info["quantization"]["convention"] = self.convention
        info_skeleton = _encode(info, "info", info_tensors)
        if self.smooth:   # the factors stay in the layer shards; refer to them by name
            info_skeleton["dict"]["smoothing"]["dict"]["factors"] = {
                "dict": {name: {"tensor": f"smoothing.{name}"} for name in factor_names}}
        attn = None
        if self.attn_bmm is not False:
            static = None
            if granularity["acts"] == "static":
                static = tuple(qkv_scales(model, note["qkv_absmax"]) for note in notes)
            fields = dict(acts=granularity["acts"], path="int", static=static, probs_int8=self.attn_bmm == "static")
            attn = _encode(fields, "attn_quant", info_tensors)
        shards = ["model.safetensors"] + [f"layer-{i:05d}.safetensors" for i in range(L)]
        if info_tensors:   # the static attention scales
            _save_file(info_tensors, self.dst / "info.safetensors")
            shards.insert(1, "info.safetensors")
        meta = dict(format=MODEL_FORMAT, config=model.config.to_dict(), params=skeleton, info=info_skeleton,
                    attn_quant=attn, tokenizer=model.tokenizer is not None, shards=shards)
        if model.tokenizer is not None:
            model.tokenizer.bpe.save(str(self.dst / "tokenizer.json"))
        _write_json(self.dst / "minisq.json", meta)

    def clean_up(self) -> None:
        """After the run is marked finished: drop the per-layer notes and the last carry."""
        for path in list(self.dst.glob("layer-*.json")) + list(self.dst.glob("carry-*.safetensors")):
            path.unlink()
