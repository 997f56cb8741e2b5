"""Reading the settings: the environment, a dotenv file and systemd credentials, in that order
after explicit values, and every problem turned into one line that names its variable.

Values are never echoed in errors: a wrong password must not end up in a log.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_settings import SettingsError

from edge_daemon.errors import ConfigError
from edge_daemon.settings import DELIMITER, ENV_PREFIX, Roi, Settings, credential_files


def env_name(loc: tuple[int | str, ...]) -> str:
    """The environment variable for a field location: ``("mqtt", "port")`` -> ``EDGE_MQTT__PORT``.

    Camera, ROI and label names are dictionary keys and keep their case; field names are upper
    case.
    A ROI is one variable: the location of one of its four numbers gives the ROI's.
    """
    parts: list[str] = []
    keyed = False
    for part in loc:
        text = str(part)
        parts.append(text if keyed else text.upper())
        if keyed and parts[-2] == "ROIS":
            break
        in_camera = len(parts) == 3 and parts[0] == "CAMERAS"  # a camera's own ``state``
        keyed = not keyed and (
            text in {"cameras", "rois", "thresholds"} or (text == "state" and in_camera)
        )
    name = DELIMITER.join(parts)  # an unknown one from the env file comes whole
    return name if name.startswith(ENV_PREFIX) else ENV_PREFIX + name


def _is_group(name: str) -> bool:
    """True for a variable that names a group of settings (``EDGE_MQTT``, ``EDGE_CAMERAS__door``,
    its ``ROIS``) rather than one setting; a ROI is one setting, written as text."""
    if not name.upper().startswith(ENV_PREFIX):
        return False
    kind: Any = Settings
    for part in name[len(ENV_PREFIX) :].lower().split(DELIMITER):
        if get_origin(kind) is dict:
            kind = get_args(kind)[1]
        elif isinstance(kind, type) and issubclass(kind, BaseModel) and part in kind.model_fields:
            kind = kind.model_fields[part].annotation
        else:
            return False
    is_model = isinstance(kind, type) and issubclass(kind, BaseModel) and kind is not Roi
    return is_model or get_origin(kind) is dict


_GROUP = (
    "{0}: a group of settings, not a value of its own: set them one by one as "
    "{0}__<SETTING>=value (see config/edge-daemon.env.example)"
)


def _unknown_variables(environ: Iterable[str]) -> list[str]:
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    edge = [key for key in environ if key.upper().startswith(ENV_PREFIX)]
    return sorted(key for key in edge if key.upper().split(DELIMITER)[0] not in known)


def _read_env_file(env_file: Path) -> str:
    """The text of ``env_file``, or a :class:`ConfigError` saying what it is instead."""
    try:
        if env_file.is_file():
            return env_file.read_bytes().decode("utf-8")
        problem = "is a directory" if env_file.is_dir() else "does not exist or is not a file"
    except UnicodeDecodeError:
        problem = "is not UTF-8 text"
    except OSError as exc:
        problem = f"cannot be read ({exc.strerror})"
    raise ConfigError(
        f"env file {env_file} {problem}: give the path of a UTF-8 file of "
        "EDGE_...=value lines (see config/edge-daemon.env.example)"
    )


def load_settings(env_file: Path | None = None, **overrides: Any) -> Settings:
    """Read the settings, raising :class:`ConfigError` with one line per problem.

    Sources, first wins: ``overrides``, the environment, ``env_file``, and files named like a
    variable in ``$CREDENTIALS_DIRECTORY`` (systemd's ``LoadCredential=``). Values are never
    echoed in errors: a wrong password must not end up in a log.
    """
    env = os.environ
    problems = []
    env_text = "" if env_file is None else _read_env_file(env_file)
    for key in _unknown_variables([*env, *credential_files()]):
        problems.append(
            f"{key}: unknown setting (see config/edge-daemon.env.example for the names)"
        )
    kwargs: dict[str, Any] = dict(overrides)
    if env_file is not None:
        kwargs["_env_file"] = env_file
    settings = None
    try:
        settings = Settings(**kwargs)
    except ValidationError as exc:
        for error in exc.errors(include_url=False, include_input=False):
            name = env_name(error["loc"])
            # Within a ROI, which of its numbers; a check across fields names its variable.
            rest = [str(p) for p in error["loc"][name.count(DELIMITER) + 1 :]]
            message = ": ".join([*rest, _message(error, name)])
            problems.append(message if message.startswith(name) else f"{name}: {message}")
    except SettingsError as exc:
        # pydantic-settings parses a value given to a whole group (EDGE_MQTT=x) as JSON, and
        # says only which top-level field failed: name the variables that did it.
        field = re.search(r'field "(\w+)"', str(exc))
        head = ENV_PREFIX + (field.group(1).upper() if field else "")
        in_file = re.findall(r"^\s*(?:export\s+)?([\w.-]+)\s*=", env_text, re.MULTILINE)
        names = [*env, *credential_files(), *in_file]
        groups = sorted({n for n in names if n.upper().startswith(head) and _is_group(n)})
        problems += [_GROUP.format(name) for name in groups or [head]]
    if problems:
        raise ConfigError("; ".join(problems), problems)
    assert settings is not None
    return settings


def _message(error: Any, name: str) -> str:
    msg = str(error["msg"])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if error["type"] == "extra_forbidden":
        msg = "unknown setting (see config/edge-daemon.env.example for the names)"
    if error["type"] == "missing":
        msg = "required, but not set"
    if error["type"] in {"model_type", "dict_type"} and _is_group(name):
        msg = _GROUP.format(name)
    return msg
