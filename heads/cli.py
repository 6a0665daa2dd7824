"""`entry_point`: the one wrapper around `hydra.main` every command uses, so that whatever goes wrong the user
sees one line, never a secret.

- Hydra's own errors (an unknown group choice such as `head=foo`, an unknown key, a malformed override)
  become `error: ...` and exit 2 instead of Hydra's multi-line message and exit 1.
- The config is validated against the command's schema (heads/schema.py) before the command starts.
- An unexpected exception is printed with secrets (Hub tokens) scrubbed, never with Hydra's
  "Error executing job with overrides: [...]" banner, which would echo a `token=` override.
- Ctrl-C ends with one line (the command's own `finally` blocks stop any processes it started).
"""

from __future__ import annotations

import functools
import os
import re
import sys
import traceback

from heads.errors import UserError
from heads.schema import Spec, validate

INTERRUPTED = 130  # the shell's code for a process ended by SIGINT
_TOKEN_ARG = re.compile(r"^[+~]*(?:[\w.]*\.)?token=(.+)$")


def secrets(cfg=None) -> list[str]:
    """Every Hub token this process might print: from the environment, the command line and the config."""
    found = [os.environ.get(name) for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")]
    found += [m.group(1) for arg in sys.argv[1:] if (m := _TOKEN_ARG.match(arg))]
    if cfg is not None and "token" in cfg:
        found.append(cfg.get("token"))
    return sorted({str(s) for s in found if s and str(s) not in ("null", "None")}, key=len, reverse=True)


def scrub(text: str, cfg=None) -> str:
    for secret in secrets(cfg):
        text = text.replace(secret, "***")
    return text


def fail(message: str, code: int, cfg=None) -> None:
    print(f"error: {scrub(message, cfg)}", file=sys.stderr, flush=True)
    sys.exit(code)


def _hydra_message(e: Exception, config_name: str) -> str:
    """Hydra's message on one line: its first line, plus the options it lists for an unknown group choice."""
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    first = lines[0] if lines else type(e).__name__
    if "Available options" in str(e):
        start = next(i for i, l in enumerate(lines) if l.startswith("Available options"))
        options = [l for l in lines[start + 1:] if not l.startswith(("Config search path", "provider=", "In "))]
        options = options[:next((i for i, l in enumerate(options) if ":" in l or " " in l), len(options))]
        return f"{first.rstrip('.')}: use one of {', '.join(options)}"
    unknown = re.match(r"Could not (?:override|append to) '([^']+)'", first)
    if unknown:
        key = unknown.group(1)
        return (f"'{key}' is not an option of this command: check the spelling against conf/{config_name}.yaml "
                f"(its keys, and its groups' choices)")
    return first


def entry_point(config_name: str, spec: Spec | None, *, one_line_errors: bool = False):
    """Decorate a command's `main(cfg)`: `hydra.main` with validation and one-line errors around it.

    one_line_errors: print any failure as one line (export: nothing it can fail on needs a traceback, and a
    traceback might show the token passed to the Hub client)."""
    import hydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    def decorate(task):
        @functools.wraps(task)  # Hydra finds the config folder and job name from the wrapped function
        def job(cfg):
            try:
                if spec is not None:
                    validate(cfg, spec)
                task(cfg)
            except UserError as e:
                fail(str(e), 2, cfg)
            except KeyboardInterrupt:
                fail("interrupted (Ctrl-C): stopped", INTERRUPTED, cfg)
            except Exception as e:  # noqa: BLE001: caught here so Hydra's banner never echoes the overrides
                if one_line_errors:
                    fail(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}", 1, cfg)
                sys.stderr.write(scrub(traceback.format_exc(), cfg))
                sys.exit(1)

        run_hydra = hydra.main(version_base="1.3", config_path="../conf", config_name=config_name)(job)

        @functools.wraps(task)
        def main():
            # Hydra re-raises its composition errors to us instead of printing them (and exit 1) itself.
            os.environ["HYDRA_FULL_ERROR"] = "1"
            try:
                run_hydra()
            except (HydraException, OmegaConfBaseException) as e:
                fail(_hydra_message(e, config_name), 2)
            except KeyboardInterrupt:
                fail("interrupted (Ctrl-C): stopped", INTERRUPTED)

        main.task = task  # the undecorated command, for tests and for callers that compose their own config
        return main

    return decorate
