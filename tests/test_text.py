"""Tests for data_pipelines/text.py: coordinates, template, tokenizer, loss mask, output parsing."""

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_pipelines import text as T

# --- fixtures -----------------------------------------------------------------------------------

CORPUS = [
    T.SYSTEM_PROMPT,
    "What is in the region [100, 50, 200, 300] <region_fea>?",
    "There is a dog [100, 150, 300, 200] in the figure.",
    "What is the location of the man in a red shirt in the image?",
    "What are the locations of a dog, a cat, a ball?",
    "A dog [12, 30, 500, 999], a cat [600, 610, 700, 720], a ball [5, 6].",
    "Is the object [320, 240] <region_fea> of the image a cat or a dog?",
    "Please classify the objects in the following locations. 1: [1, 2, 3, 4], 2: [5, 6, 7, 8].",
    "Here are the categories: 1: cat, 2: dog, 3: person.",
    "Please localize visible objects in the image in a raster scan order.",
    "The objects are: 1: cat [10, 20, 30, 40], 2: dog [50, 60, 70, 80].",
    "Include the coordinates for each mentioned object.",
    "USER: <image>\nDescribe the image. ASSISTANT: A red square and a blue circle.</s>",
    "The red square is at the top left of the picture.",
    "The blue circle [400, 400, 600, 600] is in the middle.",
    "Two green triangles [[10, 10, 90, 90], [800, 800, 900, 900]] are in the corners.",
    "How many objects are there? There are 3 objects.",
    "The numbers 0 1 2 3 4 5 6 7 8 9 and 1234567890 appear here.",
    "What color is the object [250, 125, 375, 500] <region_fea>?",
    "It is yellow.",
    "Where is the triangle? The triangle is at [700, 100, 800, 200].",
    "A person is riding a horse on the beach.",
    "The image shows a kitchen with a table and two chairs.",
    "Is there a car in the image? No, there is no car.",
    "The man [120, 80, 340, 990] is holding a cup [300, 400, 350, 470].",
    "Region [0, 0, 999, 999] covers the whole image.",
    "The star is above the moon; the sun is below!",
    "Width 640, height 480, point [639, 479].",
    "A chat between a human and an AI. Follow instructions.",
    "Summarize: small shapes, big shapes, many colors.",
]


@pytest.fixture(scope="module")
def tiny_proto() -> bytes:
    return T.train_tiny_tokenizer(CORPUS, vocab_size=600)


@pytest.fixture(scope="module")
def tiny(tiny_proto) -> T.Tokenizer:
    return T.Tokenizer(model_proto=tiny_proto)


def _mistral_path() -> str:
    mc = pytest.importorskip("mistral_common")
    path = os.path.join(os.path.dirname(mc.__file__), "data", "tokenizer.model.v1")
    if not os.path.exists(path):
        pytest.skip("mistral-common has no tokenizer.model.v1")
    return path


@pytest.fixture(scope="module", params=["tiny", "mistral"])
def tok(request, tiny) -> T.Tokenizer:
    """Every tokenizer-level test runs on the tiny model and on the 32000-piece LLaMA-like model."""
    if request.param == "tiny":
        return tiny
    return T.Tokenizer(model_file=_mistral_path())


# --- coordinates --------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 8000), st.floats(0, 1, allow_nan=False))
def test_canvas_round_trip_within_one_unit(size, frac):
    v = frac * (size - 1)
    t = T.to_canvas(v, size)
    p = T.from_canvas(t, size)
    assert 0 <= t <= 999
    assert 0 <= p <= size - 1
    # int truncation twice: p <= v < p + one canvas unit + 1 pixel
    assert 0 <= v - p < size / 1000 + 1


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 8000), st.floats(-1e6, 1e6, allow_nan=False))
def test_to_canvas_always_in_range(size, v):
    assert 0 <= T.to_canvas(v, size) <= 999


