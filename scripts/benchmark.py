"""python -m scripts.benchmark: AR vs EESD vs PPSD on the same prompts in one run, and the theory.

mode=measure  AR (all cores), EESD (the fastest γ of a sweep measured here) and PPSD with a trained head.
mode=oracle   drafts equal AR's token with probability α and are wrong otherwise (an instrument that
              fixes α exactly; never a head): measured PPSD/EESD speedup next to decode/theory.py's
              prediction from the stage costs measured in this same run, and each stage's contention
              factor (its time per position inside the pipeline / alone on its core).
mode=all      measure + oracle.
mode=theory   no model: the S = 2..8 prediction table for the per-layer costs in conf (a 7B-class GPU).

Timings are ratios taken in one invocation; the last printed line is one JSON object.
"""

from __future__ import annotations

import json
import math
import time

from omegaconf import DictConfig

from decode import theory
from heads.cli import entry_point
from heads.errors import UserError
from heads.files import read_prompts
from heads.schema import BENCHMARK

MS = 1e-3


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
    )
    table = theory.format_table(rows)
    if t.allreduce_ms is not None:
        table += ("\n\nPPSD over AR tensor-parallel on the same S devices "
                  f"(two {t.allreduce_ms} ms all-reduces per layer):\n\n" + theory.format_tp_table(rows))
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


# --- prompts and timed runs ------------------------------------------------------------------------

def load_prompts(path: str, count: int) -> list[str]:
    """The first turn of `count` prompts, taken round-robin over the categories (file order within each)."""
    by_category: dict[str, list[str]] = {}
    for q in read_prompts(path):
        by_category.setdefault(q["category"], []).append(q["turns"][0])
    columns = list(by_category.values())
    prompts = [column[i] for i in range(max(map(len, columns), default=0)) for column in columns if i < len(column)]
    return prompts[:count]


class Run:
    """One method over every prompt: decode time is first token -> last token (prefill excluded)."""

    def __init__(self, name: str):
        self.name = name
        self.generations = []
        self.decode_s = 0.0      # sum over prompts of (last token time - first token time)
        self.decode_tokens = 0   # sum over prompts of (tokens - 1)
        self.wall_s = 0.0

    def add(self, generation, first_s: float, last_s: float, wall_s: float) -> None:
        self.generations.append(generation)
        self.decode_s += last_s - first_s
        self.decode_tokens += len(generation.tokens) - 1
        self.wall_s += wall_s

    @property
    def s_per_token(self) -> float:
        return self.decode_s / max(self.decode_tokens, 1)

    @property
    def tokens(self) -> list[list[int]]:
        return [g.tokens for g in self.generations]

    @property
    def alpha(self) -> float | None:
        verified = sum(g.drafts_verified for g in self.generations)
        return sum(g.drafts_accepted for g in self.generations) / verified if verified else None


def run_method(decoder, name: str, prompt_ids: list[list[int]], max_new_tokens: int, oracles=None) -> Run:
    """Generate every prompt with `decoder`, timing each token as it is yielded."""
    run = Run(name)
    for i, ids in enumerate(prompt_ids):
        kwargs = {"oracle": oracles[i]} if oracles is not None else {}
        start = time.perf_counter()
        first = last = None
        for _ in decoder.stream(ids, max_new_tokens, temperature=0.0, **kwargs):
            last = time.perf_counter()
            first = first or last
        run.add(decoder.last_generation, first, last, time.perf_counter() - start)
    return run


def warm_up(decoder, prompt_ids: list[int], tokens: int) -> None:
    if tokens > 0:
        decoder.generate(prompt_ids, tokens, temperature=0.0)


# --- what the theory needs, measured in this run ---------------------------------------------------

def pipeline_costs(run: Run) -> dict:
    """decode.evaluate.pipeline_model over this run's generations: what the theory needs, measured here."""
    from decode.evaluate import pipeline_model

    return pipeline_model(run.generations)


def predict_ppsd(alpha: float, costs: dict, stage_s: list[float] | None = None) -> float:
    from decode.evaluate import ppsd_time

    return ppsd_time(alpha, costs, stage_s)


def eesd_costs(runs: list[Run]) -> tuple[float, dict[int, float]]:
    """(draft step, {positions: verify pass}) averaged over EESD runs, weighted by their counts."""
    draft_total = draft_n = 0.0
    verify_total: dict[int, float] = {}
    verify_n: dict[int, int] = {}
    for run in runs:
        for g in run.generations:
            st = g.stats
            # per-k counts are not in the stats: weight each generation's means by its rounds
            draft_total += st["draft_s"] * st["rounds"]
            draft_n += st["rounds"]
            for k, v in st["verify_s"].items():
                verify_total[int(k)] = verify_total.get(int(k), 0.0) + v * st["rounds"]
                verify_n[int(k)] = verify_n.get(int(k), 0) + st["rounds"]
    return draft_total / max(draft_n, 1), {k: verify_total[k] / verify_n[k] for k in verify_total}


