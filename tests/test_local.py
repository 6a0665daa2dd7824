"""PPSD with one process driving every stage (decode/local.py) on a tiny random Llama. On a CPU its stages run one
after another, so these tests cover the schedule (ticks, hand-offs, flushes, verdicts), not the overlap."""

import math
import types

import pytest
import torch

from decode import Decoder, OracleDrafts
from decode.common import draft_step, run_to_end
from decode.local import LocalPipeline
from decode.measure import local_time_per_token
from decode.spec import RunSpec
from heads import build_head
from heads.sampling import Sampling

PROMPTS = [list(range(100, 120)), [5, 9, 200, 7, 7, 31]]
LAYOUTS = {2: [(0, 2), (2, 6)], 3: [(0, 2), (2, 4), (4, 6)]}


@pytest.fixture(scope="module")
def heads(tiny_base):
    out = {}
    for kind in ("mlp", "transformer"):
        head = build_head(tiny_base, kind, exit_layer=2)
        torch.manual_seed(1)
        with torch.no_grad():  # some drafts right, most wrong: both branches of the verdict run
            for p in head.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.02)
        out[kind] = head
    return out


@pytest.fixture(scope="module")
def head_dir(heads, tmp_path_factory):
    folder = tmp_path_factory.mktemp("head") / "mlp-e2"
    heads["mlp"].save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def reference(tiny_base):
    ar = Decoder("ar", base=tiny_base, threads=1)
    return [ar.generate(prompt, 24).tokens for prompt in PROMPTS]


def _spec(layout, placement="streams") -> RunSpec:
    return RunSpec(model_path="tiny", device="cpu", dtype="float32", threads=1, stage_threads=1,
                   layout=tuple(layout), placement=placement)


def _pipeline(base, head, stages):
    return LocalPipeline(_spec(LAYOUTS[stages]), [base] * stages, head)


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_greedy_equals_ar(tiny_base, heads, reference, kind, stages):
    pipe = _pipeline(tiny_base, heads[kind], stages)
    for prompt, expected in zip(PROMPTS, reference):
        gen = run_to_end(pipe.decode(prompt, 24))
        assert gen.tokens == expected
        assert gen.drafts_verified == len(expected) and sum(gen.accept_lengths) == len(expected)
        # every rejection flushes, except one on the last token (nothing follows it); each flush ends a run
        rejected = gen.drafts_verified - gen.drafts_accepted
        assert gen.stats["flushes"] in (rejected - 1, rejected) and gen.stats["flushes"] > 0
        assert len(gen.accept_lengths) == gen.stats["flushes"] + 1
        assert gen.stats["reads"] == len(gen.tokens)  # one device-to-host read per token: none in refill ticks


def test_greedy_equals_ar_on_compiled_static_steps(tiny_base, heads, reference):
    tiny_base.set_runtime(compile=True)
    try:
        gen = run_to_end(_pipeline(tiny_base, heads["transformer"], 2).decode(PROMPTS[0], 24))
        assert tiny_base.runtime.captured  # the steps ran compiled, not eager
    finally:
        tiny_base.set_runtime()
    assert gen.tokens == reference[0]


@pytest.mark.parametrize("stages", [2, 3])
def test_ticks_follow_the_schedule_at_both_ends_of_acceptance(tiny_base, heads, reference, stages):
    """α = 1: the pipeline fills once (S - 1 ticks) and then emits a token per tick. α = 0: every token after the
    first is a flush followed by S - 1 refill ticks and the tick that verifies it."""
    pipe, n = _pipeline(tiny_base, heads["mlp"], stages), len(reference[0])
    always = run_to_end(pipe.decode(PROMPTS[0], n, oracle=OracleDrafts(reference[0], 1.0)))
    assert always.tokens == reference[0] and always.stats["flushes"] == 0
    # token k (k >= 1) is the verdict on the position stage 0 ran in tick k, reaching the last stage S - 1 ticks later
    assert always.stats["ticks"] == (n - 1) + (stages - 1)
    never = run_to_end(pipe.decode(PROMPTS[0], n, oracle=OracleDrafts(reference[0], 0.0, vocab_size=tiny_base.vocab_size)))
    assert never.tokens == reference[0] and never.drafts_accepted == 0
    assert never.stats["ticks"] == (n - 1) * stages


def test_an_early_stop_leaves_the_pipeline_reusable(tiny_base, heads, reference):
    pipe = _pipeline(tiny_base, heads["mlp"], 2)
    loop = pipe.decode(PROMPTS[0], 24)
    assert [next(loop) for _ in range(5)] == reference[0][:5]
    loop.close()
    assert run_to_end(pipe.decode(PROMPTS[1], 24)).tokens == reference[1]


def test_a_stop_token_ends_the_answer(tiny_base, heads, reference):
    stop = reference[0][6]
    gen = run_to_end(_pipeline(tiny_base, heads["mlp"], 2).decode(PROMPTS[0], 24, stop_ids={stop}))
    assert gen.tokens == reference[0][:reference[0].index(stop) + 1]


