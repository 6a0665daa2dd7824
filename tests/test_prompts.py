"""The default prompt files live in the project: every command's default reads ppsd's own set."""

import json
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from heads.files import read_prompts

ROOT = Path(__file__).resolve().parent.parent
OWN = "decode/prompts/default.jsonl"


def test_the_own_prompt_set_is_spec_bench_format_over_its_13_categories():
    questions = read_prompts(str(ROOT / OWN))
    assert len({q["question_id"] for q in questions}) == len(questions) == 26
    assert len({q["category"] for q in questions}) == 13
    assert all(isinstance(t, str) and t.strip() for q in questions for t in q["turns"])


def test_benchmark_gpu_check_and_the_wandb_sweep_default_to_it(monkeypatch):
    monkeypatch.delenv("PPSD_BENCH_PROMPTS", raising=False)
    assert OmegaConf.load(ROOT / "conf" / "benchmark.yaml").prompts == OWN
    import scripts.gpu_check as gpu_check

    assert Path(gpu_check.PROMPTS) == ROOT / OWN
    sweep = yaml.safe_load((ROOT / "scripts" / "wandb_sweep.yaml").read_text())
    assert sweep["parameters"]["prompts"]["value"] == OWN
    assert not (ROOT / "conf" / "prompts").exists()  # a folder there is a Hydra group: prompts= would break
    for path in (ROOT / "conf").rglob("*.yaml"):
        assert "shared/benchmarks" not in path.read_text(), path
    assert "shared" not in json.dumps(sweep)
