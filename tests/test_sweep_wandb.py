"""The W&B sweep, offline: build exactly the command `wandb agent` builds from scripts/wandb_sweep.yaml for
one grid point (with wandb's own helpers), run it on the tiny model through the real `python -m train`
and `python -m decode`, and check the run logged the sweep's metric."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def agent_command(sweep_config: dict, point: dict) -> list[str]:
    """What wandb/wandb_agent.py runs for one grid point (its macro expansion, with wandb's own helpers)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    sweep_vars = create_sweep_command_args({"args": {k: {"value": v} for k, v in point.items()}})
    sweep_vars |= {"interpreter": [sys.executable], "program": [sweep_config["program"]], "env": ["/usr/bin/env"]}
    command = []
    for chunk in create_sweep_command(list(sweep_config["command"])):
        chunk = str(chunk)
        if chunk.startswith("${") and chunk.endswith("}"):
            command += sweep_vars.get(chunk[2:-1]) or []
        else:
            command.append(chunk)
    return command


def grid_points(sweep_config: dict) -> list[dict]:
    import itertools

    params = sweep_config["parameters"]
    names = list(params)
    choices = [params[n]["values"] if "values" in params[n] else [params[n]["value"]] for n in names]
    return [dict(zip(names, combo)) for combo in itertools.product(*choices)]


def test_the_sweep_config_is_a_grid_over_exit_layer_and_head_maximising_speedup():
    config = yaml.safe_load((ROOT / "scripts" / "wandb_sweep.yaml").read_text())
    assert config["method"] == "grid" and config["metric"] == {"name": "speedup", "goal": "maximize"}
    assert {"exit_layer", "head_type"} <= set(config["parameters"])
    point = grid_points(config)[0]
    command = agent_command(config, point)
    assert command[:4] == ["/usr/bin/env", sys.executable, "-m", "scripts.sweep_point"]
    assert f"exit_layer={point['exit_layer']}" in command and "head_type=mlp" in command


def test_agent_command_for_one_grid_point_runs_offline_and_logs_speedup(tiny_model_dir, spec_bench_path, tmp_path):
    config = yaml.safe_load((ROOT / "scripts" / "wandb_sweep.yaml").read_text())
    # The first grid point, on the tiny model with tiny settings (values a user would put in the YAML).
    point = grid_points(config)[0] | {
        "exit_layer": 3, "model": tiny_model_dir, "prompts": spec_bench_path, "limit": 1, "max_new_tokens": 8,
        "train_overrides": ["data=tiny", "data.max_prompts=8", "data.max_new_tokens=16", "max_steps=2",
                            "batch_size=2", "head.mlp_hidden=32", "checkpoint_every=1000", "wandb.enabled=false"],
    }
    command = agent_command(config, point)
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_DIR=str(tmp_path),
               PPSD_CACHE=str(tmp_path / "cache"))  # the tiny model's generated training data stays in tmp
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # Whether the point beats ar depends on this machine's timings: the layer is named either way.
    assert result.get("exit_layer") == 3 or result.get("fastest_candidate", {}).get("exit_layer") == 3
    assert isinstance(result["speedup"], float) and result["speedup"] > 0

    out = Path(result["out_dir"])
    assert out == (tmp_path / "sweeps" / "wandb" / Path(tiny_model_dir).name / "L3-mlp").resolve()
    assert (out / "report.md").exists() and (out / "speedup_vs_exit_layer.png").exists()
    # The offline run's summary, as wandb prints it when the run finishes (`wandb sync` uploads the same).
    assert len(list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
    summary = done.stderr[done.stderr.index("Run summary:"):]
    logged = re.search(r"wandb:\s+speedup ([\d.]+)", summary)
    assert logged and float(logged.group(1)) == pytest.approx(result["speedup"], rel=1e-4)
