"""The layer-outer forward pass: models bigger than memory (the loop over layers outermost).

Legend: N batches, B batch, T tokens, C hidden, V vocab.

A forward pass is ``embed → block 0 → … → block L-1 → head``. Running it batch by batch
reads every layer once per batch; swapping the two loops — *for each layer, for each
batch* — reads every layer once in total, so only one layer's weights (widened to float32)
need to be in memory, plus the activations of all batches ``N · [B, T, C]``. That is how
production tools quantize models larger than a GPU (llm-compressor's "sequential
onloading", NVIDIA ModelOpt's layerwise calibration). Calibration and evaluation of a lazy
model run this way, and :func:`minisq.quantize_checkpoint` drives SmoothQuant with
:func:`embed_all` and :func:`apply_layer` one layer at a time.

The same batches go through the same family functions (``embed``, ``block``, ``head``) as
in :meth:`minisq.Model.forward`, so the results are the same bits.
"""

from __future__ import annotations

from .progress import progress as show_progress


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
    """Decoder layer ``i`` (its parameters ``layer``) applied to every batch's hidden states.

    The list ``xs`` is updated in place, so that each batch's old states are freed as soon
    as its new ones exist (the list is the driver's working memory, not a model)."""
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
