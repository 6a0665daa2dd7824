"""ar / eesd / ppsd on a tiny random Llama: lossless greedy output, rollback, stage splitting,
sampling that keeps the model's distribution, the oracle instrument, streaming, bad input."""

import math
import warnings

import pytest
import torch

from decode import Decoder, OracleDrafts, split_layers
from decode.common import draft_step, verify
from decode.protocol import Header, StageStats
from heads import UserError, build_head

PROMPTS = [list(range(100, 120)), [5, 9, 200, 7, 7, 31], list(range(3000, 3050, 3))]


@pytest.fixture(scope="module")
def heads(tiny_base, tmp_path_factory):
    """Untrained heads at E=2 (the logit lens: low acceptance) and a transformer head (its own cache slot)."""
    folder = tmp_path_factory.mktemp("heads")
    out = {}
    for name, kind in (("mlp", "mlp"), ("transformer", "transformer")):
        head = build_head(tiny_base, kind, exit_layer=2)
        if kind == "mlp":  # a slightly perturbed head: some drafts right, most wrong
            torch.manual_seed(1)
            with torch.no_grad():
                head.down.weight.normal_(0, 0.02)
        head.save_pretrained(folder / name)
        out[name] = str(folder / name)
    return out


@pytest.fixture(scope="module")
def ar(tiny_base):
    return Decoder("ar", base=tiny_base, threads=1)  # tiny matrices: threads only add overhead


@pytest.fixture(scope="module")
def reference(ar):
    """AR's greedy tokens for each prompt (40 new tokens)."""
    return [ar.generate(prompt, 40).tokens for prompt in PROMPTS]


@pytest.fixture(scope="module")
def ppsd(tiny_base, heads):
    """One 3-stage pipeline for every ppsd test here: it has a middle stage and a last stage (a 2-stage
    pipeline is the same code minus the middle stage; tests/test_pipeline.py runs one)."""
    with Decoder("ppsd", heads["mlp"], base=tiny_base, stages=3, timeout_s=20) as dec:
        yield dec


def test_split_layers_balanced_explicit_and_errors():
    assert split_layers(30, 8, 2) == [range(0, 8), range(8, 30)]
    three = split_layers(30, 8, 3)
    assert three[0] == range(0, 8) and three[-1].stop == 30 and three[1].stop == three[2].start
    assert len(three[1]) >= len(three[2])  # uniform layers: the last stage also holds the LM head
    heavy_head = split_layers(30, 8, 3, lm_head_cost=6.0)
    assert len(heavy_head[2]) < len(three[2])
    assert split_layers(30, 15, 3, stage_layers=[[15, 23], [23, 30]]) == [range(0, 15), range(15, 23), range(23, 30)]
    with pytest.raises(UserError, match="leaves a stage empty"):
        split_layers(6, 4, 4)
    with pytest.raises(UserError, match="at least 2 stages"):
        split_layers(6, 2, 1)
    with pytest.raises(UserError, match="contiguous"):
        split_layers(30, 15, 3, stage_layers=[[15, 20], [22, 30]])


def test_messages_round_trip():
    h = Header(1, epoch=7, pos=123, n=1, token=49151, has_q=True, accepted=True, seed=42, temperature=0.7)
    back = Header.from_tensor(h.tensor("cpu"))
    assert back == h and back.temperature == 0.7
    s = StageStats(positions=4, compute_s=0.4, send_s=0.04, wall_s=1.0, cpu_s=0.2, dropped=3)
    summary = StageStats.from_tensor(s.tensor()).summary(range(2, 6))
    assert summary["compute_s"] == pytest.approx(0.1) and summary["busy_fraction"] == pytest.approx(0.44)
    assert summary["contention"] == pytest.approx(0.5) and summary["layers"] == [2, 6]


def test_crop_rolls_back_the_transformer_heads_cache_slot(tiny_base, heads):
    from heads import load_head

    head = load_head(heads["transformer"], tiny_base)
    ids = torch.tensor([PROMPTS[0]])
    with torch.inference_mode():
        lower = tiny_base.range(0, 2)
        _, ref = draft_step(tiny_base, head, lower, ids, 0)
        lower = tiny_base.range(0, 2)
        draft_step(tiny_base, head, lower, ids[:, :12], 0)
        draft_step(tiny_base, head, lower, torch.tensor([[1, 2, 3]]), 12)  # a wrong continuation
        lower.crop(12)
        assert lower.cache.get_seq_length(head.layer_index) == 12
        _, again = draft_step(tiny_base, head, lower, ids[:, 12:], 12)
    assert torch.allclose(ref, again, atol=1e-5)


