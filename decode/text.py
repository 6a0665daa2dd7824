"""Text in, text out: `TextDecoder` over a `Decoder`, with the CLI's `auto` settings.

    from decode import TextDecoder

    if __name__ == "__main__":  # ppsd spawns its stages, which import this file again
        with TextDecoder.from_pretrained("path/to/head") as dec:
            print(dec.generate("Name three rivers in Africa."))
            for piece in dec.stream([{"role": "user", "content": "And in Europe?"}], temperature=0.7, top_p=0.9):
                print(piece, end="", flush=True)

A prompt is a string (one user turn) or chat messages [{role, content}]; the chat template turns it into
token ids. A list of prompts is decoded one after another (every method decodes one sequence at a time).
"""

from __future__ import annotations

import multiprocessing
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from decode.decoder import Decoder
from decode.spec import resolve_placement, resolve_spec
from heads.errors import UserError
from heads.hardware import check_device, is_auto
from heads.schema import METHODS

Prompt = str | list[dict]


def resolve_method(method: str, head: str | None, stages: int, device: str) -> tuple[str, str]:
    """auto: ppsd where each of its stages can have a GPU of its own, else ar; a head alone does not make
    ppsd or eesd faster on one device (see the README's measured figures). Returns (method, why)."""
    if not is_auto(method):
        if method not in METHODS:
            raise UserError(f"unknown method '{method}': use auto or one of {', '.join(METHODS)}")
        return method, "asked for"
    if head is None:
        return "ar", "no exit head"
    if torch.device(device).type == "cuda" and torch.cuda.device_count() >= stages:
        return "ppsd", f"{torch.cuda.device_count()} GPUs for {stages} stages"
    return "ar", ("one device: ppsd and eesd were slower than ar on every machine measured so far "
                  "(pass method=ppsd or eesd to run them anyway)")


def resolve_text_device(device: str) -> str:
    """auto: the first GPU when CUDA is available, else the CPU (the CLI's `auto` keeps a single process on the
    CPU unless torchrun starts it; a library caller asking for auto wants the accelerator)."""
    if is_auto(device):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(check_device(device))


def check_spawn_guard() -> None:
    """ppsd starts its stages with the `spawn` method, which runs the caller's script again in each stage. Code
    that decodes at the top level of a script would start pipelines forever: say so, in one line, before."""
    guard = "put the code that decodes under `if __name__ == \"__main__\":`"
    if multiprocessing.parent_process() is not None and getattr(sys.modules.get("__mp_main__"), "__file__", None):
        raise UserError(f"a ppsd stage process is running your script's top level: {guard}")
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file and Path(main_file).suffix == ".py" and Path(main_file).is_file():
        source = Path(main_file).read_text(errors="replace")
        if not re.search(r"__name__\s*==\s*['\"]__main__['\"]", source):
            raise UserError(f"{main_file}: ppsd spawns its stage processes, which import this script again: {guard}")


class TextDecoder:
    """A Decoder that takes and returns text; build it with `from_pretrained`."""

    def __init__(self, decoder: Decoder, settings: dict):
        self.decoder = decoder
        self.tokenizer = decoder.base.tokenizer
        self.settings = settings  # what every `auto` resolved to, and why the method was chosen

    @classmethod
    def from_pretrained(cls, head: str | None = None, *, method: str = "auto", model: str | None = None,
                        device: str = "auto", dtype: str = "auto", compile: str | bool = "auto",
                        batch_invariant: str | bool = "auto", threads: str | int = "auto",
                        stage_threads: str | int = "auto", stages: int = 2, gamma: int = 4, quiet: bool = True,
                        **decoder_kwargs) -> "TextDecoder":
        """A head folder or hub id (None: plain ar on `model`, default the embedded SmolLM2). Every `auto` is
        resolved as `python -m decode` resolves it (dtype bf16 where native, compile on CUDA, threads measured),
        except batch_invariant, on for every method below fp32: one TextDecoder's greedy text is then another's,
        whatever their methods (python -m decode shares one base between its methods instead). The base is the
        one the head records, exactly."""
        device = resolve_text_device(device)
        method, why = resolve_method(method, head, stages, device)
        if method != "ar" and head is None:
            raise UserError(f"method={method} needs an exit head: TextDecoder.from_pretrained('HEAD_FOLDER_OR_HUB_ID')")
        torchrun = torch.distributed.is_initialized()
        if method == "ppsd" and resolve_placement(decoder_kwargs.get("placement", "auto"), device, stages,
                                                  torchrun) == "processes" and not torchrun:
            check_spawn_guard()  # streams / devices run every stage in this process: nothing is spawned
        # batch_invariant=auto looks at every method: below fp32 each runs on kernels whose bits do not depend on
        # positions, so one TextDecoder's greedy text is another's, whatever their methods (3% on ar)
        spec, base, head_model = resolve_spec(
            methods=[method], matched=list(METHODS), head_path=head if method != "ar" else None, model=model,
            device=device, dtype=dtype, compile=compile, batch_invariant=batch_invariant, threads=threads,
            stage_threads=stage_threads, stages=stages, gamma=gamma, quiet=quiet,
            probe=lambda base: base.encode_chat([{"role": "user", "content": "Hello!"}]),
            **{k: v for k, v in decoder_kwargs.items() if k != "exit_layer"})
        decoder = Decoder.from_spec(spec, method, base=base, head=head_model,
                                    exit_layer=decoder_kwargs.get("exit_layer"))
        settings = {"method": method, "why": why, "device": spec.device, "dtype": spec.dtype, "compile": spec.compile,
                    "batch_invariant": spec.batch_invariant, "threads": spec.threads,
                    "stage_threads": spec.stage_threads, "rows": spec.rows, "resolved": spec.reasons}
        return cls(decoder, settings)

    @property
    def method(self) -> str:
        return self.decoder.method

    @property
    def last_generation(self):
        """The Generation of the last answer (token ids, timings, acceptance)."""
        return self.decoder.last_generation

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if not (isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "content" in m for m in prompt)):
            raise UserError("a prompt is a string or chat messages [{'role': ..., 'content': ...}]")
        return self.decoder.base.encode_chat(prompt)

    def stream(self, prompt: Prompt, max_new_tokens: int = 256, *, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int = 0) -> Iterator[str]:
        """Yield the answer's text as its tokens are verified, a piece per token (none while a multi-byte
        character is still incomplete); the pieces joined are `generate`'s string."""
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], dict):
            raise UserError("stream takes one prompt (a string or chat messages); for several, call generate([...])")
        ids = self.encode(prompt)
        tokens, shown = [], ""
        for token in self.decoder.stream(ids, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                         seed=seed):
            tokens.append(token)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                yield text[len(shown):]
                shown = text
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if len(text) > len(shown):
            yield text[len(shown):]

    def generate(self, prompt: Prompt | list[Prompt], max_new_tokens: int = 256, **sampling) -> str | list[str]:
        """The answer to one prompt, or to each of a list of prompts (decoded one after another). sampling:
        temperature, top_p, top_k, seed (greedy by default: the same text as ar)."""
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], dict):
            return [self.generate(p, max_new_tokens, **sampling) for p in prompt]
        return "".join(self.stream(prompt, max_new_tokens, **sampling))

    def close(self) -> None:
        self.decoder.close()

    def __enter__(self) -> "TextDecoder":
        return self

    def __exit__(self, *exc) -> None:
        self.decoder.__exit__(*exc)
