"""python -m scripts.benchmark: AR vs EESD vs PPSD on the same prompts in one run, and the theory.

mode=measure  AR (all cores), EESD (the fastest γ of a sweep measured here) and PPSD with a trained head.
mode=oracle   drafts equal AR's token with probability α and are wrong otherwise (an instrument that
              fixes α exactly; never a head): measured PPSD/EESD speedup next to decode/theory.py's
              prediction from the stage costs measured in this same run, and each stage's contention
              factor (its time per position inside the pipeline / alone on its core).
mode=all      measure + oracle.
mode=theory   no model: the S = 2..8 prediction table for the per-layer costs in conf (a 7B-class GPU).
mode=runtime  the decode runtime against the memory-bandwidth bound and HF generate (scripts/runtime_bench.py).

Timings are ratios taken in one invocation; a progress bar counts the timed runs, `plot` draws measured against
predicted speedup (measure, oracle), and the last printed line is one JSON object.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from decode import theory
from decode.measure import (MS, TimedRun, eesd_costs, format_table, format_tp_table, measured_table, oracle_table,
                            pipeline_model, ppsd_tick_latency, ppsd_time, stage_table, timed_run)
from heads.cli import entry_point
from heads.errors import UserError
from heads.files import read_prompts
from heads.hardware import torch_threads
from heads.schema import BenchmarkConfig


# --- theory ----------------------------------------------------------------------------------------

def theory_table(t: DictConfig) -> tuple[list[dict], str]:
    """The prediction table for the per-layer costs in conf `theory` (milliseconds in, rows in seconds)."""
    exit_layers = t.exit_layers
    if exit_layers is not None and not isinstance(exit_layers, int):
        exit_layers = list(exit_layers)
    rows = theory.predict_table(
        t.layer_ms * MS, t.num_layers, t.head_ms * MS, t.lm_head_ms * MS, t.send_ms * MS,
        alphas=list(t.alphas), stages_list=list(t.stages), exit_layers=exit_layers, embed_s=t.embed_ms * MS,
        feedback_s=None if t.feedback_ms is None else t.feedback_ms * MS, verify_batch_slope=t.verify_batch_slope,
        allreduce_s=None if t.allreduce_ms is None else t.allreduce_ms * MS,
        tp_shard_s={int(k): v * MS for k, v in (t.get("tp_shard_ms") or {}).items()},
    )
    table = format_table(rows)
    if t.allreduce_ms is not None:
        table += ("\n\nPPSD over AR tensor-parallel on the same S devices "
                  f"(two {t.allreduce_ms} ms all-reduces per layer; * = a layer at 1/S, no measured shard):\n\n"
                  + format_tp_table(rows))
    return rows, table


def run_theory(cfg: DictConfig) -> dict:
    rows, table = theory_table(cfg.theory)
    t = cfg.theory
    print(f"Predicted speedup over single-device AR: {t.num_layers} layers of {t.layer_ms} ms, head {t.head_ms} ms, "
          f"LM head {t.lm_head_ms} ms, send {t.send_ms} ms (PPSD (ideal N/(αE+(1−α)N)) / EESD at its best γ)")
    print(table)
    keep = ("stages", "exit_layer", "alpha", "ppsd_speedup", "ideal_speedup", "eesd_speedup", "eesd_gamma",
            "ceiling", "real_ceiling", "ppsd_speedup_vs_tp")
    return {"mode": "theory", "t_ar_ms": rows[0]["t_ar_s"] / MS,
            "rows": [{k: (round(r[k], 4) if isinstance(r[k], float) else r[k]) for k in keep if k in r} for r in rows]}


# --- prompts and stages alone -----------------------------------------------------------------------

def load_prompts(path: str, count: int) -> list[str]:
    """The first turn of `count` prompts, taken round-robin over the categories (file order within each)."""
    by_category: dict[str, list[str]] = {}
    for q in read_prompts(path):
        by_category.setdefault(q["category"], []).append(q["turns"][0])
    columns = list(by_category.values())
    prompts = [column[i] for i in range(max(map(len, columns), default=0)) for column in columns if i < len(column)]
    return prompts[:count]


def stage_costs_alone(base, head, layout: list[range], prompt_ids: list[list[int]], references: list[list[int]],
                      threads: int = 1) -> list[float]:
    """Each stage's compute for one position with nothing else running (one process, `threads` threads),
    teacher-forced on the AR tokens: stage 0 = layers [0, E) + head + LM head + draft choice, stage i =
    its layers (+ final norm, LM head and the model's token on the last)."""
    import torch

    from decode.common import draft_step, positions

    totals, count = [0.0] * len(layout), 0
    with torch_threads(threads), torch.inference_mode():
        for ids, reference in zip(prompt_ids, references):
            lower = base.range(0, layout[0].stop)
            uppers = [base.range(r.start, r.stop) for r in layout[1:]]
            hidden, _ = draft_step(base, head, lower, torch.tensor([ids], device=base.device), 0, with_logits=False)
            for r in uppers:
                hidden = r.forward(hidden, positions(0, len(ids), base.device))
            pos = len(ids)
            for token in reference[:-1]:
                t0 = time.perf_counter()
                hidden, logits = draft_step(base, head, lower, torch.tensor([[token]], device=base.device), pos)
                int(torch.argmax(logits))
                times = [time.perf_counter() - t0]
                for i, r in enumerate(uppers):
                    t0 = time.perf_counter()
                    hidden = r.forward(hidden, positions(pos, 1, base.device))
                    if i == len(uppers) - 1:
                        int(torch.argmax(base.logits(hidden)[0, -1]))
                    times.append(time.perf_counter() - t0)
                totals = [a + b for a, b in zip(totals, times)]
                count += 1
                pos += 1
    return [t / max(count, 1) for t in totals]


# --- the benchmark ---------------------------------------------------------------------------------

class Progress:
    """One bar over the benchmark's timed runs (a terminal only: disable=None), each named as it starts."""

    def __init__(self, total: int):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True, disable=None)

    def timed_run(self, decoder, name: str, *args, **kwargs) -> TimedRun:
        self.bar.set_description(name)
        run = timed_run(decoder, name, *args, **kwargs)
        self.bar.update(1)
        return run

    def close(self) -> None:
        self.bar.close()


