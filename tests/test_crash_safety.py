"""quantize_checkpoint survives a kill at every file operation, and never mixes a changed
source or deletes a file it did not write.

The kill test: a forked child runs quantize_checkpoint with ``os.mkdir``, ``os.fsync`` (each
write, made durable), ``os.replace``, ``os.unlink`` and ``os.rmdir`` counted, and dies by
``os._exit`` right after the k-th; a fresh forked child runs the same command again. For
every k until a run is no longer killed, the folder must then hold exactly the files of an
uninterrupted run, byte for byte (every tensor, the model's JSON, the run file). The oracle
is the uninterrupted run itself. Tiny random checkpoints: OPT and a grouped-query Llama
(2 kv heads for 4 query heads), 2 layers, hidden 32, two calibration sequences of 8 tokens.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest

import minisq

pytest.importorskip("torch")
if not hasattr(os, "fork"):
    pytest.skip("the kill test forks (POSIX only)", allow_module_level=True)

V = 101
CALIB = [np.random.default_rng(s).integers(0, V, 8) for s in (30, 31)]
KILLED = 77
COUNTED = ("mkdir", "fsync", "replace", "unlink", "rmdir")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """family -> a tiny float32 checkpoint folder."""
    from conftest import hf_model, save_hf_model
    from test_llama import hf_llama

    folders = {}

    def make(family):
        if family not in folders:
            hf = hf_model("opt", seed=3) if family == "opt" else hf_llama("llama", seed=3)
            folders[family] = save_hf_model(hf, tmp_path_factory.mktemp(f"{family}-kill"))
        return folders[family]

    return make


def in_child(fn) -> int:
    """Run ``fn()`` in a forked child; its exit code (0 done, KILLED, 3 an exception)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # fork with threads alive: the child uses none
        pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn()
        except BaseException:  # noqa: BLE001  (any failure: report it through the exit code)
            traceback.print_exc()
            code = 3
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def killed_at(k: int, fn):
    """``fn`` with the k-th counted file operation fatal (the process exits right after it)."""
    def run():
        count = [0]
        for name in COUNTED:
            original = getattr(os, name)

            def op(*args, _original=original, **kwargs):
                result = _original(*args, **kwargs)
                count[0] += 1
                if count[0] == k:
                    os._exit(KILLED)
                return result

            setattr(os, name, op)
        fn()
    return run


