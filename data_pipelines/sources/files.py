"""File access shared by the sources: annotation files -> per-record JSON, image files -> pixels.

Annotation files are split into one encoded JSON document per record at construction, so a
malformed record fails only when it is accessed (and is counted), while a file that cannot be
read at all fails at once with the path in the message.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from PIL import Image

from data_pipelines import anyres
from data_pipelines.example import ExampleError


def require_file(path: str, what: str) -> str:
    """`path` if it is an existing file, else a configuration error naming `what`."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no such file {path!r}")
    return path


def require_dir(path: str, what: str) -> str:
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: no such directory {path!r}")
    return path


def load_json(path: str, what: str) -> Any:
    """The whole JSON document at `path`; unreadable or unparsable -> ValueError with the path."""
    require_file(path, what)
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what}: {path} is not valid JSON ({e})") from e


def read_records(path: str, what: str) -> list[bytes]:
    """One encoded JSON document per record, from a `.json` list or a `.jsonl` file.

    A `.jsonl` line that does not parse is kept as is and fails (counted) when accessed.
    """
    require_file(path, what)
    if path.endswith(".jsonl"):
        with open(path, "rb") as f:
            return [line for line in (raw.strip() for raw in f) if line]
    doc = load_json(path, what)
    if not isinstance(doc, list):
        raise ValueError(f"{what}: {path} must hold a JSON list of records, got {type(doc).__name__}")
    return [json.dumps(r).encode() for r in doc]


def decode_record(raw: bytes) -> dict:
    """One record back from `read_records`; anything but a JSON object is a bad record."""
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExampleError("bad_record", f"record is not valid JSON: {e}") from e
    if not isinstance(record, dict):
        raise ExampleError("bad_record", f"record must be a JSON object, got {type(record).__name__}")
    return record


def field(record: dict, key: str, kind: type | tuple[type, ...]) -> Any:
    """`record[key]` checked against `kind`; missing or mistyped -> a counted bad record."""
    if key not in record:
        raise ExampleError("bad_record", f"record has no {key!r} (keys: {sorted(record)[:8]})")
    value, kinds = record[key], kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ExampleError("bad_record", f"record field {key!r} has type {type(value).__name__}")
    return value


def image_path(root: str, name: Any) -> str:
    """`root/name`, refusing names that are not relative paths inside `root`."""
    if not isinstance(name, str) or not name:
        raise ExampleError("no_image", f"record names no image file ({name!r})")
    if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
        raise ExampleError("bad_record", f"image name {name!r} must be a relative path inside the image root")
    return os.path.join(root, name)


def load_image(path: str) -> np.ndarray:
    """uint8 `[H, W, 3]` pixels of an image file; missing or undecodable -> reason 'bad_image'."""
    try:
        with Image.open(path) as im:
            im.load()
            return anyres.to_rgb(im)
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
        raise ExampleError("bad_image", f"cannot read image {path}: {e}") from e
