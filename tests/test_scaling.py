"""scripts.scaling: the α-vs-data report and its fit, on fabricated run folders (no model needed)."""

import json

import pytest

from scripts import scaling


def _run(folder, answers, alpha, curve, width=2304):
    head = folder / "head_L15_mlp"
    head.mkdir(parents=True)
    (head / "config.json").write_text(json.dumps({"head_type": "mlp", "mlp_hidden": width, "metadata": {"training": {
        "epochs": 2, "data": {"num_prompts": 378, "generation": {"samples": answers // 800 - 1}}}}}))
    (folder / "metrics.json").write_text(json.dumps({
        "head": "mlp", "exit_layer": 15, "head_path": str(head), "heldout_top1": alpha, "train_examples": answers,
        "train_positions": 100 * answers, "steps": answers, "generate_seconds": 1.0, "base_forward_seconds": 2.0,
        "train_seconds": 60.0 * len(curve) + 60}))
    (folder / "metrics.jsonl").write_text("".join(
        json.dumps({"step": 10 * i, "loss": 1.0}) + "\n" + json.dumps({"step": 10 * i, "train_seconds": 60.0 * (i + 1),
                                                                          "heldout/L15/top1": a}) + "\n"
        for i, a in enumerate(curve)))
    return folder


def test_report_fits_alpha_per_doubling_and_says_what_the_target_takes(tmp_path):
    runs = [_run(tmp_path / f"s{n}", 800 * n, alpha, [alpha - 0.05, alpha - 0.01])
            for n, alpha in [(2, 0.36), (4, 0.39), (8, 0.42)]]
    assert scaling.main([str(r) for r in runs] + ["--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "scaling.md").read_text()
    assert "| s8 | 15 | mlp 2304 |  | 378 | 7 | 6400 | 640000 | 2 | 6400 |" in text and "**0.420** | all |" in text
    assert "layer 15, mlp 2304, 378 prompts: b = +0.030 per doubling" in text
    # 0.42 + 0.03 * log2(need / 6400) = 0.50 -> need = 6400 * 2^(8/3), about 6.3x the largest run
    assert "α 0.50 would take about 40,637 answers (6× the largest run)" in text
    rows = scaling.read_run(runs[0])
    assert rows[0]["curve"] == [(60.0, pytest.approx(0.31)), (120.0, pytest.approx(0.35)), (180.0, 0.36)]
    assert (tmp_path / "out" / "alpha_vs_answers.png").stat().st_size > 0
    assert rows[0]["cost"] is None  # no weights in this fabricated head folder
    assert (tmp_path / "out" / "alpha_vs_time.png").stat().st_size > 0


def test_head_variants_are_separate_series(tmp_path):
    runs = [_run(tmp_path / "s2", 1600, 0.36, []), _run(tmp_path / "s4", 3200, 0.39, []),
            _run(tmp_path / "w2", 1600, 0.30, [], width=4608)]
    rows = [r for run in runs for r in scaling.read_run(run)]
    assert {r["head"] for r in rows} == {"mlp 2304", "mlp 4608"}
    assert "layer 15, mlp 2304, 378 prompts: b = +0.030 per doubling" in scaling.report(rows)  # w2 not in the fit


def test_a_folder_without_metrics_is_a_one_line_error(tmp_path, capsys):
    assert scaling.main([str(tmp_path)]) == 2
    assert "has no metrics.json" in capsys.readouterr().err


def test_head_cost_counts_weights_in_base_layers(tmp_path):
    import torch
    from safetensors.torch import save_file

    config = {"hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1}
    # one layer: q, o 8x8; k, v 8x4; gate, up, down 8x16; two norms of 8 = 128 + 64 + 384 + 16 = 592
    save_file({"up.weight": torch.zeros(32, 8), "down.weight": torch.zeros(8, 32), "norm.weight": torch.zeros(8)},
              str(tmp_path / "model.safetensors"))
    assert scaling.head_cost(tmp_path, config) == pytest.approx(520 / 592)
