"""Self-distillation training (`python -m train`) on the tiny random Llama; one SmolLM2 integration test."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from heads import UserError, load_head
from train import data as D
from train.losses import TeacherView, distill_loss, expected_acceptance, kl_loss, top1_agreement

ROOT = Path(__file__).resolve().parents[1]
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


# ---------------------------------------------------------------- pure pieces


def test_losses_and_metrics_on_known_distributions():
    teacher = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]])
    assert kl_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert top1_agreement(teacher, teacher).item() == 1.0
    assert expected_acceptance(teacher, teacher).item() == pytest.approx(1.0)
    student = torch.tensor([[0.0, 2.0, -1.0], [0.0, 3.0, 0.0]])  # wrong argmax at the first position
    assert top1_agreement(student, teacher).item() == 0.5
    p, q = teacher.softmax(-1), student.softmax(-1)
    assert expected_acceptance(student, teacher).item() == pytest.approx(torch.minimum(p, q).sum(-1).mean().item())
    assert kl_loss(student, teacher).item() > 0
    # a hotter temperature flattens both distributions: smaller divergence before the T^2 rescaling
    assert kl_loss(student, teacher, 4.0).item() / 16 < kl_loss(student, teacher).item()
    ce = distill_loss(student, teacher, "ce")
    mix = distill_loss(student, teacher, "mix", ce_weight=0.25)
    assert mix.item() == pytest.approx(0.75 * kl_loss(student, teacher).item() + 0.25 * ce.item(), rel=1e-5)


def test_topk_soft_targets_are_ce_at_k1_and_ignore_the_tail():
    from train.losses import topk_loss

    torch.manual_seed(0)
    teacher, student = torch.randn(6, 40), torch.randn(6, 40)
    assert distill_loss(student, teacher, "topk", 3.0, top_k=1).item() == pytest.approx(
        distill_loss(student, teacher, "ce").item(), rel=1e-6)
    # k = V at T = 1 is the cross-entropy to the teacher's whole distribution: KL plus the teacher's entropy
    p = teacher.softmax(-1)
    entropy = -(p * p.log()).sum(-1).mean()
    assert topk_loss(student, teacher, 40).item() == pytest.approx((kl_loss(student, teacher) + entropy).item(), rel=1e-5)
    # the tail outside the top k does not matter
    tail = teacher.clone()
    tail[tail < tail.topk(4, dim=-1).values[:, -1:]] = -30.0
    assert topk_loss(student, tail, 4, 2.0).item() == pytest.approx(topk_loss(student, teacher, 4, 2.0).item(), rel=1e-6)


def test_a_shared_teacher_view_scores_like_the_raw_logits():
    """A multi-exit step computes the teacher's argmax and probabilities once for every head."""
    torch.manual_seed(0)
    teacher, students = torch.randn(7, 50), [torch.randn(7, 50) for _ in range(3)]
    view = TeacherView(teacher)
    for s in students:
        for kind in ("kl", "ce", "mix", "topk"):
            assert torch.equal(distill_loss(s, view, kind, 2.0), distill_loss(s, teacher, kind, 2.0))
        assert torch.equal(top1_agreement(s, view), top1_agreement(s, teacher))
        assert torch.equal(expected_acceptance(s, view), expected_acceptance(s, teacher))


def test_headset_lm_head_in_bf16_matches_autocast(tiny_base):
    """The kept bf16 copy of the frozen LM head gives autocast's logits and gradients, bit for bit."""
    from train.head_set import HeadSet

    model = HeadSet(tiny_base, "mlp", [2], 0, lm_head_dtype="bfloat16")
    h = torch.randn(5, tiny_base.hidden_size, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = tiny_base.logits(h)
    ref.float().square().sum().backward()
    ref_grad, h.grad = h.grad.clone(), None
    out = model.logits(h)
    out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref) and torch.equal(h.grad, ref_grad)


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_prompt_files_are_checked(tmp_path):
    ok = _write(tmp_path / "ok.jsonl", [json.dumps({"id": "a", "turns": ["hi", "more"]}), "",
                                        json.dumps({"id": "b", "turns": "one string"})])
    assert [p["turns"] for p in D.load_prompts(ok)] == [["hi", "more"], ["one string"]]
    both = D.load_prompts([ok, "default"])  # several sources are concatenated; ids stay unique
    assert len(both) == 2 + len(D.load_prompts("default")) and both[0]["id"] == "a" and both[2]["id"] == "code-001"
    assert [p["id"] for p in D.load_prompts([ok, ok])] == ["a#0", "b#1", "a#2", "b#3"]
    assert D.load_prompts("default.jsonl") == D.load_prompts("default")  # a shipped set by its file name
    for name, lines, words in [("empty.jsonl", [], "no prompts"), ("bad.jsonl", ["{not json"], "not valid JSON"),
                               ("noturns.jsonl", [json.dumps({"id": "x"})], "'turns'"),
                               ("blank.jsonl", [json.dumps({"turns": [""]})], "'turns'")]:
        with pytest.raises(UserError, match=words):
            D.load_prompts(_write(tmp_path / name, lines))
    with pytest.raises(UserError, match="does not exist"):
        D.load_prompts(str(tmp_path / "missing.jsonl"))


