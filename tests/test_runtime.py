"""The stage runtime (heads/runtime.py): static caches and compiled steps give the eager path's tokens."""

import pytest
import torch

from decode.ar import ar_decode
from decode.common import positions, run_to_end
from decode.eesd import eesd_decode
from heads import build_head, load_base


@pytest.fixture
def static_base(tiny_model_dir):
    base = load_base(tiny_model_dir)
    assert base.set_runtime(static=True) == "static"
    return base


def test_static_cache_rollback_moves_a_length(static_base, tiny_model_dir):
    base, eager = static_base, load_base(tiny_model_dir)
    ids = torch.randint(0, base.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    wrong = torch.randint(0, base.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        r = base.range(0, base.num_layers)
        keys = r.cache.layers[0]
        r.forward(base.embed(ids[:, :6]), positions(0, 6, "cpu"))
        buffer = keys.keys.data_ptr()
        r.forward(base.embed(wrong[:, 6:]), positions(6, 6, "cpu"))  # a wrong continuation, then roll it back
        r.crop(6)
        assert r.length == 6 and int(keys.cumulative_length) == 6
        out = torch.cat([r.forward(base.embed(ids[:, i:i + 1]), positions(i, 1, "cpu")) for i in range(6, 12)], 1)
        assert keys.keys.data_ptr() == buffer  # nothing reallocated
        ref = eager.model(ids).logits[:, 6:]
    assert torch.allclose(base.logits(out), ref, atol=1e-4)


def test_static_cache_grows_past_its_first_capacity(static_base):
    base = static_base
    r = base.range(0, base.num_layers)
    first = r.cache.max_len
    with torch.no_grad():
        r.forward(base.embed(torch.zeros(1, first - 1, dtype=torch.long)), positions(0, first - 1, "cpu"))
        r.forward(base.embed(torch.zeros(1, 3, dtype=torch.long)), positions(first - 1, 3, "cpu"))
    assert r.cache.max_len > first and r.length == first + 2


@pytest.mark.parametrize("compiled", [False, True], ids=["static", "compiled"])
def test_runtime_tokens_equal_eager(tiny_model_dir, compiled):
    eager = load_base(tiny_model_dir)
    fast = load_base(tiny_model_dir)
    assert fast.set_runtime(static=True, compile=compiled) == ("compiled static" if compiled else "static")
    head = build_head(eager, "transformer", 1)
    torch.nn.init.normal_(head.layer.mlp.down_proj.weight, std=0.02)  # a head that sometimes agrees, sometimes not
    prompt = list(range(5, 25))
    want = run_to_end(ar_decode(eager, prompt, 24)).tokens
    with torch.no_grad():  # HF generate on the same weights: greedy, the same length
        hf = eager.model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):].tolist()
    assert hf == want[:len(hf)] and len(hf) >= 4  # HF stops at an end-of-sequence token, ar_decode here does not
    assert run_to_end(ar_decode(fast, prompt, 24)).tokens == want
    gen = run_to_end(eesd_decode(fast, head, prompt, 24, gamma=2))
    assert gen.tokens == want and gen.drafts_verified > 0
    if compiled:
        assert fast.runtime.capture_s > 0 and len(fast.runtime.captured) >= 2  # 1-position and verify steps


def test_batch_invariant_runtime_pads_compiled_steps_or_runs_eager(tiny_model_dir):
    base = load_base(tiny_model_dir)
    base.set_runtime(static=True, compile=True)
    base.set_batch_invariant(True)  # the plain compiled steps are not invariant
    assert not base.runtime.static and base.config._attn_implementation != "sdpa"
    assert "eager" in base.set_runtime(static=True)  # static alone, or compiled without a row count: eager
    assert "eager" in base.set_runtime(compile=True)
    assert base.set_runtime(compile=True, rows=3) == "compiled static, steps padded to 3 positions"
    assert base.config._attn_implementation == "sdpa"  # only the LM head keeps its row-by-row kernel
    assert "forward" in base.model.lm_head.__dict__ and "forward" not in base.layers[0].mlp.down_proj.__dict__


