"""Peak memory of big models: eager vs lazy (memory-mapped, layer by layer) vs quantize_checkpoint.

    python benchmarks/memory.py --layers 8            # 8 layers of OPT-6.7B's shapes, 3.6 GB float16
    python benchmarks/memory.py --layers 32           # the full OPT-6.7B shape, 13.4 GB float16

Writes a **random-weight** float16 safetensors checkpoint of OPT-6.7B's layer shapes (hidden
4096, FFN 16384, 32 heads, vocab 50272; one shard per layer, written straight with NumPy +
safetensors) into ``--dir``, then runs each scenario in a child process and samples that
process's ``RssAnon`` (anonymous resident memory: what the program itself holds; pages of
a memory-mapped file are page cache, not the program's memory) every 20 ms:

* ``eager``: ``minisq.load(folder)`` (float32) + perplexity — skipped when the float32
  weights would not fit in the machine's memory;
* ``lazy``: ``minisq.load(folder, lazy=True)`` + perplexity, layer by layer;
* ``quantize``: ``minisq.quantize_checkpoint(folder, dst, calib, "O3")``;
* ``w8a8_lazy``: ``minisq.load(dst, lazy=True)`` + perplexity: the W8A8 result of
  ``quantize``, evaluated layer by layer (needs ``quantize`` first, in this run or kept
  from an earlier one with ``--keep``).

Prints peak anonymous memory (GB), wall time and the ratio to the float32 model's size.
The weights are random (synthetic): the numbers are about memory and time, not accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

OPT_6_7B = dict(hidden_size=4096, ffn_dim=16384, num_attention_heads=32, vocab_size=50272,
                max_position_embeddings=2048, word_embed_proj_dim=4096)


def write_checkpoint(folder: Path, layers: int, seed: int = 0) -> int:
    """A random float16 OPT checkpoint of OPT-6.7B's shapes, one safetensors shard per layer.
    Returns its parameter count. Values are slices of one random pool (fast; this benchmark
    measures memory, not accuracy)."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    C, F, V, P = OPT_6_7B["hidden_size"], OPT_6_7B["ffn_dim"], OPT_6_7B["vocab_size"], OPT_6_7B["max_position_embeddings"]
    rng = np.random.default_rng(seed)
    pool = (rng.standard_normal(max(F, V) * C + 4096) * 0.02).astype(np.float16)   # [V*C + slack]

    def rand(*shape):
        n = int(np.prod(shape))
        start = int(rng.integers(0, pool.size - n + 1))
        return pool[start:start + n].reshape(shape)

    def ln(prefix):
        return {f"{prefix}.weight": np.ones(C, np.float16), f"{prefix}.bias": np.zeros(C, np.float16)}

    weight_map, n_params = {}, 0
    shards = {"embeddings.safetensors": {"model.decoder.embed_tokens.weight": rand(V, C),
                                         "model.decoder.embed_positions.weight": rand(P + 2, C),
                                         **ln("model.decoder.final_layer_norm")}}
    for i in range(layers):
        p = f"model.decoder.layers.{i}"
        t = {**ln(f"{p}.self_attn_layer_norm"), **ln(f"{p}.final_layer_norm")}
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[f"{p}.self_attn.{name}.weight"], t[f"{p}.self_attn.{name}.bias"] = rand(C, C), rand(C)
        t[f"{p}.fc1.weight"], t[f"{p}.fc1.bias"] = rand(F, C), rand(F)
        t[f"{p}.fc2.weight"], t[f"{p}.fc2.bias"] = rand(C, F), rand(C)
        shards[f"layer-{i:03d}.safetensors"] = t
    for name, tensors in shards.items():
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(folder / name))
        weight_map.update({k: name for k in tensors})
        n_params += sum(v.size for v in tensors.values())
        shards[name] = None                                                       # free as we go
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = dict(model_type="opt", architectures=["OPTForCausalLM"], num_hidden_layers=layers,
                  do_layer_norm_before=True, activation_function="relu", enable_bias=True,
                  layer_norm_elementwise_affine=True, pad_token_id=1, bos_token_id=2, eos_token_id=2,
                  torch_dtype="float16", **OPT_6_7B)
    (folder / "config.json").write_text(json.dumps(config))
    return n_params


