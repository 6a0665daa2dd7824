"""The sweep's selection: one row per measured candidate (from decode's JSON), the best measured method,
and the results: results.json/csv, selected_head/ and the report (scripts/report.py)."""

from __future__ import annotations

import csv
import io
import time
from dataclasses import asdict
from pathlib import Path

from decode.measure import method_figures
from decode.theory import ideal_ppsd_speedup
from heads.errors import UserError
from heads.files import atomic_write_json, atomic_write_text
from heads.schema import METHODS
from scripts.sweep_plan import Candidate, read_json


# --- one row per candidate (step 2 writes it as each result arrives) -----------------------------

def candidate_row(candidate: Candidate, trained: dict, result: dict, num_layers: int, seconds: float) -> dict:
    """A candidate's results row: decode's figures per method (measured and predicted), the ideal speedup
    N/(αE+(1−α)N) at the measured α, and the method with the best measured speedup (ppsd on ties)."""
    ppsd, eesd, ar = (method_figures(result, m) for m in ("ppsd", "eesd", "ar"))
    alpha = ppsd.get("acceptance_rate")
    row = asdict(candidate) | {
        "key": candidate.key,
        "head_path": trained["head_path"],
        "acceptance_rate": alpha,
        "ppsd_speedup": ppsd.get("speedup_vs_ar"),
        "ppsd_predicted_speedup": ppsd.get("predicted_speedup"),
        "ppsd_tokens_per_s": ppsd.get("tokens_per_s"),
        "eesd_acceptance_rate": eesd.get("acceptance_rate"),
        "eesd_speedup": eesd.get("speedup_vs_ar"),
        "eesd_predicted_speedup": eesd.get("predicted_speedup"),
        "eesd_tokens_per_s": eesd.get("tokens_per_s"),
        "eesd_gamma": eesd.get("gamma", candidate.gamma),
        "ar_tokens_per_s": ar.get("tokens_per_s"),
        "lossless": result.get("lossless"),
        "heldout_top1": trained.get("heldout_top1"),
        "heldout_expected_acceptance": trained.get("heldout_expected_acceptance"),
        "train_seconds": trained.get("train_seconds"),
        "eval_seconds": round(seconds, 1),
        "num_layers": num_layers,
        "device": result.get("device"), "dtype": result.get("dtype"),  # what decode's `auto` resolved to
        "runtime": result.get("runtime"),
        "threads": result.get("threads"), "stage_threads": result.get("stage_threads"),
    }
    if alpha is not None and num_layers:
        row["ideal_speedup"] = ideal_ppsd_speedup(alpha, num_layers, candidate.exit_layer)
    speeds = {m: row[f"{m}_speedup"] for m in METHODS if m != "ar" and row[f"{m}_speedup"] is not None}
    row["best_method"] = max(speeds, key=lambda m: (speeds[m], m == "ppsd")) if speeds else None
    row["best_speedup"] = speeds.get(row["best_method"]) if speeds else None
    return row


# --- step 3: select and write -------------------------------------------------------------------

def select(rows: list[dict]) -> dict:
    """The best measured speedup over ar (ppsd or eesd); ar itself when nothing beats it."""
    measured = [r for r in rows if r.get("best_speedup") is not None]
    if not measured:
        raise UserError("no candidate produced a measured speedup: see the decode logs in <out_dir>/logs")
    best = max(measured, key=lambda r: r["best_speedup"])
    config = {"key": best["key"], "method": best["best_method"], "head": best["head"], "exit_layer": best["exit_layer"],
              "stages": best["stages"] if best["best_method"] == "ppsd" else None,
              "gamma": best.get("eesd_gamma") if best["best_method"] == "eesd" else None,
              "head_path": best["head_path"], "measured_speedup": best["best_speedup"],
              "acceptance_rate": best["acceptance_rate"]}
    if best["best_speedup"] > 1.0:
        return config | {"beats_ar": True}
    return {"method": "ar", "measured_speedup": 1.0, "beats_ar": False, "fastest_candidate": config,
            "note": f"nothing beats ar on this hardware: the fastest candidate ({best['key']}, {best['best_method']}) "
                    f"reached {best['best_speedup']:.2f}x"}


def finish(out: Path, manifest: dict, candidates: list[Candidate]) -> dict:
    from heads.hub import measured_from_results, write_head_folder
    from scripts.report import noise_warnings, write_report

    keys = {c.key for c in candidates}
    # The table holds every candidate measured in this folder (earlier runs' too): same base, same settings.
    rows = sorted((r for r in (read_json(p) for p in (out / "candidates").glob("*.json")) if r),
                  key=lambda r: (r["head"], r["stages"], r.get("gamma") or 0, r["exit_layer"]))
    for row in rows:
        row["hardware"] = manifest["hardware"]
    selected = select([r for r in rows if r["key"] in keys])
    results = {k: manifest.get(k) for k in ("base_model", "model", "num_layers", "prompts", "limit", "max_new_tokens",
                                             "hardware")} | {"selected": selected, "candidates": rows}
    if selected["beats_ar"]:
        row = next(r for r in rows if r["key"] == selected["key"])
        measured = measured_from_results(row | {k: results[k] for k in ("prompts", "limit", "max_new_tokens")},
                                         {"exit_layer": row["exit_layer"], "head_type": row["head"]})
        measured["measured_at"] = time.strftime("%Y-%m-%d")
        write_head_folder(row["head_path"], out / "selected_head", measured=measured, overwrite=True)
        selected["selected_head"] = str((out / "selected_head").resolve())
        results["selected"] = selected
    results["warnings"] = noise_warnings(rows)
    atomic_write_json(out / "results.json", results)
    write_csv(out / "results.csv", rows)
    write_report(out, results)
    return results


CSV_COLUMNS = ("key", "head", "exit_layer", "stages", "gamma", "acceptance_rate", "ppsd_speedup", "ppsd_predicted_speedup",
               "ideal_speedup", "ppsd_tokens_per_s", "eesd_acceptance_rate", "eesd_speedup", "eesd_predicted_speedup",
               "eesd_gamma", "eesd_tokens_per_s", "ar_tokens_per_s", "best_method", "best_speedup", "lossless",
               "heldout_top1", "heldout_expected_acceptance", "train_seconds", "eval_seconds", "head_path")


def write_csv(path: Path, rows: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())
