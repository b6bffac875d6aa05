"""Reading TOML config files into pydantic models, with one-line errors.

Shared by the server and the client CLIs (which must not import each other's code).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from fedseg.errors import FedsegError, first_error

T = TypeVar("T", bound=BaseModel)


def read_toml(path: str | Path) -> dict:
    """A TOML file as a dict; a missing or malformed file is one line naming it."""
    p = Path(path)
    if not p.is_file():
        raise FedsegError(f"{p}: config file not found")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as err:
        raise FedsegError(f"{p}: not valid TOML ({err})") from None


def load_toml(path: str | Path, model: type[T]) -> T:
    p = Path(path)
    data = read_toml(p)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        field, msg = first_error(err)
        raise FedsegError(f"{p}: field '{field}': {msg}") from None


def load_json_model(path: str | Path, model: type[T], missing: str) -> T:
    """Read a JSON file into ``model``; ``missing`` is the one-line hint when it is absent."""
    p = Path(path)
    if not p.is_file():
        raise FedsegError(f"{p}: {missing}")
    try:
        return model.model_validate_json(p.read_text())
    except ValidationError as err:
        field, msg = first_error(err)
        raise FedsegError(f"{p}: field '{field}': {msg}") from None
