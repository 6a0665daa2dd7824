"""Typed options for the entry points: the value types every command shares, the `Options` base (strict, no
unknown keys, frozen), and `validate(cfg, Model)`, which checks a composed Hydra config once and returns the
typed options, or raises a one-line `UserError` for the first bad key. The models themselves, one per command,
are in heads/schema.py.

The defaults and their documentation stay in conf/*.yaml (Hydra composes them); the models hold no defaults, so
a key dropped from conf/ is a one-line error, not a silent fallback.
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Literal, Union

from annotated_types import Ge, Gt, Le, Lt, MinLen
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
from pydantic import BaseModel, BeforeValidator, ConfigDict, StringConstraints, ValidationError

from heads.errors import UserError

# ---------------------------------------------------------------- the value types


def _number_as_text(value):
    """A folder or a name may well look like a number (Hydra reads `out_dir=2024` as an int)."""
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _lower(value):
    return value.lower() if isinstance(value, str) else value


Text = Annotated[str, BeforeValidator(_number_as_text), MinLen(1)]
Auto = Annotated[Literal["auto"], BeforeValidator(_lower)]
Count = Annotated[int, Ge(1)]                  # a count of at least one
Natural = Annotated[int, Ge(0)]
Fraction = Annotated[float, Ge(0), Le(1)]
Positive = Annotated[float, Gt(0)]
Millis = Annotated[float, Ge(0)]
Device = Annotated[str, StringConstraints(pattern=r"^(cpu|cuda(:\d+)?)$")] | Auto | None
Threads = Count | Auto | None


def nonempty(item) -> Any:
    return Annotated[list[item], MinLen(1)]


class Options(BaseModel):
    """Strict: an int is not a bool nor "3"; an unknown key is an error (Hydra refuses most of them first)."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


# ---------------------------------------------------------------- the keys and their one-line description


def options(model: type[Options], prefix: str = "") -> dict[str, Any]:
    """Every key of `model` (dotted, nested options walked) -> its annotation (constraints included)."""
    keys = {}
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, Options):
            keys |= options(field.annotation, f"{prefix}{name}.")
        else:
            keys[prefix + name] = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    return keys


def alternatives(annotation) -> list:
    """The members of a union (a plain type is its own one member), constraints kept on each."""
    if typing.get_origin(annotation) is Annotated:
        inner, *meta = typing.get_args(annotation)
        if typing.get_origin(inner) in (Union, types.UnionType):
            return [Annotated[(a, *meta)] for a in typing.get_args(inner)]
        return [annotation]
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in alternatives(a)]
    return [annotation]


def unwrap(annotation) -> tuple[Any, list]:
    """(the bare type, its constraints)."""
    meta = []
    while typing.get_origin(annotation) is Annotated:
        annotation, *more = typing.get_args(annotation)
        meta = more + meta
    return annotation, meta


def describe(annotation) -> str:
    """What a key takes, in words: "an integer >= 1 (or auto or null)"."""
    words, extras = [], []
    for member in alternatives(annotation):
        bare, meta = unwrap(member)
        if bare is type(None):
            extras.append("null")
        elif typing.get_origin(bare) is Literal and typing.get_args(bare) == ("auto",):
            extras.append("auto")
        elif typing.get_origin(bare) is Literal:
            words.append("one of " + ", ".join(map(str, typing.get_args(bare))))
        elif typing.get_origin(bare) is list:
            item = describe(typing.get_args(bare)[0]).removeprefix("an ").removeprefix("a ")
            words.append(f"a{' non-empty' if any(isinstance(m, MinLen) for m in meta) else ''} list of {item}")
        elif typing.get_origin(bare) is dict:
            key, value = (describe(a).removeprefix("an ").removeprefix("a ") for a in typing.get_args(bare))
            words.append(f"a mapping from {key} to {value}")
        elif bare is bool:
            words.append("true or false")
        elif bare in (int, float):
            bounds = [f"{sign} {getattr(m, attr):g}" for m in meta for cls, attr, sign in
                      ((Ge, "ge", ">="), (Gt, "gt", ">"), (Le, "le", "<="), (Lt, "lt", "<")) if isinstance(m, cls)]
            words.append(f"{'an integer' if bare is int else 'a number'} {' and '.join(bounds)}".strip())
        elif any(isinstance(m, StringConstraints) for m in meta):
            words.append("cpu, cuda or cuda:N")
        else:
            words.append("a text value")
    text = " or ".join(words) if len(words) < 3 else ", ".join(words)
    return text + (f" (or {' or '.join(extras)})" if extras else "")


# ---------------------------------------------------------------- validation


def _shown(value) -> str:
    return "null" if value is None else str(value).replace("\n", " ")


def _plain(cfg, name: str) -> dict:
    """The config as plain values, interpolations resolved; a missing mandatory value (`???`) or one that
    cannot be resolved is a one-line error."""
    if not OmegaConf.is_config(cfg):
        return dict(cfg)
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        key = e.full_key or "a value"
        raise UserError(f"{key} is required: pass {key}=<value>") from None
    except OmegaConfBaseException as e:
        key = e.full_key or name
        raise UserError(f"{key} cannot be read ({str(e).splitlines()[0]}): check its value") from None


def _first_error(model: type[Options], values: dict, error: dict) -> UserError:
    """The first error pydantic found, as one line about the key it is in."""
    loc, keys, cls, value = list(error["loc"]), [], model, values
    while loc and isinstance(cls, type) and issubclass(cls, Options) and loc[0] in cls.model_fields:
        name = loc.pop(0)
        keys.append(name)
        value = value.get(name) if isinstance(value, dict) else None
        cls = cls.model_fields[name].annotation
    key = ".".join(keys)
    annotation = options(model).get(key)
    if error["type"] == "extra_forbidden" or annotation is None:
        return UserError(f"'{'.'.join(map(str, error['loc']))}' is not an option of this command: check its spelling "
                         "against conf/")
    if error["type"] == "missing":
        return UserError(f"{key} is missing from the config: restore it in conf/ (it takes {describe(annotation)})")
    choices = [typing.get_args(unwrap(a)[0]) for a in alternatives(annotation)
               if typing.get_origin(unwrap(a)[0]) is Literal]
    noun = model_field(model, key).title
    if noun and isinstance(value, str) and choices:
        return UserError(f"unknown {noun} '{value}' ({key}={value}): use {describe(annotation)}")
    return UserError(f"{key}={_shown(value)} is not valid: {key} takes {describe(annotation)}")


def model_field(model: type[Options], key: str):
    *parents, name = key.split(".")
    for parent in parents:
        model = model.model_fields[parent].annotation
    return model.model_fields[name]


def validate(cfg, model: type[Options]) -> Options:
    """Check `cfg` (a DictConfig or a dict) against `model`; returns the checked, typed options. Raises a
    one-line UserError for the first bad key, or the first cross-key check that fails."""
    values = _plain(cfg, model.__name__)
    try:
        checked = model.model_validate(values)
    except ValidationError as e:
        raise _first_error(model, values, e.errors()[0]) from None
    from heads.hardware import check_device

    device = getattr(checked, "device", None)  # a well-formed device this machine cannot run: its own one line
    if device not in (None, "auto"):
        check_device(device)
    return checked
