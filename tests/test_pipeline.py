"""The ppsd process pipeline when things go wrong, and the `python -m decode` command contract
(tiny random Llama: seconds, no real model)."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from decode import Decoder, PipelineError
from heads import build_head

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def head_dir(tiny_base, tmp_path_factory):
    folder = tmp_path_factory.mktemp("head") / "mlp-e2"
    build_head(tiny_base, "mlp", exit_layer=2).save_pretrained(folder)
    return str(folder)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_a_dead_stage_is_a_clear_error_within_seconds(tiny_base, head_dir):
    dec = Decoder("ppsd", head_dir, base=tiny_base, stages=3, timeout_s=10)
    pids = [p.pid for p in dec.pipeline.processes]
    stream = dec.stream(list(range(100, 120)), 900, stop_at_eos=False)
    next(stream)
    os.kill(pids[0], 9)  # stage 1 dies mid-generation
    start = time.time()
    with pytest.raises(PipelineError, match=r"stage \d .*(crashed|hung|exit code)") as err:
        for _ in stream:
            pass
    assert time.time() - start < 10
    assert "\n" not in str(err.value)
    deadline = time.time() + 5
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), "a stage process outlived the error"
    dec.close()


def _dies_while_starting(rank, world, port, spec, parent_pid):  # a stage process that fails before the rendezvous
    os._exit(7)


def test_a_stage_that_dies_while_starting_is_a_clear_error_within_seconds(tiny_base):
    from decode.pipeline import Pipeline
    from decode.spec import RunSpec

    class DyingPipeline(Pipeline):
        worker = staticmethod(_dies_while_starting)

    start = time.time()
    with pytest.raises(PipelineError, match="stage 1 exited with code 7 while starting"):
        DyingPipeline(RunSpec(str(tiny_base.folder), "cpu", "float32", threads=1, stage_threads=1,
                              layout=((0, 3), (3, tiny_base.num_layers))),
                      vocab_size=tiny_base.vocab_size, hidden_size=tiny_base.hidden_size)
    assert time.time() - start < 30  # the process group's own timeout would be an hour
    assert not torch.distributed.is_initialized()


def test_stages_exit_when_the_driver_dies(tiny_model_dir, head_dir, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(f"""
        import os
        from decode import Decoder
        if __name__ == "__main__":
            dec = Decoder("ppsd", {head_dir!r}, model={tiny_model_dir!r}, stages=2)
            print(" ".join(str(p.pid) for p in dec.pipeline.processes), flush=True)
            os._exit(0)  # no close(): the stages must notice on their own
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env=os.environ | {"PYTHONPATH": ROOT})
    pids = [int(p) for p in out.stdout.split()]
    assert pids, out.stderr
    deadline = time.time() + 5
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)


def _decode(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "decode", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=os.environ | {"HF_HUB_OFFLINE": "1"})


def test_command_contract(tiny_model_dir, head_dir, spec_bench_path, tmp_path):
    out = _decode("method=ppsd", "stages=2", f"head_path={head_dir}", f"model={tiny_model_dir}",
                  f"prompts={spec_bench_path}", "limit=2", "max_new_tokens=8", "compare=[ar,eesd]", "threads=1",
                  "warmup=false", f"out_dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("method", "stages", "exit_layer", "acceptance_rate", "tokens_per_s", "speedup_vs_ar",
                "predicted_speedup", "measured_over_predicted", "lossless", "compare", "fastest_method"):
        assert key in result, key
    assert result["method"] == "ppsd" and result["stages"] == 2 and result["exit_layer"] == 2
    resolved = result["resolved"]  # why each auto became what it did; threads=1 was asked for
    assert "threads" not in resolved and resolved["compile"].startswith("false: a CPU")
    assert resolved["placement"].startswith("processes: cpu") and resolved["window"].startswith("2:")
    assert resolved["layout"].startswith(str(result["stage_layers"]))
    assert result["lossless"] is True and set(result["compare"]) == {"ar", "eesd"}
    assert result["fastest_method"] in ("ar", "eesd", "ppsd")
    answers = [json.loads(line) for line in (tmp_path / "answers_ppsd.jsonl").read_text().splitlines()]
    assert len(answers) == 2
    choice = answers[0]["choices"][0]
    assert len(choice["turns"]) == 2 and len(choice["new_tokens"]) == 2  # MT-bench: two turns, answer fed back
    assert sum(choice["new_tokens"]) == sum(choice["accept_lengths"])  # Spec-Bench: one flat list per question
    assert json.loads((tmp_path / "summary.json").read_text())["method"] == "ppsd"


def test_command_bad_input_is_one_line(tiny_model_dir, head_dir, tmp_path):
    # one subprocess: every UserError takes the same path to stderr (the other messages are unit-tested)
    message = "exceeds the model's context"
    out = _decode(f"head_path={head_dir}", f"model={tiny_model_dir}", "max_new_tokens=8", f"out_dir={tmp_path}",
                  "warmup=false", "method=eesd", "prompt='" + "word " * 1500 + "'")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], out.stderr[-1500:]


