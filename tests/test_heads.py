"""The base-model runtime and the exit heads on a tiny random Llama."""

import json

import pytest
import torch

from heads import UserError, build_head, load_base, load_head



def _ids(base, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, base.vocab_size, (1, n), generator=g)


def test_layer_ranges_with_caches_match_full_forward(tiny_base):
    ids = _ids(tiny_base)
    pos = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        ref = tiny_base.model(ids).logits
        a, b = tiny_base.range(0, 2), tiny_base.range(2, tiny_base.num_layers)
        h = b.forward(a.forward(tiny_base.embed(ids[:, :8]), pos[:, :8]), pos[:, :8])
        assert torch.allclose(tiny_base.logits(h), ref[:, :8], atol=1e-4)
        for t in range(8, 12):  # one token at a time through both ranges
            h = b.forward(a.forward(tiny_base.embed(ids[:, t:t + 1]), pos[:, t:t + 1]), pos[:, t:t + 1])
            assert torch.allclose(tiny_base.logits(h)[0, -1], ref[0, t], atol=1e-4)
    assert a.length == b.length == 12


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_a_one_position_step_skips_only_a_mask_transformers_would_not_build(tiny_model_dir, batch_invariant):
    """run_layers passes no mask for one new position without padding instead of asking create_causal_mask,
    which returns None there (SDPA then attends to the whole cache): the upper range's cache starts at layer 2."""
    from transformers.masking_utils import create_causal_mask

    from heads.base import cache_kwarg

    base = load_base(tiny_model_dir, batch_invariant=batch_invariant)
    ids = _ids(base, 9, seed=4)
    pos = torch.arange(9)[None]
    lower, upper = base.range(0, 2), base.range(2, base.num_layers)
    with torch.no_grad():
        upper.forward(lower.forward(base.embed(ids[:, :8]), pos[:, :8]), pos[:, :8])
        hidden = base.embed(ids[:, 8:])
        for r in (lower, upper):
            kwargs = {cache_kwarg(create_causal_mask): r.cache}
            assert create_causal_mask(base.config, hidden, None, position_ids=pos[:, 8:], layer_idx=r.start, **kwargs) is None
            assert base.attention_masks(hidden, pos[:, 8:], r.cache, layer_idx=r.start)["full_attention"] is None
        assert base.attention_masks(base.embed(ids[:, 6:8]), pos[:, 6:8], upper.cache, layer_idx=2)["full_attention"] is not None


def test_crop_rolls_back_to_a_position(tiny_base):
    ids = _ids(tiny_base, 10, seed=1)
    other = _ids(tiny_base, 10, seed=2)
    pos = torch.arange(10)[None]
    r = tiny_base.range(0, tiny_base.num_layers)
    with torch.no_grad():
        r.forward(tiny_base.embed(ids[:, :6]), pos[:, :6])
        r.forward(tiny_base.embed(other[:, 6:]), pos[:, 6:])  # a wrong continuation, then flush it
        r.crop(6)
        assert r.length == 6
        h = r.forward(tiny_base.embed(ids[:, 6:]), pos[:, 6:])
        ref = tiny_base.model(ids).logits
    assert torch.allclose(tiny_base.logits(h), ref[:, 6:], atol=1e-4)
    r.crop(20)  # cropping to a longer length is a no-op
    assert r.length == 10


def test_batch_invariant_kernels_give_a_position_the_same_bits_alone_or_among_others(tiny_model_dir):
    """What makes bf16 eesd exact: positions verified together equal the same positions run one by one.
    (Random tiny weights happen to round alike with plain kernels too; the SmolLM2 test in
    test_decode_bf16.py is the one plain kernels fail.)"""
    base = load_base(tiny_model_dir, dtype="bfloat16", batch_invariant=True)
    ids = _ids(base, 14, seed=3)
    pos = torch.arange(14)[None]
    together, alone = base.range(0, base.num_layers), base.range(0, base.num_layers)
    with torch.no_grad():
        for r in (together, alone):
            r.forward(base.embed(ids[:, :9]), pos[:, :9])
        many = base.logits(together.forward(base.embed(ids[:, 9:]), pos[:, 9:]))
        one = torch.cat([base.logits(alone.forward(base.embed(ids[:, t:t + 1]), pos[:, t:t + 1]))
                         for t in range(9, 14)], dim=1)
    assert torch.equal(many, one)
    base.set_batch_invariant(False)  # and back to the plain kernels
    assert base.config._attn_implementation == "sdpa" and not base.batch_invariant
    assert all("forward" not in m.__dict__ for m in base.model.modules())  # layers and LM head


