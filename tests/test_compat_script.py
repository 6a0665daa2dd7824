"""scripts/compat.py without downloads: a venv stand-in (this interpreter) runs the chosen tests, and the
result is one JSON line with the pair, the installed versions and the counts."""

import json
import os
import sys

import torch

from scripts import compat


def test_compat_runs_tests_in_a_given_venv_and_prints_one_json_line(tmp_path, capsys):
    venv = tmp_path / "torch9.9-tf9.9" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    os.chmod(venv / "python", 0o755)
    result = compat.main(["--torch", "9.9", "--transformers", "9.9", "--dir", str(tmp_path), "--reuse",
                          "--tests", "tests/test_theory.py", "-k", "tensor_parallel"])
    assert result["passed"] == 2 and result["failed"] == 0 and result["exit"] == 0
    assert result["installed"]["torch"] == torch.__version__
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result


def test_constraints_leave_out_the_pair_under_test():
    path = compat.constraints_without({"torch", "transformers"})
    try:
        pins = [line.split("==")[0].lower() for line in path.read_text().splitlines() if "==" in line]
    finally:
        path.unlink()
    assert "torch" not in pins and "transformers" not in pins and "accelerate" in pins