def test_heldout_split_is_fixed_by_seed_and_kept_by_a_larger_prompt_set():
    prompts = [{"id": f"p{i}", "turns": ["x"]} for i in range(400)]
    a, b = D.heldout_ids(prompts, 0.1, seed=0), D.heldout_ids(list(reversed(prompts)), 0.1, seed=0)
    assert a == b and 25 <= len(a) <= 55
    assert D.heldout_ids(prompts, 0.1, seed=1) != a
    more = prompts + [{"id": f"q{i}", "turns": ["y"]} for i in range(400)]
    assert D.heldout_ids(more, 0.1, seed=0) & {p["id"] for p in prompts} == a  # α stays comparable
    assert len(D.heldout_ids(prompts[:2], 0.1, seed=0)) == 1 and len(D.heldout_ids(prompts[:2], 0.99, seed=0)) == 1


def test_batch_masks_cover_exactly_the_response_predictions():
    e = D.Example("p", 0, False, input_ids=[5, 6, 7, 8, 9], prompt_len=3)  # response = [8, 9]
    batch = D.pad_batch([e, D.Example("q", 0, False, [1, 2, 3], 2)], pad_id=0)
    assert batch["loss_mask"][0].tolist() == [False, False, True, True, False]  # positions 2, 3 predict 8, 9
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0]


def test_prompt_positions_start_after_the_shared_prefix():
    system = [1, 2, 3, 4]  # e.g. a chat template's default system prompt: the same in every example
    a = D.Example("a", 0, False, system + [10, 11, 12] + [50, 51], prompt_len=7)
    b = D.Example("b", 0, False, system + [20, 21] + [60, 61, 62], prompt_len=6)
    a2, b2 = D.with_prompt_positions([a, b])
    assert a.loss_positions == range(6, 8) and b.loss_positions == range(5, 8)  # responses only
    # from the last shared position (it predicts the first own token) to the end
    assert a2.loss_positions == range(3, 8) and b2.loss_positions == range(3, 8)
    batch = D.pad_batch([a2, b2], pad_id=0)
    assert batch["loss_mask"].sum().item() == 10


def test_nucleus_sampling_keeps_the_smallest_set_reaching_top_p():
    # row 0: 0.5 + 0.3 reach 0.8, so the 0.15 token and the tail never come out; row 1: flat, so the top-64 search widens
    probs = torch.tensor([[0.5, 0.3, 0.15] + [0.05 / 997] * 997, [1 / 1000] * 1000])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([D.next_tokens(probs.log(), sample=True, temperature=1.0, top_p=0.8, generator=g) for _ in range(400)])
    assert set(draws[:, 0].tolist()) == {0, 1}
    assert draws[:, 1].unique().numel() > 64  # row 1's nucleus holds 800 tokens
    assert D.next_tokens(probs.log(), sample=False, temperature=1.0, top_p=0.8).tolist() == [0, 0]


