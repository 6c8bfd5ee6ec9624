"""The command line: ``minisq demo | quantize | reproduce`` (console script and ``python -m
minisq``), ``python -m minisq.demo``; help, exit statuses, and errors as one line."""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from minisq.__main__ import COMMANDS, main
from minisq.cli import common
from minisq.errors import CheckpointError, MinisqError

ROOT = Path(__file__).resolve().parents[1]


def _run(*argv, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    return subprocess.run([*argv], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


@pytest.mark.parametrize("argv, prog", [
    (["-m", "minisq.demo"], "python -m minisq.demo"),
    (["-m", "minisq", "demo"], "python -m minisq demo"),
    (["-m", "minisq", "quantize"], "python -m minisq quantize"),
    (["-m", "minisq", "reproduce"], "python -m minisq reproduce"),
])
def test_help_exits_0_and_names_the_program(argv, prog):
    res = _run(sys.executable, *argv, "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"usage: {prog} [-h]") and "--debug" in res.stdout
    assert res.stderr == ""


def test_top_level_help_lists_every_subcommand():
    res = _run(sys.executable, "-m", "minisq", "--help")
    assert res.returncode == 0 and res.stdout.startswith("usage: python -m minisq {demo,quantize,reproduce}")
    for name in ("demo", "quantize", "reproduce"):
        assert f"\n  {name} " in res.stdout


def test_the_console_script_is_the_subcommand_entry(capsys):
    """pyproject's ``minisq`` script names minisq.__main__:main, which runs as "minisq"; where
    the package is installed (``pip install -e .``, as in CI) the script itself is run too."""
    section = (ROOT / "pyproject.toml").read_text().split("[project.scripts]\n", 1)[1].split("\n\n", 1)[0]
    assert section.splitlines() == ['minisq = "minisq.__main__:main"']   # one entry (tomllib is 3.11+)
    with pytest.raises(SystemExit) as exit_:
        main(["quantize", "--help"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("usage: minisq quantize [-h]")
    script = shutil.which("minisq")
    assert script is not None or not os.environ.get("CI"), "CI installs with pip install -e .: no minisq script"
    if script is not None:
        res = _run(script, "quantize", "--help")
        assert res.returncode == 0 and res.stdout.startswith("usage: minisq quantize [-h]"), res.stderr


def test_unknown_or_missing_subcommand_exits_2(capsys):
    assert main(["quantise"]) == 2
    err = capsys.readouterr().err
    assert err.rstrip().endswith("minisq: error: unknown subcommand 'quantise'") and "usage: minisq {" in err
    assert main([]) == 2 and "name a subcommand" in capsys.readouterr().err
    assert sorted(COMMANDS) == ["demo", "quantize", "reproduce"]


@pytest.mark.parametrize("argv", [["quantize", "src", "dst", "--alpha", "2"], ["quantize", "src"],
                                  ["demo", "--alpha", "nan"], ["demo", "--alphas", "0,x"],
                                  ["demo", "--calib-samples", "0"], ["reproduce", "--variants", "O4"]])
def test_bad_arguments_exit_2_before_any_work(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and "error:" in capsys.readouterr().err


def test_a_minisq_error_is_one_line_and_exit_1(tmp_path):
    missing, dst = tmp_path / "no-such-model", tmp_path / "dst"
    res = _run(sys.executable, "-m", "minisq", "quantize", str(missing), str(dst))
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1
    assert res.stderr.startswith(f"python -m minisq quantize: error: there is no folder {missing}.")
    assert not dst.exists(), "a failed run leaves no empty output folder"


def test_debug_shows_the_traceback_then_the_line(tmp_path):
    missing = tmp_path / "no-such-model"
    res = _run(sys.executable, "-m", "minisq", "quantize", str(missing), str(tmp_path / "dst"), "--debug")
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):" and "CheckpointError: there is no folder" in res.stderr
    assert lines[-1].startswith("python -m minisq quantize: error: there is no folder")


def test_an_unwritable_destination_is_one_line_and_exit_1(tmp_path):
    res = _run(sys.executable, "-m", "minisq", "quantize", str(tmp_path / "src"), "/proc/x")
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("python -m minisq quantize: error: cannot make the output folder /proc/x: ")
    assert not Path("/proc/x").exists()


def test_an_os_error_is_one_line_and_exit_1(tmp_path):
    """--out below a file: the OSError from making the folder becomes one line, before any model loads."""
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "out"
    res = _run(sys.executable, "-m", "minisq", "reproduce", "--models", str(tmp_path / "never-read"), "--out", str(out))
    assert res.returncode == 1
    assert res.stderr == (f"python -m minisq reproduce: error: [Errno {errno.ENOTDIR}] "
                          f"{os.strerror(errno.ENOTDIR)}: '{out / 'cache'}'\n")
    res = _run(sys.executable, "-m", "minisq", "demo", "--model", "synthetic", "--out", str(out), "--debug")
    assert res.returncode == 1 and "Traceback" in res.stderr and "NotADirectoryError" in res.stderr
    assert res.stderr.splitlines()[-1] == (f"python -m minisq demo: error: [Errno {errno.ENOTDIR}] "
                                           f"{os.strerror(errno.ENOTDIR)}: '{out}'")


def test_run_program_turns_errors_into_one_line(capsys):
    def fails(exc):
        def body(args):
            raise exc
        return body

    quiet = argparse.Namespace(debug=False)
    assert common.run_program("prog", lambda args: None, quiet) == 0
    assert common.run_program("prog", fails(CheckpointError("first line\n  second  line")), quiet) == 1
    assert capsys.readouterr().err == "prog: error: first line second line\n"
    assert common.run_program("prog", fails(PermissionError(errno.EACCES, "Permission denied", "/x")), quiet) == 1
    assert capsys.readouterr().err == "prog: error: [Errno 13] Permission denied: '/x'\n"
    assert common.run_program("prog", fails(MinisqError("")), quiet) == 1
    assert capsys.readouterr().err == "prog: error: MinisqError\n"
    # anything else is a bug in minisq: its traceback is not hidden
    with pytest.raises(ZeroDivisionError):
        common.run_program("prog", fails(ZeroDivisionError("bug")), quiet)
