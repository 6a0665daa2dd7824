"""heads/runtime.py's one runtime object and its hand-captured steps (CapturedStep), on a CPU: greedy AR's whole
step through the graphs' stand-in (`HostGraph`, whose replay runs the kernels and none of the host bookkeeping,
as a CUDA graph's does) gives the uncaptured tokens, captures once per cache size and keeps the cache lengths."""

import pytest

from decode.ar import ar_decode, greedy_step
from decode.common import run_to_end
from heads import load_base
from heads.runtime import CapturedStep, Runtime, RuntimeSpec

PROMPT = list(range(5, 25))


@pytest.fixture(scope="module")
def eager_tokens(tiny_model_dir):
    base = load_base(tiny_model_dir)
    return lambda prompt, n: run_to_end(ar_decode(base, prompt, n)).tokens


def host_captured(base) -> list:
    """Greedy AR's step on the stand-in graphs; returns the list its captures are recorded in: (cache size, the
    range's length when captured)."""
    step, captures = greedy_step(base), []
    real = step.captured._capture

    def capture():
        captures.append((step.model.cache.max_len, step.model.length))
        return real()

    step.captured.graphs, step.captured._capture = "host", capture
    return captures


def test_greedy_ar_replays_one_captured_step_per_cache_size(tiny_model_dir, eager_tokens):
    base = load_base(tiny_model_dir)
    base.set_runtime(static=True)
    captures = host_captured(base)
    step = greedy_step(base)
    gen = run_to_end(ar_decode(base, PROMPT, 24))
    assert gen.tokens == eager_tokens(PROMPT, 24)
    assert step.model.length == len(PROMPT) + 24 - 1  # the last token is emitted, never fed back
    assert int(step.model.cache.layers[0].cumulative_length) == step.model.length  # the replays moved it on the device
    assert captures == [(256, len(PROMPT))]  # captured at the first step, after the prefill
    assert run_to_end(ar_decode(base, PROMPT[:7], 12)).tokens == eager_tokens(PROMPT[:7], 12)
    assert len(captures) == 1  # the same cache from one request to the next: no new capture
    long = list(range(3, 300))
    assert run_to_end(ar_decode(base, long, 6)).tokens == eager_tokens(long, 6)
    assert captures[1:] == [(512, len(long))]  # a longer answer: the cache reserved at its size, captured once
    assert run_to_end(ar_decode(base, PROMPT, 8)).tokens == eager_tokens(PROMPT, 8)
    assert len(captures) == 2 and step.captured.error is None
    assert {k for k in base.runtime.captured if k[0] == "graph"} == {("graph", "greedy AR step", 256),
                                                                      ("graph", "greedy AR step", 512)}


def test_greedy_ar_on_the_cuda_mode_captures_without_torchs_graphs(tiny_model_dir, eager_tokens):
    """On CUDA the base compiles in reduce-overhead (torch's graph trees), which cannot run inside a hand capture:
    the captured AR step runs on the runtime's copy without them, sharing its caches and capture log."""
    base = load_base(tiny_model_dir)
    base.set_runtime(compile=True, compile_mode="reduce-overhead")
    captures = host_captured(base)
    assert run_to_end(ar_decode(base, PROMPT, 12)).tokens == eager_tokens(PROMPT, 12)
    model = greedy_step(base).model
    assert model.runtime is base.runtime.for_capture() and model.runtime is not base.runtime
    assert model.runtime.compile_mode is None and model.runtime.caches is base.runtime.caches
    assert len(captures) == 1 and ("graph", "greedy AR step", 256) in base.runtime.captured
    assert any(k[0] == 0 for k in base.runtime.captured)  # the layers inside ran as compiled steps


def test_the_uncaptured_paths_give_the_same_tokens(tiny_model_dir, eager_tokens):
    """step_graphs off: greedy AR calls the layer range step by step; a failed capture says so once and runs the
    step directly."""
    base = load_base(tiny_model_dir)
    base.set_runtime(static=True)
    base.runtime.step_graphs = False
    assert run_to_end(ar_decode(base, PROMPT, 12)).tokens == eager_tokens(PROMPT, 12)
    assert not base.runtime.steps
    base.runtime.step_graphs = True
    step = greedy_step(base).captured
    step.graphs = "host"
    step._capture = lambda: (_ for _ in ()).throw(RuntimeError("operation not permitted when stream is capturing"))
    for _ in range(2):
        assert run_to_end(ar_decode(base, PROMPT, 12)).tokens == eager_tokens(PROMPT, 12)
    assert step.error == "RuntimeError: operation not permitted when stream is capturing" and not step.captures


def test_failed_capture_is_one_warning(capsys):
    calls = []
    step = CapturedStep(lambda: calls.append(1), name="a step", graphs="host")
    step._capture = lambda: 1 / 0
    for _ in range(3):
        step(key="cache")
    assert len(calls) == 4  # the warm-up, then the step run directly each time
    assert capsys.readouterr().out.count("warning: a step runs uncaptured (ZeroDivisionError") == 1
    with pytest.raises(ValueError, match="graphs="):
        CapturedStep(lambda: None, name="x", graphs="cpu")


def test_one_rule_decides_a_compiled_step(tiny_base):
    """Written once (`Runtime.compiles`): the layers and stage 0's head step both ask it, padded rows included."""
    plain = Runtime(tiny_base, RuntimeSpec(compile=True))
    padded = Runtime(tiny_base, RuntimeSpec(compile=True, rows=4))
    assert not plain.compiles(0, 1) and not padded.compiles(0, 1)  # a prefill runs eager
    assert plain.compiles(20, 16) and not plain.compiles(20, 17)   # MAX_ROWS
    assert padded.compiles(20, 4) and not padded.compiles(20, 5)   # longer than the padded rows: eager
    assert not Runtime(tiny_base, RuntimeSpec(static=True)).compiles(20, 1)
    assert plain.static and plain.describe() == "compiled static"
    assert padded.describe() == "compiled static, steps padded to 4 positions"