def test_padded_steps_give_the_unpadded_results_and_keep_the_cache_length(tiny_model_dir):
    plain, padded = load_base(tiny_model_dir), load_base(tiny_model_dir, batch_invariant=True)
    plain.set_runtime(compile=True)
    padded.set_runtime(compile=True, rows=4)
    ids = torch.randint(0, plain.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    outs = []
    with torch.inference_mode():
        for base in (plain, padded):
            r = base.range(0, base.num_layers)
            r.forward(base.embed(ids[:, :12]), positions(0, 12, "cpu"))
            steps = [(12, 1), (13, 3), (16, 4), (20 - 4, 1)]  # the last one after a rollback to 16
            out = []
            for start, count in steps:
                r.crop(start)
                out.append(r.forward(base.embed(ids[:, start:start + count]), positions(start, count, "cpu")))
                assert [int(layer.cumulative_length) for layer in r.cache.layers[:base.num_layers]] == \
                    [start + count] * base.num_layers
            outs.append(torch.cat(out, 1))
    assert outs[1].shape == outs[0].shape and torch.allclose(outs[0], outs[1], rtol=1e-4, atol=1e-4)
    assert {k[2] for k in plain.runtime.captured} == {1, 3, 4}  # a graph per count
    assert {k[2] for k in padded.runtime.captured} == {4}      # padded: one graph for every count


@pytest.mark.parametrize("batch_invariant", [False, True], ids=["plain", "padded"])
def test_ppsd_stages_on_the_compiled_runtime_give_ar_tokens(tiny_model_dir, batch_invariant):
    from decode.decoder import Decoder

    eager = load_base(tiny_model_dir)
    head = build_head(eager, "mlp", 2)
    prompt = list(range(5, 25))
    want = run_to_end(ar_decode(eager, prompt, 16)).tokens
    with Decoder("ppsd", head=head, model=tiny_model_dir, stages=2, compile=True, timeout_s=600,
                 batch_invariant=batch_invariant, gamma=3) as ppsd:
        assert ppsd.base.runtime.compile and ppsd.base.runtime.rows == (4 if batch_invariant else 0)
        assert ppsd.generate(prompt, 16).tokens == want


def test_teacher_answers_on_the_compiled_runtime_are_each_prompts_own_and_capture_one_shape(tiny_model_dir):
    """Continuous batching: 10 prompts through 4 rows, rows refilled as answers end (tokens of the answers made
    EOS tokens so answers end early, at different steps): each greedy answer is the one its prompt gets alone, and
    every step of the turn, greedy or sampled, runs one captured shape."""
    from train.data import generate_batch, generate_batch_static, generate_responses, slot_count

    base = load_base(tiny_model_dir)
    prompts = [list(range(5 + 7 * n, 5 + 8 * n + 2)) for n in range(10)]  # 2..11 tokens
    settings = dict(max_new_tokens=12, sample=False, temperature=1.0, top_p=1.0, seed=0)
    free = [generate_batch(base, [p], **settings)[0] for p in prompts]
    stop = [a[(3 * i) % 11] for i, a in enumerate(free) if i % 3]  # every third answer runs to the end
    base.model.generation_config.eos_token_id = stop
    alone = [generate_batch(base, [p], **settings)[0] for p in prompts]
    assert len({len(a) for a in alone}) > 2 and min(map(len, alone)) < 12  # answers end at different steps
    base.set_runtime(static=True, compile=True)
    assert generate_batch_static(base, prompts, batch_size=4, **settings) == alone
    assert generate_batch_static(base, prompts[::-1], batch_size=4, **settings) == alone[::-1]
    sampled = generate_batch_static(base, prompts, batch_size=4, **settings | {"sample": True, "temperature": 0.8})
    assert all(0 < len(a) <= 12 for a in sampled)
    assert base.runtime.captured == {("slots", 4, 256)}
    assert [slot_count(n, 8) for n in (1, 2, 3, 5, 8, 9, 100)] == [1, 2, 4, 8, 8, 8, 8]
    # generate_responses sends a whole turn to the continuous batch
    rows = generate_responses(base, [{"id": f"p{i}", "turns": [f"question {i} " * (i + 1)]} for i in range(5)],
                              {"max_new_tokens": 6, "max_prompt_tokens": 512, "temperature": 1.0, "top_p": 1.0,
                               "batch_size": 4, "seed": 0}, progress=False)
    assert len(rows) == 5 and all(0 < len(r["response_ids"]) <= 6 for r in rows)
    assert base.runtime.captured == {("slots", 4, 256)}  # 5 prompts through the same 4 rows: no new capture


def test_runtime_benchmark_reports_every_figure(tiny_model_dir):
    from scripts import runtime_bench

    result = runtime_bench.run(model=tiny_model_dir, layers=3, tokens=4)
    assert set(result["host_overhead"]) == {"eager", "compiled", "hf_generate"}
    assert result["host_overhead"]["compiled"]["capture_s"] > 0
    floor = result["call_floor"]  # host time per call on each path; on a CPU "captured" runs the compiled step directly
    assert {k for k, v in floor.items() if isinstance(v, dict)} == {"eager", "compiled", "captured"}
    assert all(v["layer_call_us"] > 0 and v["ar_step_ms"] > 0 for v in floor.values() if isinstance(v, dict))
    assert "directly" in floor["captured_path"]
    figures = result["base"]
    assert figures["bound_ms"] > 0 and figures["ar_eager_ms"] > 0 and figures["ar_compiled_ms"] > 0
    assert figures["ar_captured_ms"] > 0 and figures["captured_over_bound"] > 0


def test_bf16_graphs_cut_at_a_stage_boundary_give_the_whole_range_bits(tiny_model_dir):
    """PPSD runs [0, E) and [E, N) as two graphs where AR runs [0, N) as one: in bf16 the cut must not change
    a bit (fused kernels keep intermediates in fp32 unless they round as eager does)."""
    base = load_base(tiny_model_dir, dtype="bfloat16")
    base.set_runtime(static=True, compile=True)
    ids = torch.randint(0, base.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        whole, lower, upper = base.range(0, base.num_layers), base.range(0, 2), base.range(2, base.num_layers)
        x = base.embed(ids[:, :16])
        whole.forward(x, positions(0, 16, "cpu")), upper.forward(lower.forward(x, positions(0, 16, "cpu")), positions(0, 16, "cpu"))
        for i in range(16, 24):
            x, pos = base.embed(ids[:, i:i + 1]), positions(i, 1, "cpu")
            assert torch.equal(whole.forward(x, pos), upper.forward(lower.forward(x, pos), pos))


def test_decode_warm_up_sizes_the_caches_so_no_graph_is_captured_while_timing(tiny_model_dir, tmp_path):
    """A question longer than the caches' first size would grow them mid-run and capture new graphs inside
    the timed answers; the warm-up grows them to the longest question first."""
    import json
    from pathlib import Path

    from omegaconf import OmegaConf

    from decode.evaluate import run
    from heads.config import validate
    from heads.schema import DecodeConfig

    base = load_base(tiny_model_dir)
    build_head(base, "mlp", 2).save_pretrained(tmp_path / "head")
    questions = [{"question_id": 1, "category": "a", "turns": ["Hi there."]},
                 {"question_id": 2, "category": "b", "turns": ["word " * 300, "And again?"]}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    cfg = OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "decode.yaml")
    for key in ("defaults", "hydra"):
        cfg.pop(key)
    cfg = OmegaConf.merge(cfg, {"method": "eesd", "compare": ["ar"], "head_path": str(tmp_path / "head"),
                                "model": tiny_model_dir, "prompts": str(tmp_path / "q.jsonl"), "max_new_tokens": 8,
                                "threads": 1, "compile": True, "dtype": "float32"})
    summary = run(validate(cfg, DecodeConfig), tmp_path / "out")
    assert summary["lossless"] and summary["runtime"] == "compiled static"
    assert summary["captures_while_timing"] == 0


def test_a_cpu_prefill_runs_on_one_thread_and_restores_the_count(tiny_model_dir):
    """Every method and PPSD stage prefills on one thread (oneDNN's bf16 GEMM rounds long inputs by thread
    count); decode steps keep the process's threads."""
    base = load_base(tiny_model_dir)
    seen = []
    base.layers[0].register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        r = base.range(0, base.num_layers)
        with torch.inference_mode():
            r.forward(base.embed(torch.zeros(1, 40, dtype=torch.long)), positions(0, 40, "cpu"))
            r.forward(base.embed(torch.zeros(1, 1, dtype=torch.long)), positions(40, 1, "cpu"))
        assert seen == [1, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_compile_step_takes_the_cuda_mode_on_a_cpu():
    """`reduce-overhead` is the mode CUDA runs; torch.compile refuses a mode and options together, so the step must
    fold the mode into its options (it raised at construction on every torch before)."""
    from heads.runtime import compile_step

    step = compile_step(lambda x: x * 2, "reduce-overhead", cpu=True)
    assert torch.equal(step(torch.arange(4.0)), torch.arange(4.0) * 2)
