"""Exit heads: map the hidden state after layer E to a hidden state the base's final norm + LM head
turn into a prediction of the full model's next token.

- `mlp`: x + W2·silu(W1·rmsnorm(x)), the last projection zero-initialised so an untrained head is the
  "logit lens" (the base's own LM head read at layer E). With `mlp_layers` > 1, further such residual blocks
  follow (each zero-initialised the same way); it still maps h_E -> hidden, so decoding needs no change.
- `transformer`: one decoder layer of the base's own architecture, initialised from the base's layer E
  weights. It attends over earlier positions, so at decode time it keeps a KV cache slot of its own
  (layer index N, right after the base's layers, in the same cache as the layers that feed it).

Both end in the base's frozen final norm + LM head (`Base.logits`); those weights are not part of
the head folder, which keeps heads small (config.json + model.safetensors + README.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from huggingface_hub import PyTorchModelHubMixin
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from heads.base import cache_kwarg, hub_offline
from heads.errors import UserError
from heads.schema import HEAD_TYPES


def decoder_layer_class(config):
    """The decoder-layer class transformers uses for this config (e.g. LlamaDecoderLayer)."""
    model_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    return getattr(sys.modules[model_cls.__module__], model_cls._no_split_modules[0])


def _base_config(base_config: dict):
    config = AutoConfig.for_model(**base_config)
    config._attn_implementation = "sdpa"
    return config


class ResidualMLP(nn.Module):
    """x + W2·silu(W1·rmsnorm(x)), W2 zero-initialised: a block an mlp head stacks after its first."""

    def __init__(self, hidden_size: int, width: int, eps: float):
        super().__init__()
        self.norm = nn.RMSNorm(hidden_size, eps=eps)
        self.up = nn.Linear(hidden_size, width, bias=False)
        self.down = nn.Linear(width, hidden_size, bias=False)
        nn.init.zeros_(self.down.weight)

    def forward(self, x):
        return x + self.down(nn.functional.silu(self.up(self.norm(x))))


class ExitHead(
    nn.Module,
    PyTorchModelHubMixin,
    tags=["ppsd", "early-exit", "self-speculative-decoding"],
):
    """An exit head; its constructor arguments are its config.json."""

    def __init__(
        self,
        head_type: str,
        exit_layer: int,
        base_model: str,
        base_config: dict,
        mlp_hidden: int = 0,
        mlp_layers: int = 1,
        base_revision: str | None = None,
        metadata: dict | None = None,
        base: dict | None = None,
    ):
        super().__init__()
        if head_type not in HEAD_TYPES:
            raise UserError(f"unknown head type '{head_type}': use one of {', '.join(HEAD_TYPES)}")
        config = _base_config(base_config)
        num_layers = config.num_hidden_layers
        if not 1 <= exit_layer <= num_layers - 1:
            raise UserError(f"exit_layer={exit_layer} is outside 1..{num_layers - 1} for this {num_layers}-layer base")
        self.head_type = head_type
        self.exit_layer = exit_layer
        self.base_model = base_model
        self.base_identity = base  # the exact base trained on (heads.base.base_identity); None in older heads
        self.num_base_layers = num_layers
        self.hidden_size = config.hidden_size
        self.vocab_size = config.vocab_size
        self.metadata = dict(metadata or {})
        if head_type == "mlp":
            if mlp_layers < 1:
                raise UserError(f"mlp_layers={mlp_layers}: an mlp head has at least one block")
            width = mlp_hidden or 2 * config.hidden_size
            eps = getattr(config, "rms_norm_eps", 1e-6)
            # The first block's weights keep their names (norm, up, down): one-block head folders load as before.
            self.norm = nn.RMSNorm(config.hidden_size, eps=eps)
            self.up = nn.Linear(config.hidden_size, width, bias=False)
            self.down = nn.Linear(width, config.hidden_size, bias=False)
            nn.init.zeros_(self.down.weight)
            self.blocks = nn.ModuleList(ResidualMLP(config.hidden_size, width, eps) for _ in range(mlp_layers - 1))
        else:
            # Its own cache slot sits right after the base's layers.
            self.layer = decoder_layer_class(config)(config, num_layers)

    @property
    def needs_cache(self) -> bool:
        return self.head_type == "transformer"

    @property
    def layer_index(self) -> int:
        """The cache slot a transformer head uses."""
        return self.num_base_layers

    def forward(self, hidden, *, position_embeddings=None, attention_mask=None, position_ids=None, cache=None):
        """hidden (B, T, H) after layer E -> hidden (B, T, H) for the base's final norm + LM head."""
        if self.head_type == "mlp":
            hidden = hidden + self.down(nn.functional.silu(self.up(self.norm(hidden))))
            for block in self.blocks:
                hidden = block(hidden)
            return hidden
        return self.layer(hidden, attention_mask=attention_mask, position_embeddings=position_embeddings,
                          position_ids=position_ids, use_cache=cache is not None,
                          **{cache_kwarg(type(self.layer).forward): cache})

    def describe(self) -> str:
        return f"{self.head_type} head at layer {self.exit_layer}/{self.num_base_layers} of {self.base_model}"