def planned_runs(cfg: DictConfig) -> int:
    """How many timed runs run_benchmark makes: ar on its threads and on one, then per mode."""
    runs = 2
    if cfg.mode in ("measure", "all"):
        runs += len(cfg.gammas) + 1
    if cfg.mode in ("oracle", "all"):
        runs += 2 * len(cfg.alphas) + (len(cfg.gammas) if cfg.mode == "oracle" else 0)
    return runs


def resolved_settings(cfg) -> dict:
    """device, dtype, compile and batch_invariant with every auto resolved (and why: `reasons`), by the rules
    `python -m decode` resolves them by (decode.spec.base_settings)."""
    from decode.spec import base_settings

    return base_settings(methods=["ar", "eesd", "ppsd"], device=cfg.device, dtype=cfg.dtype, compile=cfg.compile,
                         batch_invariant=cfg.batch_invariant, quiet=False)


def load_model(cfg: DictConfig, settings: dict):
    """The base and the head every method shares (an untrained head of `head_type` for oracle runs
    without head_path: oracle drafts replace its tokens, its cost is all that matters)."""
    from decode.layout import measure_costs
    from decode.spec import resolve_base_model
    from heads import build_head, load_base, load_head

    if not cfg.head_path and cfg.mode != "oracle":
        raise UserError(f"mode={cfg.mode} measures a trained head: pass head_path=FOLDER (or use mode=oracle)")
    base = load_base(resolve_base_model(cfg.head_path, cfg.model), dtype=settings["dtype"], device=settings["device"],
                     batch_invariant=settings["batch_invariant"])
    if cfg.head_path:
        from decode.decoder import check_exact_base

        head = load_head(cfg.head_path, base)
        check_exact_base(head, base)  # model= names the base here: it must be the one the head was trained on
        return base, head
    exit_layer = cfg.exit_layer
    if exit_layer is None:
        layer_s, lm_head_s = measure_costs(base)
        head_s = layer_s if cfg.head_type == "transformer" else 0.0
        exit_layer = theory.balanced_exit_layer(layer_s, base.num_layers, cfg.stages, head_s, lm_head_s)
    return base, build_head(base, cfg.head_type, int(exit_layer))


