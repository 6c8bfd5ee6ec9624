"""compressed-tensors ``int-quantized`` W8A8 checkpoints: write them, and read them back.

Legend: C_in / C_out a linear's widths (minisq stores ``[C_in, C_out]``, HF ``[C_out, C_in]``).

compressed-tensors is the format llm-compressor writes, vLLM serves (its
``CompressedTensorsW8A8Int8`` scheme) and transformers loads (with the ``compressed-tensors``
package installed). A W8A8 checkpoint in it is an ordinary Hugging Face folder, under the
checkpoint's own tensor names, whose quantized linears hold

* ``<name>.weight``: int8 codes ``[C_out, C_in]``;
* ``<name>.weight_scale``: ``[C_out, 1]`` (per channel) or ``[1]`` (per tensor), float;
* ``<name>.input_scale``: ``[1]``, for static activations only;
* ``<name>.bias``: float, as in the float model;

and whose ``config.json`` carries a ``quantization_config`` (``quant_method``
``"compressed-tensors"``, ``format`` ``"int-quantized"``, ``config_groups`` of ``weights`` /
``input_activations`` arguments, ``ignore``, ``quantization_status`` ``"compressed"``,
``version``). Everything here follows compressed-tensors 0.20.1's own definitions
(``QuantizationArgs``, ``preset_name_to_scheme("W8A8")``, ``NaiveQuantizationCompressor``,
``ModelCompressor.update_config``). A value is ``weight * weight_scale``; activations are
quantized by the format's rule, ``Δ = max|x| / 127.5`` with codes in [-128, 127]
(minisq's ``convention="compressed-tensors"``, :data:`minisq.quant.CONVENTIONS`).

minisq's schemes and the format's arguments (:data:`WEIGHT_ARGS`, :data:`ACT_ARGS`):

============================  ================================================
minisq                        compressed-tensors
============================  ================================================
weights="per_channel"         weights strategy "channel"
weights="per_tensor"          weights strategy "tensor"
acts="per_token"              input_activations strategy "token", dynamic
acts="per_tensor"             input_activations strategy "tensor", dynamic
acts="static" (O3)            input_activations strategy "tensor", static
============================  ================================================

What engines compute: a dynamic "tensor" scale is over the whole input (the batch), minisq's over one sequence.
And compressed-tensors' dynamic "token" scale reduces every axis but the first two, so a 2-D
input ``[N, C]`` (OPT's MLP in transformers, which flattens the tokens) gets one scale for all
N tokens there; minisq quantizes per token, as the format says.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..backend import to_numpy
from ..errors import CheckpointError, ConfigError, MinisqError, ShapeError
from ..families import family_for, params_from_state_dict, read_config
from ..nn import Linear
from ..qlinear import W8A8Linear
from ..tree import _map, _walk
from .dtypes import float32_to_bf16
from .hub import resolve_model_dir
from .jsonfile import read_json

QUANT_METHOD = "compressed-tensors"
FORMAT = "int-quantized"
VERSION = "0.20.1"   # the compressed-tensors release whose definitions this module follows

_INT8 = dict(num_bits=8, type="int", symmetric=True, group_size=None)
WEIGHT_ARGS = {"per_channel": dict(strategy="channel", dynamic=False),
               "per_tensor": dict(strategy="tensor", dynamic=False)}
ACT_ARGS = {"per_token": dict(strategy="token", dynamic=True),
            "per_tensor": dict(strategy="tensor", dynamic=True),
            "static": dict(strategy="tensor", dynamic=False)}

# what other compressed-tensors formats hold, for the message that refuses them
OTHER_FORMATS = {"float-quantized": "FP8 weights and activations", "naive-quantized": "fake-quantized weights",
                 "pack-quantized": "int4/int2 weights packed into int32", "nvfp4-pack-quantized": "NVFP4 weights",
                 "mixed-precision": "several formats in one model", "dense": "no quantized weights",
                 "sparse-24-bitmask": "2:4 sparse weights", "sparse-bitmask": "sparse weights",
                 "marlin-24": "2:4 sparse int4 weights"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "generation_config.json")
SAFETENSORS_CODE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int8": "I8", "float64": "F64"}


# ---------------------------------------------------------------------------------- writing

def quantization_config(schemes: dict, ignore: list) -> dict:
    """The ``quantization_config`` of config.json for ``schemes`` (``{(weights, acts): [names]}``),
    as compressed-tensors' ``ModelCompressor.update_config`` writes it. One scheme targets
    ``"Linear"`` (the float leaves are in ``ignore``); several target their layers by name."""
    groups = {}
    for i, ((weights, acts), names) in enumerate(sorted(schemes.items())):
        groups[f"group_{i}"] = dict(
            targets=["Linear"] if len(schemes) == 1 else sorted(names), format=FORMAT,
            weights={**_INT8, **WEIGHT_ARGS[weights]}, input_activations={**_INT8, **ACT_ARGS[acts]},
            output_activations=None)
    return dict(config_groups=groups, format=FORMAT, global_compression_ratio=None, ignore=sorted(ignore),
                kv_cache_scheme=None, quant_method=QUANT_METHOD, quantization_status="compressed",
                sparsity_config={}, transform_config={}, version=VERSION)


def _refuse(name: str, leaf) -> None:
    """ConfigError for a leaf whose scheme the format cannot express."""
    if not isinstance(leaf, W8A8Linear):
        what = getattr(leaf, "describe", lambda: type(leaf).__name__)()
        raise ConfigError(f"cannot export {name!r} to compressed-tensors: {what} is not W8A8 with one scale per "
                          "output channel or per tensor (ZeroQuant's groups, LLM.int8()'s float outlier columns and "
                          "weight-only W8A16 have no int-quantized W8A8 form); quantize with an O1-O3 preset")
    if leaf.acts not in ACT_ARGS:
        raise ConfigError(f"cannot export {name!r}: acts={leaf.acts!r} has no compressed-tensors form "
                          f"(it has {sorted(ACT_ARGS)})")
    if leaf.convention != "compressed-tensors":
        raise ConfigError(f"cannot export {name!r}: its activations round by the {leaf.convention!r} rule, and every "
                          "engine that reads compressed-tensors quantizes them by its own (max|x|/127.5, [-128, 127]); "
                          "quantize with convention='compressed-tensors' so that minisq computes what they compute")


def hf_prefix(config) -> str:
    """transformers' prefix of the decoder's tensor names for this model's family (its
    ``HF_PREFIX``), or a ConfigError for a family the format cannot hold (``NOT_EXPORTABLE``)."""
    family = family_for(config)
    if getattr(family, "HF_PREFIX", None) is None:
        why = getattr(family, "NOT_EXPORTABLE", "")
        raise ConfigError(f"cannot export a {config.model_type} model to compressed-tensors: minisq writes the OPT "
                          f"and Llama families (llama, mistral, qwen2)" + (f" ({why})" if why else ""))
    return family.HF_PREFIX


def check_exportable(model) -> None:
    """ConfigError unless the format can express ``model``'s scheme exactly."""
    q = model.info.get("quantization")
    if not q:
        raise ConfigError("compressed-tensors holds quantized models: quantize first "
                          "(minisq.quantize(model, 'O1', convention='compressed-tensors'))")
    hf_prefix(model.config)
    if model.attn_quant is not None:
        raise ConfigError("cannot export attention-BMM quantization (attn_bmm): compressed-tensors' int-quantized "
                          "format quantizes linear layers only; quantize with attn_bmm=False")
    if q.get("kv_cache", "float") != "float":
        raise ConfigError("cannot export kv_cache='int8': this minisq scheme has no compressed-tensors form here")
    for name, leaf in model.linears().items():
        if not isinstance(leaf, Linear):
            _refuse(name, leaf)


