"""python -m scripts.gpu_check: the project's three checks on one device, one JSON object out.

    python -m scripts.gpu_check                        # cuda when available, else cpu; dtype auto
    python -m scripts.gpu_check --device cpu --train-overrides "data=tiny max_steps=10" \
        --limit 2 --max-new-tokens 8 --benchmark-overrides "num_prompts=1 alphas=[0.0,1.0] gammas=[2]" --time-limit 1800

In order, each as its own subprocess (a crash or hang in one is recorded and the next still runs):
1. train: `python -m train` (the default training), its last JSON line (head_path, held-out α, timings);
2. decode: PPSD with compare=[ar,eesd] on the first `--limit` dev prompts: losslessness, speedups, ms/token;
3. benchmark: `python -m scripts.benchmark mode=oracle`: measured vs predicted speedups at fixed α;
4. runtime: `python -m scripts.benchmark mode=runtime`: eager vs compiled steps, HF generate, the bandwidth
   bound, teacher generation at batch 128 and a 7B-shaped layer (on CUDA).
`--steps` picks some of them (e.g. `--steps runtime` alone fits one device command with room to spare).
The last line printed is the JSON object; every step's full output is kept in `--out-dir`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# a shorter oracle sweep than conf/benchmark.yaml's, so the whole check fits one 10-minute device command
BENCHMARK_DEFAULTS = ["num_prompts=2", "alphas=[0.0,0.5,0.9,1.0]"]
PROMPTS = os.environ.get("PPSD_BENCH_PROMPTS", str(ROOT / "decode" / "prompts" / "default.jsonl"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import torch

    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m scripts.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu", help="cuda | cuda:N | cpu (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="decode/benchmark dtype (auto: bf16 where native, else fp32)")
    p.add_argument("--model", default="smollm2", help="base model for train and benchmark")
    p.add_argument("--prompts", default=PROMPTS, help="Spec-Bench-format JSONL ($PPSD_BENCH_PROMPTS)")
    p.add_argument("--limit", type=int, default=12, help="dev questions for the losslessness check")
    p.add_argument("--max-new-tokens", type=int, default=48, help="per turn (decode) / per prompt (benchmark)")
    p.add_argument("--head-path", default=None, help="skip training and decode with this head")
    p.add_argument("--train-overrides", default="", help='extra train overrides, e.g. "data=tiny max_steps=20"')
    p.add_argument("--decode-overrides", default="", help="extra decode overrides")
    p.add_argument("--benchmark-overrides", default="", help="extra benchmark overrides")
    p.add_argument("--steps", default="train,decode,benchmark,runtime", help="which checks, comma-separated")
    p.add_argument("--step-timeout", type=float, default=400, help="seconds before one step is killed")
    p.add_argument("--time-limit", type=float, default=540,
                   help="seconds for the whole check (a device machine allows 600 per command): later steps get "
                        "what is left")
    p.add_argument("--out-dir", default=None, help="logs and outputs (default: outputs/gpu_check/<time>)")
    args = p.parse_args(argv)
    args.out_dir = Path(args.out_dir or ROOT / "outputs" / "gpu_check" / time.strftime("%Y-%m-%d_%H-%M-%S"))
    return args


def environment(device: str) -> dict:
    import torch
    import transformers

    cuda = device.startswith("cuda") and torch.cuda.is_available()
    return {"device": device, "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
            "cuda": torch.version.cuda, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0], "cpu_count": os.cpu_count()}


def last_json(text: str) -> dict | None:
    """The last line of `text` that is a JSON object (each command prints its result last)."""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def run_step(name: str, args: list[str], out_dir: Path, timeout: float, env: dict | None = None) -> dict:
    """One `python -m ...` subprocess: wall time, its JSON result, and an error line when it failed."""
    if timeout < 30:  # not enough left to load a model: say so rather than report a kill
        return {"wall_s": 0.0, "error": "skipped: --time-limit reached", "result": None}
    log = out_dir / f"{name}.log"
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout, env=os.environ | (env or {}))
        stdout, stderr, error = done.stdout, done.stderr, None
        if done.returncode != 0:
            error = f"exit {done.returncode}: {error_line(stderr)}"
    except subprocess.TimeoutExpired as e:
        stdout, stderr = _text(e.stdout), _text(e.stderr)
        error = f"killed after {timeout:.0f} s (--step-timeout / --time-limit)"
    wall = time.perf_counter() - start
    log.write_text(f"$ python -m {shlex.join(args)}\n\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
    result = last_json(stdout)
    if result is None and error is None:
        error = "no JSON line in its output"
    return {"wall_s": round(wall, 1), "error": error, "log": str(log), "result": result}


def error_line(stderr: str) -> str:
    """What the failure said: the last paragraph of stderr (Hydra's message, a traceback's last lines), on
    one line; Hydra's closing hint about HYDRA_FULL_ERROR is dropped."""
    paragraphs = [p for p in stderr.split("\n\n") if p.strip() and "HYDRA_FULL_ERROR" not in p]
    if not paragraphs:
        return "(no stderr)"
    return " | ".join(line.strip() for line in paragraphs[-1].strip().splitlines()[-5:])[-500:]


