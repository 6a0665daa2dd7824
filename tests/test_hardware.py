"""What `auto` resolves to (dtype, threads, device) and training metrics that stay on the model's device."""

import subprocess
import sys

import pytest
import torch

from heads import hardware
from heads.errors import UserError


@pytest.fixture
def cpu_flags(monkeypatch):
    """Pretend to be a CPU with the given /proc/cpuinfo flags (None: unreadable)."""
    def set_flags(flags, gemm_speedup=None, capability="AVX512"):
        monkeypatch.setattr(hardware, "_cpu_flags", lambda: flags)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        if gemm_speedup is not None:
            monkeypatch.setattr(hardware, "_bf16_gemm_speedup", lambda: gemm_speedup)
        hardware.native_bf16.cache_clear()
    yield set_flags
    hardware.native_bf16.cache_clear()


@pytest.mark.parametrize("flags,gemm_speedup,expected", [
    ({"avx2", "avx512f", "avx512_bf16"}, None, "bfloat16"),   # AMD Zen 4, Intel Cooper Lake
    ({"avx2", "avx512f", "amx_bf16"}, None, "bfloat16"),      # Intel Sapphire Rapids
    ({"avx2", "fma"}, None, "float32"),                       # AMD Zen 3: bf16 emulated
    ({"avx2", "avx512f"}, None, "float32"),                   # Skylake-X: AVX-512 but no bf16
    (None, 3.0, "bfloat16"),                                  # flags unreadable: the timed GEMM decides
    ({"fp", "asimd"}, 0.4, "float32"),                        # an Arm CPU where bf16 measured slower
])
def test_dtype_auto_follows_native_bf16(cpu_flags, capsys, flags, gemm_speedup, expected):
    cpu_flags(flags, gemm_speedup)
    assert hardware.resolve_dtype("auto", "cpu") == expected
    assert f"dtype=auto -> {expected}" in capsys.readouterr().out  # the choice is printed, with its reason
    assert hardware.resolve_dtype("float32", "cpu") == "float32"  # explicit values win
    assert hardware.resolve_dtype("bfloat16", "cpu") == "bfloat16"
    assert ("is slow" in capsys.readouterr().out) == (expected == "float32")  # explicit emulated bf16: warned
    assert hardware.resolve_dtype(None, "cpu") is None  # null keeps its meaning (e.g. matmul_dtype: = dtype)


def test_dtype_auto_respects_kernels_capped_below_bf16(cpu_flags):
    """ATEN_CPU_CAPABILITY=avx2 on a bf16 CPU: torch's kernels cannot use the bf16 instructions."""
    cpu_flags({"avx2", "avx512f", "avx512_bf16"}, capability="AVX2")
    assert hardware.resolve_dtype("auto", "cpu", quiet=True) == "float32"


def test_fastest_threads_is_measured_not_all_cores():
    """A step that gets slower past 2 threads (a small model on many cores): auto picks 2, not the maximum."""
    import time

    def step():
        time.sleep({1: 0.004, 2: 0.002, 4: 0.003, 8: 0.006}[torch.get_num_threads()])

    before = torch.get_num_threads()
    best, timings = hardware.fastest_threads(step, [1, 2, 4, 8], repeats=3)
    assert best == 2 and set(timings) == {1, 2, 4, 8}
    assert torch.get_num_threads() == before
    assert hardware.thread_candidates(16) == [1, 2, 4, 8, 16] and hardware.thread_candidates(6) == [1, 2, 4, 6]
    assert hardware.process_threads("auto", processes=1) == hardware.cores()
    with pytest.raises(UserError, match="threads=0"):
        hardware.process_threads(0)


def test_devices_this_machine_cannot_run_are_one_line_errors(monkeypatch):
    with pytest.raises(UserError, match="device=tpu"):
        hardware.check_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="CUDA is not available.*device=cpu"):
        hardware.check_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="has 1 GPU"):
        hardware.check_device("cuda:1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun --nproc_per_node 2 on a one-GPU node
    with pytest.raises(UserError, match="--nproc_per_node 1"):
        hardware.check_ranks_fit_gpus()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    hardware.check_ranks_fit_gpus()
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # the deepspeed launcher on 2 nodes of 1 GPU: 2 ranks, 1 per node
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_SIZE", "1")
    hardware.check_ranks_fit_gpus()
    monkeypatch.delenv("LOCAL_SIZE")
    monkeypatch.setenv("LOCAL_RANK", "1")  # no local count given: a local rank without a GPU of its own
    with pytest.raises(UserError, match="one GPU per rank"):
        hardware.check_ranks_fit_gpus()


def test_training_metrics_stay_on_the_heads_device(monkeypatch):
    """NCCL refuses CPU tensors ("No backend type associated with device type cpu"), and reading each value
    waits for the GPU. The 'meta' device stands in for a GPU here: any metric that is read or built on the CPU
    before the reduction fails on it. One all_reduce per step, on the heads' own device."""
    from train.losses import TeacherView
    from train.distributed import reduce_mean
    from train.head_set import head_metrics

    device = torch.device("meta")
    students = {"L4": torch.randn(5, 11, device=device), "L8": torch.randn(5, 11, device=device)}
    losses = {n: s.sum() for n, s in students.items()}
    reduced = []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, *a, **k: reduced.append(t.device))
    stats = reduce_mean(head_metrics(students, TeacherView(torch.randn(5, 11, device=device)), losses), world=2)
    assert stats.shape == (2, 3) and stats.device == device
    assert reduced == [device]


@pytest.mark.parametrize("entry,args", [
    ("decode", ["device=cuda", "method=ar", "prompt=hi"]),
    ("train", ["device=cuda"]),
])
def test_cuda_without_cuda_is_one_line_exit_2(entry, args):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, "-m", entry, *args, "hydra.run.dir=/tmp/ppsd-test-hw", "wandb.enabled=false"
                           if entry == "train" else "out_dir=/tmp/ppsd-test-hw"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA is not available" in lines[0], proc.stderr