def build_head(base, head_type: str, exit_layer: int, mlp_hidden: int = 0, mlp_layers: int = 1) -> ExitHead:
    """A fresh head for `base`; a transformer head starts as a copy of the base's layer `exit_layer`."""
    head = ExitHead(head_type=head_type, exit_layer=exit_layer, base_model=base.name,
                    base_config=base.config.to_diff_dict() | {"model_type": base.config.model_type},
                    mlp_hidden=mlp_hidden, mlp_layers=mlp_layers, base=base.identity)
    head = head.to(device=base.device, dtype=base.dtype)
    if head_type == "transformer":
        head.layer.load_state_dict(base.decoder.layers[exit_layer].state_dict())
    return head


def _head_folder(path_or_id: str) -> Path:
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1:
        raise UserError(f"head '{path_or_id}' is not an existing folder nor a hub id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path_or_id, allow_patterns=["*.json", "*.safetensors", "*.md"]))
    except Exception as e:  # offline, missing repo, bad id: all one answer for the user
        hint = "HF_HUB_OFFLINE=1 forbids downloading it" if hub_offline() else type(e).__name__
        raise UserError(f"head '{path_or_id}' is not a local folder and could not be fetched ({hint})") from None


# config.json's keys (ExitHead's arguments) and their JSON types. A head folder is untrusted input: anything
# else is a one-line error naming the file, except keys a newer ppsd added, which are dropped with a warning.
HEAD_CONFIG_TYPES = {"head_type": str, "exit_layer": int, "base_model": str, "base_config": dict,
                     "mlp_hidden": int, "mlp_layers": int, "base_revision": (str, type(None)), "metadata": (dict, type(None)),
                     "base": (dict, type(None))}
HEAD_CONFIG_REQUIRED = ("head_type", "exit_layer", "base_model", "base_config")


def _checked_head_config(config, config_path: Path) -> dict:
    if not isinstance(config, dict):
        raise UserError(f"{config_path} holds a JSON {type(config).__name__}, not an object: is it a ppsd head folder?")
    missing = [k for k in HEAD_CONFIG_REQUIRED if k not in config]
    if missing:
        raise UserError(f"{config_path} lacks {missing}: is it a ppsd head folder?")
    unknown = sorted(set(config) - set(HEAD_CONFIG_TYPES))
    if unknown:
        print(f"warning: {config_path} has keys this ppsd does not know ({', '.join(unknown)}; written by a newer "
              "version?): ignored", file=sys.stderr, flush=True)
    config = {k: v for k, v in config.items() if k in HEAD_CONFIG_TYPES}
    for key, kind in HEAD_CONFIG_TYPES.items():
        value = config.get(key)
        if key in config and (not isinstance(value, kind) or isinstance(value, bool)):
            raise UserError(f"{config_path}: {key} is {json.dumps(value)[:60]}, which is not a valid {key} "
                            "(the file is damaged or not a ppsd head config): re-export or retrain the head")
    if config["head_type"] not in HEAD_TYPES:
        raise UserError(f"{config_path}: unknown head type '{config['head_type']}': this ppsd loads {', '.join(HEAD_TYPES)} heads")
    return config


def read_head_config(path_or_id: str) -> dict:
    folder = _head_folder(path_or_id)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"head folder '{folder}' has no config.json: is it a ppsd head folder?")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{config_path} is not valid JSON ({e.msg}, line {e.lineno}): the file is damaged; "
                        "re-export or retrain the head") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{config_path} cannot be read ({getattr(e, 'strerror', None) or type(e).__name__})") from None
    return _checked_head_config(config, config_path) | {"_folder": str(folder)}


