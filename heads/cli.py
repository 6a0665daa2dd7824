"""`entry_point`: the one wrapper around `hydra.main` every command uses, so that whatever goes wrong the user
sees one line, never a secret.

- Hydra's own errors (an unknown group choice such as `head=foo`, an unknown key, a malformed override)
  become `error: ...` and exit 2 instead of Hydra's multi-line message and exit 1.
- The config is checked against the command's typed options (heads/schema.py, heads/config.py) before the command starts,
  and the command receives the checked options (not the raw DictConfig): nothing validates twice.
- An unexpected exception is printed with secrets (Hub tokens) scrubbed, never with Hydra's
  "Error executing job with overrides: [...]" banner, which would echo a `token=` override.
- Ctrl-C ends with one line (the command's own `finally` blocks stop any processes it started); so does
  SIGTERM for a command that asks for it (`sigterm=True`: train, whose last checkpoint a resume continues).
- An unknown flag (`--bogus`) is one line and exit 2, not Hydra's usage; `token=` is refused beside the flags
  that make Hydra write or print the config (`-m` writes multirun.yaml, `--cfg` prints it): secrets stay in memory.
- A full disk met anywhere is one line.
- `--help` lists the command's own options, one line each (heads/help.py).
"""

from __future__ import annotations

import functools
import importlib.resources
import os
import re
import signal
import sys
import traceback
from pathlib import Path

from heads.errors import UserError
from heads.files import is_disk_full
from heads.config import Options, validate

INTERRUPTED = 130  # the shell's code for a process ended by SIGINT
TERMINATED = 143   # ... and by SIGTERM
# Hydra flags after which the config (overrides included) is written to disk or printed.
_CONFIG_SHOWN = ("-m", "--multirun", "-c", "--cfg", "-i", "--info", "hydra.mode=MULTIRUN")
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
    std = sys.modules.get("tqdm.std")  # an open progress bar ends without a newline: close it, so the error
    for bar in list(getattr(getattr(std, "tqdm", None), "_instances", ())):  # starts a line of its own
        bar.close()
    print(f"error: {scrub(message, cfg)}", file=sys.stderr, flush=True)
    sys.exit(code)


class Terminated(BaseException):
    """SIGTERM, raised where the process is so that `finally` blocks run (a BaseException, as KeyboardInterrupt
    is: no `except Exception` swallows it)."""


def _terminate(signum, frame):
    raise Terminated()


def config_dir() -> Path:
    """Hydra's configs: installed with the package as heads/conf (pyproject's package data), or conf/ beside the
    packages in a source checkout."""
    package = Path(str(importlib.resources.files("heads")))
    for folder in (package / "conf", package.parent / "conf"):
        if (folder / "train.yaml").is_file():
            return folder
    raise UserError(f"no configs in {package / 'conf'} nor {package.parent / 'conf'}: reinstall ppsd (pip install .)")


def check_command_line(argv: list[str], config_name: str) -> None:
    """What Hydra would answer with its usage text or write to disk, as one line: an unknown flag, or `token=`
    beside a flag that saves (-m) or prints (--cfg, --info) the config."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    usage = f"options are key=value (the keys of conf/{config_name}.yaml), flags Hydra's own (see --help)"

    def refuse(message):
        raise UserError(f"{message}: {usage}")

    parser.error = refuse  # argparse would print its usage and exit
    unknown = [a for a in parser.parse_known_args(argv)[1] if a.startswith("-")]
    if unknown:
        raise UserError(f"unknown flag {unknown[0]}: {usage}")
    if any(_TOKEN_ARG.match(a) for a in argv) and any(a in _CONFIG_SHOWN or a.startswith(("--cfg=", "--info="))
                                                      for a in argv):
        raise UserError("token= cannot be combined with -m, --cfg or --info: Hydra would write or print it; "
                        "set HF_TOKEN (or run `hf auth login`) instead")


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


def entry_point(config_name: str, options: type[Options] | None, *, one_line_errors: bool = False, sigterm: bool = False):
    """Decorate a command's `main(cfg)`: `hydra.main` with validation and one-line errors around it; `main`
    receives the checked `options` (or the DictConfig where `options` is None).

    one_line_errors: print any failure as one line (export: nothing it can fail on needs a traceback, and a
    traceback might show the token passed to the Hub client).
    sigterm: end on SIGTERM as on Ctrl-C (unwinding, one line, exit 143) instead of dying silently."""
    import hydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    def decorate(task):
        @functools.wraps(task)  # Hydra finds the config folder and job name from the wrapped function
        def job(cfg):
            _run_task(task, cfg, options, one_line_errors)

        run_hydra = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)(job)

        @functools.wraps(task)
        def main():
            # Hydra re-raises its composition errors to us instead of printing them (and exit 1) itself.
            os.environ["HYDRA_FULL_ERROR"] = "1"
            if sigterm:
                signal.signal(signal.SIGTERM, _terminate)
            if {"-h", "--help"} & set(sys.argv[1:]):  # this command's options, not Hydra's app-wide help
                _print_help(config_name, task)
            try:
                check_command_line(sys.argv[1:], config_name)
                run_hydra()
            except UserError as e:
                fail(str(e), 2)
            except (HydraException, OmegaConfBaseException) as e:
                fail(_hydra_message(e, config_name), 2)
            except KeyboardInterrupt:
                fail("interrupted (Ctrl-C): stopped", INTERRUPTED)
            except Terminated:
                fail("terminated (SIGTERM): stopped", TERMINATED)

        main.task = task  # the undecorated command, for tests and for callers that compose their own config
        return main

    return decorate


def _run_task(task, cfg, options: type[Options] | None, one_line_errors: bool) -> None:
    """Run the command on its checked options; every failure ends as one line (or a scrubbed traceback)."""
    try:
        task(cfg if options is None else validate(cfg, options))
    except UserError as e:
        fail(str(e), 2, cfg)
    except KeyboardInterrupt:
        fail("interrupted (Ctrl-C): stopped", INTERRUPTED, cfg)
    except Terminated:
        fail("terminated (SIGTERM): stopped", TERMINATED, cfg)
    except Exception as e:  # noqa: BLE001: caught here so Hydra's banner never echoes the overrides
        if is_disk_full(e):
            where = getattr(e, "filename", None)
            fail(f"no space left on the device{' of ' + str(where) if where else ''} "
                 f"({type(e).__name__}): free some space, or write to another disk", 1, cfg)
        if one_line_errors:
            fail(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}", 1, cfg)
        sys.stderr.write(scrub(traceback.format_exc(), cfg))
        sys.exit(1)


def _print_help(config_name: str, task) -> None:
    """`-h`: this command's options, then exit 0."""
    from heads.help import command_help

    spec = getattr(sys.modules["__main__"], "__spec__", None)  # run as -m: the module, not "__main__"
    module = spec.name if spec is not None else task.__module__
    try:
        print(command_help(config_name, f"python -m {module.removesuffix('.__main__')}"), flush=True)
    except BrokenPipeError:  # `--help | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)