def test_head_for_another_base_is_refused(tiny_base, tmp_path):
    from heads import UserError, load_base
    from tests.conftest import make_tiny_model

    other = load_base(str(make_tiny_model(tmp_path / "eight", num_layers=8)))
    build_head(other, "mlp", exit_layer=5).save_pretrained(tmp_path / "head")
    with pytest.raises(UserError, match="trained on"):
        Decoder("ppsd", str(tmp_path / "head"), base=tiny_base, stages=2)
    assert torch.distributed.is_initialized() is False


def test_every_message_tensor_is_on_the_links_device(tiny_base, head_dir, monkeypatch):
    """NCCL moves only tensors on the rank's CUDA device: rank 0 passes every send/recv tensor (headers,
    hidden states, the draft q, stats) on `link.device`, which is the CPU under gloo."""
    import decode.protocol as pipeline

    seen = []
    for name in ("isend", "irecv"):
        real = getattr(pipeline.dist, name)
        monkeypatch.setattr(pipeline.dist, name, lambda t, peer, _real=real, _name=name: (
            seen.append((_name, t.device)), _real(t, peer))[1])
    prompt = list(range(100, 110))
    want = Decoder("ar", base=tiny_base, threads=1).generate(prompt, 12, stop_at_eos=False).tokens
    with Decoder("ppsd", head_dir, base=tiny_base, stages=2, timeout_s=20) as dec:  # the 2-stage pipeline
        assert dec.pipeline.link.device == torch.device("cpu") == pipeline.comm_device()  # gloo
        gen = dec.generate(prompt, 12, stop_at_eos=False)                                 # headers, hidden, stats
        assert gen.tokens == want and gen.stats["flushes"] > 0                            # lossless through flushes
        assert len(dec.generate(prompt, 4, temperature=0.8, stop_at_eos=False).tokens) == 4  # + q
    kinds = {name for name, _ in seen}
    assert kinds == {"isend", "irecv"} and len(seen) > 20
    assert all(device == dec.pipeline.link.device for _, device in seen)


def test_nccl_uses_this_ranks_gpu(monkeypatch):
    """Under torchrun with CUDA: set_device(LOCAL_RANK) before NCCL init, messages on cuda:LOCAL_RANK,
    the base on cuda:LOCAL_RANK; without CUDA: gloo and the CPU. (Checked without a GPU: the calls are faked.)"""
    import decode.__main__ as entry
    import decode.protocol as pipeline
    from decode.decoder import resolve_device

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # one GPU per rank
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: calls.append(("init", backend)))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    assert entry._torchrun_rank() == 1
    assert calls == [("set_device", 1), ("init", "nccl")]
    assert resolve_device("auto") == resolve_device("cuda") == resolve_device(None) == "cuda:1"
    assert resolve_device("cpu") == "cpu"
    monkeypatch.setattr(pipeline.dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert pipeline.comm_device() == torch.device("cuda", 1)
    link = pipeline.Link(1, 5.0)
    assert link.device == torch.device("cuda", 1)

    calls.clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    entry._torchrun_rank()
    assert calls == [("init", "gloo")] and resolve_device("auto") == "cpu"
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device("cpu") == "cpu"  # one process: its GPU, or as asked


def _torchrun_rank_1(port: int, received) -> None:
    """Rank 1 of a two-rank gloo group, as under torchrun: its spec comes from rank 0 (`serve` is replaced by a
    recorder, so no model loads)."""
    import torch.distributed as dist

    import decode.stage as stage

    stage.serve = lambda rank, world, spec, device: received.put((rank, spec.to_json(), str(device)))
    store = dist.TCPStore("127.0.0.1", port, 2, False)
    dist.init_process_group("gloo", store=store, rank=1, world_size=2)
    stage.serve_torchrun(timeout_s=60)
    dist.destroy_process_group()


def test_torchrun_ranks_compute_with_rank_0s_spec_unchanged():
    """Rank 0 resolves the RunSpec once; the other ranks get it whole (JSON after the LAYOUT message), never
    resolving their own settings (threads, dtype, layout, the reasons)."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from decode.protocol import LAYOUT, Header, Link
    from decode.spec import RunSpec
    spec = RunSpec("/models/base", "cpu", "bfloat16", threads=3, stage_threads=5, compile=True, batch_invariant=True,
                   rows=5, gamma=4, window=2, placement="processes", layout=((0, 2), (2, 6)), timeout_s=7.0,
                   reasons={"threads": "3: fastest of {1: 9.0, 3: 4.1} ms per AR step"},
                   threads_measured_ms={1: 9.0, 3: 4.1})
    assert RunSpec.from_json(spec.to_json()) == spec and RunSpec.from_json(spec.to_json()).reasons == spec.reasons
    ctx = mp.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, 2, True, wait_for_workers=False)  # port 0: the store binds a free one
    received, port = ctx.Queue(), store.port
    child = ctx.Process(target=_torchrun_rank_1, args=(port, received), daemon=True)
    child.start()
    try:
        dist.init_process_group("gloo", store=store, rank=0, world_size=2)
        data = torch.frombuffer(bytearray(spec.to_json()), dtype=torch.uint8)
        link = Link(0, 30.0)
        link.send(1, Header(LAYOUT, n=len(data)), data)
        link.finish_sends()
        rank, got, device = received.get(timeout=60)
    finally:
        child.join(30)
        if dist.is_initialized():
            dist.destroy_process_group()
    assert (rank, device) == (1, "cpu") and got == spec.to_json()
