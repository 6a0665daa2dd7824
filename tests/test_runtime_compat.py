"""heads/compat.py: the compiled runtime's GPU settings run on a CPU, and each private/recent torch or
transformers API falls back when a release lacks it."""

import types

import pytest
import torch

from decode.ar import ar_decode
from decode.common import run_to_end
from heads import compat, load_base
from heads.runtime import compile_step


def f(x):
    return torch.relu(x * 2 - 1).cumsum(-1)


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune-no-cudagraphs", None])
def test_compile_step_runs_every_mode_on_a_cpu_and_gives_the_eager_result(mode):
    x = torch.randn(3, 8)
    assert torch.equal(compile_step(f, mode, cpu=True)(x), f(x))


def test_ar_on_the_cuda_compile_mode_runs_on_a_cpu_and_gives_eager_tokens(tiny_model_dir):
    """The mode CUDA runs (CUDA graphs: each step's output cloned before the next replay) end to end."""
    prompt = list(range(5, 25))
    want = run_to_end(ar_decode(load_base(tiny_model_dir), prompt, 12)).tokens
    base = load_base(tiny_model_dir)
    base.set_runtime(compile=True, compile_mode="reduce-overhead")
    assert base.runtime.cuda_graphs
    assert run_to_end(ar_decode(base, prompt, 12)).tokens == want
    assert base.runtime.captured  # the steps ran compiled, not eager


def test_mode_options_without_list_mode_options_are_the_listed_ones(monkeypatch):
    listed = {m: compat.mode_options(m) for m in compat.MODE_OPTIONS}
    monkeypatch.delattr(torch._inductor, "list_mode_options")
    assert {m: compat.mode_options(m) for m in compat.MODE_OPTIONS} == listed
    with pytest.raises(ValueError, match="unknown torch.compile mode"):
        compat.mode_options("fastest")


def test_compile_step_without_a_guard_filter_passes_no_guard_option(monkeypatch):
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: seen.update(kwargs) or fn)
    compile_step(f, "reduce-overhead")
    assert seen["options"]["triton.cudagraphs"] and "mode" not in seen
    if hasattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe"):  # not in torch 2.6
        assert seen["options"]["guard_filter_fn"] is torch.compiler.skip_guard_on_all_nn_modules_unsafe
        monkeypatch.delattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe")
    compile_step(f, "reduce-overhead")
    assert "guard_filter_fn" not in seen["options"]
    seen.clear()
    compile_step(f, None, cpu=True)
    assert seen["options"] == {"cpp.threads": 1}


def test_compiler_settings_are_set_once_and_fall_back_on_old_names(monkeypatch):
    old_dynamo = types.SimpleNamespace(cache_size_limit=8)  # before torch 2.7: no recompile_limit
    old_inductor = types.SimpleNamespace()                  # no emulate_precision_casts
    monkeypatch.setattr(torch._dynamo, "config", old_dynamo)
    monkeypatch.setattr(torch._inductor, "config", old_inductor)
    monkeypatch.setattr(compat, "_configured", False)
    compat.configure_compiler()
    assert old_dynamo.cache_size_limit == compat.RECOMPILE_LIMIT and not vars(old_inductor)
    old_dynamo.cache_size_limit = 8
    compat.configure_compiler()  # once per process: a second call changes nothing
    assert old_dynamo.cache_size_limit == 8


def test_compiler_settings_on_this_torch(monkeypatch):
    monkeypatch.setattr(compat, "_configured", False)
    # torch's config modules restore through their own patch(): monkeypatch's undo would hide the key
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    with torch._dynamo.config.patch(**{limit: 8}), torch._inductor.config.patch(emulate_precision_casts=False):
        compat.configure_compiler()
        assert getattr(torch._dynamo.config, limit) == compat.RECOMPILE_LIMIT
        assert torch._inductor.config.emulate_precision_casts


def test_a_static_layer_without_a_length_tensor_runs_eager(monkeypatch, tiny_model_dir):
    from transformers.cache_utils import StaticLayer

    base = load_base(tiny_model_dir)
    init = StaticLayer.__init__

    def old_init(self, *args, **kwargs):  # an older StaticLayer: its length came in cache_kwargs
        init(self, *args, **kwargs)
        del self.cumulative_length

    monkeypatch.setattr(StaticLayer, "__init__", old_init)
    assert compat.static_layer_supported()[0] is False
    note = base.set_runtime(compile=True)
    assert note.startswith("eager") and "cumulative_length" in note and not base.runtime.static
    prompt = list(range(5, 25))
    assert run_to_end(ar_decode(base, prompt, 6)).tokens == run_to_end(ar_decode(load_base(tiny_model_dir), prompt, 6)).tokens


def test_gpu_batch_sizing_runs_on_a_cpu(monkeypatch, tiny_base):
    """data.gen_batch_size=auto on a GPU: rows whose KV caches (prompt + answer) fill half the free memory, at
    most 512; the CUDA query faked."""
    from types import SimpleNamespace

    from train.data import generation_batch_size

    c = tiny_base.config  # 6 layers, 2 KV heads of 16, fp32
    gpu_base = SimpleNamespace(device=torch.device("cuda"), config=c, dtype=torch.float32,
                               vocab_size=tiny_base.vocab_size)
    cfg = SimpleNamespace(gen_batch_size="auto", max_prompt_tokens=100, max_new_tokens=28)
    per_row = 2 * 6 * 2 * 16 * 4 * 128 + 4 * tiny_base.vocab_size
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (200 * per_row, 10**12))
    assert generation_batch_size(gpu_base, cfg) == 100
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10**12, 10**12))
    assert generation_batch_size(gpu_base, cfg) == 512
    assert generation_batch_size(tiny_base, cfg) == 128  # a CPU
