"""What a run of the decoders measured, and how it compares with decode/theory.py.

The one home of every figure the commands report (decode/evaluate.py's summary, scripts/benchmark.py,
and scripts/sweep.py through decode's JSON):

- acceptance α (drafts accepted / drafts verified) and speed: Spec-Bench's tokens/s (all new tokens over
  all wall time, prefill included: `figures`' tokens_per_s), decode tokens/s (the tokens after each answer's
  first over the time after it, prefill excluded: `figures`' decode_tokens_per_s) and the benchmark's s/token (decode time, first token to
  last, prefill excluded: `TimedRun`);
- the costs theory needs, measured inside a run: one AR step (`ar_token_s`), an EESD draft step and
  verify pass per position count (`eesd_costs`), a PPSD pipeline's stage costs and feedback
  (`pipeline_model`);
- theory's prediction from them (`predict`, `ppsd_time`, `ppsd_tick_latency`);
- the Markdown tables (theory's prediction table, measured vs predicted).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from decode import theory

if TYPE_CHECKING:
    from decode.common import Generation

MS = 1e-3


# ---- acceptance and speed -----------------------------------------------------------------------

def acceptance(gens: Sequence[Generation]) -> float | None:
    """α over generations: drafts accepted / drafts verified (None when nothing was verified: ar)."""
    verified = sum(g.drafts_verified for g in gens)
    return sum(g.drafts_accepted for g in gens) / verified if verified else None


def figures(gens: Sequence[Generation]) -> dict:
    """tokens/s (all new tokens / all wall time, prefill included), decode_tokens_per_s (the tokens after each
    answer's first / the time from its first token to its last: prefill excluded; None when a Decoder did not
    time the first token), acceptance, mean accepted length over generations."""
    tokens = sum(g.new_tokens for g in gens)
    wall = sum(g.wall_time for g in gens)
    lengths = [n for g in gens for n in g.accept_lengths]
    timed = [g for g in gens if g.first_token_s is not None]  # after the first token: decode alone, no prefill
    after_first = sum(g.wall_time - g.first_token_s for g in timed)
    decode_tps = sum(g.new_tokens - 1 for g in timed) / after_first if after_first > 0 else None
    return {"new_tokens": tokens, "wall_time": wall, "tokens_per_s": tokens / wall if wall > 0 else 0.0,
            "decode_tokens_per_s": decode_tps,
            "acceptance_rate": acceptance(gens),
            "drafts_verified": sum(g.drafts_verified for g in gens),
            "drafts_accepted": sum(g.drafts_accepted for g in gens),
            "mean_accepted_length": sum(lengths) / len(lengths) if lengths else 1.0}


class TimedRun:
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
        return acceptance(self.generations)


def timed_run(decoder, name: str, prompt_ids: list[list[int]], max_new_tokens: int, oracles=None) -> TimedRun:
    """Generate every prompt greedily with `decoder`, timing each token as it is yielded."""
    run = TimedRun(name)
    for i, ids in enumerate(prompt_ids):
        kwargs = {"oracle": oracles[i]} if oracles is not None else {}
        start = time.perf_counter()
        first = last = None
        for _ in decoder.stream(ids, max_new_tokens, temperature=0.0, **kwargs):
            last = time.perf_counter()
            first = first or last
        run.add(decoder.last_generation, first, last, time.perf_counter() - start)
    return run


# ---- costs measured inside a run ----------------------------------------------------------------

def _weighted(items: list[tuple[float, float]]) -> float:
    total = sum(w for _, w in items)
    return sum(v * w for v, w in items) / total if total else 0.0


def ar_token_s(gens: Sequence[Generation]) -> float:
    """One AR decode step: each generation's mean weighted by its steps."""
    return _weighted([(g.stats["token_s"], g.stats["steps"]) for g in gens])


def eesd_costs(gens: Sequence[Generation]) -> tuple[float, dict[int, float]]:
    """(one draft token, {positions: one verify pass}) over EESD generations."""
    # A generation keeps means, not counts: weight each by its rounds (the verify passes behind its verify_s,
    # in proportion to the draft steps behind its draft_s at one γ), so the pool is a mean over every timing
    # taken; unweighted, a 2-round answer would count as much as a 100-round one.
    draft = _weighted([(g.stats["draft_s"], g.stats["rounds"]) for g in gens])
    per_k: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for g in gens:
        for k, t in g.stats["verify_s"].items():
            per_k[int(k)].append((t, g.stats["rounds"]))
    return draft, {k: _weighted(v) for k, v in sorted(per_k.items())}


