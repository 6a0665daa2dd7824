"""python -m decode: ar / eesd / ppsd on Spec-Bench-format prompts; a table per method at the end (decode/report.py),
and the last line printed is one JSON object.

    python -m decode method=ppsd stages=2 head_path=HEAD prompts=FILE.jsonl max_new_tokens=128 compare=[ar,eesd]
    python -m decode interactive=true method=ppsd head_path=HEAD    # a chat, answers streamed with tokens/s and α
    torchrun --nproc_per_node 2 -m decode method=ppsd stages=2 head_path=HEAD prompts=FILE.jsonl
"""

import json
import os
import sys
from pathlib import Path

from heads.cli import entry_point
from heads.schema import DecodeConfig


def _torchrun_rank() -> int | None:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on this rank's GPU when CUDA is
    available, else gloo) and return the rank; rank >= 1 then serves its stage."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import datetime

    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():  # NCCL sends tensors of the current CUDA device: make it this rank's GPU
        from heads.hardware import check_ranks_fit_gpus

        check_ranks_fit_gpus()
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=1))
    return dist.get_rank()


@entry_point("decode", DecodeConfig)
def main(cfg: DecodeConfig) -> None:
    from decode.protocol import PipelineError  # torch: imported once the options are checked

    rank = None
    try:
        rank = _torchrun_rank()
        if rank:  # a verify stage: serve with rank 0's RunSpec until rank 0 says stop
            import torch.distributed as dist

            from decode.stage import serve_torchrun

            serve_torchrun()
            dist.destroy_process_group()
            return
        if cfg.interactive:
            from decode.chat import chat

            return chat(cfg)
        from hydra.core.hydra_config import HydraConfig

        from decode.evaluate import run

        out_dir = Path(cfg.out_dir) if cfg.out_dir else Path(HydraConfig.get().runtime.output_dir)
        show = (lambda text: print(text, end="", flush=True)) if cfg.stream else None
        result = run(cfg, out_dir, print_text=show)
        from decode.report import methods_table

        print("\n" + methods_table(result) + f"\n(answers and summary.json in {out_dir})\n", flush=True)
        print(json.dumps(result), flush=True)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        if rank == 0:  # torchrun's rank 0: never leave the other ranks waiting, then leave the group
            _leave_torchrun_group()


def _leave_torchrun_group() -> None:
    import torch.distributed as dist

    from decode.pipeline import release_torchrun_ranks

    try:
        release_torchrun_ranks()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