def stage_costs_alone(base, head, layout: list[range], prompt_ids: list[list[int]], references: list[list[int]],
                      threads: int = 1) -> list[float]:
    """Each stage's compute for one position with nothing else running (one process, `threads` threads),
    teacher-forced on the AR tokens: stage 0 = layers [0, E) + head + LM head + draft choice, stage i =
    its layers (+ final norm, LM head and the model's token on the last)."""
    import torch

    from decode.common import draft_step, positions

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    totals, count = [0.0] * len(layout), 0
    try:
        with torch.inference_mode():
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
    finally:
        torch.set_num_threads(previous)
    return [t / max(count, 1) for t in totals]


# --- the benchmark ---------------------------------------------------------------------------------

def load_model(cfg: DictConfig):
    """The base and the head every method shares (an untrained head of `head_type` for oracle runs
    without head_path: oracle drafts replace its tokens, its cost is all that matters)."""
    from decode.decoder import resolve_base_model, resolve_device
    from decode.layout import measure_costs
    from heads import build_head, load_base, load_head
    from heads.hardware import check_device, resolve_dtype

    if not cfg.head_path and cfg.mode != "oracle":
        raise UserError(f"mode={cfg.mode} measures a trained head: pass head_path=FOLDER (or use mode=oracle)")
    device = str(check_device(resolve_device(cfg.device)))
    cfg.dtype = resolve_dtype(cfg.dtype, device)
    base = load_base(resolve_base_model(cfg.head_path, cfg.model), dtype=cfg.dtype, device=device,
                     batch_invariant=bool(cfg.batch_invariant))
    if cfg.head_path:
        return base, load_head(cfg.head_path, base)
    exit_layer = cfg.exit_layer
    if exit_layer is None:
        layer_s, lm_head_s = measure_costs(base)
        head_s = layer_s if cfg.head_type == "transformer" else 0.0
        exit_layer = theory.balanced_exit_layer(layer_s, base.num_layers, cfg.stages, head_s, lm_head_s)
    return base, build_head(base, cfg.head_type, int(exit_layer))


def run_benchmark(cfg: DictConfig) -> dict:
    import os

    import torch

    from decode import Decoder, OracleDrafts
    from decode.decoder import decode_threads

    load = os.getloadavg()[0]
    base, head = load_model(cfg)
    texts = load_prompts(cfg.prompts, cfg.num_prompts)
    prompt_ids = [base.encode_chat([{"role": "user", "content": t}]) for t in texts]
    threads = decode_threads(base, prompt_ids[0], cfg.ar_threads, cfg.stage_threads, cfg.stages)
    cfg.ar_threads, cfg.stage_threads = threads["threads"], threads["stage_threads"]
    n, common = cfg.max_new_tokens, dict(base=base, head=head, dtype=cfg.dtype, device=str(base.device))
    torch.manual_seed(cfg.seed)
    print(f"{base.name} {cfg.dtype} on {base.device}, {head.describe()}, {len(prompt_ids)} prompts × {n} new tokens, "
          f"{cfg.ar_threads} AR threads (ms per AR step by threads: {threads['measured_ms'] or 'not measured'}), "
          f"{cfg.stage_threads} per stage, load average {load:.2f} at start", flush=True)

    ar = Decoder("ar", threads=cfg.ar_threads, **common)
    warm_up(ar, prompt_ids[0], cfg.warmup_tokens)
    ar_run = run_method(ar, "ar", prompt_ids, n)
    ar1 = Decoder("ar", threads=1, **common)
    ar1_run = run_method(ar1, "ar_1thread", prompt_ids, n)
    t_ar, references = ar_run.s_per_token, ar_run.tokens
    result = {"mode": cfg.mode, "model": base.name, "head": cfg.head_path or f"untrained {cfg.head_type}",
              "exit_layer": head.exit_layer, "num_layers": base.num_layers, "dtype": cfg.dtype,
              "prompts": len(prompt_ids), "max_new_tokens": n, "ar_threads": cfg.ar_threads,
              "stage_threads": cfg.stage_threads, "threads_measured_ms": threads["measured_ms"] or None,
              "device": str(base.device), "load_average": round(load, 2),
              "ar_ms_per_token": t_ar / MS, "ar_1thread_ms_per_token": ar1_run.s_per_token / MS}

    with Decoder("ppsd", stages=cfg.stages, stage_threads=cfg.stage_threads, window=cfg.window, **common) as ppsd:
        warm_up(ppsd, prompt_ids[0], cfg.warmup_tokens)
        layout = ppsd.layout
        result["stage_layers"] = [[r.start, r.stop] for r in layout]
        alone = stage_costs_alone(base, head, layout, prompt_ids, references, cfg.stage_threads)
        eesd_runs: dict[int, Run] = {}
        if cfg.mode in ("measure", "all"):
            result["measure"] = measure(cfg, ppsd, common, prompt_ids, references, t_ar, ar1_run, eesd_runs, alone)
        if cfg.mode in ("oracle", "all"):
            result["oracle"] = oracle_sweep(cfg, ppsd, common, prompt_ids, references, t_ar, eesd_runs, alone,
                                            OracleDrafts, base.vocab_size)
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