def _head_weights(file: Path) -> dict:
    from safetensors import SafetensorError

    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{file} is not a readable safetensors file ({str(e).splitlines()[0][:120]}): it is truncated "
                        "or damaged; re-export or retrain the head") from None


def check_fits(config: dict, base) -> None:
    base_cfg = config["base_config"]
    want = (base_cfg.get("hidden_size"), base_cfg.get("vocab_size"), base_cfg.get("num_hidden_layers"))
    have = (base.hidden_size, base.vocab_size, base.num_layers)
    if want != have:
        raise UserError(f"head was trained on {config['base_model']} (hidden {want[0]}, vocab {want[1]}, {want[2]} layers) "
                        f"but the base is {base.name} (hidden {have[0]}, vocab {have[1]}, {have[2]} layers): "
                        "load the head onto the base it was trained for")


def nonfinite_weights(state: dict) -> str:
    """"" when every weight is finite, else which tensors hold NaN/Inf and how many values, in words."""
    import torch

    bad = {k: int((~torch.isfinite(v)).sum()) for k, v in state.items() if v.is_floating_point()}
    bad = {k: n for k, n in bad.items() if n}
    return ", ".join(f"{n} in {k}" for k, n in sorted(bad.items())[:3]) + (", ..." if len(bad) > 3 else "")


def load_head(path_or_id: str, base=None, device=None, dtype=None, *, refuse_nonfinite: bool = False) -> ExitHead:
    """Load a head folder or hub id (safetensors only); with `base`, check it fits and match its device/dtype.
    NaN/Inf weights: a warning (decoding stays exact, its drafts are rejected), or with refuse_nonfinite a
    one-line error (export: never publish such a head)."""
    config = read_head_config(path_or_id)
    folder = Path(config.pop("_folder"))
    if base is not None:
        check_fits(config, base)
    try:
        head = ExitHead(**config)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # e.g. a base_config transformers cannot build
        raise UserError(f"{folder / 'config.json'}: its base_config does not describe a model transformers can "
                        f"build ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"head folder '{folder}' has no model.safetensors")
    state = _head_weights(weights)
    expected = head.state_dict()
    wrong = sorted(k for k in expected.keys() | state.keys()
                   if k not in state or k not in expected or state[k].shape != expected[k].shape)
    if wrong:
        k = wrong[0]
        why = ("missing" if k not in state else "not a weight of this head" if k not in expected
               else f"shape {tuple(state[k].shape)}, config.json implies {tuple(expected[k].shape)}")
        raise UserError(f"{weights} does not match {folder / 'config.json'} ({len(wrong)} tensor(s), e.g. {k}: {why}): "
                        "the two files come from different heads; re-export or retrain the head")
    head.load_state_dict(state, strict=True)
    device = device or (base.device if base is not None else "cpu")
    dtype = dtype or (base.dtype if base is not None else None)
    head = head.to(device=device, dtype=dtype).eval().requires_grad_(False)
    broken = nonfinite_weights(head.state_dict())  # after the cast: fp16 turns large weights into Inf
    if broken and refuse_nonfinite:
        raise UserError(f"{weights} holds NaN/Inf weights ({broken}): the head is broken; retrain it")
    if broken:
        print(f"warning: {weights} holds NaN/Inf weights ({broken}{', in ' + str(dtype) if dtype else ''}): its drafts "
              "will be rejected, so decoding stays exact but slow; retrain the head (e.g. with a lower head.lr)",
              file=sys.stderr, flush=True)
    return head
