"""TrainingArguments' fields as data: their defaults, the types their annotations admit,
their help text, and text values converted to those types (the CLI flags and config files
use these, and `__post_init__` checks types with them); dict fields given as JSON and
HF's `optim_args` string parsed. Functions of the dataclass they are given, so this module
does not import `training_args.py` (which re-exports the public names).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import typing
from typing import Literal, Optional, Union

from fasttrain.training_args_choices import bad_value


def field_defaults(cls) -> dict:
    """{field name: its default} of the dataclass `cls`."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _allowed_types(annotation) -> tuple:
    """The concrete types a field annotation admits: Optional[float] -> (float,),
    Union[None, str, list[str]] -> (str, list), Literal['a', False] -> (str, bool)."""
    origin = typing.get_origin(annotation)
    if origin is Union:
        return tuple(t for a in typing.get_args(annotation) if a is not type(None)
                     for t in _allowed_types(a))
    if origin is Literal:
        return tuple(dict.fromkeys(type(a) for a in typing.get_args(annotation)))
    if origin is not None:  # list[str], dict[str, Any]
        return (origin,)
    return (annotation,) if isinstance(annotation, type) else (object,)


def field_types(cls) -> dict:
    """{field name: the types its annotation admits}, from `cls`'s resolved annotations."""
    hints = typing.get_type_hints(cls)
    return {f.name: _allowed_types(hints[f.name]) for f in dataclasses.fields(cls)}


def field_docs(cls) -> dict:
    """Each field's documentation: its `metadata["help"]`, else the string literal written
    right under it in the class body (its docstring), else the comment on its line, else its
    line in training_args_help.FIELD_HELP."""
    import ast
    import inspect
    import io
    import tokenize
    source = inspect.getsource(cls)
    comments = {tok.start[0]: tok.string.lstrip("# ").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    docs = {}
    body = ast.parse(source).body[0].body
    for node, after in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name = node.target.id
            if (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[name] = " ".join(after.value.value.split())
            elif node.lineno in comments:
                docs[name] = comments[node.lineno]
    for f in dataclasses.fields(cls):
        if f.metadata.get("help"):
            docs[f.name] = f.metadata["help"]
    from fasttrain.training_args_help import FIELD_HELP
    return {**FIELD_HELP, **docs}  # a field's own documentation wins over the table


_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def convert_value(cls, name: str, value):
    """A text value for field `name` of `cls` (a command-line flag, or a YAML/JSON config value: YAML
    reads `1e-3` and `1e2` as strings) converted to the field's type. Non-strings pass
    through for __post_init__ to validate. Raises ValueError naming the field, the value and
    the fix."""
    if not isinstance(value, str):
        return value
    kinds = field_types(cls)[name]
    text = value.strip()
    if bool in kinds and text.lower() in _TRUE + _FALSE:
        return text.lower() in _TRUE
    if int in kinds or float in kinds:
        try:
            number = float(text)
        except ValueError:
            number = None
        if number is not None:
            if float in kinds:
                return int(number) if int in kinds and number.is_integer() else number
            if not number.is_integer():
                raise bad_value(name, value, "must be a whole number")
            return int(number)
        if str not in kinds:
            raise bad_value(name, value, "must be a number (e.g. 1e-3 or 0.001)")
    if list in kinds and (str not in kinds or "," in text):
        return [item.strip() for item in text.split(",") if item.strip()]
    if kinds and all(k in (int, float, bool) for k in kinds):
        raise bad_value(name, value, f"must be {' or '.join(k.__name__ for k in kinds)}")
    return value


def check_types(args) -> None:
    """A string where a number or bool belongs fails here, by name, instead of as a raw
    TypeError deep inside the optimizer or the schedule."""
    for name, kinds in field_types(type(args)).items():
        value = getattr(args, name)
        if not isinstance(value, str) or str in kinds or object in kinds:
            continue
        try:
            fixed = convert_value(type(args), name, value)
        except ValueError:
            fixed = None
        hint = f"pass {name}={fixed!r} (a {type(fixed).__name__}, not a string)" if fixed is not None \
            else f"pass a {' or '.join(k.__name__ for k in kinds)}"
        raise bad_value(name, value, f"is a string; {hint}")


def parse_json_dict(name: str, value):
    """A dict field given as a JSON string (`'{"min_lr_rate": 0.1}'`) or a .json file path."""
    if not isinstance(value, str):
        return value
    text = value
    if not value.lstrip().startswith("{"):
        if not os.path.isfile(value):
            raise bad_value(name, value, "a dict field takes a dict, a JSON object string such as "
                            "'{\"key\": 1}', or the path of a .json file (no such file)")
        with open(value, encoding="utf-8") as f:
            text = f.read()
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as e:
        raise bad_value(name, value, f"is not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(parsed, dict):
        raise bad_value(name, value, "must be a JSON object ({...})")
    return typed_strings(parsed)


def parse_optim_args(text: Optional[str]) -> dict:
    """HF's `optim_args` ("momentum=0.9,nesterov=True") as typed keyword arguments."""
    pairs = {}
    for item in filter(None, (text or "").replace(" ", "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise bad_value("optim_args", text, "write 'key=value,key=value', e.g. 'momentum=0.9,nesterov=True'")
        pairs[key] = value
    return typed_strings(pairs, signed=True)


def typed_strings(values: dict, signed: bool = False) -> dict:
    """As HF: string values from a command line that spell a bool or a number become one
    (`signed`: also negative numbers and exponents, as optim_args needs)."""
    out = {}
    for key, v in values.items():
        if isinstance(v, dict):
            v = typed_strings(v, signed)
        elif isinstance(v, str) and v.lower() in ("true", "false"):
            v = v.lower() == "true"
        elif isinstance(v, str) and v.isdigit():
            v = int(v)
        elif isinstance(v, str) and v.replace(".", "", 1).isdigit():
            v = float(v)
        elif signed and isinstance(v, str):
            with contextlib.suppress(ValueError):
                v = int(v) if v.lstrip("-").isdigit() else float(v)
        out[key] = v
    return out
