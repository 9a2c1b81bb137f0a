"""What every config section shares: field help text, one-line value checks, the shape of a name."""

from __future__ import annotations

import re
from typing import Any

from antinet_npu import AntinetError

SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # model, recipe and run names: they become file names


def doc(text: str) -> Any:
    return {"help": text}


def require(ok: bool, message: str) -> None:
    if not ok:
        raise AntinetError(message)