def merged(defaults: list[str], overrides: list[str]) -> list[str]:
    """Hydra overrides: `overrides` replace the defaults with the same key (Hydra refuses a key given twice)."""
    given = {o.split("=", 1)[0] for o in overrides}
    return [d for d in defaults if d.split("=", 1)[0] not in given] + overrides


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def untrained_head(model: str, folder: Path) -> str:
    """An untrained MLP head at the middle layer: losslessness does not depend on the head, so the decode
    check still runs when training gave none (its speedups then say little)."""
    from heads import build_head, load_base

    base = load_base(model)
    build_head(base, "mlp", exit_layer=base.num_layers // 2).save_pretrained(folder)
    return str(folder)


def train_figures(result: dict) -> dict:
    keep = ("head_path", "exit_layer", "head", "heldout_top1", "heldout_expected_acceptance",
            "heldout_top1_untrained", "train_seconds", "generate_seconds", "steps")
    return {k: result[k] for k in keep if k in result}


def decode_figures(result: dict) -> dict:
    """Per method: speedups, tokens/s and ms/token; the verdicts and α of the main method (ppsd)."""
    methods = {result["method"]: result["figures"]} | result.get("compare", {})
    per_method = {m: {"tokens_per_s": f["tokens_per_s"],
                      "ms_per_token": round(1000 / f["tokens_per_s"], 3) if f["tokens_per_s"] else None,
                      "speedup_vs_ar": f["speedup_vs_ar"], "spec_bench_speedup": f.get("spec_bench_speedup"),
                      "acceptance_rate": f["acceptance_rate"]} for m, f in methods.items()}
    return {"lossless": result["lossless"], "mismatches": result["mismatches"], "questions": result["questions"],
            "stage_layers": result["stage_layers"], "exit_layer": result["exit_layer"], "methods": per_method}


def benchmark_figures(result: dict) -> dict:
    keep = ("alpha", "ppsd_measured", "ppsd_predicted", "ppsd_error", "ppsd_lossless", "eesd_gamma",
            "eesd_measured", "eesd_predicted", "eesd_lossless")
    rows = [{k: r[k] for k in keep} for r in result["oracle"]["rows"]]
    return {"ar_ms_per_token": result["ar_ms_per_token"], "stage_layers": result["stage_layers"],
            "exit_layer": result["exit_layer"], "rows": rows, "targets": result.get("targets")}


def figures_of(step: dict, extract) -> None:
    """Replace the raw result by the figures that matter (an unexpected shape becomes the step's error)."""
    result = step.pop("result")
    if result is not None:
        try:
            step.update(extract(result))
        except (KeyError, TypeError) as e:
            step["error"] = step["error"] or f"unexpected result shape: missing {e}"


def decode_step(args: argparse.Namespace, head_path: str | None, timeout: float) -> dict:
    """PPSD vs ar and eesd on the dev prompts, with the trained head or else an untrained one."""
    note = head_path
    if not head_path:
        try:
            head_path = untrained_head(args.model, args.out_dir / "untrained_head")
        except Exception as e:  # noqa: BLE001 - recorded: the benchmark still runs
            return {"wall_s": 0.0, "error": f"no head to decode with: {type(e).__name__}: {e}"}
        note = f"untrained (training gave no head): {head_path}"
    step = run_step("decode", [
        "decode", "method=ppsd", "compare=[ar,eesd]", f"head_path={head_path}", f"prompts={args.prompts}",
        f"limit={args.limit}", f"max_new_tokens={args.max_new_tokens}", f"device={args.device}",
        f"dtype={args.dtype}", f"out_dir={args.out_dir / 'decode'}", *shlex.split(args.decode_overrides),
    ], args.out_dir, timeout)
    step["head"] = note
    figures_of(step, decode_figures)
    return step


def main(argv: list[str] | None = None) -> dict:
    from decode.evaluate import round_floats

    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(args.device), "dtype": args.dtype, "prompts": args.prompts, "steps": {}}
    steps = report["steps"]
    overall = time.perf_counter()
    timeout = lambda: min(args.step_timeout, args.time_limit - (time.perf_counter() - overall))  # noqa: E731

    wanted = set(args.steps.split(","))
    head_path = args.head_path
    if head_path is None and wanted & {"train", "decode"}:
        # train picks the GPU by itself when there is one: hide it for a CPU check
        env = {"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {}
        steps["train"] = run_step("train", ["train", f"model={args.model}", f"out_dir={args.out_dir / 'train'}",
                                            *shlex.split(args.train_overrides)], args.out_dir, timeout(), env)
        figures_of(steps["train"], train_figures)
        head_path = steps["train"].get("head_path")

    if "decode" in wanted:
        steps["decode"] = decode_step(args, head_path, timeout())
    if "benchmark" in wanted:
        steps["benchmark"] = run_step("benchmark", [
            "scripts.benchmark", "mode=oracle", f"model={args.model}", f"prompts={args.prompts}",
            f"max_new_tokens={args.max_new_tokens}", f"device={args.device}", f"dtype={args.dtype}",
            *merged(BENCHMARK_DEFAULTS, shlex.split(args.benchmark_overrides)),
        ], args.out_dir, timeout())
        figures_of(steps["benchmark"], benchmark_figures)
    if "runtime" in wanted:
        steps["runtime"] = run_step("runtime", [
            "scripts.benchmark", "mode=runtime", f"model={args.model}", f"device={args.device}", f"dtype={args.dtype}",
            *([f"head_path={head_path}"] if head_path else []),
        ], args.out_dir, timeout())
        figures_of(steps["runtime"], lambda result: {k: v for k, v in result.items() if k != "mode"})

    report["wall_s"] = round(time.perf_counter() - overall, 1)
    report["ok"] = all(s["error"] is None for s in steps.values())
    (args.out_dir / "gpu_check.json").write_text(json.dumps(round_floats(report), indent=2))
    print(json.dumps(round_floats(report)), flush=True)
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