def test_canvas_hand_cases():
    assert T.to_canvas(639, 640) == 998
    assert T.to_canvas(0, 640) == 0
    assert T.to_canvas(320, 640) == 500
    assert T.to_canvas(640, 640) == 998  # clamped to W-1 first
    assert T.to_canvas(-5, 640) == 0
    assert T.to_canvas(479, 480) == 997
    assert T.to_canvas(0.9, 1000) == 0  # truncation, not rounding
    assert T.from_canvas(500, 640) == 320
    assert T.from_canvas(999, 640) == 639
    assert T.from_canvas(0, 480) == 0
    assert T.box_text((10, 20, 320, 479), 640, 480) == "[15, 41, 500, 997]"
    assert T.point_text((639, 0), 640, 480) == "[998, 0]"


def test_box_quantum_writes_bin_centres():
    assert T.box_text((10, 20, 320, 479), 640, 480, quantum=100) == "[50, 50, 550, 950]"
    assert T.box_text((10, 20, 320, 479), 640, 480, quantum=1) == T.box_text((10, 20, 320, 479), 640, 480)
    assert [T.quantize(t, 100) for t in (0, 99, 100, 449, 999)] == [50, 50, 150, 450, 950]
    assert [T.quantize(t, 300) for t in (0, 899, 900, 999)] == [150, 750, 999, 999]  # the last bin's centre clamps
    # Each quantized value lies within half a bin of the exact one: the bin centre is the value of
    # least mean error where only the bin is known.
    values = np.arange(T.CANVAS)
    for q in (1, 7, 50, 100):
        assert np.abs(np.array([T.quantize(int(v), q) for v in values]) - values).max() <= q // 2


@pytest.mark.parametrize(
    "call",
    [
        lambda: T.to_canvas(1, 0),
        lambda: T.to_canvas(float("nan"), 10),
        lambda: T.from_canvas(1000, 10),
        lambda: T.from_canvas(-1, 10),
        lambda: T.box_text((1, 2, 3), 10, 10),
        lambda: T.point_text((1, 2, 3), 10, 10),
        lambda: T.box_text((1, 2, 3, 4), 10, 10, quantum=0),
        lambda: T.box_text((1, 2, 3, 4), 10, 10, quantum=1001),
        lambda: T.quantize(5, 2.5),
    ],
)
def test_canvas_errors(call):
    with pytest.raises(ValueError):
        call()


# --- template -----------------------------------------------------------------------------------

SYSTEM = (
    "A chat between a human and an AI that understands visuals. In images, [x, y] denotes points: "
    "top-left [0, 0], bottom-right [width-1, height-1]. Increasing x moves right; y moves down. "
    "Bounding box: [x1, y1, x2, y2]. Image size: 1000x1000. Follow instructions. "
)


def test_system_prompt_verbatim():
    assert T.SYSTEM_PROMPT == SYSTEM
    assert T.SYSTEM_PROMPT.endswith(". ")


def test_render_single_turn_matches_spec():
    turns = [("human", "<image>\nWhat is this?"), ("gpt", "A dog [1, 2, 3, 4].")]
    expected = SYSTEM + " USER: <image>\nWhat is this? ASSISTANT: A dog [1, 2, 3, 4].</s>"
    assert T.render(turns) == expected
    assert "instructions.  USER:" in expected  # the double space of SPEC §5.2


def test_render_multi_turn():
    turns = [("human", "Q1"), ("gpt", "A1"), ("human", "Q2"), ("gpt", "A2")]
    assert T.render(turns) == SYSTEM + " USER: Q1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>"


def test_render_moves_image_to_front_of_first_user_message():
    turns = [("human", "What is this? <image>"), ("gpt", "A cat.")]
    assert T.render(turns) == SYSTEM + " USER: <image>\nWhat is this? ASSISTANT: A cat.</s>"
    later = [("human", "Hi"), ("gpt", "Hello"), ("human", "Look <image> here"), ("gpt", "Ok")]
    assert T.render(later) == SYSTEM + " USER: <image>\nHi ASSISTANT: Hello</s>USER: Look here ASSISTANT: Ok</s>"


def test_render_generation_prompt():
    s = T.render([("human", "<image>\nWhere is the dog?")], add_generation_prompt=True)
    assert s == SYSTEM + " USER: <image>\nWhere is the dog? ASSISTANT:"
    assert s.endswith("ASSISTANT:")


