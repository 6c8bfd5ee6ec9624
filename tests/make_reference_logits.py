"""Write tests/data/reference_logits.npz: logits of tiny GPT-2 and OPT models computed by
minisq at commit 31e4c99 (before the families refactor), which test_families.py pins.

Run once from the repo root: ``PYTHONPATH=$PWD python3 tests/make_reference_logits.py``.
The tiny checkpoints come from tests/conftest.py's ``hf_model`` (seeded torch init), so the
test rebuilds exactly the same weights.
"""

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from conftest import hf_model, save_hf_model  # noqa: E402

import minisq  # noqa: E402
from minisq.calibrate import calibrate  # noqa: E402
from minisq.qlinear import quantize  # noqa: E402
from minisq.smooth import smooth  # noqa: E402

SYNTHETIC_CONFIGS = {
    "gpt2": minisq.ModelConfig(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, ffn_dim=128,
                               max_positions=64),
    "opt": minisq.ModelConfig(model_type="opt", vocab_size=101, hidden_size=32, num_layers=2, num_heads=4,
                              ffn_dim=64, max_positions=64, activation="relu", position_offset=2),
}
OUT = Path(__file__).parent / "data" / "reference_logits.npz"


def reference_inputs():
    # [2, 12] ids with a left-padded row, and calibration batches
    rng = np.random.default_rng(123)
    ids = rng.integers(0, 101, (2, 12))
    mask = np.ones((2, 12), np.int64)
    mask[1, :3] = 0
    calib = [rng.integers(0, 101, (2, 16)), rng.integers(0, 101, (1, 20))]
    return ids, mask, calib


def variants(model, calib):
    """name -> model: plain, smoothed (all groups), quantized O1 / O3 (int path), smoothed + O3 with attn_bmm."""
    stats = calibrate(model, calib, progress=False)
    smoothed = smooth(model, stats, alpha=0.5, groups="all")
    s_stats = calibrate(smoothed, calib, progress=False)
    return {
        "plain": model,
        "smoothed": smoothed,
        "O1": quantize(model, "O1", path="int"),
        "O3": quantize(model, "O3", stats=stats, path="int"),
        "smoothed_O3_attn": quantize(smoothed, "O3", stats=s_stats, path="int", attn_bmm="static"),
        "smoothed_O1_attn": quantize(smoothed, "O1", path="int", attn_bmm=True),
    }


def all_logits(folder_of) -> dict:
    ids, mask, calib = reference_inputs()
    out = {}
    for family in ("gpt2", "opt"):
        for dtype in ("float32", "float64"):
            model = minisq.load(folder_of(family), dtype=dtype)
            for name, m in variants(model, calib).items():
                out[f"{family}/{dtype}/{name}"] = m(ids, mask)
    # the synthetic-outlier recipe of each family (random weights, planted outliers)
    for family, cfg in SYNTHETIC_CONFIGS.items():
        out[f"synthetic/{family}"] = minisq.synthetic_model(cfg, seed=3)(ids, mask)
    return out


def main():
    with tempfile.TemporaryDirectory() as tmp:
        folders = {f: save_hf_model(hf_model(f), Path(tmp) / f) for f in ("gpt2", "opt")}
        logits = all_logits(folders.__getitem__)
    OUT.parent.mkdir(exist_ok=True)
    np.savez_compressed(OUT, **logits)
    print(f"wrote {OUT}: {len(logits)} arrays, {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main()