def run_benchmark(cfg: DictConfig) -> dict:
    import os

    import torch

    from decode.decoder import decode_threads

    load = os.getloadavg()[0]
    settings = resolved_settings(cfg)
    base, head = load_model(cfg, settings)
    texts = load_prompts(cfg.prompts, cfg.num_prompts)
    prompt_ids = [base.encode_chat([{"role": "user", "content": t}]) for t in texts]
    longest = max(map(len, prompt_ids)) + cfg.max_new_tokens  # the warm-up's length on a static runtime
    threads = decode_threads(base, prompt_ids[0], cfg.ar_threads, cfg.stage_threads, cfg.stages)
    cfg = cfg.model_copy(update={"dtype": str(base.dtype).removeprefix("torch."), "ar_threads": threads["threads"],
                                 "stage_threads": threads["stage_threads"]})  # the resolved options, for what follows
    n, common = cfg.max_new_tokens, dict(base=base, head=head, dtype=cfg.dtype, device=str(base.device),
                                         compile=settings["compile"])
    torch.manual_seed(cfg.seed)
    print(f"{base.name} {cfg.dtype} on {base.device}, {head.describe()}, {len(prompt_ids)} prompts × {n} new tokens, "
          f"{cfg.ar_threads} AR threads (ms per AR step by threads: {threads['measured_ms'] or 'not measured'}), "
          f"{cfg.stage_threads} per stage, load average {load:.2f} at start", flush=True)

    progress = Progress(planned_runs(cfg))
    try:
        result = _run_benchmark(cfg, base, head, prompt_ids, longest, common, threads, load, progress)
        return result | {"resolved": settings["reasons"]}  # why each auto became what it did
    finally:
        progress.close()


