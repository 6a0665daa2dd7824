"""The private and recent torch / transformers APIs the runtime uses, each with a fallback for older releases.

Every such call in the project goes through here, so one file says what each release lacks:
- `torch._inductor.list_mode_options` (a mode's inductor options: torch.compile refuses a mode and options
  together, so a mode is passed as its options); fallback: the options of the modes the project uses;
- `guard_filter_fn` with `torch.compiler.skip_guard_on_all_nn_modules_unsafe` (not in torch 2.6): fallback, every
  guard kept (correct, only more host time per call);
- `torch._dynamo.config.recompile_limit`, named `cache_size_limit` in torch 2.6;
- `torch._inductor.config.emulate_precision_casts`: fallback, inductor's own rounding (bf16 graphs cut at
  another layer may then differ in the last bit);
- `torch._dynamo.mark_static_address`: fallback, none (a CUDA graph then copies the tensor in per replay);
- transformers' `StaticLayer` with a tensor `cumulative_length` (transformers 5.x): without it static caches
  are off and the runtime runs eager.
"""

from __future__ import annotations

import torch

# What `list_mode_options` answers on torch 2.13 for the modes the project passes; used where it is missing.
MODE_OPTIONS = {
    "default": {},
    "reduce-overhead": {"triton.cudagraphs": True},
    "max-autotune-no-cudagraphs": {"max_autotune": True, "coordinate_descent_tuning": True},
    "max-autotune": {"max_autotune": True, "triton.cudagraphs": True, "coordinate_descent_tuning": True},
}
RECOMPILE_LIMIT = 64  # one graph per (layer range, positions, cache length): EESD alone needs γ + 2

_configured = False


def mode_options(mode: str | None) -> dict:
    """Inductor options of a torch.compile mode (None: the default mode, no options)."""
    if not mode:
        return {}
    lister = getattr(torch._inductor, "list_mode_options", None)
    if lister is not None:
        return dict(lister(mode))
    if mode not in MODE_OPTIONS:
        raise ValueError(f"unknown torch.compile mode '{mode}' (known: {', '.join(MODE_OPTIONS)})")
    return dict(MODE_OPTIONS[mode])


def guard_filter():
    """A guard filter that skips the guards on module attributes (weights), or None where torch has none."""
    return getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)


def configure_compiler() -> None:
    """Process-wide dynamo/inductor settings, set once (every compiled step shares them):
    - a recompile limit past dynamo's default of 8: past it a step falls back to eager without a word;
    - bf16 rounded as eager rounds: fused kernels would keep bf16 intermediates in fp32, so a graph cut at
      another layer (a PPSD stage boundary, EESD's exit layer) would round differently from AR's whole graph."""
    global _configured
    if _configured:
        return
    dynamo = torch._dynamo.config
    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    if hasattr(dynamo, name):
        setattr(dynamo, name, max(getattr(dynamo, name), RECOMPILE_LIMIT))
    if hasattr(torch._inductor.config, "emulate_precision_casts"):
        torch._inductor.config.emulate_precision_casts = True
    _configured = True


def mark_static(tensor: torch.Tensor) -> None:
    """Tell dynamo a tensor keeps its address (CUDA graphs then read it in place instead of copying it in);
    a no-op where torch lacks `mark_static_address`."""
    marker = getattr(torch._dynamo, "mark_static_address", None)
    if marker is not None:
        marker(tensor)


def static_layer_supported() -> tuple[bool, str]:
    """Whether transformers' `StaticLayer` keeps its length in a tensor (`cumulative_length`), which the
    static runtime moves in place on a rollback."""
    try:
        from transformers.cache_utils import StaticLayer
    except ImportError:
        return False, "this transformers has no StaticLayer"
    if not isinstance(getattr(StaticLayer(max_cache_len=1), "cumulative_length", None), torch.Tensor):
        return False, "this transformers' StaticLayer keeps no cumulative_length tensor"
    return True, ""
