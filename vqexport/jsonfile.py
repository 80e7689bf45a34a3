"""Reading a JSON object from a file with every problem a one-line error."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import VQExportError


def read_json_object(path: Path) -> dict:
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise VQExportError(f"{path}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise VQExportError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(raw, dict):
        raise VQExportError(f"{path}: expected a JSON object at the top level")
    return raw