def hf_state_dict(model, dtype: str) -> tuple:
    """``(tensors, schemes, ignore)``: the model's tensors under its Hugging Face names and
    layouts (floats in ``dtype``), ``{(weights, acts): [quantized names]}`` and the float
    linears' names."""
    prefix = hf_prefix(model.config)
    embedding = model._embedding()
    out, schemes, ignore = {}, {}, []

    def hf(name):
        return name if name == "lm_head" else prefix + name

    def put(key, a, kind=None):
        out[key] = (np.ascontiguousarray(to_numpy(a)), kind or dtype)

    def walk(node, name):
        if isinstance(node, dict) and set(node) <= {"g", "b"}:                # a norm's gain and bias
            for k, suffix in (("g", "weight"), ("b", "bias")):
                if node.get(k) is not None:
                    put(f"{hf(name)}.{suffix}", node[k])
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{name}.{k}" if name else k)
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{name}.{i}")
        elif isinstance(node, W8A8Linear):
            put(f"{hf(name)}.weight", to_numpy(node.w_q).T, "int8")            # [C_out, C_in] int8
            w_s = to_numpy(node.w_scale)
            weights = "per_tensor" if w_s.size == 1 else "per_channel"                # [1, C_out] or one value
            put(f"{hf(name)}.weight_scale", w_s.reshape(-1, 1) if weights == "per_channel" else w_s.reshape(1),
                "float32")
            if node.acts == "static":
                put(f"{hf(name)}.input_scale", to_numpy(node.x_scale).reshape(1), "float32")
            if node.b is not None:
                put(f"{hf(name)}.bias", node.b)
            schemes.setdefault((weights, node.acts), []).append(hf(name))
        elif isinstance(node, Linear):
            ignore.append(hf(name))
            tied = name == "lm_head" and model.config.tie_word_embeddings and \
                np.array_equal(to_numpy(node.w).T, to_numpy(embedding))
            if not tied:
                put(f"{hf(name)}.weight", to_numpy(node.w).T)                  # [C_out, C_in]
            if node.b is not None:
                put(f"{hf(name)}.bias", node.b)
        elif node is not None:                                                # embedding tables
            put(f"{hf(name)}.weight", node)

    walk(model.params, "")
    return out, schemes, ignore


