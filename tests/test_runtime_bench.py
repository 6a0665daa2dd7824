"""scripts/runtime_bench.py's 7B-shaped model and tensor-parallel shards, at a tiny shape on the CPU: the code
an H200 runs at full size (meta-device init, compiled AR and verify steps, the bound, the shards)."""

import json

import pytest
import torch

from scripts import runtime_bench
from scripts.llama7b import Shape, random_llama

TINY = Shape(layers=1, hidden=128, intermediate=256, heads=4, kv_heads=2, head_dim=32, vocab=256)


def test_random_llama_is_made_on_the_device_with_real_values():
    base = random_llama(TINY, "cpu")
    params = list(base.model.parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in params)
    assert base.decoder.layers[0].self_attn.q_proj.weight.std() > 0.01  # random, not the empty buffer's zeros
    inv_freq = base.decoder.rotary_emb.inv_freq
    assert torch.allclose(inv_freq, 1.0 / (base.config.rope_parameters["rope_theta"]
                                           ** (torch.arange(0, 32, 2).float() / 32)))


def test_a_shard_splits_heads_and_mlp_and_keeps_the_hidden_size():
    half = TINY.shard(2)
    assert (half.heads, half.kv_heads, half.intermediate, half.hidden) == (2, 1, 128, 128)
    with pytest.raises(Exception, match="do not divide"):
        TINY.shard(3)


def test_the_7b_path_reports_every_figure_at_a_tiny_shape(capsys):
    result = runtime_bench.main(["--model", "7b", "--layers", "1", "--hidden", "128", "--intermediate", "256",
                                 "--heads", "4", "--kv-heads", "2", "--head-dim", "32", "--vocab", "256",
                                 "--skip-overhead", "--shards", "2", "--allreduce-ms", "0.01", "--tokens", "4",
                                 "--repeats", "2", "--gamma", "3", "--bandwidth-gb-s", "100"])
    m = result["model_7b"]
    assert m["shape"]["layers"] == 1 and m["runtime"] == "compiled static" and m["bandwidth_source"] == "stated"
    weights = sum(p.numel() * 2 for p in random_llama(TINY, "cpu").model.parameters())
    assert m["bound_ms"] == pytest.approx(weights / 100e9 * 1e3, abs=1e-4)
    assert m["ar_ms"] > 0 and m["verify_4_ms"] > 0 and m["capture_s"] > 0
    assert m["ar_captured_ms"] > 0 and m["captured_over_bound"] > 0 and m["capture_s"] >= m["captured_capture_s"]
    t = result["tp_shards"]
    assert set(t["shard_ms"]) == {2} and t["tp_layer_ms"][2] == pytest.approx(t["shard_ms"][2] + 0.02, abs=1e-4)
    assert set(t["shard_captured_ms"]) == {2} and t["shard_captured_ms"][2] > 0
    assert "assumed" in t["allreduce_source"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["model_7b"]["ar_ms"] == m["ar_ms"]


def test_bad_shards_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        runtime_bench.main(["--model", "7b", "--skip-overhead", "--skip-model", "--shards", "two"])
    assert "--shards" in str(e.value.code)