def files_of(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_a_kill_at_every_file_operation_resumes_to_the_identical_result(source, tmp_path, family):
    src = source(family)

    def quantize(dst):
        return lambda: minisq.quantize_checkpoint(src, dst, CALIB, progress=False)

    assert in_child(quantize(tmp_path / "whole")) == 0
    whole = files_of(tmp_path / "whole")
    assert {"minisq.json", "model.safetensors", "quantize_run.json"} <= set(whole)
    assert not any(n.startswith("carry") or n.endswith(".tmp") or n.endswith(".json") and n.startswith("layer")
                   for n in whole)
    k = 0
    while True:
        k += 1
        dst = tmp_path / f"killed-{k}"
        code = in_child(killed_at(k, quantize(dst)))
        if code == 0:          # k is past the last file operation: nothing left to kill
            break
        assert code == KILLED, f"operation {k}: the killed run failed before the kill"
        assert in_child(quantize(dst)) == 0, f"operation {k}: the same command after the kill failed"
        got = files_of(dst)
        assert list(got) == list(whole), f"operation {k}"
        for name in whole:
            assert got[name] == whole[name], f"operation {k}: {name} differs"
    assert k > 30, f"only {k - 1} file operations were counted"
    m = minisq.load(dst)
    assert m.config.num_layers == 2 and isinstance(m.linears()["layers.0.fc1" if family == "opt"
                                                                else "layers.0.mlp.up_proj"], minisq.W8A8Linear)


def test_a_finished_run_again_is_a_no_op_that_says_so_and_keeps_other_files(source, tmp_path, capsys):
    src = source("opt")
    dst = minisq.quantize_checkpoint(src, tmp_path / "q", CALIB, progress=False)
    before = files_of(dst)
    (dst / "layer-notes.json").write_text('{"mine": 1}')           # a user's file, matching layer-*.json
    (dst / "carry-notes.safetensors").write_text("mine")
    capsys.readouterr()
    assert minisq.quantize_checkpoint(src, dst, CALIB, progress=False) == dst
    assert "already holds the finished result" in capsys.readouterr().err
    after = files_of(dst)
    assert after.pop("layer-notes.json") == b'{"mine": 1}' and after.pop("carry-notes.safetensors") == b"mine"
    assert after == before
    with pytest.raises(minisq.CheckpointError, match="other arguments.*alpha"):
        minisq.quantize_checkpoint(src, dst, CALIB, alpha=0.75, progress=False)


def test_a_finished_run_whose_clean_up_was_cut_short_finishes_it(source, tmp_path):
    """The run file says finished and lists its scratch files; a carry and a layer note are
    still there (the kill came mid clean-up): the same command deletes them, and only them."""
    src = source("opt")
    dst = minisq.quantize_checkpoint(src, tmp_path / "q", CALIB, progress=False)
    run = json.loads((dst / "quantize_run.json").read_text())
    assert run["finished"] and run["scratch"] == []
    run["scratch"] = ["carry-00001.safetensors", "layer-00000.json"]
    (dst / "quantize_run.json").write_text(json.dumps(run))
    (dst / "carry-00001.safetensors").write_bytes(b"x")
    (dst / "layer-00000.json").write_text("{}")
    (dst / "layer-00001.json").write_text('{"mine": 1}')              # not listed: not the run's to delete
    minisq.quantize_checkpoint(src, dst, CALIB, progress=False)
    names = {p.name for p in dst.iterdir()}
    assert "carry-00001.safetensors" not in names and "layer-00000.json" not in names
    assert "layer-00001.json" in names
    assert json.loads((dst / "quantize_run.json").read_text())["scratch"] == []


def test_resuming_onto_a_changed_source_is_refused_naming_the_change(source, tmp_path):
    """A run killed after its first layer; the source's weights rewritten (same size, layer 0
    scaled by 1.5): the resume is refused and names the file, instead of mixing two models."""
    import shutil

    from safetensors.numpy import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(source("opt"), src)
    killed = in_child(killed_at(16, lambda: minisq.quantize_checkpoint(src, tmp_path / "q", CALIB,
                                                                        progress=False)))
    assert killed == KILLED
    assert json.loads((tmp_path / "q" / "quantize_run.json").read_text())["layers_done"] == 1
    weights = load_file(str(src / "model.safetensors"))
    name = next(k for k in weights if "layers.0.fc1.weight" in k)
    weights[name] = weights[name] * np.float32(1.5)
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(minisq.CheckpointError, match=r"source .* changed .*model\.safetensors changed \(.*content"):
        minisq.quantize_checkpoint(src, tmp_path / "q", CALIB, progress=False)
    (src / "config.json").touch()
    with pytest.raises(minisq.CheckpointError, match=r"config\.json changed \(modified time\)"):
        minisq.quantize_checkpoint(src, tmp_path / "q", CALIB, progress=False)


@pytest.mark.parametrize("kwargs,match", [
    (dict(alpha="0.5"), r"alpha must be a number, got '0\.5' \(str\)"),
    (dict(alpha=float("nan")), "alpha must be a finite number"),
    (dict(alpha=1.5), r"alpha must be <= 1\.0"),
    (dict(alpha=True), "alpha must be a number"),
    (dict(groups="bogus"), "groups"),
    (dict(smooth="yes"), "smooth must be True or False"),
    (dict(calib=[np.array([1, 2, V + 5])]), "vocab"),
    (dict(calib=[np.array([1.5, 2.0])]), "integers"),
    (dict(calib=None), "calib"),
])
def test_bad_arguments_are_refused_before_anything_is_written(source, tmp_path, kwargs, match):
    args = {"calib": CALIB, **kwargs}
    calib = args.pop("calib")
    with pytest.raises(minisq.MinisqError, match=match):
        minisq.quantize_checkpoint(source("opt"), tmp_path / "q", calib, progress=False, **args)
    assert not (tmp_path / "q").exists()


def test_numpy_scalar_alpha_is_a_number_and_json_safe(source, tmp_path):
    dst = minisq.quantize_checkpoint(source("opt"), tmp_path / "q", CALIB, alpha=np.float32(0.5), progress=False)
    run = json.loads((dst / "quantize_run.json").read_text())
    assert run["key"]["alpha"] == 0.5 and type(run["key"]["alpha"]) is float
    assert minisq.load(dst).info["smoothing"]["alpha"] == 0.5
