"""Typed errors with stable codes; every failure a user sees carries one."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError


class EdgevlError(Exception):
    """An error with a stable machine-readable ``code`` and a human message."""

    code = "internal_error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class ImageError(EdgevlError):
    """The image cannot be used: codes ``image_empty``, ``image_unreadable``,
    ``unsupported_format``, ``image_too_large``, ``crop_outside_image``."""

    code = "image_unreadable"


class ModelError(EdgevlError):
    """The model cannot be found or loaded."""

    code = "model_unavailable"


class AnswerError(EdgevlError):
    """One question's answer could not be turned into its type (the record is kept)."""

    code = "answer_invalid"


class ConfigError(EdgevlError):
    """Configuration or rules are invalid."""

    code = "config_invalid"


class InputError(EdgevlError):
    """An input cannot be taken as it is: codes ``not_a_regular_file``, ``file_too_large``,
    ``file_unreadable``."""

    code = "file_unreadable"


class StateError(EdgevlError):
    """The state directory cannot be used: a fault of the appliance, not of an input."""

    code = "state_unusable"


# pydantic's wording, in words for the person editing the file; {ctx} fields come from the error.
_PLAIN = {
    "int_parsing": "must be a whole number",
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be text in quotes",
    "path_type": "must be a path in quotes",
    "tuple_type": "must be a list, e.g. [\"…\"]",
    "list_type": "must be a list, e.g. [\"…\"]",
    "model_type": "must be a table",
    "dict_type": "must be a table",
    "byte_size": 'must be a size such as "10GiB" or "500MB"',
    "byte_size_unit": 'must be a size such as "10GiB" or "500MB"',
    "greater_than": "must be greater than {gt}",
    "greater_than_equal": "must be at least {ge}",
    "less_than": "must be less than {lt}",
    "less_than_equal": "must be at most {le}",
    "too_short": "needs at least {min_length} item(s)",
    "too_long": "takes at most {max_length} item(s)",
    "string_too_short": "must not be empty",
    "string_too_long": "is longer than {max_length} characters",
}
_LIST_OF = {"folders": "must be a list of folder paths, e.g. [\"/srv/inbox\"]",
            "patterns": "must be a list of file name patterns, e.g. [\"*.jpg\"]",
            "topics": "must be a list of MQTT topics, e.g. [\"factory/+/frame\"]",
            "options": "must be a list of the possible answers, e.g. [\"A\", \"B\"]"}
_NAMED_LISTS = {"rule": "name", "question": "id"}  # lists whose items are best named by these keys


def _fields_at(model: Any, loc: tuple[str | int, ...]) -> dict[str, Any]:
    """The fields (by TOML name) of the model at ``loc`` inside ``model``, or {} when it is not a model."""
    for part in loc:
        if isinstance(part, int):
            continue
        fields = {(f.alias or name): f for name, f in getattr(model, "model_fields", {}).items()}
        field = fields.get(part)
        if field is None:
            return {}
        model = model_in(field.annotation)
        if model is None:
            return {}
    return {(f.alias or name): f for name, f in getattr(model, "model_fields", {}).items()}


def model_in(annotation: Any) -> Any:
    """The pydantic model an annotation holds (``Rule``, ``tuple[Rule, ...]``, ``Calibration | None``), or None."""
    if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = model_in(arg)
        if found is not None:
            return found
    return None


def _where(loc: tuple[str | int, ...], raw: Any) -> str:
    """``rule "weld-seam", question "defect": alarm_abvoe`` or ``model.memory_limit``."""
    named: list[str] = []
    keys: list[str] = []
    node = raw
    for part in loc:
        if isinstance(part, int):
            item = node[part] if isinstance(node, list) and part < len(node) else None
            label = keys[-1] if keys else "item"
            name_key = _NAMED_LISTS.get(label)
            name = item.get(name_key) if isinstance(item, dict) and name_key else None
            if name_key and isinstance(name, str):
                keys.pop()
                named.append(f'{" ".join([".".join(keys), label]).strip()} "{name}"')
                keys = []
            else:
                keys[-1:] = [f"{label}[{part}]"]
            node = item
        else:
            keys.append(part)
            node = node.get(part) if isinstance(node, dict) else None
    return ", ".join([*named, ".".join(keys)] if keys else named) or "(top level)"


def _plain(err: Any, fields: dict[str, Any], last: str) -> str:
    kind = err["type"]
    if kind == "missing":
        return f'"{last}" is missing'
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(last, list(fields), n=1, cutoff=0.6)
        hint = f' — did you mean "{close[0]}"?' if close else (f" (keys: {', '.join(fields)})" if fields else "")
        return f'unknown key "{last}"{hint}'
    if kind in ("tuple_type", "list_type") and last in _LIST_OF:
        return _LIST_OF[last]
    if kind == "literal_error":
        return f"must be one of: {err.get('ctx', {}).get('expected', '').replace(chr(39), '')}"
    if kind == "string_pattern_mismatch":
        return "has characters that are not allowed: letters, digits, '_', '.' and '-', starting with a letter or digit"
    if kind == "value_error":
        return str(err["msg"]).removeprefix("Value error, ")
    text = _PLAIN.get(kind)
    if text is None:
        return str(err["msg"])
    try:
        return text.format(**err.get("ctx", {}))
    except (KeyError, IndexError):
        return str(err["msg"])


def _line_of(text: str | None, key: str) -> int | None:
    """The line that sets ``key``, when the file sets it exactly once."""
    if not text or not key:
        return None
    hits = [m.start() for m in re.finditer(rf'^[ \t]*"?{re.escape(key)}"?[ \t]*=', text, re.MULTILINE)]
    return text.count("\n", 0, hits[0]) + 1 if len(hits) == 1 else None


def format_validation_error(path: Path, exc: ValidationError, raw: Any = None, model: Any = None,
                            text: str | None = None, env: dict[tuple[str, ...], str] | None = None) -> list[str]:
    """One line per mistake, in plain words: ``file[:line]: where: what``.

    ``raw`` (the parsed file) names list items by their name (``rule "weld-seam"``), ``model`` offers
    the key meant by a misspelt one, ``text`` gives line numbers, and ``env`` (key path → variable)
    names an environment variable instead of the file for values that came from it.
    """
    errors = exc.errors()
    locs = [tuple(e["loc"]) for e in errors]
    lines = []
    for err, loc in zip(errors, locs, strict=True):
        if any(other != loc and other[:len(loc)] == loc for other in locs):
            continue  # a list failing because an item failed: the item's message says it all
        keys = tuple(str(p) for p in loc if not isinstance(p, int))
        last = keys[-1] if keys else ""
        message = _plain(err, _fields_at(model, loc[:-1]) if model is not None else {}, last)
        variable = (env or {}).get(tuple(k.lower() for k in keys))
        if variable:
            lines.append(f"{variable} (environment variable): {message}")
            continue
        line = _line_of(text, last) if loc and isinstance(loc[-1], str) else None
        # An unknown key is named in the message; where it is, is the table holding it.
        named_in_message = err["type"] in ("extra_forbidden", "missing")
        where = _where(loc[:-1] if named_in_message else loc, raw)
        where = "" if where == "(top level)" else f"{where}: "
        lines.append(f"{path}{f':{line}' if line else ''}: {where}{message}")
    return lines