def stage_summary(gens: Sequence[Generation]) -> list[dict]:
    """Per-stage figures over all generations: per-position means weighted by positions, totals summed."""
    out = []
    for i in range(len(gens[0].stats["stages"])):
        rows = [g.stats["stages"][i] for g in gens]
        w = [max(r["positions"], 1) for r in rows]
        mean = lambda key: _weighted([(r[key], x) for r, x in zip(rows, w)])  # noqa: E731
        out.append({"layers": rows[0]["layers"], "positions": sum(r["positions"] for r in rows),
                    "compute_s": mean("compute_s"), "send_s": mean("send_s"), "head_s": mean("head_s"),
                    "busy_fraction": mean("busy_fraction"), "blocked_s": sum(r["blocked_s"] for r in rows),
                    "bubble_s": sum(r["bubble_s"] for r in rows), "dropped": sum(r["dropped"] for r in rows),
                    "flushes": sum(r["flushes"] for r in rows), "contention": mean("contention")})
    return out


def pipeline_model(gens: Sequence[Generation]) -> dict:
    """What decode/theory.py needs about a PPSD pipeline, measured in these generations: each stage's time
    per position (compute + posting its sends), stage 0's head part (after h_E is sent), the feedback
    (S hops, from the ping each request measures), the window and whether stage 0 polls for verdicts;
    `stages` holds the per-stage summary they come from."""
    stages = stage_summary(gens)
    stats = gens[0].stats
    hop = sum(g.stats["feedback_s"] for g in gens) / len(gens)
    return {"stage_s": [s["compute_s"] + s["send_s"] for s in stages], "compute_s": [s["compute_s"] for s in stages],
            "send_s": [s["send_s"] for s in stages], "head_s": stages[0]["head_s"], "feedback_s": len(stages) * hop,
            "window": stats["window"], "poll": stats["polls"], "stages": stages}


# ---- theory's prediction from them --------------------------------------------------------------

def ppsd_time(alpha: float, model: dict, stage_s: list[float] | None = None) -> float:
    """theory's PPSD time per token for a `pipeline_model` (optionally with other stage costs)."""
    stage_s = stage_s or model["stage_s"]
    head_s = min(model["head_s"], stage_s[0])  # other costs (stage 0 alone) may be below the head measured here
    return theory.ppsd_time_per_token(alpha, stage_s, model["feedback_s"], model["window"], head_s, model["poll"])


def local_time_per_token(alpha: float, prefix_s: list[float]) -> float:
    """PPSD time per token when one process drives the stages (decode/local.py), from its measured ticks:
    `prefix_s[j]` is a tick in which stages 0..j run (on one GPU they overlap, so the full tick costs less than
    its stages one after another). Every token takes a full tick, and a rejected one (1 - α) also the S - 1
    refill ticks after its flush."""
    return prefix_s[-1] + (1 - alpha) * sum(prefix_s[:-1])


def ppsd_tick_latency(model: dict) -> tuple[float, float]:
    """theory's tick and flush latency for a `pipeline_model`."""
    pipe = (model["stage_s"], model["feedback_s"], model["window"], model["head_s"])
    return theory.ppsd_tick(*pipe), theory.ppsd_flush_latency(*pipe, model["poll"])


def predict(method: str, gens: Sequence[Generation], t_ar: float | None, gamma: int, alpha: float | None) -> dict:
    """theory's prediction from this run's own measurements (None where it does not apply)."""
    if method == "ar" or t_ar is None or alpha is None:
        return {"predicted_speedup": 1.0 if method == "ar" else None}
    if method == "eesd":
        draft_s, verify_s = eesd_costs(gens)
        if not verify_s:
            return {"predicted_speedup": None}
        ks = sorted(verify_s)
        nearest = lambda k: verify_s[min(ks, key=lambda m: abs(m - k))]  # noqa: E731
        return {"predicted_speedup": theory.eesd_speedup(alpha, gamma, draft_s, nearest, t_ar),
                "draft_s": draft_s, "verify_s": verify_s,
                "best_gamma": theory.best_eesd_gamma(alpha, draft_s, nearest, t_ar)}
    ticks = gens[0].stats.get("tick_costs")
    if gens[0].stats.get("placement") in ("streams", "devices"):  # one process drives the stages: measured ticks
        if not ticks:
            return {"predicted_speedup": None}
        return {"predicted_speedup": t_ar / local_time_per_token(alpha, ticks["prefix_s"]), "tick_costs": ticks}
    model = pipeline_model(gens)
    return {"predicted_speedup": t_ar / ppsd_time(alpha, model)} | model


def method_figures(result: dict, method: str) -> dict:
    """One method's figures from decode's JSON (top level for the method it ran, `compare` for the others)."""
    if result.get("method") == method:
        return result
    compare = result.get("compare") or {}
    return compare.get(method) or {}


# ---- Markdown tables ----------------------------------------------------------------------------