@pytest.mark.parametrize(
    "turns, gen, match",
    [
        ([], False, "empty"),
        ([("gpt", "a")], True, "expected 'human'"),
        ([("human", "q"), ("human", "q")], True, "alternate"),
        ([("user", "q"), ("gpt", "a")], False, "roles are"),
        ([("human", "<image> q"), ("gpt", "a <image>")], False, "at most one"),
        ([("human", "<image><image> q"), ("gpt", "a")], False, "at most one"),
        ([("human", "q"), ("gpt", "a")], True, "last turn to be human"),
        ([("human", "q")], False, "end with a gpt"),
        ([("human", "q"), ("gpt", "see <region_fea>")], False, "user turns"),
        (["human q"], False, "tuple"),
    ],
)
def test_render_errors(turns, gen, match):
    with pytest.raises(ValueError, match=match):
        T.render(turns, add_generation_prompt=gen)


def test_task_prompts():
    assert T.add_grounding_suffix("Describe it.") == "Describe it.\nInclude the coordinates for each mentioned object."
    assert T.rec_question("man, left") == "What is the location of man left in the image?"
    assert T.flickr_question(["A Dog", "red, car"]) == "What are the locations of a dog, red car?"
    assert T.roc_question("[1, 2]", "cat", "dog") == "Is the object [1, 2] <region_fea> of the image a cat or a dog?"


# --- tokenizer ----------------------------------------------------------------------------------


def test_module_does_not_import_jax():
    code = "import sys; import data_pipelines.text; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.strip() == "False"


def test_tiny_tokenizer_ids(tiny):
    assert (tiny.pad_id, tiny.bos_id, tiny.eos_id) == (0, 1, 2)
    n = tiny.sp.get_piece_size()
    assert 259 < n <= 600
    assert tiny.region_id == n and tiny.vocab_size == n + 1


def test_mistral_tokenizer_ids():
    tok = T.Tokenizer(model_file=_mistral_path())
    assert tok.vocab_size == 32001
    assert tok.region_id == 32000
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)


def test_region_already_in_model_is_reused():
    proto = T.train_tiny_tokenizer(CORPUS, vocab_size=600, user_defined_symbols=["<region_fea>"])
    tok = T.Tokenizer(model_proto=proto)
    assert tok.vocab_size == tok.sp.get_piece_size()
    assert tok.sp.id_to_piece(tok.region_id) == "<region_fea>"
    ids = tok.encode("box [1, 2, 3, 4] <region_fea>?")
    assert ids.count(tok.region_id) == 1
    assert tok.decode(ids) == "box [1, 2, 3, 4] <region_fea>?"


def test_digits_are_single_pieces(tok):
    ids = tok.encode("[12, 305, 999] and 1234567890")
    pieces = [tok.sp.id_to_piece(i) for i in ids]
    digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digit_pieces == list("12305999") + list("1234567890")


def test_specials_never_reach_sentencepiece(tok):
    text = "What is in the region [100, 50, 200, 300] <region_fea>?"
    ids = tok.encode(text)
    assert ids.count(tok.region_id) == 1
    assert T.IMAGE_ID not in ids
    assert tok.decode(ids) == text
    ids = tok.encode("<image>\nWhat is this <region_fea> and <region_fea>?")
    assert ids[0] == T.IMAGE_ID and ids.count(T.IMAGE_ID) == 1
    assert ids.count(tok.region_id) == 2
    assert "<" not in tok.sp.decode([i for i in ids if 0 <= i < tok.sp.get_piece_size()])
    assert tok.decode(ids) == "\nWhat is this <region_fea> and <region_fea>?"  # IMAGE_ID is skipped


@pytest.mark.parametrize(
    "text",
    ["There is a dog [100, 150, 300, 200] in the figure.", "  two  spaces\nand a newline\t", "ünïcode 你好 ok",
     "<region_fea><region_fea> x", ""],
)
def test_encode_decode_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_decode_specials_and_errors(tok):
    ids = [tok.bos_id] + tok.encode("a cat") + [tok.eos_id, tok.pad_id, tok.pad_id]
    assert tok.decode(np.asarray(ids, np.int32)) == "a cat</s>"
    assert tok.eos_text == "</s>"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size + 5])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([-3])
    with pytest.raises(ValueError):
        tok.encode(123)