def test_generation_is_batched_cached_and_reused(tiny_base, tmp_path):
    prompts = [{"id": f"p{i}", "turns": [f"question {i} " * (i + 1)] + (["and then?"] if i == 0 else [])}
               for i in range(5)]
    cfg = _compose(["data=tiny", "data.max_new_tokens=6", "data.gen_batch_size=2", "data.samples=1"]).data
    rows, [folder] = D.self_distillation_set(tiny_base, prompts, cfg, cache_dir=str(tmp_path), progress=False)
    assert len(rows) == 12  # (5 first turns + 1 second turn) x (greedy + 1 sampled)
    assert all(0 < len(r["response_ids"]) <= 6 for r in rows)
    second = next(r for r in rows if r["turn"] == 1 and not r["sampled"])
    first = next(r for r in rows if r["turn"] == 0 and r["id"] == "p0" and not r["sampled"])
    assert len(second["prompt_ids"]) > len(first["prompt_ids"]) + len(first["response_ids"])  # sees its own answer
    # greedy batched generation with left padding = one prompt alone
    alone = D.generate_batch(tiny_base, [first["prompt_ids"]], max_new_tokens=6, sample=False, temperature=1,
                              top_p=1, seed=0)
    assert alone[0] == first["response_ids"]
    stamp = (folder / "greedy.jsonl").stat().st_mtime_ns
    again, [folder2] = D.self_distillation_set(tiny_base, prompts, cfg, cache_dir=str(tmp_path), progress=False)
    assert folder2 == folder and again == rows and (folder / "greedy.jsonl").stat().st_mtime_ns == stamp
    # more samples extend the cached set: the first sampled answers stay, only the new variant is generated
    more = cfg.copy()
    more.samples = 2
    extended, [folder4] = D.self_distillation_set(tiny_base, prompts, more, cache_dir=str(tmp_path), progress=False)
    assert folder4 == folder and len(extended) == 18 and (folder / "greedy.jsonl").stat().st_mtime_ns == stamp
    assert [r for r in extended if r["sample"] < 1] == rows
    assert sorted(p.name for p in folder.iterdir()) == ["greedy.jsonl", "meta.json", "sample-000.jsonl", "sample-001.jsonl"]
    changed = cfg.copy()
    changed.max_new_tokens = 5
    _, [folder3] = D.self_distillation_set(tiny_base, prompts, changed, cache_dir=str(tmp_path), progress=False)
    assert folder3 != folder
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers
    # two sources: the first one's answers come from its cache, the second gets a folder of its own
    extra = [{"id": "x0", "turns": ["another question"], "source": "b.jsonl"}]
    both, folders = D.self_distillation_set(tiny_base, [p | {"source": "a.jsonl"} for p in prompts] + extra, cfg,
                                            cache_dir=str(tmp_path), progress=False)
    assert folders[0] == folder and folders[1] != folder and (folder / "greedy.jsonl").stat().st_mtime_ns == stamp
    assert [r for r in both if r["id"] != "x0"] == rows and len(both) == len(rows) + 2


# ---------------------------------------------------------------- the job, in process