def _run_benchmark(cfg, base, head, prompt_ids, longest, common, threads, load, progress) -> dict:
    import os

    from decode import Decoder, OracleDrafts

    n = cfg.max_new_tokens
    ar = Decoder("ar", threads=cfg.ar_threads, **common)
    ar.warm_up(prompt_ids[0], cfg.warmup_tokens, longest)
    ar_run = progress.timed_run(ar, "ar", prompt_ids, n)
    ar1 = Decoder("ar", threads=1, **common)
    ar1_run = progress.timed_run(ar1, "ar_1thread", prompt_ids, n)
    t_ar, references = ar_run.s_per_token, ar_run.tokens
    result = {"mode": cfg.mode, "model": base.name, "head": cfg.head_path or f"untrained {cfg.head_type}",
              "exit_layer": head.exit_layer, "num_layers": base.num_layers, "dtype": cfg.dtype,
              "prompts": len(prompt_ids), "max_new_tokens": n, "ar_threads": cfg.ar_threads,
              "stage_threads": cfg.stage_threads, "threads_measured_ms": threads["measured_ms"] or None,
              "device": str(base.device), "load_average": round(load, 2),
              "ar_ms_per_token": t_ar / MS, "ar_1thread_ms_per_token": ar1_run.s_per_token / MS}

    # the oracle sweep models stage processes (pipeline_model); decode compares every placement (scripts.gpu_check)
    with Decoder("ppsd", stages=cfg.stages, stage_threads=cfg.stage_threads, window=cfg.window,
                 placement="processes", **common) as ppsd:
        ppsd.warm_up(prompt_ids[0], cfg.warmup_tokens, longest)
        layout = ppsd.layout
        result["stage_layers"] = [[r.start, r.stop] for r in layout]
        alone = stage_costs_alone(base, head, layout, prompt_ids, references, cfg.stage_threads)
        eesd_runs: dict[int, TimedRun] = {}
        if cfg.mode in ("measure", "all"):
            result["measure"] = measure(cfg, ppsd, common, prompt_ids, references, t_ar, ar1_run, eesd_runs, alone,
                                        progress)
        if cfg.mode in ("oracle", "all"):
            result["oracle"] = oracle_sweep(cfg, ppsd, common, prompt_ids, references, t_ar, eesd_runs, alone,
                                            OracleDrafts, base.vocab_size, progress)
    result["stages_alone_ms"] = [a / MS for a in alone]
    result["load_average_end"] = round(os.getloadavg()[0], 2)  # other jobs on the cores make timings noisy
    if "oracle" in result:
        rows = result["oracle"]["rows"]
        errors = [abs(r["ppsd_error"]) for r in rows]
        zero = next((r for r in rows if r["alpha"] == 0.0), None)
        result["targets"] = {
            "ppsd_max_error": max(errors),
            "ppsd_within_tolerance": max(errors) <= cfg.target_tolerance,
            "ppsd_alpha0_vs_ar": zero["ppsd_measured"] if zero else None,
            "ppsd_alpha0_ok": (zero["ppsd_measured"] >= 0.9) if zero else None,
        }
        print(f"\ntargets: PPSD within {cfg.target_tolerance:.0%} of theory at every α: "
              f"{result['targets']['ppsd_within_tolerance']} (worst {max(errors):.1%}); "
              + (f"PPSD at α=0 = {zero['ppsd_measured']:.2f}× AR (target ≥ 0.90×)" if zero else ""))
    return result


def lossless(run: TimedRun, references: list[list[int]]) -> bool:
    return run.tokens == references


def measure(cfg, ppsd, common, prompt_ids, references, t_ar, ar1_run, eesd_runs, alone, progress) -> dict:
    """AR vs EESD (every γ, the fastest reported) vs PPSD with the trained head."""
    from decode import Decoder

    n = cfg.max_new_tokens
    sweep = {}
    for gamma in cfg.gammas:
        eesd = Decoder("eesd", gamma=int(gamma), threads=cfg.ar_threads, **common)
        eesd.warm_up(prompt_ids[0], cfg.warmup_tokens, max(map(len, prompt_ids)) + n)
        eesd_runs[int(gamma)] = run = progress.timed_run(eesd, f"eesd γ={gamma}", prompt_ids, n)
        sweep[int(gamma)] = run
    best = min(sweep, key=lambda g: sweep[g].s_per_token)
    ppsd_run = progress.timed_run(ppsd, "ppsd", prompt_ids, n)
    costs = pipeline_model(ppsd_run.generations)
    alpha = ppsd_run.alpha or 0.0
    predicted = ppsd_time(alpha, costs)
    draft_s, verify_s = eesd_costs(sweep[best].generations)
    eesd_alpha = sweep[best].alpha or 0.0
    eesd_pred = theory.eesd_time_per_token(eesd_alpha, best, draft_s, verify_s) if best + 1 in verify_s else None
    out = {
        "ar_ms_per_token": t_ar / MS,
        "ppsd": {"speedup": t_ar / ppsd_run.s_per_token, "speedup_vs_1thread_ar": ar1_run.s_per_token / ppsd_run.s_per_token,
                 "alpha": alpha, "ms_per_token": ppsd_run.s_per_token / MS, "predicted_speedup": t_ar / predicted,
                 "lossless": lossless(ppsd_run, references)},
        "eesd": {"gamma": best, "speedup": t_ar / sweep[best].s_per_token, "alpha": eesd_alpha,
                 "ms_per_token": sweep[best].s_per_token / MS,
                 "predicted_speedup": t_ar / eesd_pred if eesd_pred else None,
                 "lossless": lossless(sweep[best], references),
                 "sweep": {g: round(t_ar / r.s_per_token, 3) for g, r in sweep.items()}},
    }
    table, stage_rows = stage_table(costs, alone)
    out["stages"] = stage_rows
    print(f"\n## Head {cfg.head_path}: measured speedup over AR ({cfg.ar_threads} threads, {t_ar / MS:.2f} ms/token)\n")
    print(measured_table(t_ar, ar1_run.s_per_token, [(f"eesd γ={best}", out["eesd"], sweep[best].s_per_token),
                                                     (f"ppsd S={cfg.stages}", out["ppsd"], ppsd_run.s_per_token)]))
    print("\nEESD γ sweep (speedup): " + ", ".join(f"γ={g}: {s:.2f}×" for g, s in out["eesd"]["sweep"].items()))
    print("\nPPSD stages (this head):\n" + table, flush=True)
    return out