def test_tokenizer_construction_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        T.Tokenizer()
    with pytest.raises(ValueError, match="exactly one"):
        T.Tokenizer(model_file="x", model_proto=b"x")
    with pytest.raises(ValueError, match="cannot load"):
        T.Tokenizer(model_file=str(tmp_path / "missing.model"))
    with pytest.raises(ValueError):
        T.train_tiny_tokenizer([""])
    with pytest.raises(ValueError):
        T.train_tiny_tokenizer("a single string")
    with pytest.raises(ValueError):
        T.train_tiny_tokenizer(CORPUS, vocab_size=100)


def test_matches_hf_llama_tokenizer(tmp_path, tiny_proto):
    """Our SentencePiece ids equal transformers' LlamaTokenizer ids on the same model (ECOSYSTEM §4.4)."""
    transformers = pytest.importorskip("transformers")
    (tmp_path / "tokenizer.model").write_bytes(tiny_proto)
    hf = transformers.LlamaTokenizer.from_pretrained(str(tmp_path), add_bos_token=True, legacy=True)
    tok = T.Tokenizer(model_proto=tiny_proto)
    text = "There is a dog [100, 150, 300, 200] in the figure."
    assert hf(text).input_ids == [tok.bos_id] + tok.encode(text)


# --- tokenized conversation and loss mask ---------------------------------------------------------

MULTI = [
    ("human", "What is in the region [100, 50, 200, 300] <region_fea>? <image>"),
    ("gpt", "A dog [100, 150, 300, 200]."),
    ("human", "And the cat?"),
    ("gpt", "The cat [5, 6] is on the left."),
]