@pytest.mark.parametrize("head_name", ["mlp", "transformer"])
def test_eesd_greedy_equals_ar(tiny_base, heads, reference, head_name):
    for gamma in (1, 3):
        dec = Decoder("eesd", heads[head_name], base=tiny_base, gamma=gamma, threads=1)
        for prompt, want in zip(PROMPTS, reference):
            got = dec.generate(prompt, 40)
            assert got.tokens == want
            assert 0 < got.drafts_verified and sum(got.accept_lengths) == len(want)


@pytest.mark.parametrize("head_name", ["mlp", "transformer"])
def test_no_future_warning_from_our_calls(tiny_base, heads, head_name):
    """transformers warns (FutureWarning) on every call that passes a deprecated argument name, e.g.
    `past_key_values=` since `cache=` replaced it: none of our calls may."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        ar = Decoder("ar", base=tiny_base, threads=1).generate(PROMPTS[0], 12).tokens
        eesd = Decoder("eesd", heads[head_name], base=tiny_base, threads=1, gamma=3).generate(PROMPTS[0], 12).tokens
    assert eesd == ar


def test_ppsd_greedy_equals_ar(ppsd, reference, heads, tiny_base):
    from heads import load_head

    for head_name in ("mlp", "transformer"):  # stage 0's head is swappable: the verify stages never see it
        ppsd.head = load_head(heads[head_name], tiny_base)
        for prompt, want in zip(PROMPTS, reference):
            got = ppsd.generate(prompt, 40)
            assert got.tokens == want, head_name
            assert got.drafts_verified == len(want) and sum(got.accept_lengths) == len(want)
            stages = got.stats["stages"]
            assert len(stages) == ppsd.stages and stages[-1]["flushes"] - stages[0]["flushes"] in (0, 1)
            assert got.drafts_verified - got.drafts_accepted >= stages[0]["flushes"]
    ppsd.head = load_head(heads["mlp"], tiny_base)


def test_ppsd_stream_is_generate_and_survives_an_early_stop(ppsd, ar):
    prompt = PROMPTS[1]
    want = ar.generate(prompt, 30).tokens
    assert list(ppsd.stream(prompt, 30)) == want
    stream = ppsd.stream(prompt, 30)
    assert [next(stream) for _ in range(5)] == want[:5]
    stream.close()  # the request is closed; the stages take the next one
    assert ppsd.generate(PROMPTS[2], 20).tokens == ar.generate(PROMPTS[2], 20).tokens


def test_oracle_drafts_set_the_acceptance_eesd(tiny_base, heads, ar):
    _check_oracle(Decoder("eesd", heads["mlp"], base=tiny_base, gamma=4, threads=1), ar)


def test_oracle_drafts_set_the_acceptance_ppsd(ppsd, ar):
    _check_oracle(ppsd, ar)


def _check_oracle(dec, ar):
    prompt = PROMPTS[0]
    reference = ar.generate(prompt, 60, stop_at_eos=False).tokens
    for alpha in (0.0, 1.0, 0.6):
        gen = dec.generate(prompt, 60, oracle=OracleDrafts(reference, alpha, seed=3), stop_at_eos=False)
        assert gen.tokens == reference  # the oracle changes the drafts, never the output
        if alpha in (0.0, 1.0):
            assert gen.acceptance_rate == alpha
        else:
            assert 0.3 < gen.acceptance_rate < 0.9


def test_verify_rule_keeps_the_target_distribution():
    """The one-draft speculative rule: whatever q, the accepted-or-resampled token is distributed as p."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    n = 5000  # 0.03 is > 4 standard deviations (sqrt(0.25 / n) = 0.007); a residual taken from p instead
    for _ in range(n):  # of max(p - q, 0) would be off by 0.15 on token 0, emitting the draft as is by 0.4
        d = int(torch.multinomial(q, 1, generator=g))
        token, _ = verify(torch.log(p), d, q, 1.0, g)
        counts[token] += 1
    assert (counts / n - p).abs().max() < 0.03
    assert verify(torch.tensor([0.0, 3.0, 1.0]), 1, None, 0.0, None) == (1, True)
    assert verify(torch.tensor([0.0, 3.0, 1.0]), 2, None, 0.0, None) == (1, False)


