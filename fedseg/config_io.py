"""Reading TOML config files into pydantic models, with one-line errors.

Shared by the server and the client CLIs (which must not import each other's code).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from fedseg.errors import FedsegError

T = TypeVar("T", bound=BaseModel)


def load_toml(path: str | Path, model: type[T]) -> T:
    p = Path(path)
    if not p.is_file():
        raise FedsegError(f"{p}: config file not found")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as err:
        raise FedsegError(f"{p}: not valid TOML ({err})") from None
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(x) for x in first["loc"]) or "(root)"
        raise FedsegError(f"{p}: field '{field}': {first['msg']}") from None