def _source_config(model) -> dict | None:
    """The config.json of the checkpoint the model came from, or None (synthetic, in memory)."""
    source = model.info.get("source")
    if not source:
        return None
    try:
        return read_json(resolve_model_dir(source) / "config.json")
    except (OSError, ValueError, MinisqError):
        return None


def _hf_config(model, raw, dtype: str, qconfig: dict, tied: bool) -> dict:
    """The source checkpoint's config.json (or the family's rendering of the config), with
    this dtype and quantization_config."""
    if raw is None:
        family = family_for(model.config)
        if not hasattr(family, "config_to_hf"):
            raise CheckpointError(f"the model has no source config.json and the {model.config.model_type} family "
                                  "cannot write one; load it from its checkpoint folder before quantizing")
        raw = family.config_to_hf(model.config)
    raw = {k: v for k, v in raw.items() if k not in ("quantization_config", "torch_dtype")}
    raw.update(dtype=dtype, tie_word_embeddings=tied, quantization_config=qconfig)
    return raw


def write_safetensors(tensors: dict, path) -> None:
    """A safetensors file from ``{name: (array, dtype name)}``; bfloat16 is written as its bits."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        a, kind = tensors[name]
        data = float32_to_bf16(a) if kind == "bfloat16" else np.ascontiguousarray(a, dtype=kind)
        raw = data.astype(data.dtype.newbyteorder("<")).tobytes()
        header[name] = dict(dtype=SAFETENSORS_CODE[kind], shape=list(a.shape), data_offsets=[offset, offset + len(raw)])
        blobs.append(raw)
        offset += len(raw)
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for raw in blobs:
            f.write(raw)


def source_dtype(raw) -> str:
    """The float dtype a source config.json states (float32 when it states none we write)."""
    stated = (raw or {}).get("dtype") or (raw or {}).get("torch_dtype")
    return stated if stated in ("float16", "bfloat16", "float32") else "float32"


def save_compressed_tensors(model, folder, dtype: str | None = None) -> Path:
    """Write a quantized ``model`` as a compressed-tensors int-quantized checkpoint.

    Float tensors (embeddings, norms, biases, skipped linears) are written in ``dtype``
    (default: the source checkpoint's float dtype), int8 codes and float32 scales as they
    are. Refused with a ConfigError before anything is written when the format cannot express
    the scheme; written to a temporary folder and renamed, so ``folder`` is never half-written.
    """
    check_exportable(model)
    raw = _source_config(model)
    dtype = dtype or source_dtype(raw)
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ConfigError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError(f"{folder} exists and is not an empty folder: choose a new one")
    if model.device != "cpu":
        model = model.to("cpu")
    tensors, schemes, ignore = hf_state_dict(model, dtype)
    tied = "lm_head.weight" not in tensors
    config = _hf_config(model, raw, dtype, quantization_config(schemes, ignore), tied)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write_safetensors(tensors, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        _write_tokenizer(model, tmp)
        if folder.exists():
            folder.rmdir()
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _write_tokenizer(model, folder: Path) -> None:
    """The source folder's tokenizer files, or the loaded tokenizer as minisq writes it."""
    source = model.info.get("source")
    src = Path(source) if source and Path(source).is_dir() else None
    copied = [n for n in TOKENIZER_FILES if src is not None and (src / n).is_file()]
    for n in copied:
        shutil.copyfile(src / n, folder / n)
    if not copied and model.tokenizer is not None:
        model.tokenizer.save(folder)


# ---------------------------------------------------------------------------------- reading

def is_compressed_tensors(folder) -> bool:
    """Whether ``folder/config.json`` declares a compressed-tensors quantization_config."""
    try:
        raw = read_json(Path(folder) / "config.json")
    except (OSError, MinisqError):
        return False
    q = raw.get("quantization_config") if isinstance(raw, dict) else None
    return isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD


def _granularity(args, table: dict, what: str, source: str) -> str:
    """The minisq granularity whose compressed-tensors arguments are ``args``, else a clear error."""
    if not isinstance(args, dict):
        raise CheckpointError(f"{source}: {what} is {args!r}; minisq reads W8A8 (int8 weights and int8 activations)")
    if (args.get("num_bits"), args.get("type")) != (8, "int"):
        raise CheckpointError(f"{source}: {what} are {args.get('num_bits')}-bit {args.get('type')}; minisq reads "
                              "8-bit int only (not fp8, int4, ...)")
    if not args.get("symmetric", True):
        raise CheckpointError(f"{source}: {what} are asymmetric (zero points); minisq reads symmetric int8 only")
    if args.get("group_size") is not None or args.get("strategy") in ("group", "tensor_group", "block"):
        raise CheckpointError(f"{source}: {what} are group-wise ({args.get('strategy')}, group_size "
                              f"{args.get('group_size')}); minisq reads per-channel/per-tensor/per-token scales only")
    for name, want in table.items():
        if args.get("strategy") == want["strategy"] and bool(args.get("dynamic")) == want["dynamic"]:
            return name
    raise CheckpointError(f"{source}: {what} with strategy {args.get('strategy')!r}, dynamic={args.get('dynamic')!r} "
                          f"have no minisq form (it reads {[(v['strategy'], v['dynamic']) for v in table.values()]})")


def read_schemes(q: dict, source: str) -> list:
    """``[(targets, (weights, acts))]`` from a quantization_config, refusing what minisq cannot run."""
    fmt = q.get("format")
    if q.get("sparsity_config") or q.get("transform_config") or q.get("kv_cache_scheme"):
        what = [k for k in ("sparsity_config", "transform_config", "kv_cache_scheme") if q.get(k)]
        raise CheckpointError(f"{source}: the checkpoint uses {what}; minisq reads plain int-quantized W8A8 only")
    if q.get("quantization_status") != "compressed":
        raise CheckpointError(f"{source}: quantization_status is {q.get('quantization_status')!r}; minisq reads "
                              "'compressed' checkpoints (int8 weights with their scales)")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise CheckpointError(f"{source}: quantization_config has no config_groups")
    out = []
    for gname, g in groups.items():
        gfmt = g.get("format") or fmt
        if gfmt != FORMAT:
            raise CheckpointError(f"{source}: group {gname!r} has format {gfmt!r} "
                                  f"({OTHER_FORMATS.get(gfmt, 'not int8 W8A8')}); minisq reads {FORMAT!r} W8A8 only")
        if g.get("output_activations"):
            raise CheckpointError(f"{source}: group {gname!r} quantizes output activations; minisq does not")
        weights = _granularity(g.get("weights"), WEIGHT_ARGS, f"group {gname!r}'s weights", source)
        acts = _granularity(g.get("input_activations"), ACT_ARGS, f"group {gname!r}'s input activations", source)
        out.append((list(g.get("targets") or []), (weights, acts)))
    return out


def _matches(name: str, target: str) -> bool:
    # compressed-tensors' match_name (exact name, or "re:" + a regex matched at the start), and
    # the class name "Linear", which every linear leaf is
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target in (name, "Linear")


SCALE_SUFFIXES = (".weight_scale", ".input_scale")   # beside each weight; read per leaf, not by the family


def load_compressed_tensors(folder, dtype: str = "float32") -> dict:
    """The fields of a :class:`~minisq.model.Model` from a compressed-tensors int-quantized
    W8A8 checkpoint: its int8 codes and scales go unchanged into :class:`W8A8Linear` leaves
    that evaluate by the format's rule (``convention="compressed-tensors"``).

    Holds the whole checkpoint in memory, plus a float placeholder of each quantized weight.
    """
    from .checkpoint import read_state_dict
    from .tokenizer import load_tokenizer

    folder = Path(folder)
    source = str(folder)
    raw = read_json(folder / "config.json")
    schemes = read_schemes(raw["quantization_config"], source)
    ignore = list(raw["quantization_config"].get("ignore") or [])
    config = read_config(folder)
    compute = np.dtype("float64" if dtype == "float64" else "float32")
    state = read_state_dict(folder)
    # what the family's reader expects: a float weight of the right shape in place of the codes
    placeholder = {k: np.zeros(v.shape, np.float32) for k, v in state.items()
                   if k.endswith(".weight") and v.dtype == np.int8}
    float_state = {k: v for k, v in {**state, **placeholder}.items() if not k.endswith(SCALE_SUFFIXES)}
    params = params_from_state_dict(config, float_state, compute, source=source)
    used, quantized_kinds = set(), set()

    def module_of(name):          # the checkpoint's module name of a minisq leaf
        hits = [k[:-len(".weight")] for k in state if k.endswith(".weight") and
                (k[:-len(".weight")] == name or k[:-len(".weight")].endswith("." + name))]
        return hits[0] if len(hits) == 1 else (name if name == "lm_head" else None)

    def swap(name, leaf):
        module = module_of(name)
        scheme = None
        if module is not None and not any(_matches(module, ign) for ign in ignore):
            scheme = next((s for targets, s in schemes if any(_matches(module, t) for t in targets)), None)
        if scheme is None:
            if module is not None and f"{module}.weight" in placeholder:
                raise CheckpointError(f"{source}: {module!r} holds int8 weights but no config group quantizes it")
            return leaf
        used.add(module)
        quantized_kinds.add(scheme)
        return _w8a8_leaf(state, module, leaf, *scheme, compute, source)

    qparams = _map(params, swap, "")
    stray = sorted(k for k in state if k.endswith(SCALE_SUFFIXES) and k.rsplit(".", 1)[0] not in used)
    if stray:
        raise CheckpointError(f"{source}: scales for layers no config group quantizes: {stray[:3]}")
    weights, acts = sorted(quantized_kinds)[0] if len(quantized_kinds) == 1 else ("mixed", "mixed")
    skip = sorted(n for n, leaf in _walk(qparams, "") if isinstance(leaf, Linear))
    info = {"source": source, "quantization": dict(preset="custom", weights=weights, acts=acts, path="int", skip=skip,
                                                   attn_bmm=False, convention="compressed-tensors", format=QUANT_METHOD)}
    try:
        tokenizer = load_tokenizer(folder, config.model_type)
    except CheckpointError:
        tokenizer = None
    return dict(config=config, params=qparams, tokenizer=tokenizer, info=info)


def _w8a8_leaf(state, module: str, leaf: Linear, weights: str, acts: str, dtype, source: str) -> W8A8Linear:
    """One quantized linear from its stored tensors, every shape and value checked."""
    def need(suffix):
        key = f"{module}.{suffix}"
        if key not in state:
            raise CheckpointError(f"{source}: {key!r} is missing: a {weights} int8 layer needs its {suffix}")
        return state[key]

    w = need("weight")                                                  # [C_out, C_in] int8
    if w.dtype != np.int8:
        raise CheckpointError(f"{source}: {module}.weight has dtype {w.dtype}; an int-quantized layer stores int8")
    c_out = w.shape[0]
    scale = np.asarray(need("weight_scale"))
    want = (c_out, 1) if weights == "per_channel" else (1,)
    if scale.shape != want and not (weights == "per_tensor" and scale.size == 1):
        raise ShapeError(f"{source}: {module}.weight_scale has shape {scale.shape}, expected {want} for {weights} "
                         f"weights of {tuple(w.shape)}")
    w_scale = scale.reshape(1, c_out) if weights == "per_channel" else scale.reshape(())
    x_scale = None
    if acts == "static":
        s = np.asarray(need("input_scale"))
        if s.size != 1:
            raise ShapeError(f"{source}: {module}.input_scale has shape {s.shape}, expected (1,)")
        x_scale = s.reshape(()).astype(dtype)
    for name, s in (("weight_scale", w_scale), ("input_scale", x_scale)):
        if s is not None and not (np.isfinite(s).all() and (s > 0).all()):
            raise CheckpointError(f"{source}: {module}.{name} holds values that are not finite and > 0")
    return W8A8Linear(np.ascontiguousarray(w.T), w_scale.astype(dtype), leaf.b, acts=acts, x_scale=x_scale,
                      path="int", convention="compressed-tensors")
