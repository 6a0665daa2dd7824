"""Head quality against data and compute, from finished training runs.

    python -m scripts.scaling RUN_DIR [RUN_DIR ...] [--out FOLDER]

Each RUN_DIR is a `python -m train` output folder (metrics.json; metrics.jsonl with held-out lines when it ran
with eval_every). Writes to FOLDER (default: the first run's parent):
- scaling.md: one row per (run, head): answers, positions, epochs, steps, the generation / frozen-forward /
  training seconds and the held-out α; per exit layer and head type, the fit α = a + b·log2(answers) and
  what it says the targets would take (an extrapolation, marked as one);
- alpha_vs_answers.png: held-out α per exit layer against the training answers (log scale);
- alpha_vs_time.png: held-out α during training against training seconds, one curve per run and head.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from heads import UserError  # noqa: E402
from heads.files import atomic_write_text  # noqa: E402

TARGETS = {15: 0.50, 20: 0.60}  # issue 13's targets for SmolLM2's layers 15 and 20


def read_run(folder: Path, source: str = "default") -> list[dict]:
    """One row per head of a finished run, with its held-out curve (train seconds, α) if it logged one. A run on
    several prompt sources is scored on the held-out prompts of `source` alone where it recorded them."""
    path = folder / "metrics.json"
    if not path.is_file():
        raise UserError(f"{folder} has no metrics.json: pass the out_dir of a finished `python -m train` run")
    result = json.loads(path.read_text())
    heads = result.get("heads") or [result]
    log = folder / "metrics.jsonl"
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.is_file() else []
    rows = []
    for h in heads:
        config = json.loads((Path(h["head_path"]) / "config.json").read_text())
        training = config.get("metadata", {}).get("training", {})
        alpha, scored_on = h["heldout_top1"], "all"
        key = f"heldout/L{h['exit_layer']}/top1"
        if source in h.get("heldout_top1_by_source", {}):
            alpha, scored_on, key = h["heldout_top1_by_source"][source], source, f"{key}/{source}"
        curve = [(r["train_seconds"], r[key]) for r in lines if key in r]
        curve.append((result["train_seconds"], alpha))
        rows.append({"run": folder.name, "exit_layer": h["exit_layer"], "head": head_label(config, training),
                     "cost": head_cost(Path(h["head_path"]), config.get("base_config", {})),
                     "alpha": alpha, "scored_on": scored_on, "answers": result["train_examples"],
                     "positions": result.get("train_positions"), "epochs": training.get("epochs"),
                     "samples": training.get("data", {}).get("generation", {}).get("samples"),
                     "prompts": training.get("data", {}).get("num_prompts"), "steps": result["steps"],
                     "generate_s": result["generate_seconds"], "forward_s": result["base_forward_seconds"],
                     "train_s": result["train_seconds"], "curve": curve})
    return rows


def head_label(config: dict, training: dict) -> str:
    """The head type with what tells its variants apart: an MLP head's width, a transformer head's peak rate."""
    if config.get("head_type") == "mlp":
        blocks = config.get("mlp_layers", 1)
        return f"mlp {config.get('mlp_hidden') or 2 * config.get('base_config', {}).get('hidden_size', 0)}" + \
            (f" x{blocks}" if blocks > 1 else "")
    return f"{config.get('head_type')} lr {training['lr']:g}" if "lr" in training else str(config.get("head_type"))


def head_cost(head_path: Path, base_config: dict) -> float | None:
    """The head's weights in units of one base decoder layer's: what a draft costs beyond layers [0, E) (both
    also run the base's LM head, the same for every head)."""
    from safetensors import safe_open

    file = head_path / "model.safetensors"
    if not file.is_file() or "hidden_size" not in base_config:
        return None
    with safe_open(str(file), "pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    c = base_config
    hidden, inter = c["hidden_size"], c.get("intermediate_size", 4 * c["hidden_size"])
    heads = c.get("num_attention_heads", 1)
    head_dim = c.get("head_dim") or hidden // heads
    kv = c.get("num_key_value_heads", heads) * head_dim
    layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter + 2 * hidden
    return params / layer


def log_fit(rows: list[dict]) -> tuple[float, float] | None:
    """α = a + b·log2(answers) by least squares over runs with distinct data sizes; None with fewer than 2."""
    points = {r["answers"]: r["alpha"] for r in rows}
    if len(points) < 2:
        return None
    x = np.log2(list(points))
    b, a = np.polyfit(x, list(points.values()), 1)
    return float(a), float(b)


def _groups(rows):
    """Series: runs of one exit layer and head type on one prompt set (more data = more answers per prompt)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["exit_layer"], r["head"], r["prompts"]), []).append(r)
    return {k: sorted(v, key=lambda r: r["answers"]) for k, v in sorted(groups.items())}


def report(rows: list[dict]) -> str:
    out = ["# Held-out α against data and compute", "",
           "α = top-1 agreement of the head with the full model on the greedy answers to the held-out prompts.",
           "Seconds are wall time of the run's own generation (0 where it reused cached answers), frozen-base forward and",
           "training. Head cost: its weights in",
           "units of one base layer's (a draft runs layers [0, E), the head and the LM head).", "",
           "| run | exit layer | head | head cost | prompts | samples | answers | positions | epochs | steps | generate s | forward s | train s | α | held out |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (layer, head, _), group in _groups(rows).items():
        for r in group:
            cost = f"{r['cost']:.2f}" if r["cost"] is not None else ""
            out.append(f"| {r['run']} | {layer} | {head} | {cost} | {r['prompts']} | {r['samples']} | {r['answers']} | "
                       f"{r['positions'] or ''} | {r['epochs']} | {r['steps']} | {r['generate_s']:.0f} | "
                       f"{r['forward_s']:.0f} | {r['train_s']:.0f} | **{r['alpha']:.3f}** | {r['scored_on']} |")
    out += ["", "## Fit α = a + b·log2(answers), per exit layer, head and prompt set", ""]
    for (layer, head, prompts), group in _groups(rows).items():
        fit = log_fit(group)
        if fit is None:
            continue
        a, b = fit
        line = f"- layer {layer}, {head}, {prompts} prompts: b = {b:+.3f} per doubling of the answers"
        target = TARGETS.get(layer)
        if target is not None and b > 0:
            need = 2 ** ((target - a) / b)
            most = max(r["answers"] for r in group)
            line += (f"; α {target:.2f} would take about {need:,.0f} answers ({need / most:.0f}× the largest run), "
                     "if the trend held that far (an extrapolation)" if need > most else f"; α {target:.2f} is reached")
        out.append(line)
    return "\n".join(out) + "\n"


def plot(rows: list[dict], folder: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors, markers = {}, {}  # a colour per (layer, head), a marker per prompt set
    for (layer, head, prompts), group in _groups(rows).items():
        x = [r["answers"] for r in group]
        color = colors.setdefault((layer, head), f"C{len(colors)}")
        marker = markers.setdefault(prompts, "osD^v"[len(markers) % 5])
        line, = ax.plot(x, [r["alpha"] for r in group], marker + "-", color=color,
                        label=f"layer {layer}, {head} head, {prompts} prompts")
        fit = log_fit(group)
        if fit and len(group) > 2:
            grid = np.geomspace(min(x), max(x) * 4, 50)
            ax.plot(grid, fit[0] + fit[1] * np.log2(grid), ":", color=line.get_color(), alpha=0.6)
        if layer in TARGETS:
            ax.axhline(TARGETS[layer], color=line.get_color(), lw=0.8, ls="--", alpha=0.5)
    ax.set_xscale("log", base=2)
    _save(fig, ax, folder / "alpha_vs_answers.png", "training answers (greedy + sampled)",
          "held-out α (top-1 agreement)", "α against data (dotted: log-linear fit; dashed: targets)", legend_size=8)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in sorted(rows, key=lambda r: (r["exit_layer"], r["answers"])):
        t, a = zip(*r["curve"])
        ax.plot(np.array(t) / 60, a, "o-" if len(t) > 1 else "o", ms=3,
                label=f"L{r['exit_layer']} {r['head']}, {r['answers']} answers, {r['epochs']} epochs")
    _save(fig, ax, folder / "alpha_vs_time.png", "training minutes (frozen forward and generation not included)",
          "held-out α", "α against training time", legend_size=7)


def _save(fig, ax, path: Path, xlabel: str, ylabel: str, title: str, legend_size: int) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--source", default="default", help="score runs on several prompt sources on this one's held-out "
                    "prompts (default: default), so every run is scored on the same prompts")
    args = ap.parse_args(argv)
    try:
        rows = [r for folder in args.runs for r in read_run(folder, args.source)]
        out = args.out or args.runs[0].resolve().parent
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "scaling.md", report(rows))
        plot(rows, out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out / 'scaling.md'}, {out / 'alpha_vs_answers.png'}, {out / 'alpha_vs_time.png'}")
    print(report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