def lossless(run: Run, references: list[list[int]]) -> bool:
    return run.tokens == references


def stage_table(costs: dict, alone: list[float]) -> tuple[str, list[dict]]:
    lines = ["| stage | compute ms/pos (pipeline) | alone ms/pos | contention | send ms/pos | τ ms |",
             "|---|---|---|---|---|---|"]
    rows = []
    for i, (c, a, x, tau) in enumerate(zip(costs["compute_s"], alone, costs["send_s"], costs["stage_s"])):
        rows.append({"stage": i, "compute_ms": c / MS, "alone_ms": a / MS, "contention": c / a if a else None,
                     "send_ms": x / MS, "tau_ms": tau / MS})
        lines.append(f"| {i} | {c / MS:.2f} | {a / MS:.2f} | {c / a:.2f} | {x / MS:.3f} | {tau / MS:.2f} |")
    return "\n".join(lines), rows


def measure(cfg, ppsd, common, prompt_ids, references, t_ar, ar1_run, eesd_runs, alone) -> dict:
    """AR vs EESD (every γ, the fastest reported) vs PPSD with the trained head."""
    from decode import Decoder

    n = cfg.max_new_tokens
    sweep = {}
    for gamma in cfg.gammas:
        eesd = Decoder("eesd", gamma=int(gamma), threads=cfg.ar_threads, **common)
        warm_up(eesd, prompt_ids[0], cfg.warmup_tokens)
        eesd_runs[int(gamma)] = run = run_method(eesd, f"eesd γ={gamma}", prompt_ids, n)
        sweep[int(gamma)] = run
    best = min(sweep, key=lambda g: sweep[g].s_per_token)
    ppsd_run = run_method(ppsd, "ppsd", prompt_ids, n)
    costs = pipeline_costs(ppsd_run)
    alpha = ppsd_run.alpha or 0.0
    predicted = predict_ppsd(alpha, costs)
    draft_s, verify_s = eesd_costs([sweep[best]])
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
    print("| method | α | ms/token | speedup | predicted | vs 1-thread AR | lossless |\n|---|---|---|---|---|---|---|")
    print(f"| ar | | {t_ar / MS:.2f} | 1.00× | | {ar1_run.s_per_token / t_ar:.2f}× | |")
    e, p = out["eesd"], out["ppsd"]
    print(f"| eesd γ={best} | {eesd_alpha:.3f} | {e['ms_per_token']:.2f} | {e['speedup']:.2f}× | "
          f"{e['predicted_speedup'] or float('nan'):.2f}× | {ar1_run.s_per_token / sweep[best].s_per_token:.2f}× | {e['lossless']} |")
    print(f"| ppsd S={cfg.stages} | {alpha:.3f} | {p['ms_per_token']:.2f} | {p['speedup']:.2f}× | "
          f"{p['predicted_speedup']:.2f}× | {p['speedup_vs_1thread_ar']:.2f}× | {p['lossless']} |")
    print("\nEESD γ sweep (speedup): " + ", ".join(f"γ={g}: {s:.2f}×" for g, s in out["eesd"]["sweep"].items()))
    print("\nPPSD stages (this head):\n" + table, flush=True)
    return out