def _markdown(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def _by_stages(rows: Sequence[dict]) -> tuple[list[float], dict[int, dict[float, dict]]]:
    """theory.predict_table's rows as (the α values, {stages: {α: row}})."""
    by_stages: dict[int, dict[float, dict]] = {}
    for r in rows:
        by_stages.setdefault(r["stages"], {})[r["alpha"]] = r
    return sorted({r["alpha"] for r in rows}), by_stages


def format_tp_table(rows: Sequence[dict]) -> str:
    """A Markdown table of PPSD's speedup over AR tensor-parallel on the same S devices (rows need allreduce_s)."""
    alphas, by_stages = _by_stages(rows)
    lines = []
    for stages, per_alpha in by_stages.items():
        first = next(iter(per_alpha.values()))
        rule = "*" if first.get("tp_layer_source") == "1/S rule" else ""  # a layer at 1/S, no measured shard
        cells = [str(stages), str(first["exit_layer"]), f"{first['t_ar_tp_s'] * 1e3:.3f}{rule}"]
        cells += [f"{per_alpha[a]['ppsd_speedup_vs_tp']:.2f}×" if a in per_alpha else "" for a in alphas]
        lines.append(cells)
    return _markdown(["S", "E", "TP-AR ms"] + [f"α={a:g}" for a in alphas], lines)


def format_table(rows: Sequence[dict]) -> str:
    """A Markdown table of theory.predict_table: one line per stage count, PPSD (EESD) speedup per α, the ceilings."""
    alphas, by_stages = _by_stages(rows)
    lines = []
    for stages, per_alpha in by_stages.items():
        first = next(iter(per_alpha.values()))
        cells = [str(stages), str(first["exit_layer"]), f"{first['tick_s'] * 1e3:.3f}", f"{first['latency_s'] * 1e3:.3f}"]
        for a in alphas:
            r = per_alpha.get(a)
            cells.append("" if r is None else
                         f"{r['ppsd_speedup']:.2f}× ({r['ideal_speedup']:.2f}) / {r['eesd_speedup']:.2f}× γ={r['eesd_gamma']}")
        cells += [f"{first['ceiling']:.2f}", f"{first['real_ceiling']:.2f}"]
        lines.append(cells)
    head = ["S", "E", "tick ms", "L ms"] + [f"α={a:g} PPSD (ideal) / EESD γ" for a in alphas] + ["N/E", "T_AR/tick"]
    return _markdown(head, lines)


def stage_table(model: dict, alone: list[float]) -> tuple[str, list[dict]]:
    """A `pipeline_model`'s stages next to their compute alone (contention = pipeline / alone): (Markdown, rows)."""
    lines, rows = [], []
    for i, (c, a, x, tau) in enumerate(zip(model["compute_s"], alone, model["send_s"], model["stage_s"])):
        rows.append({"stage": i, "compute_ms": c / MS, "alone_ms": a / MS, "contention": c / a if a else None,
                     "send_ms": x / MS, "tau_ms": tau / MS})
        lines.append([str(i), f"{c / MS:.2f}", f"{a / MS:.2f}", f"{c / a:.2f}", f"{x / MS:.3f}", f"{tau / MS:.2f}"])
    head = ["stage", "compute ms/pos (pipeline)", "alone ms/pos", "contention", "send ms/pos", "τ ms"]
    return _markdown(head, lines), rows


def measured_table(t_ar: float, ar1_s: float, rows: Sequence[tuple[str, dict, float]]) -> str:
    """The benchmark's trained-head figures: ar, then one (name, figures, s/token) per method, measured next to
    predicted and against one-thread ar (ar1_s: its s/token)."""
    lines = [[name, f"{f['alpha']:.3f}", f"{f['ms_per_token']:.2f}", f"{f['speedup']:.2f}×",
              f"{f['predicted_speedup'] or float('nan'):.2f}×", f"{ar1_s / s:.2f}×", str(f["lossless"])]
             for name, f, s in rows]
    head = ["method", "α", "ms/token", "speedup", "predicted", "vs 1-thread AR", "lossless"]
    table = _markdown(head, lines).split("\n")
    ar = f"| ar | | {t_ar / MS:.2f} | 1.00× | | {ar1_s / t_ar:.2f}× | |"
    return "\n".join(table[:2] + [ar] + table[2:])


def oracle_table(rows: Sequence[dict]) -> str:
    """The benchmark's oracle rows: measured vs predicted PPSD and EESD speedups per α."""
    head = ["α", "PPSD α", "PPSD measured", "PPSD predicted", "error", "pred. from alone costs", "tick ms", "L ms",
            "contention", "EESD γ", "EESD measured", "EESD predicted", "error"]
    return _markdown(head, [[
        f"{r['alpha']:.1f}", f"{r['ppsd_alpha']:.3f}", f"{r['ppsd_measured']:.2f}×", f"{r['ppsd_predicted']:.2f}×",
        f"{r['ppsd_error']:+.1%}", f"{r['ppsd_predicted_alone']:.2f}×", f"{r['tick_ms']:.2f}", f"{r['latency_ms']:.2f}",
        "/".join(f"{c:.2f}" for c in r["contention"]), str(r["eesd_gamma"]), f"{r['eesd_measured']:.2f}×",
        f"{r['eesd_predicted']:.2f}×", f"{r['eesd_error']:+.1%}"] for r in rows])
