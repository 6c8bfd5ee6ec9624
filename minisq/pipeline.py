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
last finished layer with the same result. The file-writing part (``_prepare_dst``,
``_write_json``, ``_save_file``, the carry files) is kept apart from the algorithm.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from .attnquant import AttentionQuant, attention_quant
from .calibrate import Recorder, as_sequences, calibrate_layer, observe
from .errors import CheckpointError, ConfigError
from .layerwise import embed_all
from .progress import progress as show_progress
from .qlinear import DEFAULT_SKIP, quant_spec, quantize_leaves
from .smooth import resolve_groups, smooth_layer, smoothing_info, smoothing_rows
from .tree import _walk

RUN_FILE = "quantize_run.json"
FORMAT = "minisq-quantize-run-v2"


def _calib_digest(seqs) -> str:
    h = hashlib.sha256()
    for ids in seqs:
        h.update(str(ids.shape).encode())
        h.update(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


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
    module docstring).

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
    from .io.loading import load

    if preset is None:
        raise ConfigError("quantize_checkpoint needs a preset (naive, O1, O2, O3 or a baseline)")
    if format not in ("minisq", "compressed-tensors"):
        raise ConfigError(f"format={format!r} is not one of ('minisq', 'compressed-tensors')")
    convention = "compressed-tensors" if format == "compressed-tensors" else "smoothquant"
    spec = quant_spec(preset, path=path, skip=DEFAULT_SKIP if skip is None else skip, attn_bmm=attn_bmm,
                      threshold=threshold, group_size=group_size, kv_cache=kv_cache, convention=convention)
    model = load(src, lazy=True)
    if format == "compressed-tensors":      # refuse what the format cannot express before any work
        from .io.compressed_tensors import CHECKPOINT_PREFIX
        if (spec.attn_bmm is not False or spec.kv_cache != "float" or spec.threshold is not None
                or spec.group_size is not None or spec.acts in ("float", "per_channel") or spec.path != "int"
                or model.config.model_type not in CHECKPOINT_PREFIX):
            raise ConfigError(f"compressed-tensors holds W8A8 {sorted(CHECKPOINT_PREFIX)} models on the integer path, "
                              f"without attention-BMM quantization, an int8 KV cache or the baselines' schemes "
                              f"(this is {model.config.model_type}, preset {preset!r}, attn_bmm={attn_bmm!r})")
    groups = resolve_groups(model.config, groups)
    seqs = as_sequences(model, calib)
    final, dst = Path(dst), Path(dst)
    if format == "compressed-tensors":
        dst = final.with_name(f".{final.name}.minisq-run")
    key = dict(format=FORMAT, src=str(src), alpha=alpha, smooth=bool(smooth), groups=list(groups),
               quantization=spec.info(), calib=_calib_digest(seqs), layers=model.config.num_layers)
    done = _prepare_dst(dst, key, resume)
    run = _Run(model, dst, spec, alpha, smooth, groups, seqs)
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


# --------------------------------------------------------------------------------------------
# the files: a run's key and progress, atomic writes


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
        except (OSError, ValueError, RecursionError) as e:   # RecursionError: JSON nested too deep
            raise CheckpointError(f"{run_file} is unreadable ({e!r:.200}); delete {dst} and start again") from None
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
        _save_file(tensors, self.dst / f"layer-{i:05d}.safetensors")
        _write_json(self.dst / f"layer-{i:05d}.json", note)
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
        _save_file(tensors, self.dst / "model.safetensors")
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
