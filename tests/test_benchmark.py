"""scripts/benchmark.py's plumbing on the tiny model: it runs and prints the JSON it promises (no timings)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def benchmark(*overrides: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "scripts.benchmark", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny_head(tiny_base, tmp_path_factory):
    from heads import build_head

    folder = tmp_path_factory.mktemp("tiny-head")
    build_head(tiny_base, "transformer", exit_layer=2).save_pretrained(folder)
    return str(folder)


def config(**overrides):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(os.path.join(ROOT, "conf", "benchmark.yaml"))
    cfg.pop("defaults"), cfg.pop("hydra")
    return OmegaConf.merge(cfg, overrides)


def test_theory_table(capsys):
    from scripts.benchmark import run_theory

    result = run_theory(config(mode="theory", theory={"stages": [2, 4], "alphas": [0.5, 0.9]}))
    assert "| 4 |" in capsys.readouterr().out
    assert result["mode"] == "theory"
    assert [(r["stages"], r["alpha"]) for r in result["rows"]] == [(2, 0.5), (2, 0.9), (4, 0.5), (4, 0.9)]
    assert {"ppsd_speedup", "eesd_speedup", "eesd_gamma", "exit_layer", "ceiling"} <= set(result["rows"][0])


def test_measure_and_oracle_on_tiny_model(tiny_model_dir, tiny_head, spec_bench_path, tmp_path):
    done = benchmark("mode=all", f"model={tiny_model_dir}", f"head_path={tiny_head}", f"prompts={spec_bench_path}",
                     "dtype=float32", "num_prompts=1", "max_new_tokens=6", "gammas=[1,2]", "alphas=[0.0,1.0]",
                     "warmup_tokens=2", f"plot={tmp_path}/plots/speedup.png")
    assert done.returncode == 0, done.stderr[-2000:]
    result = last_json(done.stdout)
    assert {"ar_ms_per_token", "ar_1thread_ms_per_token", "stage_layers", "measure", "oracle", "targets",
            "stages_alone_ms"} <= set(result)
    assert result["stage_layers"][0] == [0, 2]
    assert result["resolved"]["compile"].startswith("false: a CPU")  # each auto, resolved as python -m decode does
    measure = result["measure"]
    assert {"speedup", "alpha", "predicted_speedup", "lossless"} <= set(measure["ppsd"])
    assert measure["eesd"]["gamma"] in (1, 2) and set(measure["eesd"]["sweep"]) == {"1", "2"}
    assert measure["ppsd"]["lossless"] and measure["eesd"]["lossless"]
    rows = result["oracle"]["rows"]
    assert [r["alpha"] for r in rows] == [0.0, 1.0]
    assert {"ppsd_measured", "ppsd_predicted", "ppsd_error", "eesd_measured", "eesd_predicted", "contention",
            "eesd_gamma"} <= set(rows[0])
    assert rows[0]["ppsd_alpha"] == 0.0 and rows[1]["ppsd_alpha"] == 1.0  # the oracle sets α exactly
    assert {"ppsd_within_tolerance", "ppsd_alpha0_vs_ar"} <= set(result["targets"])
    plot = tmp_path / "plots" / "speedup.png"  # measured vs predicted speedup, a PNG
    assert result["plot"] == str(plot) and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_measure_needs_a_head():
    from heads.errors import UserError
    from scripts.benchmark import run_benchmark

    with pytest.raises(UserError, match="mode=measure measures a trained head: pass head_path"):
        run_benchmark(config(mode="measure"))


def test_load_prompts_round_robin(tmp_path):
    from heads.errors import UserError
    from scripts.benchmark import load_prompts

    file = tmp_path / "p.jsonl"
    rows = [("a", "a1"), ("a", "a2"), ("b", "b1"), ("c", "c1"), ("b", "b2")]
    file.write_text("\n".join(json.dumps({"category": c, "turns": [t, "second"]}) for c, t in rows) + "\n")
    assert load_prompts(str(file), 4) == ["a1", "b1", "c1", "a2"]
    file.write_text('{"category": "a"}\n')
    with pytest.raises(UserError, match="p.jsonl:1 needs .turns."):
        load_prompts(str(file), 4)
