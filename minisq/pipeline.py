"""SmoothQuant as a streamed pipeline: models bigger than memory, one layer at a time.

Legend: N calibration batches, B batch, T tokens, C hidden.

:func:`quantize_checkpoint` runs the loop over layers outermost (see
:mod:`minisq.layerwise`): for each decoder layer in turn it calibrates the layer on the
activations that reach it, smooths it, calibrates the smoothed layer (static scales),
quantizes it and writes it, carrying the activations on. Each of those steps is the very
function the in-memory pipeline calls —

=================  =========================================  ===============================
step               one layer, streamed                        whole model, in memory
=================  =========================================  ===============================
observe            :func:`~minisq.calibrate.calibrate_layer`  :func:`minisq.calibrate`
choose groups      :func:`~minisq.smooth.smoothing_rows`      :func:`minisq.smooth`
factor and fold    :func:`~minisq.smooth.smooth_layer`        :func:`minisq.smooth` (per layer)
quantize leaves    :func:`~minisq.qlinear.quantize_leaves`    :func:`minisq.quantize`
attention scales   :func:`~minisq.attnquant.attention_quant`  :func:`minisq.quantize`
=================  =========================================  ===============================

— so the result is the in-memory pipeline's,

    stats = calibrate(m, calib); sm = smooth(m, stats, α, groups)
    q = quantize(sm, preset, stats=calibrate(sm, calib), ...)

bit for bit: the same batches go through the same block functions in the same order (the
unsmoothed activations are carried beside the smoothed ones for that), and smoothing and
quantization act on one layer at a time anyway. Killed at any point, it resumes after the
last finished layer with the same result. The file-writing part (durable writes, the run
file, the source's fingerprint, the clean-up) is kept apart in :mod:`minisq.runfiles`; the
order of the writes is in :func:`quantize_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from . import checks
from .attnquant import AttentionQuant, attention_quant
from .calibrate import Recorder, as_sequences, calibrate_layer, observe
from .errors import CheckpointError, ConfigError
from .layerwise import embed_all
from .progress import progress as show_progress
from .qlinear import DEFAULT_SKIP, quant_spec, quantize_leaves
from .runfiles import (
    FORMAT,
    RUN_FILE,
    read_run,
    remove,
    save_file,
    source_fingerprint,
    write_durably,
    write_json,
    write_run,
)
from .smooth import resolve_groups, smooth_layer, smoothing_info, smoothing_rows
from .tree import _walk

__all__ = ["RUN_FILE", "quantize_checkpoint"]


def _calib_digest(seqs) -> str:
    h = hashlib.sha256()
    for ids in seqs:
        h.update(str(ids.shape).encode())
        h.update(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def _carry(i: int) -> str:
    return f"carry-{i:05d}.safetensors"


def _scratch(num_layers: int) -> list:
    """The names of every scratch file a run of ``num_layers`` layers may leave: the layer
    notes, the carries and the temporary names of every file it writes."""
    kept = ["model.safetensors", "info.safetensors", "tokenizer.json", "minisq.json"]
    kept += [f"layer-{i:05d}.safetensors" for i in range(num_layers)]
    notes = [f"layer-{i:05d}.json" for i in range(num_layers)] + [_carry(i) for i in range(num_layers)]
    return notes + [n + ".tmp" for n in notes + kept + [RUN_FILE]]


def quantize_checkpoint(src, dst, calib, preset: str = "O3", alpha=0.5, smooth: bool = True, groups=None,
                        skip=None, attn_bmm=False, resume: bool = True, progress: bool = True,
                        threshold: float | None = None, group_size: int | None = None, kv_cache: str = "float",
                        path: str = "int", format: str = "minisq"):
    """SmoothQuant a checkpoint layer by layer into ``dst``, a folder ``minisq.load`` reads.

    ``src``: a checkpoint folder or hub id, read lazily (memory-mapped). ``calib``: texts or
    token-id arrays, as for :func:`minisq.calibrate`. For each decoder layer in turn:
    calibrate it, smooth it (``alpha``, ``groups`` as in :func:`minisq.smooth`; ``None`` =
    ``"default"``), calibrate the smoothed layer, quantize it with ``preset`` (a SmoothQuant
    preset or a baseline; ``skip``, ``attn_bmm``, ``threshold``, ``group_size``, ``kv_cache``
    and ``path`` as in :func:`minisq.quantize`), write it, and carry the activations on.
    Leaves outside the decoder layers that ``skip`` does not keep float (e.g. ``skip=()``
    quantizes the LM head) are quantized at the end, their static ranges observed on the
    carried activations. The result is bit-identical to the in-memory pipeline (see the
    module docstring). Every argument (and every calibration id) is checked before
    anything is written.

    With ``resume`` (default), a ``dst`` holding an unfinished run *of the same arguments
    and the same source files* (size, mtime and a sampled hash of each, see
    :mod:`minisq.runfiles`) continues after its last finished layer, with the same result
    as an uninterrupted run, whatever file operation a kill interrupted; a ``dst`` holding
    the finished result of the same run is left as it is (after finishing a clean-up a
    kill interrupted) and said so; a ``dst`` holding anything else is refused, so a later
    run never trusts foreign files.

    What it holds in memory: one layer in float32, the calibration activations (twice when
    smoothing: the unsmoothed ones give the smoothing statistics), and one layer's stats.

    ``format="compressed-tensors"`` quantizes with the format's rounding and writes a
    compressed-tensors int-quantized checkpoint (:mod:`minisq.io.compressed_tensors`): the
    layers are written to ``.<dst>.minisq-run`` beside it first (and resumed from there), then
    converted, holding the int8 model in memory once.
    """
    from .io.hub import resolve_model_dir
    from .io.loading import load

    if preset is None:
        raise ConfigError("quantize_checkpoint needs a preset (naive, O1, O2, O3 or a baseline)")
    if format not in ("minisq", "compressed-tensors"):
        raise ConfigError(f"format={format!r} is not one of ('minisq', 'compressed-tensors')")
    convention = "compressed-tensors" if format == "compressed-tensors" else "smoothquant"
    alpha = checks.alpha(alpha)
    smooth, resume = checks.flag("smooth", smooth), checks.flag("resume", resume)
    spec = quant_spec(preset, path=path, skip=DEFAULT_SKIP if skip is None else skip, attn_bmm=attn_bmm,
                      threshold=threshold, group_size=group_size, kv_cache=kv_cache, convention=convention)
    model = load(src, lazy=True)
    if format == "compressed-tensors":      # refuse what the format cannot express before any work
        from .io.compressed_tensors import hf_prefix
        hf_prefix(model.config)             # the families the format holds
        if (spec.attn_bmm is not False or spec.kv_cache != "float" or spec.threshold is not None
                or spec.group_size is not None or spec.acts in ("float", "per_channel") or spec.path != "int"):
            raise ConfigError(f"compressed-tensors holds W8A8 models on the integer path, without attention-BMM "
                              f"quantization, an int8 KV cache or the baselines' schemes "
                              f"(preset {preset!r}, attn_bmm={attn_bmm!r})")
    groups = resolve_groups(model.config, groups)
    seqs = as_sequences(model, calib)
    final, dst, L = Path(dst), Path(dst), model.config.num_layers
    if format == "compressed-tensors":     # the run works in a sibling folder, then converts
        dst = final.with_name(f".{final.name}.minisq-run")
        if not dst.exists() and final.exists() and (not final.is_dir() or any(final.iterdir())):
            raise CheckpointError(f"{final} is not an empty folder: pass a new or empty one for the checkpoint")
    run = _Run(model, dst, spec, alpha, smooth, groups, seqs)                 # checks every calibration id
    if spec.group_size is not None:                                           # every layer has layer 0's shapes
        from .baselines import check_group_size

        prefix = model.family.LAYER_PREFIX.format(i=0)
        for name, leaf in _walk(model.family.layers(model.params)[0], prefix + "."):   # as stored: shapes only
            if not spec.skips(name):
                check_group_size(spec.group_size, leaf.w.shape[0], name)
    key = dict(format=FORMAT, src=str(src), alpha=alpha, smooth=smooth, groups=list(groups),
               quantization=spec.info(), calib=_calib_digest(seqs), layers=L)
    source = source_fingerprint(resolve_model_dir(src))
    state = read_run(dst, key, source)
    if state is not None and state["finished"]:
        remove(dst, state["scratch"])                                         # a clean-up a kill cut short
        if state["scratch"]:
            write_run(dst, key, source, L, finished=True)
        if format == "compressed-tensors":                                    # killed while converting
            return _to_compressed_tensors(dst, final)
        print(f"{dst} already holds the finished result of this run; nothing to do: minisq.load({str(dst)!r})",
              file=sys.stderr)
        return dst
    if state is not None and not resume:
        raise CheckpointError(f"{dst} holds an unfinished run of these arguments and resume=False: "
                              "pass resume=True to continue it, or delete the folder")
    if state is None:
        dst.mkdir(parents=True, exist_ok=True)
        write_run(dst, key, source, 0)
    done = 0 if state is None else state["layers_done"]
    run.start(done)
    bar = show_progress(range(done, L), progress, "quantizing layers")
    n_tokens = sum(int(ids.size) for ids in seqs)
    for i in bar:
        t0 = time.perf_counter()
        run.layer(i)                                  # layer i's files and carry i, on disk
        write_run(dst, key, source, i + 1)            # then the run counts layer i
        remove(dst, [_carry(i - 1)] if i else [])     # then the carry it no longer needs goes
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(tokens_per_s=f"{(2 if smooth else 1) * n_tokens / (time.perf_counter() - t0):.0f}")
    run.finish(src)
    write_run(dst, key, source, L, finished=True, scratch=_scratch(L))
    remove(dst, _scratch(L))                          # only the names this run writes
    write_run(dst, key, source, L, finished=True)
    if format == "compressed-tensors":
        return _to_compressed_tensors(dst, final)
    return dst


def _to_compressed_tensors(work: Path, final: Path) -> Path:
    """The finished run in ``work`` written to ``final`` as a compressed-tensors checkpoint
    (into a temporary folder, then renamed), and ``work`` removed."""
    from .io.compressed_tensors import is_compressed_tensors, save_compressed_tensors
    from .io.loading import load

    if not is_compressed_tensors(final):      # else a kill came after the rename: only clean up
        save_compressed_tensors(load(work), final)
    shutil.rmtree(work)
    return final


class _Run:
    """The state of one quantize_checkpoint run: the model, the carried activations, and
    what is written per layer (see :func:`quantize_checkpoint`)."""

    def __init__(self, model, dst, spec, alpha, smooth, groups, seqs):
        self.model, self.dst, self.spec, self.alpha, self.smooth, self.groups = model, dst, spec, alpha, smooth, groups
        self.rows = smoothing_rows(model.config, groups) if smooth else []
        self.family, self.outer = model.family, model.outer()
        self.inputs = [model.prepare(ids) for ids in seqs]           # each calibration batch unpadded
        self.key = self.family.LAYER_PREFIX.split(".")[0]            # "h", "layers"

    # --- the carried activations ------------------------------------------------------------
    def start(self, done: int) -> None:
        """The activations entering layer ``done``: embedded afresh, or read back from disk."""
        if done == 0:
            xs = embed_all(self.outer, self.inputs)
            self.float_xs, self.smooth_xs = xs, list(xs)
            return
        from .io.checkpoint import read_safetensors

        remove(self.dst, [_carry(done - 2)] if done >= 2 else [])   # left by a kill before its deletion
        path = self.dst / _carry(done - 1)
        if not path.is_file():
            raise CheckpointError(f"{self.dst}: the run says {done} layers are done but {path.name} is missing; "
                                  "delete the folder and start again")
        arrays = read_safetensors(path)
        n = len(self.inputs)
        self.float_xs = [arrays[f"float.{j}"] for j in range(n)]
        self.smooth_xs = [arrays[f"smoothed.{j}"] for j in range(n)] if self.smooth else list(self.float_xs)

    def _save_carry(self, i: int) -> None:
        """The activations leaving layer i (the previous carry is deleted by the caller, once
        the run file counts layer i)."""
        tensors = {f"float.{j}": x for j, x in enumerate(self.float_xs)}
        if self.smooth:
            tensors.update({f"smoothed.{j}": x for j, x in enumerate(self.smooth_xs)})
        save_file(tensors, self.dst / _carry(i))

    # --- one layer: the algorithm's steps, then its files -------------------------------------
    def layer(self, i: int) -> None:
        """Layer i: calibrate, smooth, calibrate again, quantize, write; carry the activations."""
        from .io.export import _encode

        prefix = self.family.LAYER_PREFIX.format(i=i)
        layer = self.model.layer(i)                                                   # float32 arrays
        factors = {}
        if self.smooth:
            stats = calibrate_layer(self.outer, i, layer, self.float_xs, self.inputs)  # the float layer's ranges
            layer, factors = smooth_layer(self.model.config, i, layer, stats, self.alpha, self.rows)
        stats = calibrate_layer(self.outer, i, layer, self.smooth_xs, self.inputs)      # the smoothed layer's
        if not self.smooth:
            self.float_xs = self.smooth_xs
        quantized = quantize_leaves(layer, self.spec, stats, self.model.dtype, prefix)
        tensors: dict = {}
        skeleton = _encode(quantized, prefix, tensors)
        tensors.update({f"smoothing.{src}": s for src, s in factors.items()})
        note = {"skeleton": skeleton, "factors": list(factors)}
        if self.spec.attn_bmm is not False and self.spec.acts == "static":
            note["qkv_absmax"] = [float(a) for a in stats.qkv_absmax(self.model, i)]
        save_file(tensors, self.dst / f"layer-{i:05d}.safetensors")
        write_json(self.dst / f"layer-{i:05d}.json", note)
        self._save_carry(i)

    def _outer_params(self) -> dict:
        """The parameters outside the decoder layers (embedding first), quantized where
        ``skip`` does not keep them float; static ranges observed on the carried activations
        (the embedding's projection on the embedded batches, the head's on the last layer's
        outputs), as :func:`minisq.calibrate` observes them."""
        embedding = self.outer._embedding()
        params = {self.family.EMBEDDING: embedding,
                  **{k: v for k, v in self.outer.params.items() if v is not embedding and k != self.key}}
        if all(self.spec.skips(name) for name, _ in _walk(params, "")):
            return params
        stats = None
        if self.spec.acts == "static":
            recorder = Recorder(0)
            observed = self.outer.evolve(params=observe(self.outer.params, recorder))
            embed_all(observed, self.inputs)
            for x, inp in zip(self.smooth_xs, self.inputs):
                self.family.head(observed, x, inp.new_mask)                        # one batch's logits at a time
            stats = recorder.stats(0, {})
        return quantize_leaves(params, self.spec, stats, self.model.dtype)

    # --- the end ----------------------------------------------------------------------------
    def finish(self, src) -> None:
        """Write the parameters outside the layers, the tokenizer and, last, ``minisq.json``
        (a folder without it is no model). Run again after a kill, it writes the same."""
        from .io.export import FORMAT as MODEL_FORMAT
        from .io.export import _encode

        model, L = self.model, self.model.config.num_layers
        outer_params = self._outer_params()
        tensors: dict = {}
        outer_skeleton = _encode(outer_params, "", tensors, self.outer._embedding())["dict"]
        save_file(tensors, self.dst / "model.safetensors")
        notes = [json.loads((self.dst / f"layer-{i:05d}.json").read_text()) for i in range(L)]
        layer_skeletons = [note["skeleton"] for note in notes]
        factor_names = [name for note in notes for name in note["factors"]]
        order = [self.family.EMBEDDING] + [k for k in model.params if k != self.family.EMBEDDING]
        skeleton = {"dict": {k: ({"list": layer_skeletons} if k == self.key else outer_skeleton[k]) for k in order}}
        info = {"source": str(src)}
        info_tensors: dict = {}
        if self.smooth:
            info["smoothing"] = smoothing_info(self.alpha, self.groups)
        info["quantization"] = self.spec.info()
        info_skeleton = _encode(info, "info", info_tensors)
        if self.smooth:   # the factors stay in the layer shards; refer to them by name
            info_skeleton["dict"]["smoothing"]["dict"]["factors"] = {
                "dict": {name: {"tensor": f"smoothing.{name}"} for name in factor_names}}
        maxima = [note["qkv_absmax"] for note in notes] if "qkv_absmax" in notes[0] else None
        attn_quant = attention_quant(self.spec, model, maxima)
        attn = None
        if attn_quant is not None:
            fields = {f.name: getattr(attn_quant, f.name) for f in dataclasses.fields(AttentionQuant)}
            attn = _encode(fields, "attn_quant", info_tensors)
        shards = ["model.safetensors"] + [f"layer-{i:05d}.safetensors" for i in range(L)]
        if info_tensors:   # the static attention scales
            save_file(info_tensors, self.dst / "info.safetensors")
            shards.insert(1, "info.safetensors")
        meta = dict(format=MODEL_FORMAT, config=model.config.to_dict(), params=skeleton, info=info_skeleton,
                    attn_quant=attn, tokenizer=model.tokenizer is not None, shards=shards)
        if model.tokenizer is not None:
            write_durably(self.dst / "tokenizer.json", lambda tmp: model.tokenizer.bpe.save(str(tmp)))
        write_json(self.dst / "minisq.json", meta)
