"""The table `python -m decode` prints for people at the end of a run (the JSON line after it is for machines).

Its two speeds, per method over every answer of the run:
- tokens/s: new tokens / wall time, prefill included (each answer timed from its first prefill op to its last
  token); what Spec-Bench's speed.py reports, and what a user waits for;
- decode tokens/s: the tokens after each answer's first / the time from its first token to its last, prefill
  excluded; what the benchmark (`scripts.benchmark`) and decode/theory.py's per-token predictions measure.
"""

from __future__ import annotations

import textwrap

SPEEDS = ("tokens/s: new tokens / wall time, prefill included. decode tokens/s: tokens after the first / time from "
          "the first token to the last (prefill excluded). speedup: tokens/s over ar's in this run; predicted: "
          "decode/theory.py from this run's measured costs and α. α: drafts accepted / drafts verified.")


def _number(value, digits: int = 1, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def _lossless(result: dict, method: str) -> str:
    if method == "ar":
        return "(reference)"
    value = (result.get("lossless_by_method") or {}).get(method)
    if value is None:
        return "n/a (sampling)" if result.get("temperature", 0) > 0 else "-"
    return "yes" if value else "NO"


def methods_table(result: dict) -> str:
    """A Markdown table with a row per method (ar first), from `decode.evaluate.run`'s result."""
    by_method = {result["method"]: result["figures"]} | dict(result.get("compare") or {})
    order = ["ar"] + [m for m in by_method if m != "ar"]
    rows = [["method", "tokens/s", "decode tokens/s", "speedup vs ar", "predicted", "α", "lossless"]]
    for method in order:
        f = by_method[method]
        rows.append([method, _number(f.get("tokens_per_s")), _number(f.get("decode_tokens_per_s")),
                     _number(f.get("speedup_vs_ar"), 2, "×"), _number(f.get("predicted_speedup"), 2, "×"),
                     _number(f.get("acceptance_rate"), 2), _lossless(result, method)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    where = (f"{result.get('model')} {result.get('dtype')} on {result.get('device')}, {result.get('questions')} "
             f"question(s) × up to {result.get('max_new_tokens')} new tokens per turn")
    return "\n".join([where, *lines, textwrap.fill(SPEEDS, 110)])
