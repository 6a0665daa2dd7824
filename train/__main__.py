"""`python -m train`: freeze a base LLM and self-distil exit head(s); see conf/train.yaml for every option."""

import atexit
import json
import os
import sys

from heads.cli import entry_point
from heads.schema import TrainConfig


def _destroy_process_group():
    dist = sys.modules.get("torch.distributed")  # never imported (bad input stops before torch): nothing to end
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# At exit, not after each job: a Hydra multirun runs its jobs in this one process and DeepSpeed keeps
# its groups between them.
atexit.register(_destroy_process_group)


@entry_point("train", TrainConfig, sigterm=True)
def main(cfg: TrainConfig) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from train.recipe import run

    result = run(cfg)
    if result is not None:  # rank 0 only
        paths = result.get("head_paths") or [result["head_path"]]
        top1 = result["heldout_top1"] if isinstance(result["heldout_top1"], list) else [result["heldout_top1"]]
        acc = result["heldout_expected_acceptance"]
        acc = acc if isinstance(acc, list) else [acc]
        for path, t, a in zip(paths, top1, acc):
            print(f"head written to {path}; held-out top-1 {t:.3f}, expected acceptance {a:.3f}", flush=True)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
