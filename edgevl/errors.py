"""Typed errors with stable codes; every failure a user sees carries one."""

from __future__ import annotations

from pathlib import Path

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


def format_validation_error(path: Path, exc: ValidationError, aliases: dict[str, str] | None = None) -> list[str]:
    """One line per error: ``file: key.path: message`` with the TOML names of the keys."""
    lines = []
    for err in exc.errors():
        parts: list[str] = []
        for loc in err["loc"]:
            if isinstance(loc, int):
                parts[-1:] = [f"{parts[-1]}[{loc}]"] if parts else [f"[{loc}]"]
            else:
                parts.append((aliases or {}).get(str(loc), str(loc)))
        key = ".".join(parts) or "(top level)"
        lines.append(f"{path}: {key}: {err['msg']}")
    return lines
