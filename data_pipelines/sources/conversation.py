"""LLaVA / ShareGPT4V conversation JSON -> records `{'id', 'image', 'turns'}`.

    [{"id": ..., "image": "relative/path.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nWhat is ..."}, {"from": "gpt", "value": "..."}]}]

Stage I captions (ShareGPT4V) and stage III VQA/OCR conversations (LLaVA-1.5's mixture). Records
without an image (LLaVA's text-only conversations) are skipped with reason 'no_image': every
example of the batch contract shows an image.

`GroundedConversationSource` adds per-image detector boxes (GLIPv2-style) and OCR word boxes,
which the stage III task writes into the answers (SPEC §5.3). Their files map an image name to
its boxes, pixel (x1, y1, x2, y2):

    detections.json: {"path.jpg": [{"label": "cup", "box": [x1, y1, x2, y2], "score": 0.83}, ...]}
    ocr.json:        {"path.jpg": [{"text": "STOP", "box": [x1, y1, x2, y2]}, ...]}
"""

from __future__ import annotations

from typing import Any

from data_pipelines import text
from data_pipelines.example import ExampleError
from data_pipelines.sources import files
from data_pipelines.tasks import Detection

ROLES = (text.HUMAN_ROLE, text.GPT_ROLE)


def parse_turns(conversations: Any) -> list[tuple[str, str]]:
    """`[{from, value}]` -> `[(role, text)]`; anything else is a counted bad record."""
    if not isinstance(conversations, list) or not conversations:
        raise ExampleError("bad_record", "'conversations' must be a non-empty list")
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise ExampleError("bad_record", f"turn {i} must be {{'from': 'human'|'gpt', 'value': str}}, got {str(turn)[:80]}")
        turns.append((turn["from"], turn["value"]))
    return turns


class ConversationSource:
    """Conversation JSON (a list, or JSON Lines) + image directory."""

    def __init__(self, annotations: str, image_root: str):
        self._records = files.read_records(annotations, "conversation annotations")
        self.image_root = files.require_dir(image_root, "conversation image root")

    def __len__(self) -> int:
        return len(self._records)

    def read(self, index: int) -> tuple[dict, dict]:
        """(raw record, decoded record) of entry `index`."""
        raw = files.decode_record(self._records[index])
        turns = parse_turns(raw.get("conversations"))
        image = files.load_image(files.image_path(self.image_root, raw.get("image")))
        return raw, {"id": str(raw.get("id", index)), "image": image, "turns": turns}

    def __getitem__(self, index: int) -> dict:
        return self.read(index)[1]


def _boxes_by_image(path: str | None, what: str, phrase_key: str) -> dict[str, list[Detection]]:
    """An image -> detections file; malformed entries are left out (they only mean fewer boxes)."""
    if path is None:
        return {}
    doc = files.load_json(path, what)
    if not isinstance(doc, dict):
        raise ValueError(f"{what}: {path} must map image names to lists of boxes")
    out: dict[str, list[Detection]] = {}
    for image, items in doc.items():
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict) and isinstance(item.get(phrase_key), str) and isinstance(item.get("box"), list):
                score = item.get("score", 1.0)
                out.setdefault(image, []).append(
                    Detection(item[phrase_key], tuple(item["box"]), float(score) if isinstance(score, (int, float)) else 0.0)
                )
    return out


class GroundedConversationSource(ConversationSource):
    """Conversations plus the detector and OCR boxes of their images: records gain 'detections'."""

    def __init__(self, annotations: str, image_root: str, detections: str | None = None, ocr: str | None = None):
        super().__init__(annotations, image_root)
        if detections is None and ocr is None:
            raise ValueError("a grounded conversation source needs a detections file, an OCR file or both")
        self._detections = _boxes_by_image(detections, "detections file", "label")
        self._ocr = _boxes_by_image(ocr, "OCR file", "text")

    def __getitem__(self, index: int) -> dict:
        raw, record = self.read(index)
        name = raw["image"]
        record["detections"] = self._detections.get(name, []) + self._ocr.get(name, [])
        return record