def test_ppsd_sampling_matches_the_models_distribution(ppsd, tiny_base):
    """First new token sampled by ppsd (the last stage applies the rule against stage 0's q) vs the
    model's p, chi-square over the likely tokens + the rest; q is far from p (total variation > 0.5), so
    a wrong rule fails: forwarding the draft as is gives an expected chi-square of n * sum((q - p)^2 / p),
    far above the bound already at n = 150."""
    temperature, prompt, n = 0.3, PROMPTS[0], 150
    with torch.inference_mode():
        logits = tiny_base.model(torch.tensor([prompt])).logits[0, -1]
        _, draft_logits = draft_step(tiny_base, ppsd.head, tiny_base.range(0, 2), torch.tensor([prompt]), 0)
    p = torch.softmax(logits / temperature, -1)
    q = torch.softmax(draft_logits / temperature, -1)
    assert 0.5 * (p - q).abs().sum() > 0.5  # the draft alone would fail this test
    samples = [ppsd.generate(prompt, 1, temperature=temperature, seed=s).tokens[0] for s in range(n)]
    top = [int(t) for t in torch.argsort(p, descending=True) if p[t] * n >= 5]
    expected = [float(p[t]) * n for t in top] + [n * (1 - float(p[top].sum()))]
    observed = [samples.count(t) for t in top] + [sum(1 for s in samples if s not in top)]
    chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, expected) if e > 0)
    dof = len(expected) - 1
    assert chi2 < dof + 4 * math.sqrt(2 * dof) + 6, (observed, expected)  # far beyond p=0.001 only if wrong


def test_eesd_sampling_is_reproducible_and_valid(tiny_base, heads):
    dec = Decoder("eesd", heads["mlp"], base=tiny_base, gamma=3, threads=1)
    a = dec.generate(PROMPTS[0], 30, temperature=0.8, seed=5)
    b = dec.generate(PROMPTS[0], 30, temperature=0.8, seed=5)
    assert a.tokens == b.tokens and len(a.tokens) == 30


def test_bad_input_is_one_clear_error(tiny_base, heads, ar):
    with pytest.raises(UserError, match="exceeds the model's context"):
        ar.generate(list(range(1, 1100)), 8)
    with pytest.raises(UserError, match="leaves a stage empty"):
        Decoder("ppsd", heads["mlp"], base=tiny_base, stages=6)
    with pytest.raises(UserError, match="needs an exit head"):
        Decoder("eesd", base=tiny_base)
    with pytest.raises(UserError, match="unknown method"):
        Decoder("medusa", base=tiny_base)


@pytest.mark.parametrize("setting,method,compare,dtype,expected", [
    ("auto", "ppsd", ["ar", "eesd"], "bfloat16", True),   # eesd below fp32: exact only on invariant kernels
    ("auto", "ppsd", ["ar"], "bfloat16", False),          # one position per call everywhere: plain kernels are exact
    ("auto", "eesd", [], "float32", False),
    (True, "ar", [], "float32", True),
    (False, "eesd", [], "bfloat16", False),
])
def test_batch_invariant_auto_turns_on_for_eesd_below_fp32(setting, method, compare, dtype, expected):
    from omegaconf import OmegaConf

    from decode.evaluate import methods_of
    from decode.spec import wants_batch_invariant

    cfg = OmegaConf.create({"batch_invariant": setting, "method": method, "compare": compare, "dtype": dtype})
    assert wants_batch_invariant(cfg.batch_invariant, cfg.dtype, methods_of(cfg))[0] is expected


def test_a_decode_loops_generation_comes_back_explicitly_and_its_phases_are_clocked():
    from decode.clock import Clock
    from decode.common import Decoding

    def loop():
        yield 1
        yield 2
        return "the generation"

    decoding = Decoding(loop())
    assert decoding.result is None and list(decoding) == [1, 2] and decoding.result == "the generation"
    clock = Clock()
    with clock.phase("compute", "head") as lap:
        sum(range(1000))
    with clock.phase(("verify", 3)), clock.phase(("verify", 2)):
        pass
    clock.add("blocked", 0.5)
    assert clock.count["compute"] == clock.count["head"] == 1 and clock.wall["compute"] == clock.wall["head"] == lap.s
    assert clock.keys("verify") == [2, 3] and clock.mean("blocked") == 0.5 and clock.mean("never") == 0.0
    assert clock.elapsed() >= lap.s > 0
