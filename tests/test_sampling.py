"""heads/sampling.py: one processed distribution (temperature, top-k, top-p) for every method, and the
speculative rule on it still emits exactly that distribution."""

import math

import pytest
import torch

from decode import Decoder
from decode.common import draft_step
from heads import UserError, build_head
from heads.sampling import Sampling, probabilities, sample, verify

PROMPT = list(range(100, 120))


def _chi2_ok(samples: list[int], p: torch.Tensor) -> tuple[bool, tuple]:
    """Chi-square of samples against p over the tokens expected >= 5 times + the rest (bound: far past p=0.001)."""
    n = len(samples)
    top = [int(t) for t in torch.argsort(p, descending=True) if p[t] * n >= 5]
    expected = [float(p[t]) * n for t in top] + [n * (1 - float(p[top].sum()))]
    observed = [samples.count(t) for t in top] + [sum(1 for s in samples if s not in top)]
    chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, expected) if e > 1e-9)
    dof = max(1, len(expected) - 1)
    return chi2 < dof + 4 * math.sqrt(2 * dof) + 6, (observed, expected)


def test_top_k_then_top_p_keep_what_they_say():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert torch.allclose(probabilities(logits, Sampling(1.0, top_k=2)), torch.tensor([0.625, 0.375, 0, 0]))
    assert torch.allclose(probabilities(logits, Sampling(1.0, top_p=0.8)), torch.tensor([0.625, 0.375, 0, 0]))
    assert torch.allclose(probabilities(logits, Sampling(1.0, top_p=0.81)), torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95)
    # top-k first, then the nucleus of the renormalized top 3 (0.526, 0.316, 0.158): two tokens reach 0.55
    assert torch.allclose(probabilities(logits, Sampling(1.0, top_p=0.55, top_k=3)), torch.tensor([0.625, 0.375, 0, 0]))
    flat = torch.zeros(1000)  # a flat row: the search among the top 64 widens until it holds top_p
    assert int((probabilities(flat, Sampling(1.0, top_p=0.5)) > 0).sum()) == 500
    assert sample(torch.stack([logits, logits]), Sampling(0.0, top_k=3)).tolist() == [0, 0]  # greedy: the argmax


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2), dict(top_k=1.5)])
def test_bad_settings_are_one_line_errors(bad):
    with pytest.raises(UserError, match="^(temperature|top_p|top_k)="):
        Sampling(**({"temperature": 1.0} | bad))


def test_the_rule_on_processed_p_and_q_emits_processed_p():
    """Drafts from a q whose top-k set differs from p's: every output token still follows processed p."""
    sampling = Sampling(1.0, top_p=0.9, top_k=3)
    p_logits, q_logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log(), torch.tensor([0.1, 0.2, 0.3, 0.4]).log()
    p, q = probabilities(p_logits, sampling), probabilities(q_logits, sampling)
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(3000):
        d = int(torch.multinomial(q, 1, generator=g))
        out.append(verify(p_logits, d, q, sampling, g)[0])
    assert p[3] == 0 and 3 not in out  # outside p's top k: never emitted, though q drafts it most
    ok, detail = _chi2_ok(out, p)
    assert ok, detail


@pytest.mark.parametrize("method", ["eesd", "ppsd"])
def test_speculative_sampling_with_top_p_and_top_k_matches_ar(method, tiny_base, tmp_path_factory):
    """The first new token from eesd / ppsd (draft from the head, verify by the model, both through one
    sampler) against the model's own processed distribution, and against AR's draws with the same settings."""
    folder = tmp_path_factory.mktemp("head") / "mlp"
    head = build_head(tiny_base, "mlp", exit_layer=2)
    torch.manual_seed(1)
    with torch.no_grad():
        head.down.weight.normal_(0, 0.02)
    head.save_pretrained(folder)
    sampling, n = Sampling(0.7, top_p=0.8, top_k=12), 150
    with torch.inference_mode():
        logits = tiny_base.model(torch.tensor([PROMPT])).logits[0, -1]
        _, draft_logits = draft_step(tiny_base, head, tiny_base.range(0, 2), torch.tensor([PROMPT]), 0)
    p, q = probabilities(logits, sampling), probabilities(draft_logits, sampling)
    assert 0.5 * (p - q).abs().sum() > 0.3  # forwarding the draft as is would fail
    kwargs = dict(temperature=0.7, top_p=0.8, top_k=12)
    with Decoder(method, str(folder), base=tiny_base, stages=2, gamma=3, threads=1, timeout_s=30) as dec:
        draws = [dec.generate(PROMPT, 1, seed=s, **kwargs).tokens[0] for s in range(n)]
        assert len(dec.generate(PROMPT, 12, seed=0, stop_at_eos=False, **kwargs).tokens) == 12  # later rounds run
    assert set(draws) <= set(torch.nonzero(p).flatten().tolist())
    ok, detail = _chi2_ok(draws, p)
    assert ok, detail
    ar = Decoder("ar", base=tiny_base, threads=1)
    ar_draws = [ar.generate(PROMPT, 1, seed=s, **kwargs).tokens[0] for s in range(n)]
    ok, detail = _chi2_ok(ar_draws, p)
    assert ok, detail
