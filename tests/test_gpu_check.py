"""scripts/gpu_check.py on the CPU with the tiny random model: a failing step is recorded and the others
still run (training fails on a bad override, so decode falls back to an untrained head)."""

import json

from scripts.gpu_check import main


def test_a_failed_step_is_recorded_and_the_others_run(tiny_model_dir, spec_bench_path, tmp_path):
    report = main(["--device", "cpu", "--model", tiny_model_dir, "--prompts", spec_bench_path, "--limit", "1", "--steps", "train,decode,benchmark",
                   "--max-new-tokens", "4", "--train-overrides", "no_such_key=1", "--out-dir", str(tmp_path),
                   "--decode-overrides", "threads=1 warmup=false",
                   "--benchmark-overrides", "num_prompts=1 alphas=[0.0,1.0] gammas=[1] warmup_tokens=0 ar_threads=1"])
    steps = report["steps"]
    assert steps["train"]["error"] and "no_such_key" in steps["train"]["error"]
    assert steps["decode"]["error"] is None and steps["decode"]["head"].startswith("untrained")
    assert steps["decode"]["lossless"] is True and set(steps["decode"]["methods"]) == {"ar", "eesd", "ppsd"}
    assert steps["benchmark"]["error"] is None and [r["alpha"] for r in steps["benchmark"]["rows"]] == [0.0, 1.0]
    assert report["ok"] is False and report["environment"]["device"] == "cpu"
    assert json.loads((tmp_path / "gpu_check.json").read_text())["steps"].keys() == steps.keys()
