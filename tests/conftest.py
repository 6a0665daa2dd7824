"""Shared fixtures: a tiny random Llama (unit tests, seconds) and the real SmolLM2 (integration)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_tiny_model(folder, num_layers: int = 6, seed: int = 0):
    """A random Llama with SmolLM2's tokenizer (so chat templates work), saved as an HF folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from heads.base import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("smollm2"))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init, so the model's argmax varies by context
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def tiny_base(tiny_model_dir):
    from heads import load_base

    return load_base(tiny_model_dir)


@pytest.fixture(scope="session")
def smollm2():
    from heads import load_base

    return load_base("smollm2")


SPEC_BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "benchmarks", "spec_bench_dev.jsonl")


@pytest.fixture(scope="session")
def spec_bench_path():
    if not os.path.exists(SPEC_BENCH):
        pytest.skip("../shared/benchmarks/spec_bench_dev.jsonl is not beside this checkout")
    return SPEC_BENCH