def _compose(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    topics = ["cooking", "physics", "python", "rome", "cats", "sorting", "the moon", "taxes", "music", "football"]
    rows = [{"id": f"p{i}", "category": "t", "turns": [f"Tell me about {topics[i % 10]} ({i})."]} for i in range(16)]
    return _write(tmp_path_factory.mktemp("prompts") / "p.jsonl", [json.dumps(r) for r in rows])


def _tiny_overrides(tiny_model_dir, prompt_file, out_dir, cache_dir, *extra):
    return [f"model={tiny_model_dir}", "data=tiny", f"data.prompts={prompt_file}", f"data.cache_dir={cache_dir}",
            "data.max_new_tokens=12", "exit_layer=3", "epochs=2", "batch_size=2", "checkpoint_every=2",
            "forward_batch_size=4", f"out_dir={out_dir}", "wandb.enabled=false", "threads=1", *extra]


@pytest.fixture(scope="module", autouse=True)
def _leave_the_process_group():
    """In-process runs keep one process group up between them, as a Hydra multirun does; modules after this
    one (a ppsd pipeline creates its own group) must not inherit it."""
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _run_in_process(overrides):
    from heads.config import validate
    from heads.schema import TrainConfig
    from train.recipe import run

    return run(validate(_compose(overrides), TrainConfig))  # the one-process group stays up between runs, as in a Hydra multirun


def test_multi_exit_transformer_heads_share_one_job(tiny_model_dir, tiny_base, prompt_file, tmp_path):
    result = _run_in_process(_tiny_overrides(tiny_model_dir, prompt_file, tmp_path / "run", tmp_path / "cache",
                                             "exit_layers=[2,4]", "head=transformer", "loss=kl", "temperature=2",
                                             "eval_every=2"))
    assert result["exit_layers"] == [2, 4] and result["head"] == "transformer"
    assert [h["exit_layer"] for h in result["heads"]] == [2, 4]
    for h in result["heads"]:
        head = load_head(h["head_path"], tiny_base)
        assert head.exit_layer == h["exit_layer"] and head.head_type == "transformer"
        assert head.metadata["heldout"]["top1"] == pytest.approx(h["heldout_top1"])
        assert head.metadata["training"]["loss"] == "kl"
        # it trained: the weights moved away from the base layer it started from
        start = tiny_base.decoder.layers[h["exit_layer"]].state_dict()
        assert any(not torch.equal(v, start[k]) for k, v in head.layer.state_dict().items())
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    log = [r for r in lines if "loss" in r]
    assert [r["step"] for r in log] == list(range(1, result["steps"] + 1))
    assert {"L2/top1", "L4/top1", "L2/expected_acceptance", "loss", "lr"} <= set(log[0])
    # held-out scores during training (eval_every=2), before the final one in metrics.json
    heldout = [r for r in lines if "heldout/L2/top1" in r]
    assert [r["step"] for r in heldout] == list(range(2, result["steps"], 2)) and "heldout/L4/top1" in heldout[0]
    assert all(0 <= r["heldout/L4/top1"] <= 1 and r["train_seconds"] > 0 for r in heldout)
    assert result["train_positions"] > result["train_examples"]


def test_two_block_mlp_head_trains_and_saves_both_blocks(tiny_model_dir, tiny_base, prompt_file, tmp_path):
    result = _run_in_process(_tiny_overrides(tiny_model_dir, prompt_file, tmp_path / "run", tmp_path / "cache",
                                             "head=mlp2", "head.mlp_hidden=16", "max_steps=4"))
    head = load_head(result["head_path"], tiny_base)
    assert head.head_type == "mlp" and len(head.blocks) == 1 and head.blocks[0].up.out_features == 16
    # both zero-initialised output projections moved: the second block trained too
    assert head.down.weight.abs().sum() > 0 and head.blocks[0].down.weight.abs().sum() > 0


def test_topk_loss_trains_and_is_recorded(tiny_model_dir, tiny_base, prompt_file, tmp_path):
    result = _run_in_process(_tiny_overrides(tiny_model_dir, prompt_file, tmp_path / "run", tmp_path / "cache",
                                             "head.mlp_hidden=16", "max_steps=4", "loss=topk", "top_k=3"))
    head = load_head(result["head_path"], tiny_base)
    assert head.metadata["training"]["loss"] == "topk" and head.metadata["training"]["top_k"] == 3
    assert head.down.weight.abs().sum() > 0 and 0 <= result["heldout_top1"] <= 1


def test_several_prompt_sources_are_also_scored_each_on_its_own(tiny_model_dir, prompt_file, tmp_path):
    other = _write(tmp_path / "other.jsonl", [json.dumps({"id": f"o{i}", "turns": [f"Name a colour ({i})."]})
                                              for i in range(8)])
    result = _run_in_process(_tiny_overrides(tiny_model_dir, prompt_file, tmp_path / "run", tmp_path / "cache",
                                             f"data.prompts=[{prompt_file},{other}]", "max_steps=4", "eval_every=2"))
    by_source = result["heldout_top1_by_source"]
    assert set(by_source) == {prompt_file, other} and all(0 <= a <= 1 for a in by_source.values())
    # the whole held-out set is the two sources' positions together
    lo, hi = min(by_source.values()), max(by_source.values())
    assert lo - 1e-9 <= result["heldout_top1"] <= hi + 1e-9
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(f"heldout/L3/top1/{other}" in r for r in lines)


@pytest.mark.parametrize("overrides, words", [
    (["exit_layer=6"], "outside 1..5"),
    (["exit_layers=[0,3]"], "outside 1..5"),
    (["head.type=lstm"], "unknown head type"),
    (["resume=true"], "holds no checkpoint"),
])
def test_bad_config_is_a_user_error(tiny_model_dir, prompt_file, tmp_path, overrides, words):
    with pytest.raises(UserError, match=words):
        _run_in_process(_tiny_overrides(tiny_model_dir, prompt_file, tmp_path / "run", tmp_path / "cache", *overrides))


def test_init_from_a_head_of_another_base_is_a_user_error(tiny_model_dir, prompt_file, tmp_path):
    from heads import build_head, load_base
    from tests.conftest import make_tiny_model

    other = load_base(str(make_tiny_model(tmp_path / "other", num_layers=4)))
    build_head(other, "mlp", exit_layer=3).save_pretrained(tmp_path / "head")
    with pytest.raises(UserError, match="trained on"):
        _run_in_process(_tiny_overrides(tiny_model_dir, prompt_file, tmp_path / "run", tmp_path / "cache",
                                        f"init_from={tmp_path / 'head'}"))


def test_prompt_longer_than_the_context_is_a_user_error(tiny_model_dir, tmp_path):
    long = _write(tmp_path / "long.jsonl", [json.dumps({"id": "long", "turns": ["word " * 1200]})] * 2)
    with pytest.raises(UserError, match="exceeds the model's context"):
        _run_in_process(_tiny_overrides(tiny_model_dir, long, tmp_path / "run", tmp_path / "cache",
                                        "data.max_prompt_tokens=100000"))


# ---------------------------------------------------------------- the command line, killed and resumed


def _cli(args, launch=("-m", "train"), **kw):
    return subprocess.Popen([sys.executable, *launch, *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


# `python -m train`, each step 0.4 s longer (a pause after its log line), so that a test can kill the run mid-way
SLOW_STEPS = ("-c", "import runpy, time\n"
                    "from train.recipe import DistillRecipe\n"
                    "log_step = DistillRecipe.log_step\n"
                    "DistillRecipe.log_step = lambda self, *a: (log_step(self, *a), time.sleep(0.4))[0]\n"
                    "runpy.run_module('train', run_name='__main__', alter_sys=True)")


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    proc = _cli([f"model={tmp_path / 'nope'}", f"out_dir={tmp_path}", "wandb.enabled=false"])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err.strip().splitlines()[-1].startswith("error: model folder") and "Traceback" not in err


def test_killed_run_resumes_without_lost_or_repeated_steps(tiny_model_dir, prompt_file, tmp_path):
    cache = tmp_path / "cache"
    reference = _run_in_process(_tiny_overrides(tiny_model_dir, prompt_file, tmp_path / "ref", cache))
    total = reference["steps"]
    assert total >= 8

    run = tmp_path / "run"
    args = _tiny_overrides(tiny_model_dir, prompt_file, run, cache)
    proc = _cli(args, launch=SLOW_STEPS, start_new_session=True)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "latest").exists() or \
            (run / "checkpoints" / "latest").read_text().strip() < "step_0000004":
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = int((run / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert killed_at < total

    proc = _cli(args + ["resume=true"])
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["steps"] == total
    assert "held-out top-1" in out.strip().splitlines()[-2]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, total + 1))
    assert json.loads((run / "metrics.json").read_text())["head_path"] == result["head_path"]
    resumed = load_head(result["head_path"]).state_dict()
    uninterrupted = load_head(reference["head_path"]).state_dict()
    assert resumed.keys() == uninterrupted.keys()
    for k in resumed:
        assert torch.allclose(resumed[k], uninterrupted[k], atol=1e-6), k


# ---------------------------------------------------------------- the real model


@pytest.mark.integration
def test_short_smollm2_run_beats_the_untrained_head(tmp_path):
    proc = _cli(["data=tiny", "data.max_new_tokens=48", "exit_layer=15", "epochs=4", "batch_size=2", "head.lr=3e-3",
                 f"data.cache_dir={tmp_path / 'cache'}", f"out_dir={tmp_path / 'run'}", "wandb.enabled=false"])
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["heldout_top1"] > result["heldout_top1_untrained"] + 0.05, result
    assert 0 < result["heldout_expected_acceptance"] <= 1
    head = load_head(result["head_path"])
    assert head.exit_layer == 15 and head.metadata["heldout"]["top1"] == pytest.approx(result["heldout_top1"])


def test_prompts_from_a_datasets_folder(tmp_path):
    import datasets

    rows = [{"id": "a", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"}]},
            {"id": "b", "messages": [{"role": "user", "content": "what is 2+2?"}]}]
    folder = tmp_path / "chats"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    prompts = D.load_prompts(str(folder), field="messages")
    assert [(p["id"], p["turns"]) for p in prompts] == [("a", ["hi", "and?"]), ("b", ["what is 2+2?"])]
    with pytest.raises(UserError, match="no column 'turns'"):
        D.load_prompts(str(folder))
    both = D.load_prompts([str(folder), "default"], field="messages")  # a dataset beside the project's own set
    assert len(both) == 2 + 378 and both[0]["source"] == str(folder)