def test_partial_load_materialises_only_its_layers(tiny_model_dir):
    stage = load_base(tiny_model_dir, layers=range(2, 4), embedding=False, lm_head=False)
    real = {n for n, p in stage.model.named_parameters() if not p.is_meta}
    assert real and all(".layers.2." in n or ".layers.3." in n for n in real)
    last = load_base(tiny_model_dir, layers=range(4, 6), embedding=False, lm_head=True)
    assert not last.model.lm_head.weight.is_meta and not last.decoder.norm.weight.is_meta


@pytest.mark.parametrize("head_type, mlp_layers", [("mlp", 1), ("mlp", 2), ("transformer", 1)])
def test_head_save_load_round_trip(tiny_base, tmp_path, head_type, mlp_layers):
    head = build_head(tiny_base, head_type, exit_layer=3, mlp_layers=mlp_layers)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.01 * torch.randn_like(p))
    head.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["exit_layer"] == 3 and config["head_type"] == head_type
    loaded = load_head(str(tmp_path), tiny_base)
    x = torch.randn(1, 5, tiny_base.hidden_size)
    pos = torch.arange(5)[None]
    rope = tiny_base.position_embeddings(x, pos)
    with torch.no_grad():
        assert torch.equal(head(x, position_embeddings=rope, position_ids=pos),
                           loaded(x, position_embeddings=rope, position_ids=pos))


@pytest.mark.parametrize("mlp_layers", [1, 2])
def test_untrained_mlp_head_is_the_logit_lens(tiny_base, mlp_layers):
    head = build_head(tiny_base, "mlp", exit_layer=2, mlp_layers=mlp_layers)
    x = torch.randn(1, 3, tiny_base.hidden_size)
    assert torch.equal(head(x), x)


def test_two_block_mlp_head_applies_its_blocks_in_turn(tiny_base):
    head = build_head(tiny_base, "mlp", exit_layer=2, mlp_hidden=8, mlp_layers=2)
    assert len(head.blocks) == 1 and head.blocks[0].up.out_features == 8
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(1, 3, tiny_base.hidden_size)
    block = lambda m, h: h + m.down(torch.nn.functional.silu(m.up(m.norm(h))))  # noqa: E731
    with torch.no_grad():
        assert torch.allclose(head(x), block(head.blocks[0], block(head, x)))


def test_one_block_head_folder_without_mlp_layers_still_loads(tiny_base, tmp_path):
    """Head folders written before `mlp_layers` existed have no such key: they are one-block heads."""
    build_head(tiny_base, "mlp", exit_layer=2).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["mlp_layers"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert len(load_head(str(tmp_path), tiny_base).blocks) == 0


def test_mlp_head_needs_a_block(tiny_base):
    with pytest.raises(UserError, match="mlp_layers=0"):
        build_head(tiny_base, "mlp", exit_layer=2, mlp_layers=0)


def test_transformer_head_starts_as_the_bases_next_layer(tiny_base):
    head = build_head(tiny_base, "transformer", exit_layer=2)
    for (n, p), (_, q) in zip(head.layer.state_dict().items(), tiny_base.decoder.layers[2].state_dict().items()):
        assert torch.equal(p, q), n


def test_head_that_does_not_fit_the_base_is_refused(tiny_base, tmp_path):
    from tests.conftest import make_tiny_model

    other = load_base(str(make_tiny_model(tmp_path / "eight", num_layers=8)))
    build_head(other, "mlp", exit_layer=5).save_pretrained(tmp_path / "head")
    with pytest.raises(UserError, match="trained on"):
        load_head(str(tmp_path / "head"), tiny_base)


@pytest.mark.parametrize("bad", [0, 6, -1])
def test_exit_layer_out_of_range(tiny_base, bad):
    with pytest.raises(UserError, match="outside 1..5"):
        build_head(tiny_base, "mlp", exit_layer=bad)


def test_unknown_head_type(tiny_base):
    with pytest.raises(UserError, match="unknown head type"):
        build_head(tiny_base, "lstm", exit_layer=2)


def test_missing_model_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        load_base("nobody/no-such-model-ppsd")
    with pytest.raises(UserError, match="does not exist"):
        load_base("./no/such/folder")
