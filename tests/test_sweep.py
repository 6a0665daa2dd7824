"""The sweep's orchestration: one multi-exit train job, one decode multirun, selection, report, resume and
bad input. `python -m train` / `python -m decode` are replaced by stubs that honour the same command-line
contract (the real ones are exercised by test_sweep_wandb.py), so every branch runs in seconds."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from heads import UserError

ROOT = Path(__file__).resolve().parents[1]

STUB_TRAIN = '''
import json, os, re, sys
import numpy as np
from safetensors.numpy import save_file
args = dict(a.split("=", 1) for a in sys.argv[1:])
layers = [int(x) for x in re.findall(r"\\d+", args["exit_layers"])]
open(os.environ["STUB_LOG"], "a").write(json.dumps({"cmd": "train", "argv": sys.argv[1:]}) + "\\n")
heads = []
for e in layers:
    folder = os.path.join(args["out_dir"], f"head_L{e}_{args['head']}")
    os.makedirs(folder, exist_ok=True)
    config = {"head_type": args["head"], "exit_layer": e, "base_model": "stub/base", "mlp_hidden": 0,
              "base_config": {"num_hidden_layers": 6, "hidden_size": 64, "vocab_size": 100, "model_type": "llama"},
              "metadata": {"heldout": {"top1": 0.1 * e, "expected_acceptance": 0.09 * e}}}
    open(os.path.join(folder, "config.json"), "w").write(json.dumps(config))
    save_file({"norm.weight": np.ones(64, np.float32), "up.weight": np.zeros((128, 64), np.float32),
               "down.weight": np.zeros((64, 128), np.float32)}, os.path.join(folder, "model.safetensors"))
    heads.append({"exit_layer": e, "head_path": folder, "heldout_top1": 0.1 * e, "heldout_expected_acceptance": 0.09 * e})
print("training done")
print(json.dumps({"head_paths": [h["head_path"] for h in heads], "exit_layers": layers, "heads": heads,
                  "head": args["head"], "train_seconds": 1.5}))
'''

# Speedups peak at exit layer 3 (acceptance falls with depth... of the stub's own making), scaled by STUB_SCALE.
STUB_DECODE = '''
import json, os, sys
argv = [a for a in sys.argv[1:] if a != "--multirun" and not a.startswith("hydra.")]
args = dict(a.split("=", 1) for a in argv)
open(os.environ["STUB_LOG"], "a").write(json.dumps({"cmd": "decode", "argv": sys.argv[1:]}) + "\\n")
scale = float(os.environ.get("STUB_SCALE", "1"))
fail_after = int(os.environ.get("STUB_FAIL_AFTER", "-1"))
for n, path in enumerate(args["head_path"].split(",")):
    if n == fail_after:
        print("error: stub killed mid-sweep", file=sys.stderr)
        sys.exit(1)
    e = json.load(open(os.path.join(path, "config.json")))["exit_layer"]
    alpha = 0.9 - 0.1 * abs(e - 3)
    ppsd = scale * (1.0 + 0.2 * (3 - abs(e - 3)))
    print(f"decoding {path}")
    print(json.dumps({"method": "ppsd", "stages": int(args["stages"]), "exit_layer": e, "head_path": path, "acceptance_rate": alpha,
                      "tokens_per_s": 10 * ppsd, "speedup_vs_ar": ppsd, "predicted_speedup": ppsd * 1.1,
                      "lossless": True, "compare": {"ar": {"tokens_per_s": 10.0},
                      "eesd": {"acceptance_rate": alpha, "tokens_per_s": 9 * ppsd, "speedup_vs_ar": 0.9 * ppsd,
                               "predicted_speedup": ppsd, "gamma": 3}}}))
'''


@pytest.fixture
def stubs(tmp_path, monkeypatch):
    """Children run `python -m train|decode` from the cwd: make that a folder whose train/decode are stubs."""
    for name, source in (("train", STUB_TRAIN), ("decode", STUB_DECODE)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
        (tmp_path / name / "__main__.py").write_text(textwrap.dedent(source))
    log = tmp_path / "calls.jsonl"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STUB_LOG", str(log))

    def calls():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return calls


def sweep_cfg(tiny_model_dir, prompts, out_dir, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("sweep", overrides=[f"model={tiny_model_dir}", f"prompts={prompts}", f"out_dir={out_dir}",
                                           "exit_layers=[2,3,4]", "limit=2", "max_new_tokens=8", *overrides])


def test_sweep_trains_once_measures_all_and_selects_the_fastest(tiny_model_dir, spec_bench_path, tmp_path, stubs):
    from scripts.sweep import sweep

    out = tmp_path / "sweep"
    summary = sweep(sweep_cfg(tiny_model_dir, spec_bench_path, out))
    assert summary["method"] == "ppsd" and summary["exit_layer"] == 3 and summary["stages"] == 2
    assert summary["measured_speedup"] == pytest.approx(1.6) and summary["beats_ar"]

    train_calls = [c for c in stubs() if c["cmd"] == "train"]
    decode_calls = [c for c in stubs() if c["cmd"] == "decode"]
    assert len(train_calls) == 1 and "exit_layers=[2,3,4]" in train_calls[0]["argv"]  # one multi-exit job
    assert len(decode_calls) == 1 and "--multirun" in decode_calls[0]["argv"]  # one Hydra multirun
    argv = decode_calls[0]["argv"]
    assert "compare=[ar,eesd]" in argv and "method=ppsd" in argv and "stages=2" in argv and "limit=2" in argv

    results = json.loads((out / "results.json").read_text())
    assert [r["exit_layer"] for r in results["candidates"]] == [2, 3, 4]
    row = results["candidates"][1]
    assert row["ideal_speedup"] == pytest.approx(6 / (0.9 * 3 + 0.1 * 6))  # N/(αE+(1−α)N) at measured α
    assert row["eesd_speedup"] == pytest.approx(0.9 * 1.6) and row["heldout_expected_acceptance"] == pytest.approx(0.27)
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and csv_lines[0].startswith("key,head,exit_layer,stages")
    for png in ("speedup_vs_exit_layer.png", "acceptance_vs_exit_layer.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "Selected: ppsd (2 stages) with the mlp head at exit layer 3: 1.60× over ar, measured" in report
    assert "| 3 | mlp | 2 | 0.900 | 1.60× | 1.76× |" in report
    selected = json.loads((out / "selected_head" / "config.json").read_text())
    assert selected["exit_layer"] == 3 and selected["metadata"]["measured"]["speedup_vs_ar"] == pytest.approx(1.6)
    assert "1.60× (ppsd, 2 stages)" in (out / "selected_head" / "README.md").read_text()
    assert json.loads((out / "sweep.json").read_text())["base_model"] == tiny_model_dir


def test_interrupted_sweep_resumes_without_redoing_finished_candidates(tiny_model_dir, spec_bench_path, tmp_path,
                                                                        stubs, monkeypatch):
    from scripts.sweep import sweep

    out = tmp_path / "sweep"
    monkeypatch.setenv("STUB_FAIL_AFTER", "1")  # the decode job dies after its first candidate
    with pytest.raises(UserError, match="stub killed mid-sweep"):
        sweep(sweep_cfg(tiny_model_dir, spec_bench_path, out))
    assert [p.name for p in (out / "candidates").iterdir()] == ["L02-mlp-s2-g4.json"]

    monkeypatch.delenv("STUB_FAIL_AFTER")
    before = len(stubs())
    sweep(sweep_cfg(tiny_model_dir, spec_bench_path, out))
    again = stubs()[before:]
    assert [c["cmd"] for c in again] == ["decode"]  # no retraining
    head_paths = next(a for a in again[0]["argv"] if a.startswith("head_path=")).split("=", 1)[1].split(",")
    assert [Path(p).name for p in head_paths] == ["head_L3_mlp", "head_L4_mlp"]
    assert len(json.loads((out / "results.json").read_text())["candidates"]) == 3

    before = len(stubs())  # a finished sweep re-run only rewrites the report
    sweep(sweep_cfg(tiny_model_dir, spec_bench_path, out, "launcher=subprocess"))
    assert stubs()[before:] == []


def test_says_so_when_nothing_beats_ar(tiny_model_dir, spec_bench_path, tmp_path, stubs, monkeypatch):
    from scripts.sweep import sweep

    monkeypatch.setenv("STUB_SCALE", "0.5")
    out = tmp_path / "sweep"
    summary = sweep(sweep_cfg(tiny_model_dir, spec_bench_path, out, "launcher=subprocess"))
    assert summary["method"] == "ar" and not summary["beats_ar"]
    assert summary["fastest_candidate"]["exit_layer"] == 3
    assert (out / "report.md").read_text().count("Nothing beats ar on this hardware") == 1
    assert not (out / "selected_head").exists()
    assert len([c for c in stubs() if c["cmd"] == "decode"]) == 3  # launcher=subprocess: one per candidate


def test_gamma_and_stage_grid(tiny_model_dir, spec_bench_path, tmp_path, stubs):
    from scripts.sweep import sweep

    out = tmp_path / "sweep"
    sweep(sweep_cfg(tiny_model_dir, spec_bench_path, out, "exit_layers=[2,3]", "stages=[2,3]", "gammas=[2]"))
    names = sorted(p.name for p in (out / "candidates").iterdir())
    assert names == ["L02-mlp-s2-g2.json", "L02-mlp-s3-g2.json", "L03-mlp-s2-g2.json", "L03-mlp-s3-g2.json"]
    decode_argvs = [c["argv"] for c in stubs() if c["cmd"] == "decode"]
    assert sorted(next(a for a in argv if a.startswith("stages=")) for argv in decode_argvs) == ["stages=2", "stages=3"]
    assert all("gamma=2" in argv for argv in decode_argvs)


@pytest.mark.parametrize("overrides, message", [
    (["exit_layers=[]"], "no candidate exit layers"),
    (["exit_layers=[3,6]"], r"exit layer\(s\) \[6\] out of range: this 6-layer base with up to 2 stages takes exit layers 1..5"),
    (["exit_layers=[5]", "stages=[3]"], r"exit layer\(s\) \[5\] out of range"),
    (["heads=[lstm]"], "unknown head type 'lstm'"),
    (["stages=[1]"], "PPSD needs at least 2 stages"),
])
def test_bad_candidates_are_one_line_errors(tiny_model_dir, spec_bench_path, tmp_path, overrides, message):
    from scripts.sweep import sweep

    with pytest.raises(UserError, match=message):
        sweep(sweep_cfg(tiny_model_dir, spec_bench_path, tmp_path / "sweep", *overrides))
    assert not (tmp_path / "sweep").exists()  # nothing written for a plan that cannot run


def test_bad_prompts_and_foreign_folder_are_refused(tiny_model_dir, spec_bench_path, tmp_path):
    from scripts.sweep import sweep

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="holds no questions"):
        sweep(sweep_cfg(tiny_model_dir, empty, tmp_path / "a"))
    with pytest.raises(UserError, match="does not exist"):
        sweep(sweep_cfg(tiny_model_dir, tmp_path / "missing.jsonl", tmp_path / "a"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "sweep.json").write_text(json.dumps({"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    with pytest.raises(UserError, match="was made for base model HuggingFaceTB/SmolLM2-135M-Instruct, not"):
        sweep(sweep_cfg(tiny_model_dir, spec_bench_path, foreign))


def test_command_line_error_is_one_line(tiny_model_dir, spec_bench_path, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    done = subprocess.run([sys.executable, "-m", "scripts.sweep", f"model={tiny_model_dir}", f"prompts={spec_bench_path}",
                           f"out_dir={tmp_path / 's'}", "exit_layers=[9]"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: exit layer(s) [9] out of range: this 6-layer base with up to 2 stages takes exit layers 1..5"]


@pytest.mark.integration
def test_smollm2_sweep_end_to_end(spec_bench_path, tmp_path):
    """The real thing, small: two exit layers of SmolLM2, tiny training, one prompt, through the CLI."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    train = "['data=tiny','data.max_prompts=16','max_steps=4','batch_size=4','wandb.enabled=false']"
    done = subprocess.run([sys.executable, "-m", "scripts.sweep", "exit_layers=[10,15]", f"prompts={spec_bench_path}",
                           "limit=1", "max_new_tokens=16", f"out_dir={tmp_path / 'sweep'}", f"train_overrides={train}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and summary["candidates"] == 2
    results = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert [r["exit_layer"] for r in results["candidates"]] == [10, 15]
    for row in results["candidates"]:
        assert row["lossless"] is True
        assert 0 <= row["acceptance_rate"] <= 1 and row["ppsd_speedup"] > 0 and row["eesd_speedup"] > 0
        assert row["ar_tokens_per_s"] > 0 and row["ppsd_predicted_speedup"] > 0
    assert summary["method"] in ("ppsd", "eesd", "ar")
    assert (summary["method"] == "ar") == (max(r["best_speedup"] for r in results["candidates"]) <= 1.0)
    from scripts.report import main as report  # the report and plots come back from results.json alone
    outputs = [tmp_path / "sweep" / name for name in ("report.md", "speedup_vs_exit_layer.png", "acceptance_vs_exit_layer.png")]
    for path in outputs:
        path.unlink()
    report([str(tmp_path / "sweep")])
    assert all(path.stat().st_size > 0 for path in outputs)


def test_report_flags_timings_a_busy_machine_spoiled():
    from scripts.report import noise_warnings

    quiet = [{"key": "a", "ar_tokens_per_s": 30.0, "ppsd_speedup": 1.2, "ideal_speedup": 1.4},
             {"key": "b", "ar_tokens_per_s": 32.0, "ppsd_speedup": 1.3, "ideal_speedup": 1.5}]
    assert noise_warnings(quiet) == []
    busy = quiet + [{"key": "c", "ar_tokens_per_s": 3.0, "ppsd_speedup": 2.9, "ideal_speedup": 1.1}]
    warnings = noise_warnings(busy)
    assert "3.0–32.0 tokens/s" in warnings[0] and "in c:" in warnings[1]