def _spans(weights: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) runs of weight 1."""
    w = np.concatenate([[0], weights, [0]])
    d = np.diff(w)
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


def _whole_string_ids(tok: T.Tokenizer, rendered: str) -> list[int]:
    """Tokenize the rendered string in one go, "</s>" being the eos token (Ferret's training path)."""
    chunks = rendered.split("</s>")
    ids = [tok.bos_id]
    for k, chunk in enumerate(chunks):
        ids += tok.encode(chunk)
        if k < len(chunks) - 1:
            ids.append(tok.eos_id)
    return ids


@pytest.mark.parametrize("turns", [MULTI[:2], MULTI, [("human", "Hi"), ("gpt", "Hello!")]])
def test_loss_mask_covers_answers_and_eos_exactly(tok, turns):
    ids, w = T.tokenize_conversation(turns, tok)
    assert ids.dtype == np.int32 and w.dtype == np.float32 and ids.shape == w.shape
    assert ids[0] == tok.bos_id and w[0] == 0
    assert set(np.unique(w)) <= {0.0, 1.0}
    answers = [text for role, text in turns if role == "gpt"]
    spans = _spans(w)
    assert [tok.decode(ids[a:b]) for a, b in spans] == [a + "</s>" for a in answers]
    assert all(ids[b - 1] == tok.eos_id for _, b in spans)
    # every eos is supervised; nothing of the prompt is
    assert np.all(w[ids == tok.eos_id] == 1)
    assert np.all(w[ids == T.IMAGE_ID] == 0) and np.all(w[ids == tok.region_id] == 0)
    # the whole sequence decodes to the rendered template (IMAGE_ID is skipped by decode)
    assert tok.decode(ids) == T.render(turns).replace("<image>", "")


@pytest.mark.parametrize("turns", [MULTI[:2], MULTI])
def test_piecewise_equals_whole_string_tokenization(tok, turns):
    ids, _ = T.tokenize_conversation(turns, tok)
    assert ids.tolist() == _whole_string_ids(tok, T.render(turns))


def test_image_and_region_ids(tok):
    ids, _ = T.tokenize_conversation(MULTI, tok)
    assert (ids == T.IMAGE_ID).sum() == 1
    assert (ids == tok.region_id).sum() == 1
    assert np.flatnonzero(ids == T.IMAGE_ID)[0] < np.flatnonzero(ids == tok.region_id)[0]  # image moved first


@pytest.mark.parametrize("k", [1, 3])
def test_prompt_is_exact_prefix_of_training_sequence(tok, k):
    full, w = T.tokenize_conversation(MULTI, tok)
    prompt = T.tokenize_prompt(MULTI[:k], tok)
    assert prompt.dtype == np.int32
    assert full[: len(prompt)].tolist() == prompt.tolist()
    assert w[len(prompt)] == 1 and w[len(prompt) - 1] == 0  # the answer starts right after
    assert tok.decode(prompt).endswith("ASSISTANT:")
    # what inference sees equals the rendered generation prompt tokenized in one go
    assert prompt.tolist() == _whole_string_ids(tok, T.render(MULTI[:k], add_generation_prompt=True))


def test_tokenize_errors(tiny):
    with pytest.raises(ValueError):
        T.tokenize_conversation([("human", "q")], tiny)
    with pytest.raises(ValueError):
        T.tokenize_prompt([("human", "q"), ("gpt", "a")], tiny)


# --- parsing ------------------------------------------------------------------------------------


def test_parse_boxes_and_points():
    s = "A dog [100, 150, 300, 200] and [[1, 2, 3, 4], [5, 6, 7, 8]], point [7, 9], junk [1, 2, 3] [1,2]."
    assert T.parse_boxes(s) == [(100, 150, 300, 200), (1, 2, 3, 4), (5, 6, 7, 8)]
    assert T.parse_points(s) == [(7, 9)]
    assert T.parse_boxes("no boxes here [a, b]") == [] and T.parse_points("") == []


def test_parse_groundings_spec_example_is_literal():
    # SPEC §5.4 literally: the phrase is all text since the last cut, here the start of the answer.
    g = T.parse_groundings("There is a dog [100, 150, 300, 200] in the figure.", 1000, 1000)
    assert g == [T.Grounding("there is a dog", [(100, 150, 300, 200)], [])]


def test_parse_groundings_several_phrases_and_pixels():
    s = "A dog [100, 200, 500, 999], a Cat's toy [0, 0, 10, 10]; the sun [500, 500]!"
    g = T.parse_groundings(s, 640, 480)
    assert [x.phrase for x in g] == ["a dog", "a cat s toy", "the sun"]
    assert g[0].boxes == [(64, 96, 320, 479)]
    assert g[1].boxes == [(0, 0, 6, 4)]
    assert g[2].points == [(320, 240)] and g[2].boxes == []
    assert T.normalize_phrase("a Cat's toy") == g[1].phrase


@pytest.mark.parametrize(
    "s", ["Two dogs [[1, 2, 3, 4], [5, 6, 7, 8]] play.", "Two dogs [1, 2, 3, 4] [5, 6, 7, 8] play."]
)
def test_parse_groundings_multi_box_phrase(s):
    g = T.parse_groundings(s, 1000, 1000)
    assert g == [T.Grounding("two dogs", [(1, 2, 3, 4), (5, 6, 7, 8)], [])]


def test_parse_groundings_box_before_delimiter_takes_text_since_previous_box():
    g = T.parse_groundings("A man [1, 2, 3, 4] holding a cup [5, 6, 7, 8]. A tree [9, 9, 9, 9]", 1000, 1000)
    assert [x.phrase for x in g] == ["a man", "holding a cup", "a tree"]


def test_parse_groundings_garbage_and_clamping():
    assert T.parse_groundings("nothing to see [here], [1, 2, 3]", 100, 100) == []
    assert T.parse_groundings("", 100, 100) == []
    g = T.parse_groundings("big [0, 0, 1500, 999]", 100, 50)
    assert g[0].boxes == [(0, 0, 99, 49)]  # 1500 clamped to 999 before scaling
    with pytest.raises(ValueError):
        T.parse_groundings("x [1, 2]", 0, 10)


def test_flickr_round_trip_through_text():
    """Boxes written with box_text come back within a canvas unit after parse_groundings."""
    w, h = 500, 375
    boxes = {"a dog": (10, 20, 200, 300), "two people": (250, 30, 499, 374)}
    answer = ", ".join(f"{p} {T.box_text(b, w, h)}" for p, b in boxes.items()) + "."
    g = T.parse_groundings(answer, w, h)
    assert [x.phrase for x in g] == list(boxes)
    for x, b in zip(g, boxes.values()):
        assert np.all(np.abs(np.subtract(x.boxes[0], b)) <= 1)
