"""bf16 on the real SmolLM2: ppsd token-identical to ar, and eesd too on batch-invariant kernels. Its own
module: the pipelines of test_decode_integration.py (module-scoped fixtures) are gone by then, so this one
can start its own."""

import pytest

from decode import Decoder, OracleDrafts
from heads import build_head, load_base
from heads.hardware import native_bf16

# Where bf16 is emulated (AVX2-only CPUs) no default decodes in bf16, and these runs would take minutes: the
# property is checked where auto picks bf16 (CPUs with native bf16; GPUs through scripts.gpu_check).
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not native_bf16("cpu")[0], reason="bf16 is emulated on this CPU: " + native_bf16("cpu")[1])]


def test_ppsd_is_lossless_in_bf16(tmp_path):
    """ppsd verifies one position per pass, the shapes of ar's steps, so its ids are ar's in bf16 too."""
    base = load_base("smollm2", dtype="bfloat16")
    build_head(base, "mlp", 8).save_pretrained(tmp_path / "head")  # untrained: a flush at almost every position
    prompts = [base.encode_chat([{"role": "user", "content": text}]) for text in
               ("Write a short poem about the sea.", "List three uses of a binary search tree, briefly.")]
    reference = [Decoder("ar", base=base, threads=1).generate(p, 20).tokens for p in prompts]
    with Decoder("ppsd", str(tmp_path / "head"), base=base, stages=2) as ppsd:  # the stages load the base's dtype
        gens = [ppsd.generate(p, 20) for p in prompts]
    assert [g.tokens for g in gens] == reference
    assert sum(g.stats["flushes"] for g in gens) > 0


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_eesd_is_lossless_in_bf16_on_batch_invariant_kernels(compile):
    """eesd verifies up to γ + 1 positions per pass; with plain kernels bf16 rounds those rows differently
    from ar's one-position steps (the last prompt drifted within 48 tokens here; compiled, 2 of these 5
    prompts). batch_invariant=True puts every method on kernels where it cannot: eager, row-blocked kernels;
    compiled, every step padded to γ + 1 positions. Oracle drafts at α = 0.9 keep the verify passes full."""
    base = load_base("smollm2", dtype="bfloat16", batch_invariant=True)
    head = build_head(base, "mlp", 8)
    texts = ("Write a short poem about the sea.", "List three uses of a binary search tree, briefly.",
             "Explain why the sky is blue to a ten-year-old.", "Translate 'good morning, my friend' into French.",
             "What is 17 times 23? Show your steps.")
    ar, eesd = Decoder("ar", base=base, compile=compile), Decoder("eesd", base=base, head=head, gamma=4, compile=compile)
    assert base.runtime.rows == (5 if compile else 0)
    for i, text in enumerate(texts):
        prompt = base.encode_chat([{"role": "user", "content": text}])
        reference = ar.generate(prompt, 48).tokens
        gen = eesd.generate(prompt, 48, oracle=OracleDrafts(reference, 0.9, seed=i, vocab_size=base.vocab_size))
        assert gen.tokens == reference, f"prompt {i}"
        assert max(gen.accept_lengths) > 2  # multi-position verify passes happened