def oracle_sweep(cfg, ppsd, common, prompt_ids, references, t_ar, eesd_runs, alone, OracleDrafts, vocab_size) -> dict:
    """Drafts right with probability α: measured vs predicted PPSD and EESD at each α."""
    from decode import Decoder

    n = cfg.max_new_tokens

    def oracles(alpha: float):
        return [OracleDrafts(ref, alpha, seed=cfg.seed + i, vocab_size=vocab_size) for i, ref in enumerate(references)]

    if not eesd_runs:  # calibrate the EESD costs per γ on one prompt (an oracle at α = 0.8 keeps rounds full)
        for gamma in cfg.gammas:
            eesd = Decoder("eesd", gamma=int(gamma), threads=cfg.ar_threads, **common)
            eesd_runs[int(gamma)] = run_method(eesd, f"eesd γ={gamma}", prompt_ids[:1], n, oracles(0.8)[:1])
    draft_s, verify_s = eesd_costs(list(eesd_runs.values()))
    gammas = [g for g in cfg.gammas if g + 1 in verify_s]
    rows, stage_rows = [], {}
    for alpha in cfg.alphas:
        alpha = float(alpha)
        run = run_method(ppsd, f"ppsd α={alpha}", prompt_ids, n, oracles(alpha))
        costs = pipeline_costs(run)
        measured_alpha = run.alpha or 0.0
        predicted = predict_ppsd(measured_alpha, costs)
        stage_rows[alpha] = stage_table(costs, alone)
        gamma = theory.best_eesd_gamma(alpha, draft_s, verify_s, t_ar, gammas)
        eesd = Decoder("eesd", gamma=gamma, threads=cfg.ar_threads, **common)
        erun = run_method(eesd, f"eesd α={alpha}", prompt_ids, n, oracles(alpha))
        e_draft, e_verify = eesd_costs([erun])
        e_alpha = erun.alpha or 0.0
        e_verify = e_verify if gamma + 1 in e_verify else verify_s
        e_pred = theory.eesd_time_per_token(e_alpha, gamma, e_draft, e_verify)
        rows.append({
            "alpha": alpha, "ppsd_alpha": measured_alpha, "ppsd_ms": run.s_per_token / MS,
            "ppsd_measured": t_ar / run.s_per_token, "ppsd_predicted": t_ar / predicted,
            "ppsd_error": run.s_per_token / predicted - 1,
            "ppsd_predicted_alone": t_ar / predict_ppsd(measured_alpha, costs,
                                                        [a + x for a, x in zip(alone, costs["send_s"])]),
            "ppsd_lossless": lossless(run, references),
            "tick_ms": theory.ppsd_tick(costs["stage_s"], costs["feedback_s"], costs["window"], costs["head_s"]) / MS,
            "latency_ms": theory.ppsd_flush_latency(costs["stage_s"], costs["feedback_s"], costs["window"],
                                                    costs["head_s"], costs["poll"]) / MS,
            "window": costs["window"],
            "contention": [c / a for c, a in zip(costs["compute_s"], alone)],
            "eesd_gamma": gamma, "eesd_alpha": e_alpha, "eesd_ms": erun.s_per_token / MS,
            "eesd_measured": t_ar / erun.s_per_token, "eesd_predicted": t_ar / e_pred,
            "eesd_error": erun.s_per_token / e_pred - 1, "eesd_lossless": lossless(erun, references),
        })
    print(f"\n## Oracle acceptance: measured vs predicted speedup over AR ({cfg.ar_threads} threads, "
          f"{t_ar / MS:.2f} ms/token); PPSD S={cfg.stages}, one thread per stage\n")
    print("| α | PPSD α | PPSD measured | PPSD predicted | error | pred. from alone costs | tick ms | L ms | "
          "contention | EESD γ | EESD measured | EESD predicted | error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['alpha']:.1f} | {r['ppsd_alpha']:.3f} | {r['ppsd_measured']:.2f}× | {r['ppsd_predicted']:.2f}× | "
              f"{r['ppsd_error']:+.1%} | {r['ppsd_predicted_alone']:.2f}× | {r['tick_ms']:.2f} | {r['latency_ms']:.2f} | "
              + "/".join(f"{c:.2f}" for c in r["contention"]) +
              f" | {r['eesd_gamma']} | {r['eesd_measured']:.2f}× | {r['eesd_predicted']:.2f}× | {r['eesd_error']:+.1%} |")
    last_alpha = max(stage_rows)
    print(f"\nPPSD stages at α={last_alpha:g}:\n" + stage_rows[last_alpha][0])
    print(f"EESD costs (γ sweep): draft {draft_s / MS:.2f} ms, verify " +
          ", ".join(f"{k}: {v / MS:.2f}" for k, v in sorted(verify_s.items())) + " ms", flush=True)
    return {"rows": rows, "stages": {a: s[1] for a, s in stage_rows.items()},
            "eesd_draft_ms": draft_s / MS, "eesd_verify_ms": {k: v / MS for k, v in verify_s.items()}}


# --- entry point -----------------------------------------------------------------------------------

@entry_point("benchmark", BENCHMARK)
def main(cfg: DictConfig) -> None:
    result = run_theory(cfg) if cfg.mode == "theory" else run_benchmark(cfg)
    print(json.dumps(result, default=_jsonable))


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


if __name__ == "__main__":
    main()
