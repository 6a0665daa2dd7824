"""The sweep's report: report.md (verdict, table, how close measurement sits to theory) and two plots.

- speedup_vs_exit_layer.png: measured PPSD and EESD speedups over ar per exit layer, over the theory
  curve N / (αE + (1 − α)N) evaluated with the measured acceptance (interpolated between the measured
  layers), the stage-cost prediction decode makes for each candidate, and the exit-position ceiling N/E.
- acceptance_vs_exit_layer.png: measured acceptance (PPSD and EESD) and the held-out expected
  acceptance from training, per exit layer.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from decode.theory import ideal_ppsd_speedup  # noqa: E402


def _series(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows grouped by (head, stages, γ), each sorted by exit layer."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["head"], row["stages"], row.get("gamma")), []).append(row)
    return {k: sorted(v, key=lambda r: r["exit_layer"]) for k, v in sorted(groups.items(), key=lambda kv: str(kv[0]))}


def _label(key: tuple) -> str:
    head, stages, gamma = key
    return f"{head}, {stages} stages" + (f", γ={gamma}" if gamma else "")


def theory_curve(rows: list[dict], num_layers: int) -> tuple[np.ndarray, np.ndarray]:
    """Ideal PPSD speedup across the measured exit layers, α interpolated linearly between them."""
    points = [(r["exit_layer"], r["acceptance_rate"]) for r in rows if r.get("acceptance_rate") is not None]
    if not points:
        return np.array([]), np.array([])
    layers, alphas = zip(*sorted(points))
    grid = np.linspace(min(layers), max(layers), 8 * (max(layers) - min(layers)) + 1)  # no extrapolation
    alpha = np.clip(np.interp(grid, layers, alphas), 0.0, 1.0)
    return grid, np.array([ideal_ppsd_speedup(float(a), num_layers, float(e)) for a, e in zip(alpha, grid)])


def plot_speedup(rows: list[dict], num_layers: int, path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    all_layers = sorted({r["exit_layer"] for r in rows})
    plotted = [1.2] + [r.get(k) or 0 for r in rows for k in ("ppsd_speedup", "eesd_speedup", "ppsd_predicted_speedup")]
    for i, (key, group) in enumerate(_series(rows).items()):
        color = colors[i % len(colors)]
        layers = [r["exit_layer"] for r in group]
        grid, ideal = theory_curve(group, num_layers)
        if len(grid):
            ax.plot(grid, ideal, "-", color=color, alpha=0.45,
                    label=f"theory N/(αE+(1−α)N), balanced stages, measured α ({_label(key)})")
            plotted += list(ideal)
        predicted = [(r["exit_layer"], r["ppsd_predicted_speedup"]) for r in group if r.get("ppsd_predicted_speedup") is not None]
        if predicted:
            ax.plot(*zip(*predicted), "x--", color=color, alpha=0.8, label=f"stage-cost prediction ({_label(key)})")
        ax.plot(layers, [r.get("ppsd_speedup") for r in group], "o", color=color, markersize=8,
                label=f"PPSD measured ({_label(key)})")
        eesd = [(r["exit_layer"], r["eesd_speedup"]) for r in group if r.get("eesd_speedup") is not None]
        if eesd:
            ax.plot(*zip(*eesd), "s", color=color, markerfacecolor="none", markersize=8, label=f"EESD measured ({_label(key)})")
    if len(all_layers) > 1:
        grid = np.linspace(min(all_layers), max(all_layers), 50)
        ax.plot(grid, num_layers / grid, ":", color="gray", label="ceiling N/E (α = 1)")
        plotted.append(num_layers / min(all_layers))
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.axhline(1.0, color="black", linewidth=0.8, label="ar (1×)")
    ax.set_xlabel(f"exit layer E (of N = {num_layers})")
    ax.set_ylabel("speedup over ar")
    ax.set_title(title)
    ax.set_ylim(0, max(plotted) * 1.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_acceptance(rows: list[dict], num_layers: int, path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (key, group) in enumerate(_series(rows).items()):
        color = colors[i % len(colors)]
        layers = [r["exit_layer"] for r in group]
        ax.plot(layers, [r.get("acceptance_rate") for r in group], "o-", color=color, label=f"PPSD measured ({_label(key)})")
        if any(r.get("eesd_acceptance_rate") is not None for r in group):
            ax.plot(layers, [r.get("eesd_acceptance_rate") for r in group], "s--", color=color, markerfacecolor="none",
                    label=f"EESD measured ({_label(key)})")
        if any(r.get("heldout_expected_acceptance") is not None for r in group):
            ax.plot(layers, [r.get("heldout_expected_acceptance") for r in group], "^:", color=color, alpha=0.7,
                    label=f"held-out expected acceptance, training ({key[0]})")
    ax.set_xlabel(f"exit layer E (of N = {num_layers})")
    ax.set_ylabel("acceptance rate α")
    ax.set_ylim(0, 1.02)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _f(value, digits: int = 2, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def results_table(rows: list[dict]) -> str:
    """The Markdown table the README shows."""
    head = ["exit layer", "head", "stages", "α (PPSD)", "PPSD measured", "PPSD predicted", "theory (ideal)",
            "EESD measured (predicted)", "α (EESD)", "tokens/s ar / PPSD / EESD", "lossless"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        gamma = r.get("eesd_gamma")
        lines.append("| " + " | ".join([
            str(r["exit_layer"]), r["head"], str(r["stages"]), _f(r.get("acceptance_rate"), 3),
            _f(r.get("ppsd_speedup"), 2, "×"), _f(r.get("ppsd_predicted_speedup"), 2, "×"), _f(r.get("ideal_speedup"), 2, "×"),
            _f(r.get("eesd_speedup"), 2, "×") + f" ({_f(r.get('eesd_predicted_speedup'), 2, '×')}" + (f", γ={gamma})" if gamma else ")"),
            _f(r.get("eesd_acceptance_rate"), 3),
            " / ".join(_f(r.get(k), 1) for k in ("ar_tokens_per_s", "ppsd_tokens_per_s", "eesd_tokens_per_s")),
            {True: "yes", False: "**no**"}.get(r.get("lossless"), "–"),
        ]) + " |")
    return "\n".join(lines)


def verdict(selected: dict) -> str:
    if not selected.get("beats_ar"):
        detail = selected["note"].split(": ", 1)[-1]  # the note opens with the verdict itself
        return f"**Nothing beats ar on this hardware:** {detail}; use plain ar decoding."
    how = f"{selected['stages']} stages" if selected["method"] == "ppsd" else f"γ={selected.get('gamma')}"
    return (f"**Selected: {selected['method']} ({how}) with the {selected['head']} head at exit layer "
            f"{selected['exit_layer']}: {selected['measured_speedup']:.2f}× over ar, measured** "
            f"(acceptance {_f(selected.get('acceptance_rate'), 3)}). Head: `{selected.get('selected_head', selected['head_path'])}`.")


def closeness(rows: list[dict]) -> str:
    """How far measured PPSD speedups sit from the ideal curve and from the stage-cost prediction."""
    def ratios(key):
        return [r["ppsd_speedup"] / r[key] for r in rows if r.get("ppsd_speedup") and r.get(key)]

    parts = []
    for key, name in (("ideal_speedup", "the ideal curve N/(αE+(1−α)N)"), ("ppsd_predicted_speedup", "the stage-cost prediction")):
        values = ratios(key)
        if values:
            parts.append(f"measured PPSD speedups are {np.mean(values):.2f}× of {name} on average "
                         f"(range {min(values):.2f}–{max(values):.2f})")
    return ("; ".join(parts) + ".") if parts else "No theory comparison available."


def noise_warnings(rows: list[dict]) -> list[str]:
    """Signs the timings are not to be trusted: ar is the same work in every candidate, and no PPSD run can
    beat the ideal bound N/(αE+(1−α)N) by much unless its ar baseline was slowed down."""
    warnings = []
    ar = [r["ar_tokens_per_s"] for r in rows if r.get("ar_tokens_per_s")]
    if len(ar) > 1 and max(ar) / min(ar) > 1.25:
        warnings.append(f"ar ran at {min(ar):.1f}–{max(ar):.1f} tokens/s across candidates ({max(ar) / min(ar):.1f}× spread) "
                        "for the same work: the machine was busy and these speedups are noise; rerun on a quiet machine")
    over = [r["key"] for r in rows if r.get("ppsd_speedup") and r.get("ideal_speedup")
            and r["ppsd_speedup"] > 1.25 * r["ideal_speedup"]]
    if over:
        warnings.append(f"PPSD beat its ideal bound by more than 25% in {', '.join(over)}: the ar baseline of those runs "
                        "was slowed down (CPU contention), not PPSD sped up")
    return warnings


def write_report(out: Path, results: dict) -> dict[str, Path]:
    rows = results["candidates"]
    num_layers = results["num_layers"]
    title = f"{Path(results['base_model']).name}: {results.get('limit')} prompts × {results.get('max_new_tokens')} new tokens"
    paths = {"speedup_plot": out / "speedup_vs_exit_layer.png", "acceptance_plot": out / "acceptance_vs_exit_layer.png",
             "report": out / "report.md"}
    plot_speedup(rows, num_layers, paths["speedup_plot"], title)
    plot_acceptance(rows, num_layers, paths["acceptance_plot"], title)
    text = "\n".join([
        f"# Exit-position sweep: {results['base_model']}", "",
        verdict(results["selected"]), "",
        *[f"> **Warning:** {w}.\n" for w in noise_warnings(rows)],
        f"- Hardware: {results.get('hardware')}",
        f"- Prompts: `{results.get('prompts')}` (first {results.get('limit')}), {results.get('max_new_tokens')} new tokens, greedy",
        f"- Base: {num_layers} decoder layers; every speedup is over ar measured in the same run on the same prompts.",
        "", "## Results", "", results_table(rows), "",
        closeness(rows), "",
        "![speedup vs exit layer](speedup_vs_exit_layer.png)", "",
        "![acceptance vs exit layer](acceptance_vs_exit_layer.png)", "",
        "Machine-readable: `results.csv`, `results.json`. Theory: `decode/theory.py`.", "",
    ])
    paths["report"].write_text(text)
    return paths


def main(argv: list[str] | None = None) -> None:
    """python -m scripts.report SWEEP_FOLDER: rewrite report.md and both plots from the folder's results.json."""
    import json
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not (Path(args[0]) / "results.json").is_file():
        print("error: usage: python -m scripts.report SWEEP_FOLDER (a folder holding a sweep's results.json)",
              file=sys.stderr)
        sys.exit(2)
    write_report(Path(args[0]), json.loads((Path(args[0]) / "results.json").read_text()))
    print(f"wrote {Path(args[0]) / 'report.md'} and its plots", flush=True)


if __name__ == "__main__":
    main()
