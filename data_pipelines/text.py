"""Ferret text format: coordinates, conversation template, tokenization with loss mask, output parsing.

Host-side only (numpy + sentencepiece; no JAX). References: SPEC §2.6 (tokenizer), §5 (coordinates,
template, parsing), §7.1 (eval prompts); DESIGN §5-§6.

Piece boundaries of a tokenized conversation (see `tokenize_conversation`)::

    [bos] enc(SYSTEM_PROMPT + " USER: " + q1 + " ASSISTANT:")   weight 0
          enc(a1) [eos]                                         weight 1
          enc("USER: " + q2 + " ASSISTANT:")                    weight 0
          enc(a2) [eos]                                         weight 1 ...

`enc` is `Tokenizer.encode`: SentencePiece with its dummy prefix, split on `<image>` / `<region_fea>`.
Every boundary between two pieces is either a single space of the rendered string (which the next
piece's dummy prefix "▁" stands for) or an eos token, so the piecewise ids equal the ids of the whole
rendered string tokenized in one go, the way Ferret's `tokenizer_image_token` does it (an HF slow
LLaMA tokenizer in legacy mode also restarts with "▁" after `</s>`).
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

# --- constants ---------------------------------------------------------------------------------

SYSTEM_PROMPT = (
    "A chat between a human and an AI that understands visuals. In images, [x, y] denotes points: "
    "top-left [0, 0], bottom-right [width-1, height-1]. Increasing x moves right; y moves down. "
    "Bounding box: [x1, y1, x2, y2]. Image size: 1000x1000. Follow instructions. "
)
IMAGE_TOKEN = "<image>"
REGION_TOKEN = "<region_fea>"
USER = "USER"
ASSISTANT = "ASSISTANT"
GROUNDING_SUFFIX = "Include the coordinates for each mentioned object."
IMAGE_ID = -200  # Ferret's IMAGE_TOKEN_INDEX; the caller expands it into the visual slots
IGNORE = 0  # loss weight of unsupervised positions

HUMAN_ROLE = "human"
GPT_ROLE = "gpt"
SEP = " "  # SeparatorStyle.TWO sep, after a user message
SEP2 = "</s>"  # SeparatorStyle.TWO sep2, after an assistant message (the eos token)
CANVAS = 1000  # virtual canvas side (VOCAB_IMAGE_W = VOCAB_IMAGE_H = 1000)

Turn = tuple[str, str]
Box = tuple[int, int, int, int]
Point = tuple[int, int]

# --- coordinates (SPEC §5.1) ---------------------------------------------------------------------


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"image size must be a positive int, got {size!r}")
    return int(size)


def to_canvas(v: float, size: int) -> int:
    """Pixel coordinate -> 0..999 canvas integer: clamp to [0, size-1], then int(v * 1000 / size)."""
    size = _check_size(size)
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"coordinate must be finite, got {v!r}")
    v = min(max(v, 0.0), size - 1.0)  # Ferret's regulate_box
    return int(v * CANVAS / size)


def from_canvas(t: int, size: int) -> int:
    """Canvas integer 0..999 -> pixel coordinate int(t * size / 1000) (Ferret eval's resize_bbox)."""
    size = _check_size(size)
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < CANVAS:
        raise ValueError(f"canvas coordinate must be an int in 0..{CANVAS - 1}, got {t!r}")
    return int(int(t) * size / CANVAS)


def _coords_text(values: Iterable[int]) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"


def check_box_quantum(quantum: int) -> int:
    """A bin width of the 0..999 canvas: an int in 1..1000, else a ValueError."""
    if isinstance(quantum, bool) or not isinstance(quantum, (int, np.integer)) or not 1 <= quantum <= CANVAS:
        raise ValueError(f"box quantum must be an int in 1..{CANVAS}, got {quantum!r}")
    return int(quantum)


def quantize(t: int, quantum: int) -> int:
    """Canvas integer -> the centre of its `quantum`-wide bin (clamped to 999); quantum 1 keeps it."""
    quantum = check_box_quantum(quantum)
    return min(t // quantum * quantum + quantum // 2, CANVAS - 1)


def box_text(box: Sequence[float], width: int, height: int, quantum: int = 1) -> str:
    """Pixel box (x1, y1, x2, y2) -> "[x1, y1, x2, y2]" on the 0..999 canvas, each value the centre
    of its `quantum`-wide bin (1: the exact canvas integer, as Ferret writes boxes)."""
    if len(box) != 4:
        raise ValueError(f"box must have 4 values (x1, y1, x2, y2), got {box!r}")
    x1, y1, x2, y2 = box
    values = (to_canvas(x1, width), to_canvas(y1, height), to_canvas(x2, width), to_canvas(y2, height))
    return _coords_text(quantize(v, quantum) for v in values)


def point_text(point: Sequence[float], width: int, height: int) -> str:
    """Pixel point (x, y) -> "[x, y]" on the 0..999 canvas."""
    if len(point) != 2:
        raise ValueError(f"point must have 2 values (x, y), got {point!r}")
    return _coords_text((to_canvas(point[0], width), to_canvas(point[1], height)))


# --- conversation template (SPEC §5.2) -----------------------------------------------------------


_IMAGE_CUT = re.compile(rf"\s*{re.escape(IMAGE_TOKEN)}\s*")


def _normalize_turns(turns: Sequence[Turn], generation: bool) -> list[Turn]:
    """Validate roles and move the single `<image>` to the front of the first user message.

    Turn texts are stripped: whitespace at a turn's edge would only add stray "▁" tokens and break
    the piecewise == whole-string tokenization property.
    """
    turns = list(turns)
    if not turns:
        raise ValueError("conversation is empty")
    for i, turn in enumerate(turns):
        if not (isinstance(turn, tuple) and len(turn) == 2 and all(isinstance(x, str) for x in turn)):
            raise ValueError(f"turn {i} must be a (role, text) tuple of str, got {turn!r}")
        role, text = turn
        expected = HUMAN_ROLE if i % 2 == 0 else GPT_ROLE
        if role not in (HUMAN_ROLE, GPT_ROLE):
            raise ValueError(f"turn {i} has role {role!r}; roles are {HUMAN_ROLE!r} and {GPT_ROLE!r}")
        if role != expected:
            raise ValueError(
                f"turn {i} has role {role!r}, expected {expected!r}: roles must alternate, starting with human"
            )
        if role == GPT_ROLE and REGION_TOKEN in text:
            # Region slots carry input features; the model must never be trained to emit one.
            raise ValueError(f"turn {i}: {REGION_TOKEN} may only appear in user turns")
    last = turns[-1][0]
    if generation and last != HUMAN_ROLE:
        raise ValueError("a generation prompt needs the last turn to be human")
    if not generation and last != GPT_ROLE:
        raise ValueError("a complete conversation must end with a gpt turn (use the generation prompt otherwise)")

    n_images = sum(text.count(IMAGE_TOKEN) for _, text in turns)
    if n_images > 1:
        raise ValueError(f"at most one {IMAGE_TOKEN} per conversation, found {n_images}")
    # Cut `<image>` with its surrounding whitespace; a single space keeps the words apart.
    out = [(role, _IMAGE_CUT.sub(" ", text).strip()) for role, text in turns]
    if n_images:
        out[0] = (HUMAN_ROLE, IMAGE_TOKEN + "\n" + out[0][1])  # preprocess_multimodal
    return out


def _human_piece(text: str, first: bool) -> str:
    """Prompt text of one user turn up to and including "ASSISTANT:" (weight 0).

    The first turn carries the system prompt: system + sep + "USER: " (a double space, since the
    system prompt ends with a space). Later turns follow an eos directly.
    """
    head = SYSTEM_PROMPT + SEP if first else ""
    return f"{head}{USER}: {text}{SEP}{ASSISTANT}:"


def render(turns: Sequence[Turn], add_generation_prompt: bool = False) -> str:
    """Render a conversation with Ferret's `v1` template (SeparatorStyle.TWO, sep " ", sep2 "</s>").

    `{system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>`; with
    `add_generation_prompt` the last turn is human and the string ends with "ASSISTANT:".
    """
    turns = _normalize_turns(turns, add_generation_prompt)
    parts = [SYSTEM_PROMPT + SEP]
    for role, text in turns:
        if role == HUMAN_ROLE:
            parts.append(f"{USER}: {text}{SEP}")
        else:
            parts.append(f"{ASSISTANT}: {text}{SEP2}")
    if add_generation_prompt:
        parts.append(f"{ASSISTANT}:")
    return "".join(parts)


# --- tokenizer (SPEC §2.6) -----------------------------------------------------------------------

_SPECIAL_SPLIT = re.compile(f"({re.escape(IMAGE_TOKEN)}|{re.escape(REGION_TOKEN)})")


class Tokenizer:
    """A LLaMA-style SentencePiece model plus Ferret's `<region_fea>` token and the `<image>` sentinel.

    `<region_fea>` gets id = SentencePiece size (vocab grows by one, 32000 -> 32001) unless the model
    already has it as a piece. `<image>` is never a vocabulary token: it becomes `IMAGE_ID`.
    Padding uses the unk id (0) on the right, as Ferret's v1 setup does.
    """

    eos_text = SEP2

    def __init__(self, model_file: str | None = None, model_proto: bytes | None = None):
        if (model_file is None) == (model_proto is None):
            raise ValueError("pass exactly one of model_file or model_proto")
        try:
            if model_file is not None:
                self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
            else:
                self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except (OSError, RuntimeError, TypeError) as e:
            raise ValueError(f"cannot load SentencePiece model: {e}") from e
        self._n = self._sp.get_piece_size()
        for name, i in (("bos", self._sp.bos_id()), ("eos", self._sp.eos_id()), ("unk", self._sp.unk_id())):
            if i < 0:
                raise ValueError(f"SentencePiece model has no {name} id; Ferret needs bos, eos and unk")
        rid = self._sp.piece_to_id(REGION_TOKEN)
        # piece_to_id answers unk for unknown pieces, so check that the piece really is there.
        self._region_defined = self._sp.id_to_piece(rid) == REGION_TOKEN
        self._region_id = rid if self._region_defined else self._n

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.unk_id()

    @property
    def region_id(self) -> int:
        return self._region_id

    @property
    def vocab_size(self) -> int:
        return self._n if self._region_defined else self._n + 1

    @property
    def sp(self) -> spm.SentencePieceProcessor:
        """The wrapped SentencePiece processor (read-only use)."""
        return self._sp

    def encode(self, text: str) -> list[int]:
        """Text -> ids without bos. `<region_fea>` -> region_id, `<image>` -> IMAGE_ID; each plain
        segment between them is encoded by SentencePiece on its own (with its dummy prefix)."""
        if not isinstance(text, str):
            raise ValueError(f"encode needs a str, got {type(text).__name__}")
        ids: list[int] = []
        for seg in _SPECIAL_SPLIT.split(text):
            if seg == IMAGE_TOKEN:
                ids.append(IMAGE_ID)
            elif seg == REGION_TOKEN:
                ids.append(self._region_id)
            elif seg:
                ids.extend(self._sp.encode(seg, out_type=int))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text. region_id -> "<region_fea>", eos -> "</s>"; IMAGE_ID, bos and pad are skipped.

        Every special id ends a run of ordinary ids; each run is decoded separately, which undoes the
        per-segment dummy prefix of `encode`. Nothing stops decoding: the caller trims at `eos_text`.
        """
        out: list[str] = []
        run: list[int] = []

        def flush() -> None:
            if run:
                out.append(self._sp.decode(run))
                run.clear()

        for i in np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), np.int64).reshape(-1).tolist():
            if i == self._region_id:
                flush()
                out.append(REGION_TOKEN)
            elif i == self.eos_id:
                flush()
                out.append(SEP2)
            elif i in (IMAGE_ID, self.bos_id, self.pad_id):
                flush()
            elif 0 <= i < self._n:
                run.append(i)
            else:
                raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        flush()
        return "".join(out)


def train_tiny_tokenizer(
    sentences: Iterable[str], vocab_size: int = 1000, user_defined_symbols: Sequence[str] = ()
) -> bytes:
    """Train a small LLaMA-like BPE SentencePiece model in memory and return its model proto bytes.

    Settings follow ECOSYSTEM §4.4 and LLaMA's normalizer (identity, keep whitespace, dummy prefix),
    with digits split so coordinates tokenize digit by digit. `vocab_size` is a soft upper bound
    (hard_vocab_limit=False): a small corpus yields fewer pieces. `<image>` / `<region_fea>` are
    removed from the corpus since `Tokenizer.encode` never shows them to SentencePiece.
    """
    if isinstance(sentences, str):
        raise ValueError("sentences must be an iterable of str, not a single str")
    corpus = []
    for s in sentences:
        if not isinstance(s, str):
            raise ValueError(f"sentences must be str, got {type(s).__name__}")
        s = _SPECIAL_SPLIT.sub(" ", s).strip()
        if s:
            corpus.append(s)
    if not corpus:
        raise ValueError("no non-empty sentences to train the tokenizer on")
    if vocab_size <= 259:  # 3 specials + 256 byte-fallback pieces
        raise ValueError(f"vocab_size must exceed 259 (3 specials + 256 byte pieces), got {vocab_size}")
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus),
            model_writer=buf,
            vocab_size=int(vocab_size),
            model_type="bpe",
            byte_fallback=True,
            split_digits=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            user_defined_symbols=list(user_defined_symbols),
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            character_coverage=1.0,
            hard_vocab_limit=False,
            max_sentence_length=1 << 16,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(f"SentencePiece training failed: {e}") from e
    return buf.getvalue()


# --- tokenized conversation with loss mask --------------------------------------------------------


def _pieces(turns: list[Turn], system_prompt: bool = True) -> list[tuple[str, float]]:
    """(text, weight) pieces of a normalized conversation; "</s>" marks the eos token."""
    pieces: list[tuple[str, float]] = []
    for k, (role, text) in enumerate(turns):
        if role == HUMAN_ROLE:
            pieces.append((_human_piece(text, first=k == 0 and system_prompt), float(IGNORE)))
        else:
            pieces.append((text, 1.0))
            pieces.append((SEP2, 1.0))
    return pieces


def _tokenize_pieces(pieces: list[tuple[str, float]], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    ids = [tokenizer.bos_id]
    weights = [float(IGNORE)]
    for text, w in pieces:
        piece_ids = [tokenizer.eos_id] if text == SEP2 else tokenizer.encode(text)
        ids.extend(piece_ids)
        weights.extend([w] * len(piece_ids))
    return np.asarray(ids, np.int32), np.asarray(weights, np.float32)


def tokenize_conversation(
    turns: Sequence[Turn], tokenizer: Tokenizer, system_prompt: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Complete conversation -> (int32 ids, float32 loss weights), starting with bos.

    Weight 1 exactly on each assistant answer's tokens and its eos; 0 on bos, the system prompt, the
    user turns, the "ASSISTANT:" markers and the single IMAGE_ID. See the module docstring for the
    piece boundaries; `tokenize_prompt` on the first turns is an exact prefix of this sequence.
    `system_prompt=False` leaves the system prompt out (the CPU demo's format: its small LLM gains
    nothing from 87 constant tokens that would take a third of every sequence).
    """
    return _tokenize_pieces(_pieces(_normalize_turns(turns, generation=False), system_prompt), tokenizer)


def tokenize_prompt(turns: Sequence[Turn], tokenizer: Tokenizer, system_prompt: bool = True) -> np.ndarray:
    """Generation prompt (last turn human) -> int32 ids ending right after the "ASSISTANT:" tokens;
    `system_prompt` as in `tokenize_conversation`."""
    ids, _ = _tokenize_pieces(_pieces(_normalize_turns(turns, generation=True), system_prompt), tokenizer)
    return ids


# --- task and evaluation prompts (SPEC §5.3, §7.1) ------------------------------------------------


def add_grounding_suffix(question: str) -> str:
    """Stage III grounded-answer prompt: the question, a newline, then GROUNDING_SUFFIX (placement
    INFERRED, as in Ferret-UI's templates)."""
    return f"{question.rstrip()}\n{GROUNDING_SUFFIX}"


def rec_question(expression: str) -> str:
    """REC prompt (RefCOCO/+/g): commas are removed from the expression, as Ferret's eval does."""
    return f"What is the location of {expression.replace(',', '')} in the image?"


def flickr_question(phrases: Sequence[str]) -> str:
    """Flickr30k Entities prompt: phrases lower-cased with commas removed, joined by ", "."""
    if not phrases:
        raise ValueError("flickr_question needs at least one phrase")
    return "What are the locations of " + ", ".join(p.lower().replace(",", "") for p in phrases) + "?"


def roc_question(location: str, name_a: str, name_b: str) -> str:
    """LVIS referring object classification prompt; `location` is a point_text/box_text string."""
    return f"Is the object {location} {REGION_TOKEN} of the image a {name_a} or a {name_b}?"


# --- parsing model outputs (SPEC §5.4) -------------------------------------------------------------

_BOX_RE = re.compile(r"\[(\d+), (\d+), (\d+), (\d+)\]")
_POINT_RE = re.compile(r"\[(\d+), (\d+)\]")
_COORDS = r"\[\d+, \d+(?:, \d+, \d+)?\]"  # one point or box, Ferret's ", " separator
# A coordinate group: one point/box, or a bracketed list of them ("dogs [[box1], [box2]]").
_GROUP_RE = re.compile(rf"\[\s*{_COORDS}(?:\s*,\s*{_COORDS})*\s*\]|{_COORDS}")
_ITEM_RE = re.compile(_COORDS)
_DELIMITERS = ".,;!?"


def parse_boxes(text: str) -> list[Box]:
    """All `[x1, y1, x2, y2]` boxes (0..999 canvas ints) in order, at any nesting depth."""
    return [tuple(int(g) for g in m.groups()) for m in _BOX_RE.finditer(text)]  # type: ignore[misc]


def parse_points(text: str) -> list[Point]:
    """All `[x, y]` points (0..999 canvas ints) in order; 4-number boxes never match."""
    return [(int(m.group(1)), int(m.group(2))) for m in _POINT_RE.finditer(text)]


def normalize_phrase(s: str) -> str:
    """Ferret's phrase comparison key (eval_flickr_entities `are_phrases_similar`): lower-case,
    punctuation removed, whitespace collapsed."""
    s = s.lower()
    s = re.sub(r"\s*(['\",.;!?|:])\s*", r"\1 ", s).strip()  # "man's" -> "man' s", as Ferret does
    s = re.sub(r"[^\w\s]", "", s)
    return " ".join(s.split())


@dataclass
class Grounding:
    """A phrase and the boxes/points (in PIXELS) that directly follow it in the model output."""

    phrase: str
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    points: list[tuple[int, int]] = field(default_factory=list)


def _to_pixels(values: list[int], width: int, height: int) -> tuple[int, ...]:
    # Clamp first: a model may emit 1000+; pixel results then stay inside the image.
    sizes = (width, height) * (len(values) // 2)
    return tuple(from_canvas(min(v, CANVAS - 1), s) for v, s in zip(values, sizes))


def parse_groundings(text: str, width: int, height: int) -> list[Grounding]:
    """Pair phrases with the coordinates that follow them (Ferret's decode_bbox_from_caption).

    Walk the text: at each coordinate group the text since the last cut is the phrase (normalized
    with `normalize_phrase`); groups separated only by whitespace belong to the same phrase; after a
    group the next phrase starts after the next `. , ; ! ?`. Deviations from Ferret's loop, which
    crashes or yields empty phrases there: nested lists `[[..], [..]]` are parsed; a group that comes
    before that delimiter takes the text since the previous group as its phrase; brackets that hold
    no point/box are plain text.
    """
    _check_size(width)
    _check_size(height)
    out: list[Grounding] = []
    cut = 0  # where the next phrase starts
    prev_end = -1  # end of the previous coordinate group
    for m in _GROUP_RE.finditer(text):
        items = [[int(v) for v in re.findall(r"\d+", it)] for it in _ITEM_RE.findall(m.group(0))]
        if prev_end >= 0 and not text[prev_end : m.start()].strip():
            g = out[-1]  # "dogs [..] [..]": same phrase
        else:
            start = cut if cut <= m.start() else prev_end
            g = Grounding(phrase=normalize_phrase(text[start : m.start()]))
            out.append(g)
        for vals in items:
            px = _to_pixels(vals, width, height)
            (g.boxes if len(vals) == 4 else g.points).append(px)  # type: ignore[arg-type]
        prev_end = m.end()
        nxt = [i for i in (text.find(d, prev_end) for d in _DELIMITERS) if i >= 0]
        cut = min(nxt) + 1 if nxt else len(text)
    return out
