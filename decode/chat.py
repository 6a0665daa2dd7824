"""`python -m decode interactive=true`: a chat on the terminal (or on piped stdin, a prompt per line), each
answer streamed as it is verified, with the method, tokens/s and acceptance live on a terminal and after
every answer.

    python -m decode interactive=true method=ppsd head_path=HEAD     # type a message, Enter; /reset, /exit
    printf 'Hi!\nAnd in French?\n' | python -m decode interactive=true method=ar
"""

from __future__ import annotations

import sys
import time

from decode.text import TextDecoder
from heads.errors import UserError

DIM, RESET = "\x1b[2m", "\x1b[0m"
# After each piece on a terminal: clear what follows the cursor, write the piece, save the cursor, show the
# figures in dim after it, go back to the saved cursor (the next piece overwrites the figures).
CLEAR_BELOW, SAVE, RESTORE = "\x1b[J", "\x1b7", "\x1b8"


def figures_line(method: str, tokens: int, seconds: float, generation=None) -> str:
    """`ppsd · 64 tokens · 21.3 tokens/s · α 0.41` (α: drafts accepted / drafts verified; ar has none)."""
    parts = [method, f"{tokens} tokens", f"{tokens / seconds:.1f} tokens/s" if seconds > 0 else "- tokens/s"]
    if generation is not None and generation.acceptance_rate is not None:
        parts.append(f"α {generation.acceptance_rate:.2f}")
    return " · ".join(parts)


def answer(dec: TextDecoder, messages: list[dict], cfg, out=sys.stdout) -> str:
    live = out.isatty()
    start, count, pieces = time.perf_counter(), 0, []
    for piece in dec.stream(messages, cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            top_k=cfg.top_k, seed=cfg.seed):
        count += 1
        pieces.append(piece)
        if live:
            status = figures_line(dec.method, count, time.perf_counter() - start)
            out.write(f"{CLEAR_BELOW}{piece}{SAVE}  {DIM}[{status}]{RESET}{RESTORE}")
        else:
            out.write(piece)
        out.flush()
    gen = dec.last_generation
    out.write(f"{CLEAR_BELOW}\n" if live else "\n")
    # the final figures are the decoder's own: from its first prefill op to its last token
    out.write(f"[{figures_line(dec.method, gen.new_tokens, gen.wall_time, gen)}]\n")
    out.flush()
    return "".join(pieces)


def chat(cfg, stdin=sys.stdin, out=sys.stdout) -> None:
    """Read prompts (a line each; the conversation carries on until /reset), answer each as it streams."""
    dec = TextDecoder.from_pretrained(
        cfg.head_path, method=cfg.method, model=cfg.model, device=cfg.device, dtype=cfg.dtype,
        compile=cfg.compile, batch_invariant=cfg.batch_invariant, threads=cfg.threads,
        stage_threads=cfg.stage_threads, stages=cfg.stages, gamma=cfg.gamma, quiet=False, window=cfg.window,
        timeout_s=cfg.timeout_s, stage_layers=cfg.stage_layers)
    terminal = stdin.isatty()
    s = dec.settings
    print(f"{s['method']} ({s['why']}) on {s['device']}, {s['dtype']}; max_new_tokens={cfg.max_new_tokens}, "
          f"temperature={cfg.temperature}" + ("; /reset starts over, /exit or Ctrl-D ends" if terminal else ""),
          file=out, flush=True)
    messages: list[dict] = []
    with dec:
        while True:
            if terminal:
                out.write("\nyou> ")
                out.flush()
            line = stdin.readline()
            if not line:
                break
            prompt = line.strip()
            if prompt in ("/exit", "/quit"):
                break
            if prompt == "/reset":
                messages = []
                continue
            if not prompt:
                continue
            messages.append({"role": "user", "content": prompt})
            try:
                text = answer(dec, messages, cfg, out)
            except UserError as e:  # e.g. the conversation outgrew the context: say so, start over
                print(f"error: {e}; the conversation starts over", file=out, flush=True)
                messages = []
                continue
            messages.append({"role": "assistant", "content": text})
