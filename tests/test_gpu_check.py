"""scripts/gpu_check.py on the CPU with the tiny random model: every step's code path runs (the 7B-shaped steps at
a tiny shape), a failing step is recorded and the others still run (training fails on a bad override, so decode
falls back to an untrained head)."""

import json

from scripts.gpu_check import BUDGETS, main

# the budgets are a GPU's; a shared 2-core CPU takes minutes for what a GPU does in seconds
CPU_BUDGETS = [arg for step in BUDGETS for arg in ("--budget", f"{step}=900")] + ["--time-limit", "3600"]


def test_a_failed_step_is_recorded_and_the_others_run(tiny_model_dir, spec_bench_path, tmp_path):
    report = main(["--device", "cpu", "--model", tiny_model_dir, "--prompts", spec_bench_path, "--limit", "1",
                   "--steps", "train,decode,benchmark", "--max-new-tokens", "4", "--train-overrides", "no_such_key=1",
                   "--out-dir", str(tmp_path), "--decode-overrides", "threads=1 warmup=false",
                   "--benchmark-overrides", "num_prompts=1 alphas=[0.0,1.0] gammas=[1] warmup_tokens=0 ar_threads=1",
                   *CPU_BUDGETS])
    steps = report["steps"]
    assert steps["train"]["error"] and "no_such_key" in steps["train"]["error"]
    for placement, method in (("streams", "ppsd"), ("processes", "ppsd"), ("eesd", "eesd")):
        decode = steps[f"decode_{placement}"]
        assert decode["error"] is None and decode["head"].startswith("untrained")
        assert decode["lossless"] is True and set(decode["methods"]) == {"ar", method}
        assert decode["methods"]["ar"]["decode_ms_per_token"] > 0
    assert set(report["placements"]) == {"streams", "processes"}
    assert report["placements"]["processes"]["lossless"] and report["placements"]["streams"]["lossless"]
    assert report["placements"]["streams"]["ar_step_ms"] > 0
    assert report["placements"]["streams"]["alpha"] is not None  # (tick costs need warmup, off here: no prediction)
    assert steps["benchmark"]["error"] is None and [r["alpha"] for r in steps["benchmark"]["rows"]] == [0.0, 1.0]
    assert report["ok"] is False and report["environment"]["device"] == "cpu"
    assert json.loads((tmp_path / "gpu_check.json").read_text())["steps"].keys() == steps.keys()


def test_the_7b_teacher_and_shard_steps_run_at_a_tiny_shape(tiny_model_dir, tmp_path):
    report = main(["--device", "cpu", "--tiny", "--model", tiny_model_dir, "--steps", "runtime7b,teacher,shards",
                   "--out-dir", str(tmp_path), *CPU_BUDGETS])
    steps = report["steps"]
    assert report["ok"], {k: s["error"] for k, s in steps.items()}
    model = steps["runtime7b"]["model_7b"]
    assert model["shape"]["layers"] == 1 and model["ar_ms"] > 0 and model["capture_s"] > 0 and model["bound_ms"] > 0
    teacher = steps["teacher"]["teacher"]
    assert teacher["greedy"]["answers"] == teacher["sampled"]["answers"] == 3 and teacher["shapes_captured"] == 1
    shards = steps["shards"]["tp_shards"]
    assert set(shards["shard_ms"]) == {"1", "2"} and "assumed" in shards["allreduce_source"]


def test_bad_arguments_are_one_line(capsys):
    import pytest

    for argv in (["--steps", "runtime7b,nope"], ["--budget", "train"]):
        with pytest.raises(SystemExit):
            main(argv)
        assert "error:" in capsys.readouterr().err


def test_the_xxlarge_training_resumes_where_an_earlier_call_left_it(tmp_path):
    """data=xxlarge takes longer than one device command: each call resumes the run its --out-dir holds."""
    from scripts.gpu_check import parse_args, xxlarge_args

    args = parse_args(["--device", "cpu", "--steps", "xxlarge", "--out-dir", str(tmp_path)])
    first = xxlarge_args(args)
    assert "data=xxlarge" in first and f"out_dir={tmp_path / 'xxlarge'}" in first and "resume=true" not in first
    latest = tmp_path / "xxlarge" / "checkpoints" / "latest"
    latest.parent.mkdir(parents=True)
    latest.write_text("step_0000100")
    assert "resume=true" in xxlarge_args(args)