def test_sampling_keeps_the_models_distribution(tiny_base, heads):
    """The first new token is the verdict on the prefill's draft, by the speculative rule: chi-square against the
    model's p, with a head whose q is far from p (forwarding the draft would fail)."""
    temperature, prompt, n = 0.3, PROMPTS[0], 150
    head = heads["mlp"]
    with torch.inference_mode():
        p = torch.softmax(tiny_base.model(torch.tensor([prompt])).logits[0, -1] / temperature, -1)
        _, draft_logits = draft_step(tiny_base, head, tiny_base.range(0, 2), torch.tensor([prompt]), 0)
    q = torch.softmax(draft_logits / temperature, -1)
    assert 0.5 * (p - q).abs().sum() > 0.5
    pipe = _pipeline(tiny_base, head, 2)
    samples = [run_to_end(pipe.decode(prompt, 1, sampling=Sampling(temperature), seed=s)).tokens[0] for s in range(n)]
    top = [int(t) for t in torch.argsort(p, descending=True) if p[t] * n >= 5]
    expected = [float(p[t]) * n for t in top] + [n * (1 - float(p[top].sum()))]
    observed = [samples.count(t) for t in top] + [sum(1 for s in samples if s not in top)]
    chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, expected) if e > 0)
    dof = len(expected) - 1
    assert chi2 < dof + 4 * math.sqrt(2 * dof) + 6, (observed, expected)
    one = run_to_end(pipe.decode(prompt, 16, sampling=Sampling(0.8, top_k=1), seed=3))  # top-1 of p: AR's argmax
    assert one.tokens == Decoder("ar", base=tiny_base, threads=1).generate(prompt, 16).tokens
    longer = run_to_end(pipe.decode(prompt, 16, sampling=Sampling(0.8), seed=3))
    assert len(longer.tokens) == 16 and longer.tokens == run_to_end(pipe.decode(prompt, 16, sampling=Sampling(0.8), seed=3)).tokens


def test_tick_costs_predict_the_time_per_token(tiny_base, heads):
    pipe = _pipeline(tiny_base, heads["mlp"], 3)
    ticks = pipe.measure_ticks(PROMPTS[0], repeats=3)
    assert len(ticks["alone_s"]) == len(ticks["prefix_s"]) == 3 and ticks["overlap"] > 0
    full, refill = ticks["prefix_s"][-1], sum(ticks["prefix_s"][:-1])
    assert local_time_per_token(1.0, ticks["prefix_s"]) == full
    assert local_time_per_token(0.0, ticks["prefix_s"]) == pytest.approx(full + refill)
    # the caches were rolled back: a decode afterwards is still AR's
    ar = Decoder("ar", base=tiny_base, threads=1).generate(PROMPTS[0], 8).tokens
    assert run_to_end(pipe.decode(PROMPTS[0], 8)).tokens == ar


@pytest.mark.parametrize("placement, device, gpus, stages, torchrun, expected", [
    ("auto", "cpu", 0, 2, False, "processes"),       # a CPU: each stage its own process and threads
    ("auto", "cuda:0", 2, 2, True, "processes"),     # torchrun: the ranks are the stages
    ("auto", "cuda", 1, 2, False, "streams"),        # one GPU
    ("auto", "cuda", 2, 2, False, "devices"),        # a GPU per stage
    ("auto", "cuda", 2, 3, False, "streams"),        # fewer GPUs than stages
    ("auto", "cuda:1", 2, 2, False, "streams"),      # GPUs counted from the one asked for
    ("streams", "cpu", 0, 2, False, "streams"),      # as asked (on a CPU: one after another)
    ("processes", "cuda", 4, 2, False, "processes"),
])
def test_placement_resolves_from_the_machine(monkeypatch, placement, device, gpus, stages, torchrun, expected):
    from decode.decoder import resolve_placement

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert resolve_placement(placement, device, stages, torchrun) == expected


@pytest.mark.parametrize("placement, gpus, torchrun, message", [
    ("devices", 1, False, "use placement=streams"),
    ("streams", 2, True, "under torchrun use placement=processes"),
    ("nodes", 2, False, "use one of auto, streams, devices, processes"),
])
def test_an_impossible_placement_is_one_clear_error(monkeypatch, placement, gpus, torchrun, message):
    from decode.decoder import resolve_placement
    from heads.errors import UserError

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    with pytest.raises(UserError, match=message):
        resolve_placement(placement, "cuda", 2, torchrun)


def test_decoder_drives_local_stages(tiny_base, heads, reference):
    """Decoder(placement=streams): the same answers as AR, the tick costs measured at warm-up reach the stats,
    and the time to the first token is recorded (what tokens/s without prefill is computed from)."""
    with Decoder("ppsd", base=tiny_base, head=heads["mlp"], placement="streams", threads=1) as dec:
        assert dec.placement == "streams" and dec.pipeline is None and dec.local is not None
        dec.warm_up(PROMPTS[1], 4)
        gen = dec.generate(PROMPTS[0], 24)
    assert gen.tokens == reference[0]
    assert gen.stats["placement"] == "streams" and len(gen.stats["tick_costs"]["prefix_s"]) == 2
    assert 0 < gen.first_token_s <= gen.wall_time


