"""ppsd in bf16 on the real SmolLM2: token-identical to ar. Its own module: the pipelines of
test_decode_integration.py (module-scoped fixtures) are gone by then, so this one can start its own."""

import pytest

from decode import Decoder
from heads import build_head, load_base

pytestmark = pytest.mark.integration


def test_ppsd_is_lossless_in_bf16(tmp_path):
    """ppsd verifies one position per pass, the shapes of ar's steps, so its ids are ar's in bf16 too (eesd's
    multi-position pass is not bit-identical in bf16 on this CPU: see the README)."""
    base = load_base("smollm2", dtype="bfloat16")
    build_head(base, "mlp", 8).save_pretrained(tmp_path / "head")  # untrained: a flush at almost every position
    prompts = [base.encode_chat([{"role": "user", "content": text}]) for text in
               ("Write a short poem about the sea.", "List three uses of a binary search tree, briefly.")]
    reference = [Decoder("ar", base=base, threads=1).generate(p, 20).tokens for p in prompts]
    with Decoder("ppsd", str(tmp_path / "head"), base=base, stages=2) as ppsd:  # the stages load the base's dtype
        gens = [ppsd.generate(p, 20) for p in prompts]
    assert [g.tokens for g in gens] == reference
    assert sum(g.stats["flushes"] for g in gens) > 0
