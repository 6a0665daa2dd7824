"""Lossless on the real SmolLM2: eesd and ppsd (stages 2 and 3) produce AR's greedy token ids on
Spec-Bench prompts. eesd: a high-acceptance head (the logit lens at layer 28 of 30, standing in for a
trained head) and a low-acceptance one (the untrained head at layer 8). ppsd: one pipeline per stage
count with the layer-8 head, driven by that head (a flush at almost every position) and by oracle
drafts at alpha = 0.9 (long accepted runs in flight: the high-acceptance regime, same stage-0 work)."""

import pytest

from decode import Decoder, OracleDrafts
from heads.files import read_prompts
from heads import build_head

pytestmark = pytest.mark.integration

MAX_NEW = 20  # with 2 prompts: 40 verified drafts per run, several flushes even at alpha = 0.9


@pytest.fixture(scope="module")
def setup(smollm2, spec_bench_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("smol-heads")
    heads = {}
    for name, exit_layer in (("deep", 28), ("untrained", 8)):
        build_head(smollm2, "mlp", exit_layer).save_pretrained(folder / name)
        heads[name] = str(folder / name)
    questions = read_prompts(spec_bench_path)
    picks = [questions[i] for i in (0, 200)]  # an MT-bench writing question, a Spec-Bench task
    prompts = [smollm2.encode_chat([{"role": "user", "content": q["turns"][0]}]) for q in picks]
    ar = Decoder("ar", base=smollm2, threads=1)  # a shared CI box: oversubscribed threads only slow it down
    reference = [ar.generate(p, MAX_NEW).tokens for p in prompts]
    return heads, prompts, reference


@pytest.mark.parametrize("head", ["deep", "untrained"])
def test_eesd_is_lossless_on_smollm2(smollm2, setup, head):
    heads, prompts, reference = setup
    # the untrained head's drafts almost all miss: gamma=2 checks the same rollback at half the draft work
    dec = Decoder("eesd", heads[head], base=smollm2, gamma=4 if head == "deep" else 2, threads=1)
    gens = [dec.generate(p, MAX_NEW) for p in prompts]
    assert [g.tokens for g in gens] == reference
    alpha = sum(g.drafts_accepted for g in gens) / sum(g.drafts_verified for g in gens)
    assert (alpha > 0.4) if head == "deep" else (alpha < 0.4)


@pytest.fixture(scope="module", params=[2, 3], ids=["stages2", "stages3"])
def ppsd(request, smollm2, setup):
    """Spawned once per stage count and reused by both drafting regimes."""
    heads, _, _ = setup
    with Decoder("ppsd", heads["untrained"], base=smollm2, stages=request.param) as dec:
        yield dec


@pytest.mark.parametrize("drafts", ["untrained", "oracle"])
def test_ppsd_is_lossless_on_smollm2(ppsd, setup, drafts):
    _, prompts, reference = setup
    gens = [ppsd.generate(p, MAX_NEW, oracle=OracleDrafts(ref, 0.9, seed=i) if drafts == "oracle" else None)
            for i, (p, ref) in enumerate(zip(prompts, reference))]
    assert [g.tokens for g in gens] == reference  # untrained: acceptance near 0, still finishes, still exact
    alpha = sum(g.drafts_accepted for g in gens) / sum(g.drafts_verified for g in gens)
    assert (alpha > 0.6) if drafts == "oracle" else (alpha < 0.4)
    assert all(len(g.stats["stages"]) == ppsd.stages for g in gens)
    assert sum(g.stats["flushes"] for g in gens) > 0


