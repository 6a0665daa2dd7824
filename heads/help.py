"""`--help` of every command: its own options, one line each, read from its conf/<name>.yaml (key, default, the
first line of the comment beside it), instead of Hydra's help, which names the app after its module file
(`__main__`) and lists every config group of the folder, other commands' included."""

from __future__ import annotations

import re
from pathlib import Path

CONF = Path(__file__).resolve().parent.parent / "conf"
_LINE = re.compile(r"^(?P<indent> *)(?P<key>[\w.]+):(?P<value>[^#]*?)\s*(?:#\s?(?P<comment>.*))?$")
_DEFAULT = re.compile(r"^\s+-\s+(?:(?P<group>\w+):\s*(?P<choice>\w+)|(?P<name>\w+))\s*(?:#\s?(?P<comment>.*))?$")
_SKIP = ("defaults", "hydra")


def _options(path: Path, prefix: str = "") -> tuple[list[str], list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """(the file's leading comment lines, [(key, default, comment)], [(group, default choice, comment)])."""
    lines = path.read_text().splitlines()
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line.lstrip("# ").rstrip())
    options, groups, parents, skipping = [], [], [], False
    in_defaults = False
    for line in lines:
        if in_defaults:
            entry = _DEFAULT.match(line)
            if entry and entry["group"] and entry["group"] != "override":
                groups.append((prefix + entry["group"], entry["choice"], entry["comment"] or ""))
            elif entry and entry["name"] and entry["name"] != "_self_":  # a config this one extends
                inherited = _options(path.parent / f"{entry['name']}.yaml", prefix)
                options += inherited[1]
                groups += inherited[2]
            if line and not line.startswith(" "):
                in_defaults = False
            else:
                continue
        match = _LINE.match(line)
        if not match:
            continue
        depth = len(match["indent"]) // 2
        parents = parents[:depth]
        key = match["key"]
        if depth == 0:
            skipping = key in _SKIP
            in_defaults = key == "defaults"
        if skipping:
            continue
        value = match["value"].strip()
        if not value:  # a block: its keys follow, indented
            parents.append(key)
            continue
        name = prefix + ".".join(parents + [key])
        options = [o for o in options if o[0] != name] + [(name, value, (match["comment"] or "").strip())]
    return header, options, groups


def command_help(config_name: str, command: str) -> str:
    header, options, groups = _options(CONF / f"{config_name}.yaml")
    lines = [f"usage: {command} [key=value ...]", ""]
    lines += [h for h in header if h] + [""]
    width = max([len(f"{k}={v}") for k, v, _ in options] + [len(f"{g}={c}") for g, c, _ in groups], default=0)
    if groups:
        lines.append("config groups (each also takes its own keys as group.key=value):")
        for group, choice, comment in groups:
            choices = "|".join(sorted(p.stem for p in (CONF / group).glob("*.yaml")))
            lines.append(f"  {f'{group}={choice}':<{width}}  one of {choices}" + (f"; {comment}" if comment else ""))
            _, group_options, _ = _options(CONF / group / f"{choice}.yaml", prefix=f"{group}.")
            lines += [f"  {f'{k}={v}':<{width}}  {c}".rstrip() for k, v, c in group_options]
        lines.append("")
        lines.append("options:")
    lines += [f"  {f'{k}={v}':<{width}}  {c}".rstrip() for k, v, c in options]
    lines += ["", "Hydra's flags work too (--cfg job prints the composed config); docs/reference.md explains every option."]
    return "\n".join(lines)