def oracle_sweep(cfg, ppsd, common, prompt_ids, references, t_ar, eesd_runs, alone, OracleDrafts, vocab_size,
                 progress) -> dict:
    """Drafts right with probability α: measured vs predicted PPSD and EESD at each α."""
    from decode import Decoder

    n = cfg.max_new_tokens

    def oracles(alpha: float):
        return [OracleDrafts(ref, alpha, seed=cfg.seed + i, vocab_size=vocab_size) for i, ref in enumerate(references)]

    if not eesd_runs:  # calibrate the EESD costs per γ on one prompt (an oracle at α = 0.8 keeps rounds full)
        for gamma in cfg.gammas:
            eesd = Decoder("eesd", gamma=int(gamma), threads=cfg.ar_threads, **common)
            eesd_runs[int(gamma)] = progress.timed_run(eesd, f"eesd γ={gamma}", prompt_ids[:1], n, oracles(0.8)[:1])
    draft_s, verify_s = eesd_costs([g for r in eesd_runs.values() for g in r.generations])
    gammas = [g for g in cfg.gammas if g + 1 in verify_s]
    rows, stage_rows = [], {}
    for alpha in cfg.alphas:
        alpha = float(alpha)
        run = progress.timed_run(ppsd, f"ppsd α={alpha}", prompt_ids, n, oracles(alpha))
        costs = pipeline_model(run.generations)
        measured_alpha = run.alpha or 0.0
        predicted = ppsd_time(measured_alpha, costs)
        tick, latency = ppsd_tick_latency(costs)
        stage_rows[alpha] = stage_table(costs, alone)
        gamma = theory.best_eesd_gamma(alpha, draft_s, verify_s, t_ar, gammas)
        eesd = Decoder("eesd", gamma=gamma, threads=cfg.ar_threads, **common)
        erun = progress.timed_run(eesd, f"eesd α={alpha}", prompt_ids, n, oracles(alpha))
        e_draft, e_verify = eesd_costs(erun.generations)
        e_alpha = erun.alpha or 0.0
        e_verify = e_verify if gamma + 1 in e_verify else verify_s
        e_pred = theory.eesd_time_per_token(e_alpha, gamma, e_draft, e_verify)
        rows.append({
            "alpha": alpha, "ppsd_alpha": measured_alpha, "ppsd_ms": run.s_per_token / MS,
            "ppsd_measured": t_ar / run.s_per_token, "ppsd_predicted": t_ar / predicted,
            "ppsd_error": run.s_per_token / predicted - 1,
            "ppsd_predicted_alone": t_ar / ppsd_time(measured_alpha, costs, [a + x for a, x in zip(alone, costs["send_s"])]),
            "ppsd_lossless": lossless(run, references),
            "tick_ms": tick / MS, "latency_ms": latency / MS, "window": costs["window"],
            "contention": [c / a for c, a in zip(costs["compute_s"], alone)],
            "eesd_gamma": gamma, "eesd_alpha": e_alpha, "eesd_ms": erun.s_per_token / MS,
            "eesd_measured": t_ar / erun.s_per_token, "eesd_predicted": t_ar / e_pred,
            "eesd_error": erun.s_per_token / e_pred - 1, "eesd_lossless": lossless(erun, references),
        })
    print(f"\n## Oracle acceptance: measured vs predicted speedup over AR ({cfg.ar_threads} threads, "
          f"{t_ar / MS:.2f} ms/token); PPSD S={cfg.stages}, one thread per stage\n")
    print(oracle_table(rows))
    last_alpha = max(stage_rows)
    print(f"\nPPSD stages at α={last_alpha:g}:\n" + stage_rows[last_alpha][0])
    print(f"EESD costs (γ sweep): draft {draft_s / MS:.2f} ms, verify " +
          ", ".join(f"{k}: {v / MS:.2f}" for k, v in sorted(verify_s.items())) + " ms", flush=True)
    return {"rows": rows, "stages": {a: s[1] for a, s in stage_rows.items()},
            "eesd_draft_ms": draft_s / MS, "eesd_verify_ms": {k: v / MS for k, v in verify_s.items()}}


