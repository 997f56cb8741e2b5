"""What every setting's value must be: the checks and bounds shared by the settings' groups.

A value that passes here cannot fail later in some thread: text is printable and bounded,
numbers are finite (``allow_inf_nan=False``), paths are usable, names fit in a topic.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, field_validator

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
#: Longest path or other free text a setting takes (Linux's PATH_MAX).
MAX_TEXT = 4096
#: Largest ROI coordinate, in pixels: far beyond any frame, far below float overflow in round().
MAX_PIXELS = 100_000
#: MQTT encodes a user name or password with a 16-bit length.
MQTT_MAX_BYTES = 65_535
_T = TypeVar("_T")


def check_names(value: dict[str, _T], kind: str) -> dict[str, _T]:
    """Camera and ROI names end up in topics: letters, digits, '-' and '_' only."""
    for name in value:
        if not re.fullmatch(NAME_PATTERN, name):
            raise ValueError(f"{kind} name {name[:64]!r} must be letters, digits, '-' or '_'")
    return value


def check_text(value: Any) -> Any:
    """Refuse blank text, control characters and undecodable bytes (surrogates): they would
    break a path, topic, URL or paho's UTF-8 encoding later, in some thread."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("is empty: give a value, or leave the variable out")
        if not value.isprintable():
            raise ValueError("has control characters or bytes that are not UTF-8")
    return value


def check_path(value: Any) -> Any:
    """A path setting: bounded, and usable text."""
    if isinstance(value, str) and len(value) > MAX_TEXT:
        raise ValueError(f"is longer than {MAX_TEXT} characters")
    return check_text(value)


FilePath = Annotated[Path, BeforeValidator(check_path)]


def fraction(value: Any) -> Any:
    """``1/127.5`` (text) to its value, so a scale can be written as the model's docs give it;
    any other value passes unchanged (and is checked as a number later)."""
    if isinstance(value, str) and "/" in value:
        top, _, bottom = value.partition("/")
        try:
            numerator, denominator = float(top), float(bottom)
        except ValueError:
            raise ValueError("give a number or a fraction such as 1/127.5") from None
        if denominator == 0 or not math.isfinite(numerator / denominator):
            raise ValueError("give a number or a fraction such as 1/127.5 (finite, not /0)")
        return numerator / denominator
    return value


def check_mqtt_string(text: str) -> str:
    """A user name or password: MQTT sends it with a 16-bit length (paho fails otherwise)."""
    if len(check_text(text).encode()) > MQTT_MAX_BYTES:
        raise ValueError(f"is longer than the {MQTT_MAX_BYTES} bytes MQTT allows")
    return text


class Group(BaseModel):
    """A group of settings: frozen, no unknown keys, finite numbers, usable text and paths."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    #: Whether a path setting must name an existing file now, or is checked when used.
    paths_must_exist: ClassVar[bool] = True

    @field_validator("*")
    @classmethod
    def _usable(cls, value: Any) -> Any:
        if isinstance(value, Path):
            try:  # stat() raises for a too long name, which would end a thread later
                problem = "is a directory: give the path of a file" if value.is_dir() else ""
                if not problem and cls.paths_must_exist and not value.is_file():
                    problem = "does not exist or is not a file"
            except OSError as exc:
                problem = f"cannot be used ({exc.strerror})"
            if problem:
                raise ValueError(problem)
        return check_text(value)
