"""Our answer files read by Spec-Bench's evaluation/speed.py: its reading is reproduced here from what it
does (not vendored): per question it sums choices[0].new_tokens and wall_time, extends one list with
choices[0].accept_lengths and takes np.mean of it; the baseline's tokens are recounted from the answer
text with the tokenizer passed to it (len(tokenizer(turn).input_ids) - 1 per turn); the speedup is the
mean of per-question speeds over the mean of the baseline's."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from decode.evaluate import run
from heads import build_head
from heads.config import validate
from heads.schema import DecodeConfig

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = [  # two turns each (the answer is fed back) and two categories, like Spec-Bench's MT-bench rows
    {"question_id": 1, "category": "writing", "turns": ["Write a haiku about rain.", "Now make it sadder."]},
    {"question_id": 2, "category": "qa", "turns": ["What is the capital of France?", "And of Italy?"]},
    {"question_id": 3, "category": "qa", "turns": ["Name three colours."]},
]


def speed_py(answers: Path, baseline: Path, tokenizer) -> tuple[float, float]:
    """(mean accepted tokens, speedup ratio) as speed.py computes them for task 'overall'."""
    speeds, accept_lengths = [], []
    for line in answers.read_text().splitlines():
        choice = json.loads(line)["choices"][0]
        speeds.append(sum(choice["new_tokens"]) / sum(choice["wall_time"]))
        accept_lengths.extend(choice["accept_lengths"])
    speeds0 = []
    for line in baseline.read_text().splitlines():
        choice = json.loads(line)["choices"][0]
        tokens = sum(len(tokenizer(turn).input_ids) - 1 for turn in choice["turns"])
        speeds0.append(tokens / sum(choice["wall_time"]))
    # np.mean raises on per-turn (ragged) lists; equal-length ones would pass as a 2-D array, hence the check
    assert all(isinstance(n, int) for n in accept_lengths), "accept_lengths must be one flat list per question"
    return float(np.mean(accept_lengths)), float(np.mean(speeds) / np.mean(speeds0))


@pytest.fixture(scope="module")
def decoded(tiny_base, tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("spec-bench")
    head = folder / "head"
    build_head(tiny_base, "mlp", exit_layer=2).save_pretrained(head)
    prompts = folder / "questions.jsonl"
    prompts.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    cfg = OmegaConf.load(ROOT / "conf" / "decode.yaml")
    for key in ("defaults", "hydra"):
        cfg.pop(key)
    cfg = OmegaConf.merge(cfg, {"method": "eesd", "compare": ["ar"], "head_path": str(head), "model": tiny_model_dir,
                                "prompts": str(prompts), "max_new_tokens": 12, "threads": 1, "warmup": False})
    out = folder / "out"
    return run(validate(cfg, DecodeConfig), out), out


def test_answer_files_have_spec_bench_fields(decoded):
    _, out = decoded
    for method in ("ar", "eesd"):
        records = [json.loads(line) for line in (out / f"answers_{method}.jsonl").read_text().splitlines()]
        assert [r["question_id"] for r in records] == [q["question_id"] for q in QUESTIONS]
        for record, question in zip(records, QUESTIONS):
            assert record["category"] == question["category"] and record["model_id"].endswith(f"-{method}")
            choice = record["choices"][0]
            turns = len(question["turns"])
            assert all(len(choice[k]) == turns for k in ("turns", "new_tokens", "wall_time", "decoding_steps"))
            assert len(choice["accept_lengths"]) == sum(choice["decoding_steps"])
            assert sum(choice["accept_lengths"]) == sum(choice["new_tokens"])


def test_speed_py_reads_our_files_and_agrees_with_the_summary(decoded, tiny_base):
    # speed.py recounts the baseline's tokens from its text with the tokenizer it is given: ours (SmolLM2's,
    # which adds no BOS, so its "- 1" drops one token per turn, and the tiny random model's text does not
    # re-tokenize to the generated count). The summary's spec_bench_speedup does the same recount, so it is
    # speed.py's number, not speedup_vs_ar (total tokens / total time with the generated counts).
    result, out = decoded
    baseline = out / "answers_ar.jsonl"
    mean_accepted, speedup = speed_py(out / "answers_eesd.jsonl", baseline, tiny_base.tokenizer)
    assert result["spec_bench_speedup"] == pytest.approx(speedup, rel=1e-4, abs=1e-5)
    assert result["mean_accepted_length"] == pytest.approx(mean_accepted, rel=1e-4)
    _, ar_speedup = speed_py(baseline, baseline, tiny_base.tokenizer)  # ar against itself: the recount alone
    assert result["compare"]["ar"]["spec_bench_speedup"] == pytest.approx(ar_speedup, rel=1e-4, abs=1e-5)
    assert math.isfinite(result["speedup_vs_ar"])