def run_runtime(cfg: DictConfig) -> dict:
    """mode=runtime: the decode runtime against its bounds and HF generate (scripts/runtime_bench.py)."""
    from decode.decoder import resolve_device
    from heads.hardware import check_device, is_auto, resolve_dtype
    from scripts import runtime_bench

    device = str(check_device(resolve_device(cfg.device)))
    cuda = device.startswith("cuda")
    return runtime_bench.run(model=cfg.model or "smollm2", device=device, dtype=resolve_dtype(cfg.dtype, device), tokens=int(cfg.max_new_tokens),
                             threads=1 if is_auto(cfg.ar_threads) else int(cfg.ar_threads), head_path=cfg.head_path,
                             gen_rows=128 if cuda else 0, layer_7b_figures=cuda)


# --- the plot --------------------------------------------------------------------------------------

def plot_speedups(result: dict, path: Path) -> Path | None:
    """Measured against predicted speedup over ar: the oracle's α sweep as lines (PPSD, EESD), the trained
    head's runs as points at their α. None when the run measured neither."""
    measured, oracle = result.get("measure"), (result.get("oracle") or {}).get("rows")
    if not (measured or oracle):
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, color in (("ppsd", "tab:blue"), ("eesd", "tab:orange")):
        if oracle:
            alphas = [r["alpha"] for r in oracle]
            ax.plot(alphas, [r[f"{method}_measured"] for r in oracle], "o-", color=color, label=f"{method} measured (oracle α)")
            ax.plot(alphas, [r[f"{method}_predicted"] for r in oracle], "--", color=color, label=f"{method} predicted")
        if measured and measured[method].get("predicted_speedup") is not None:
            m = measured[method]
            ax.plot([m["alpha"]], [m["speedup"]], "*", ms=14, color=color, label=f"{method}, trained head: measured")
            ax.plot([m["alpha"]], [m["predicted_speedup"]], "x", ms=10, color=color, label=f"{method}, trained head: predicted")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("acceptance α")
    ax.set_ylabel("speedup over ar (decode time, prefill excluded)")
    ax.set_title(f"{Path(str(result['model'])).name} {result['dtype']} on {result['device']}, "
                 f"{result['prompts']} prompts × {result['max_new_tokens']} tokens", fontsize=9)
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- entry point -----------------------------------------------------------------------------------

@entry_point("benchmark", BenchmarkConfig)
def main(cfg: DictConfig) -> None:
    result = {"theory": run_theory, "runtime": run_runtime}.get(cfg.mode, run_benchmark)(cfg)
    if cfg.plot and cfg.mode in ("measure", "oracle", "all"):
        written = plot_speedups(result, Path(cfg.plot))
        if written:
            result["plot"] = str(written)
            print(f"\nmeasured vs predicted speedup: {written}", flush=True)
    print(json.dumps(result, default=_jsonable))


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


if __name__ == "__main__":
    main()