SCENARIOS = {
    "eager": """
import numpy as np, minisq
m = minisq.load({folder!r})
ids = np.random.default_rng(0).integers(3, 50000, {tokens})
print(minisq.perplexity(m, ids, seq_len={seq_len}, batch_size={batch}, progress=False))
""",
    "lazy": """
import numpy as np, minisq
m = minisq.load({folder!r}, lazy=True)
ids = np.random.default_rng(0).integers(3, 50000, {tokens})
print(minisq.perplexity(m, ids, seq_len={seq_len}, batch_size={batch}, progress=False))
""",
    "quantize": """
import numpy as np, minisq
calib = [np.random.default_rng(i).integers(3, 50000, {seq_len}) for i in range({calib})]
minisq.quantize_checkpoint({folder!r}, {dst!r}, calib, preset="O3", progress=False)
print("done")
""",
    "w8a8_lazy": """
import numpy as np, minisq
m = minisq.load({dst!r}, lazy=True)
ids = np.random.default_rng(0).integers(3, 50000, {tokens})
print(minisq.perplexity(m, ids, seq_len={seq_len}, batch_size={batch}, progress=False))
""",
}


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


def rss_anon(pid: int) -> int:
    """RssAnon of a process in bytes (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(code: str) -> dict:
    """Run ``code`` in a child Python; its peak RssAnon (sampled every 20 ms) and wall time."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], rss_anon(proc.pid))
            time.sleep(0.02)

    thread = threading.Thread(target=sample)
    thread.start()
    out, err = proc.communicate()
    thread.join()
    return dict(peak_gb=peak[0] / 1e9, seconds=time.perf_counter() - t0, rc=proc.returncode,
                out=out.strip()[-200:], err=err.strip()[-800:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of OPT-6.7B's shapes (32 = the full model)")
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp folder)")
    ap.add_argument("--tokens", type=int, default=2048, help="evaluation tokens (default 2048)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4, help="windows per batch for perplexity")
    ap.add_argument("--calib", type=int, default=8, help="calibration sequences of --seq-len tokens")
    ap.add_argument("--scenarios", default="eager,lazy,quantize,w8a8_lazy")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    args = ap.parse_args(argv)

    root = Path(args.dir or tempfile.mkdtemp(prefix="minisq-memory-"))
    folder, dst = root / f"opt-6.7b-shapes-{args.layers}L", root / f"opt-6.7b-shapes-{args.layers}L-o3"
    t0 = time.perf_counter()
    if (folder / "config.json").is_file() and args.keep:     # kept from an earlier --keep run
        n_params = sum(int(np.prod(v["shape"])) for f in folder.glob("*.safetensors")
                       for k, v in _header(f).items() if k != "__metadata__")
    else:
        n_params = write_checkpoint(folder, args.layers)
    f32_gb = 4 * n_params / 1e9
    print(f"SYNTHETIC (random weights) OPT-6.7B-shaped checkpoint, {args.layers} layers: {n_params / 1e9:.2f}B "
          f"parameters, {2 * n_params / 1e9:.1f} GB float16 on disk, {f32_gb:.1f} GB in float32 "
          f"(written in {time.perf_counter() - t0:.0f} s)")
    avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") / 1e9
    print(f"{'scenario':<10} {'peak RssAnon GB':>16} {'/ float32 model':>16} {'time s':>8}")
    results = {}
    for name in args.scenarios.split(","):
        if name == "eager" and f32_gb > 0.8 * avail:
            print(f"{name:<10} skipped: the float32 weights ({f32_gb:.1f} GB) would not fit in {avail:.1f} GB free")
            continue
        code = SCENARIOS[name].format(folder=str(folder), dst=str(dst), tokens=args.tokens, seq_len=args.seq_len,
                                      batch=args.batch, calib=args.calib)
        r = measure(code)
        results[name] = r
        status = "" if r["rc"] == 0 else f"   FAILED (rc {r['rc']}): {r['err'][-300:]}"
        print(f"{name:<10} {r['peak_gb']:>16.2f} {r['peak_gb'] / f32_gb:>16.3f} {r['seconds']:>8.1f}{status}")
    if not args.keep:   # only what this run wrote
        import shutil
        for path in (folder, dst):
            shutil.rmtree(path, ignore_errors=True)
    return 0 if all(r["rc"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