def test_command_with_streams_placement(tiny_model_dir, head_dir, spec_bench_path, tmp_path):
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "decode", "method=ppsd", "placement=streams", f"head_path={head_dir}",
                          f"model={tiny_model_dir}", f"prompts={spec_bench_path}", "limit=1", "max_new_tokens=8",
                          "compare=[ar,eesd]", "threads=1", f"out_dir={tmp_path}"],
                         capture_output=True, text=True, timeout=300, cwd=root, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["placement"] == "streams" and result["lossless"] is True
    assert result["predicted_speedup"] is not None  # from the ticks measured at warm-up
    assert result["decode_tokens_per_s"] > 0 and result["stage_overlap"] > 0 and result["handoff_us"] > 0


def test_captured_steps_keep_the_cache_bookkeeping(tiny_base, heads, reference):
    """The CUDA-graph path on a CPU: each stage's step is "captured" once per cache (the runtime's stand-in graph,
    whose replay runs the step without its Python bookkeeping, as a real replay does) and replayed every tick
    after; the warm-up step, the capture's own step and the replays' lengths must add up for the answers to stay
    AR's."""
    tiny_base.set_runtime(static=True)
    try:
        pipe = _pipeline(tiny_base, heads["transformer"], 2)
        captures = []
        for stage in pipe.stages:
            def capture(stage=stage, real=stage.step._capture):
                captures.append((stage.start, stage.range.length))
                return real()  # the stand-in: what a capture records (its Python runs, its length is undone after)
            stage.capturable, stage.step._capture = True, capture
        gens, lengths = [], []
        for prompt in PROMPTS:
            gens.append(run_to_end(pipe.decode(prompt, 24)))
            # the host's count of each stage's positions and the device's (moved by the replays) agree
            lengths += [(s.range.length, int(s.range.cache.layers[s.start].cumulative_length)) for s in pipe.stages]
    finally:
        tiny_base.set_runtime()
    assert [g.tokens for g in gens] == reference
    assert sorted({start for start, _ in captures}) == [0, 2] and len(captures) == 2  # once per stage and cache
    assert not any(g.stats["uncaptured"] for g in gens)
    assert all(host == device > 0 for host, device in lengths)


def test_a_capturing_stage_compiles_without_torchs_own_graphs(tiny_base, heads):
    """On CUDA the base's steps are compiled with mode=reduce-overhead (torch's CUDA-graph trees, which assume the
    current stream); a stage that captures its own step gets a copy of the runtime without them, and the base,
    shared with AR and EESD, keeps its own."""
    tiny_base.set_runtime(compile=True, compile_mode="reduce-overhead")
    try:
        pipe = _pipeline(tiny_base, heads["mlp"], 2)
        for stage in pipe.stages:
            stage.capturable = True
            stage.begin()
            assert stage.range.runtime is not tiny_base.runtime and stage.range.runtime.compile_mode is None
            assert stage.range.runtime.compile and stage.range.runtime.static
        assert tiny_base.runtime.compile_mode == "reduce-overhead"
        stage = pipe.stages[0]
        first = stage.range.runtime
        stage.begin()
        assert stage.range.runtime is first  # one copy per stage: its compiled functions are reused per request
    finally:
        tiny_base.set_runtime()


def test_stages_on_their_own_bases(tiny_base, tiny_model_dir, heads, reference):
    """placement=devices on a CPU: each later stage loads only its layers (the last, also the LM head) as its own
    Base, as it would on its own GPU, and the answers are still AR's."""
    from decode.decoder import stage_bases, stage_devices

    cpu = torch.device("cpu")
    assert stage_devices("cuda:1", 3, "devices") == [torch.device("cuda", i) for i in (1, 2, 3)]
    assert stage_devices("cuda", 2, "streams") == [torch.device("cuda")] * 2
    assert stage_devices("cpu", 2, "devices") == [cpu, cpu]
    layout = [range(0, 2), range(2, 4), range(4, 6)]
    other = torch.device("meta")  # any device but the base's: stage_bases loads those stages separately
    fake = types.SimpleNamespace(device=cpu, dtype=tiny_base.dtype, folder=tiny_model_dir,
                                 batch_invariant=False, runtime=tiny_base.runtime)
    loaded = []
    import decode.decoder as decoder
    real = decoder.load_base

    def load_on_cpu(name, **kwargs):
        loaded.append((kwargs["layers"], kwargs["embedding"], kwargs["lm_head"]))
        return real(name, **kwargs | {"device": "cpu"})

    decoder.load_base = load_on_cpu
    try:
        bases = stage_bases(fake, layout, [cpu, other, other])
    finally:
        decoder.load_base = real
    assert loaded == [(range(2, 4), False, False), (range(4, 6), False, True)]
    bases[0] = tiny_base
    pipe = LocalPipeline(_spec([(r.start, r.stop) for r in layout], "devices"), bases, heads["mlp"])
    assert [run_to_end(pipe.decode(p, 24)).tokens for p in PROMPTS] == reference
