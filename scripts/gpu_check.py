"""python -m scripts.gpu_check: every GPU check of the project on one device, one JSON object out.

    python -m scripts.gpu_check                        # cuda when available, else cpu; dtype auto; 8 minutes
    python -m scripts.gpu_check --device cpu --tiny --model TINY_MODEL_DIR --limit 1 --max-new-tokens 4 ...
        # every step's code path on a CPU, small (what tests/test_gpu_check.py runs)

In order, each as its own subprocess with its own time budget (a crash or hang in one is recorded as its
error and the next still runs; later steps get what is left of --time-limit):
1. runtime7b (150 s): a whole Llama-7B-shaped model, random bf16 weights made on the GPU: the AR step captured
   by hand as one CUDA graph (`ar_captured_ms`, `captured_capture_s`, `captured_over_bound`) beside the compiled
   layer range's step through torch's graph trees, reduce-overhead (`ar_ms`, `ar_over_bound`), γ + 1-position
   verify step, capture time, bound (scripts/runtime_bench.py --model 7b);
2. teacher (75 s): teacher generation as training runs it (default prompts, compiled, continuous batch):
   greedy and sampled tokens/s, capture included;
3. train (120 s): `python -m train` (the default training), its last JSON line (head_path, held-out α, timings);
4. decode_<placement> (45 s each): PPSD against AR on the first `--limit` dev prompts, once per placement
   (streams: one process drives both stages on CUDA streams; processes: spawned stage processes), on the plain
   compiled steps (no eesd in the run, so no batch-invariant padding): losslessness, tokens/s and ms/token with
   and without prefill, the speedups, the prediction from the measured tick costs, the stages' overlap and the
   hand-off; then decode_eesd (45 s): EESD against AR (bf16: batch-invariant, padded steps), losslessness and
   speed; `placements` sums up PPSD per placement and the loop's AR ms/token against the AR step inside it;
5. benchmark (45 s): `python -m scripts.benchmark mode=oracle`: measured vs predicted speedups at fixed α;
6. shards (45 s): one 7B-shaped layer split S = 1, 2, 4, 8 ways (tensor-parallel shard costs for the theory),
   each through the compiled layer range (`shard_ms`) and replayed as one hand-captured graph
   (`shard_captured_ms`: whether the ~0.2 ms floor per call is gone).
`runtime` (SmolLM2 eager vs compiled vs captured vs HF generate, and `call_floor`: the host time of one call on
each path, eager, compiled, reduce-overhead and the captured replay; `scripts.benchmark mode=runtime`) runs when
named in `--steps`. The budgets add up to 8 minutes, inside a 10-minute device command. The last line printed is the
JSON object; every step's full output is kept in `--out-dir`.

`xxlarge` (named alone, longer than one device command): `python -m train data=xxlarge exit_layers=[15,20]` into
`--out-dir`/xxlarge, resumed from its last checkpoint when one is there; run the same command again on the warm
machine until the step has no error:

    python -m scripts.gpu_check --steps xxlarge --time-limit 590 --out-dir outputs/xxlarge
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
# seconds each step may take at most (the whole check: --time-limit)
BUDGETS = {"runtime7b": 150, "teacher": 75, "train": 120, "decode": 45, "benchmark": 45, "shards": 45, "runtime": 150,
           "xxlarge": 570}
STEPS = "runtime7b,teacher,train,decode,benchmark,shards"
PLACEMENTS = ("streams", "processes")  # decode runs PPSD once per placement (and EESD once, `decode_eesd`)
# --tiny: the 7B step's code at a shape a CPU compiles in seconds
TINY_SHAPE = ["--layers", "1", "--hidden", "128", "--intermediate", "256", "--heads", "4", "--kv-heads", "2",
              "--head-dim", "32", "--vocab", "256", "--tokens", "4", "--repeats", "2"]
ALLREDUCE_MS = "0.015"  # stated, not measured (one GPU): see conf/benchmark.yaml
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
    p.add_argument("--steps", default=STEPS, help=f"which checks, comma-separated (default {STEPS}; also: runtime, xxlarge)")
    p.add_argument("--placements", default=",".join(PLACEMENTS), help="decode placements, comma-separated")
    p.add_argument("--budget", action="append", default=[], metavar="STEP=SECONDS",
                   help=f"a step's time budget (defaults: {BUDGETS})")
    p.add_argument("--tiny", action="store_true", help="small shapes and counts: every step's code path, on a CPU")
    p.add_argument("--time-limit", type=float, default=480,
                   help="seconds for the whole check (a device machine allows 600 per command): later steps get "
                        "what is left")
    p.add_argument("--out-dir", default=None, help="logs and outputs (default: outputs/gpu_check/<time>)")
    args = p.parse_args(argv)
    args.budgets = dict(BUDGETS)
    for item in args.budget:
        name, _, seconds = item.partition("=")
        try:
            args.budgets[name] = float(seconds)
        except ValueError:
            p.error(f"--budget {item}: give STEP=SECONDS, e.g. train=200")
    unknown = set(args.steps.split(",")) - set(BUDGETS)
    if unknown:
        p.error(f"--steps: unknown step(s) {', '.join(sorted(unknown))} (known: {', '.join(BUDGETS)})")
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


def xxlarge_args(args) -> list[str]:
    """The data=xxlarge training (issue: heads that agree more often), resumed where an earlier call left it."""
    folder = args.out_dir / "xxlarge"
    resume = ["resume=true"] if (folder / "checkpoints" / "latest").is_file() else []
    return ["train", f"model={args.model}", "data=xxlarge", "exit_layers=[15,20]", f"out_dir={folder}", *resume,
            *shlex.split(args.train_overrides)]


def train_figures(result: dict) -> dict:
    keep = ("head_path", "exit_layer", "head", "heldout_top1", "heldout_expected_acceptance",
            "heldout_top1_untrained", "train_seconds", "generate_seconds", "steps")
    return {k: result[k] for k in keep if k in result}


def decode_figures(result: dict) -> dict:
    """Per method: tokens/s and ms/token with prefill (Spec-Bench's) and without (first token to last), the
    speedups and the AR step timed inside the loop; for ppsd its placement, prediction, overlap and hand-off."""
    def ms(tps):
        return round(1000 / tps, 3) if tps else None

    methods = {result["method"]: result["figures"]} | result.get("compare", {})
    per_method = {m: {"tokens_per_s": f["tokens_per_s"], "ms_per_token": ms(f["tokens_per_s"]),
                      "decode_tokens_per_s": f.get("decode_tokens_per_s"),
                      "decode_ms_per_token": ms(f.get("decode_tokens_per_s")),
                      "speedup_vs_ar": f["speedup_vs_ar"], "decode_speedup_vs_ar": f.get("decode_speedup_vs_ar"),
                      "spec_bench_speedup": f.get("spec_bench_speedup"), "acceptance_rate": f["acceptance_rate"],
                      "predicted_speedup": f.get("predicted_speedup")} for m, f in methods.items()}
    keep = ("lossless", "mismatches", "questions", "stage_layers", "exit_layer", "placement", "runtime", "capture_s",
            "captures_while_timing", "measured_over_predicted", "stage_overlap", "handoff_us", "ar_step_ms")
    return {k: result.get(k) for k in keep} | {"methods": per_method}


def placements_summary(steps: dict) -> dict:
    """PPSD's decode-only speedup over AR per placement, with its prediction, overlap and hand-off, and the loop's
    AR ms/token (prefill excluded) next to the AR step time measured inside the same loop."""
    out = {}
    for name, step in steps.items():
        methods = step.get("methods") or {}
        if not name.startswith("decode_") or "ppsd" not in methods:
            continue
        ppsd = methods["ppsd"]
        out[step.get("placement") or name.removeprefix("decode_")] = {
            "lossless": step.get("lossless"), "decode_speedup_vs_ar": ppsd["decode_speedup_vs_ar"],
            "speedup_vs_ar": ppsd["speedup_vs_ar"], "predicted_speedup": ppsd["predicted_speedup"],
            "measured_over_predicted": step.get("measured_over_predicted"), "alpha": ppsd["acceptance_rate"],
            "stage_overlap": step.get("stage_overlap"), "handoff_us": step.get("handoff_us"),
            "ar_decode_ms_per_token": methods.get("ar", {}).get("decode_ms_per_token"),
            "ar_step_ms": step.get("ar_step_ms"),  # the AR step timed inside the loop (target: loop within 1.1x)
            "ar_ms_per_token_with_prefill": methods.get("ar", {}).get("ms_per_token")}
    return out


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


def decode_step(args: argparse.Namespace, head_path: str | None, placement: str, timeout: float) -> dict:
    """PPSD at `placement` (or, with placement "eesd", EESD) against AR on the dev prompts, with the trained head
    or else an untrained one."""
    note = head_path
    if not head_path:
        try:
            head_path = untrained_head(args.model, args.out_dir / "untrained_head")
        except Exception as e:  # noqa: BLE001 - recorded: the benchmark still runs
            return {"wall_s": 0.0, "error": f"no head to decode with: {type(e).__name__}: {e}"}
        note = f"untrained (training gave no head): {head_path}"
    step = run_step(f"decode_{placement}", [
        "decode", *(["method=eesd"] if placement == "eesd" else ["method=ppsd", f"placement={placement}"]),
        "compare=[ar]", f"head_path={head_path}", f"prompts={args.prompts}",
        f"limit={args.limit}", f"max_new_tokens={args.max_new_tokens}", f"device={args.device}",
        f"dtype={args.dtype}", f"out_dir={args.out_dir / f'decode_{placement}'}",
        *shlex.split(args.decode_overrides),
    ], args.out_dir, timeout)
    step["head"] = note
    figures_of(step, decode_figures)
    return step


def runtime_bench_step(name: str, args: argparse.Namespace, extra: list[str], timeout: float) -> dict:
    """scripts.runtime_bench with `extra` arguments; its JSON line less the settings echoed back."""
    step = run_step(name, ["scripts.runtime_bench", "--device", args.device, "--skip-overhead", *extra],
                    args.out_dir, timeout)
    figures_of(step, lambda r: {k: v for k, v in r.items() if k not in ("mode", "device", "dtype", "threads", "tokens")})
    return step


def main(argv: list[str] | None = None) -> dict:
    from decode.evaluate import round_floats
    from heads.files import atomic_write_json

    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(args.device), "dtype": args.dtype, "prompts": args.prompts,
              "budgets_s": args.budgets, "steps": {}}
    steps = report["steps"]
    overall = time.perf_counter()

    def timeout(name: str) -> float:
        return min(args.budgets[name], args.time_limit - (time.perf_counter() - overall))

    wanted = args.steps.split(",")
    tiny = TINY_SHAPE if args.tiny else []
    gen_dtype = "bfloat16" if args.dtype == "auto" and args.device.startswith("cuda") else \
        ("float32" if args.dtype == "auto" else args.dtype)
    if "runtime7b" in wanted:
        steps["runtime7b"] = runtime_bench_step("runtime7b", args, ["--model", "7b", *tiny],
                                                timeout("runtime7b"))
    if "teacher" in wanted:
        steps["teacher"] = runtime_bench_step("teacher", args, [
            "--skip-model", "--model", args.model, "--dtype", gen_dtype,
            *(["--teacher-prompts", "3", "--teacher-new-tokens", "4"] if args.tiny else ["--teacher-prompts", "0"]),
        ], timeout("teacher"))
    head_path = _head_steps(args, wanted, report, timeout)
    if "shards" in wanted:
        steps["shards"] = runtime_bench_step("shards", args, [
            "--model", "7b", "--skip-model", "--shards", "1,2" if args.tiny else "1,2,4,8",
            "--allreduce-ms", ALLREDUCE_MS, *tiny], timeout("shards"))
    if "runtime" in wanted:
        steps["runtime"] = run_step("runtime", [
            "scripts.benchmark", "mode=runtime", f"model={args.model}", f"device={args.device}", f"dtype={args.dtype}",
            *([f"head_path={head_path}"] if head_path else []),
        ], args.out_dir, timeout("runtime"))
        figures_of(steps["runtime"], lambda result: {k: v for k, v in result.items() if k != "mode"})

    report["wall_s"] = round(time.perf_counter() - overall, 1)
    report["ok"] = all(s["error"] is None for s in steps.values())
    atomic_write_json(args.out_dir / "gpu_check.json", round_floats(report))
    print(json.dumps(round_floats(report)), flush=True)
    return report


def _head_steps(args, wanted: list[str], report: dict, timeout) -> str | None:
    """The steps that train or use a head: train (or --head-path), xxlarge, decode per placement, benchmark.
    Returns the head decode used."""
    steps, head_path = report["steps"], args.head_path
    if head_path is None and ("train" in wanted or "decode" in wanted):
        # train picks the GPU by itself when there is one: hide it for a CPU check
        env = {"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {}
        steps["train"] = run_step("train", ["train", f"model={args.model}", f"out_dir={args.out_dir / 'train'}",
                                            *shlex.split(args.train_overrides)], args.out_dir, timeout("train"), env)
        figures_of(steps["train"], train_figures)
        head_path = steps["train"].get("head_path")
    if "xxlarge" in wanted:
        steps["xxlarge"] = run_step("xxlarge", xxlarge_args(args), args.out_dir, timeout("xxlarge"))
        figures_of(steps["xxlarge"], train_figures)
    if "decode" in wanted:
        for placement in [*args.placements.split(","), "eesd"]:
            steps[f"decode_{placement}"] = decode_step(args, head_path, placement, timeout("decode"))
        report["placements"] = placements_summary(steps)
    if "benchmark" in wanted:
        steps["benchmark"] = run_step("benchmark", [
            "scripts.benchmark", "mode=oracle", f"model={args.model}", f"prompts={args.prompts}",
            f"max_new_tokens={args.max_new_tokens}", f"device={args.device}", f"dtype={args.dtype}",
            *merged(BENCHMARK_DEFAULTS, shlex.split(args.benchmark_overrides)),
        ], args.out_dir, timeout("benchmark"))
        figures_of(steps["benchmark"], benchmark_figures)
    return head_path


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
