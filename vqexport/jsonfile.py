"""Reading a JSON object from a file with every problem a one-line error."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import VQExportError


def read_json_object(path: Path) -> dict:
    return read_json(path, dict, "a JSON object at the top level")


def read_json(path: Path, kind: type, expected: str):
    """The JSON value in ``path``, which must be a ``kind`` (``expected`` says what, in the error)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise VQExportError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    except json.JSONDecodeError as e:
        raise VQExportError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); expected {expected}") from None
    if not isinstance(raw, kind):
        raise VQExportError(f"{path}: expected {expected}")
    return raw
