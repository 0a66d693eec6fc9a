"""Inference: region flags -> Ferret's prompt text, the printed report, the command line on a tiny
random export and a real photograph, its one-line errors, and batch mode."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from PIL import Image

from data_pipelines import regions as R, text
from data_pipelines.example import region_prompt
from ferret_jax import evaluate as E
from ferret_jax import infer as I
from ferret_jax.generate import Sampling
from tests import train_helpers as th

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTO_SIZE = (120, 90)  # (W, H): not square, so x and y scale differently
MAX_NEW_TOKENS = 6

# ----------------------------------------------------------------------------------------------
# Regions and prompts


def test_importing_defines_no_flags():
    assert "checkpoint" not in flags.FLAGS and "box" not in flags.FLAGS


def test_parse_box_and_point():
    assert I.parse_box("10,20,30,40") == R.Box(10, 20, 30, 40)
    assert I.parse_box("[10.5, 20, 30, 40]") == R.Box(10.5, 20, 30, 40)
    assert I.parse_point("7,8") == R.Point(7, 8)
    for bad in ("10,20,30", "10,20,30,40,50", "a,b,c,d", "10;20;30;40", "1,2,3,nan", ""):
        with pytest.raises(I.InferError, match="expected x1,y1,x2,y2"):
            I.parse_box(bad)
    with pytest.raises(I.InferError, match="corners inverted"):
        I.parse_box("30,20,10,40")
    with pytest.raises(I.InferError, match="expected x,y"):
        I.parse_point("1,2,3")


def test_fill_regions_writes_ferret_format_on_the_canvas():
    # 200x100: x scales by 1000/200, y by 1000/100. Box (20, 10, 120, 40) -> [100, 100, 600, 400];
    # point (50, 25) -> [250, 250].
    box, point = R.Box(20, 10, 120, 40), R.Point(50, 25)
    prompt, regions = I.fill_regions("Compare <region> with <region_fea>.", [box, point], 200, 100)
    assert prompt == "Compare [100, 100, 600, 400] <region_fea> with [250, 250] <region_fea>."
    assert regions == (box, point)
    # A filled prompt fills to itself: written coordinates are rewritten from the regions.
    assert I.fill_regions(prompt, regions, 200, 100)[0] == prompt
    assert I.fill_regions("What is [1, 2, 3, 4] <region>?", [box], 200, 100)[0] == (
        "What is [100, 100, 600, 400] <region_fea>?"
    )
    assert I.fill_regions("Describe the image.", [], 200, 100) == ("Describe the image.", ())


def test_fill_regions_refuses_mismatches_and_regions_outside():
    box = R.Box(20, 10, 120, 40)
    with pytest.raises(I.InferError, match="0 <region> placeholder.* for 1 region"):
        I.fill_regions("What is this?", [box], 200, 100)
    with pytest.raises(I.InferError, match="2 <region> placeholder.* for 1 region"):
        I.fill_regions("Is <region> left of <region>?", [box], 200, 100)
    with pytest.raises(R.RegionError, match="no pixel inside"):
        I.fill_regions("What is <region>?", [R.Box(300, 10, 400, 40)], 200, 100)


def test_collect_regions_order_is_boxes_points_masks(tmp_path):
    mask = np.zeros((100, 200), np.uint8)
    mask[30:50, 60:90] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    regions = I.collect_regions(["1,2,3,4"], ["5,6"], [str(tmp_path / "m.png")], 200, 100)
    assert [type(r) for r in regions] == [R.Box, R.Point, R.Mask]


def test_load_mask(tmp_path):
    mask = np.zeros((100, 200), np.uint8)
    mask[30:50, 60:90] = 1  # any non-zero value counts
    Image.fromarray(mask).save(tmp_path / "grey.png")
    region = I.load_mask(str(tmp_path / "grey.png"), 200, 100)
    np.testing.assert_array_equal(region.mask, mask > 0)
    assert R.region_box(region, 200, 100) == (60, 30, 89, 49)
    assert region_prompt(region, 200, 100) == "[300, 300, 445, 490] <region_fea>"

    rgba = np.zeros((100, 200, 4), np.uint8)
    rgba[..., 3] = 255  # opaque everywhere: alpha is not the region
    rgba[30:50, 60:90, 0] = 200
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(I.load_mask(str(tmp_path / "rgba.png"), 200, 100).mask, mask > 0)

    with pytest.raises(I.InferError, match=r"is 200x100 \(WxH\) but the image is 100x200"):
        I.load_mask(str(tmp_path / "grey.png"), 100, 200)
    Image.fromarray(np.zeros((100, 200), np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(I.InferError, match="no non-zero pixel"):
        I.load_mask(str(tmp_path / "empty.png"), 200, 100)
    with pytest.raises(I.InferError, match="cannot read mask"):
        I.load_mask(str(tmp_path / "missing.png"), 200, 100)


def test_report_prints_the_answer_then_each_grounding_in_pixels():
    reply = "A man [100, 100, 600, 400] holds a flag [0, 0, 500, 500] [500, 500, 999, 999]."
    groundings = text.parse_groundings(reply, 200, 100)
    assert I.report(reply, groundings).splitlines() == [
        reply,
        "a man: boxes [(20, 10, 120, 40)] points []",
        "holds a flag: boxes [(0, 0, 100, 50), (100, 50, 199, 99)] points []",
    ]
    assert I.grounding_line(text.Grounding("", points=[(3, 4)])) == "?: boxes [] points [(3, 4)]"
    assert I.report("Nothing to ground.", []) == "Nothing to ground."


def test_an_answer_box_with_swapped_corners_is_drawn_over_the_corners_it_spans():
    from ferret_jax import draw

    image = np.zeros((32, 32, 3), np.uint8)  # enlarged 10x: MIN_SIDE 320
    swapped = text.Grounding("red circle", boxes=[(20, 25, 5, 8)])
    picture = np.asarray(draw.draw_answer(image, groundings=[swapped]))
    colour = draw.ANSWER_COLOURS[0]
    # the left edge at x = 5 and the bottom edge at y = 25 (enlarged), between the other corners
    np.testing.assert_array_equal(picture[150, 51], colour)
    np.testing.assert_array_equal(picture[249, 150], colour)
    np.testing.assert_array_equal(picture[150, 150], 0)  # inside stays the image


def test_cli_modes_and_picture_paths_are_checked():
    I.check_mode("a.png", "What?", False, None, None)
    I.check_mode(None, None, False, "requests.jsonl", "out")
    with pytest.raises(I.InferError, match="give --image and --prompt"):
        I.check_mode("a.png", None, False, None, None)
    with pytest.raises(I.InferError, match="drop --image"):
        I.check_mode(None, None, True, "requests.jsonl", "out")
    with pytest.raises(I.InferError, match="needs --out_dir"):
        I.check_mode(None, None, False, "requests.jsonl", None)
    I.check_picture_path("answer.JPG")
    with pytest.raises(I.InferError, match="extension must name an image format"):
        I.check_picture_path("answer.txt")


def test_requests_parse_relative_paths_and_name_bad_lines(tmp_path):
    path = tmp_path / "requests.jsonl"
    path.write_text(json.dumps({"image": "a.png", "prompt": "p <region>", "boxes": [[1, 2, 3, 4]], "id": 7})
                    + "\n\n" + json.dumps({"image": "/abs/b.png", "prompt": "q", "masks": ["m.png"]}) + "\n")
    first, second = I.read_requests(str(path))
    assert first == I.Request(str(tmp_path / "a.png"), "p <region>", ([1, 2, 3, 4],), (), (), 7)
    assert second.image == "/abs/b.png" and second.masks == (str(tmp_path / "m.png"),)
    path.write_text(json.dumps({"image": "a.png", "prompt": "p"}) + "\n" + json.dumps({"image": "a.png", "box": []}))
    with pytest.raises(I.InferError, match="line 2: unknown keys \\['box'\\]"):
        I.read_requests(str(path))
    path.write_text("{not json\n")
    with pytest.raises(I.InferError, match="line 1"):
        I.read_requests(str(path))


# ----------------------------------------------------------------------------------------------
# A tiny random export and a photograph


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    return th.write_tiny_export(str(tmp_path_factory.mktemp("export")), max_length=256)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """skimage's astronaut, small, as a PNG."""
    from skimage import data

    path = str(tmp_path_factory.mktemp("photo") / "astronaut.png")
    Image.fromarray(data.astronaut()).resize(PHOTO_SIZE, Image.BILINEAR).save(path)
    return path


@pytest.fixture(scope="module")
def loaded(tiny_export):
    model, params, tokenizer, ecfg = E.load_model(tiny_export, max_regions=1)
    sampling = Sampling(max_new_tokens=MAX_NEW_TOKENS, eos_id=tokenizer.eos_id)
    return model, params, tokenizer, ecfg, sampling


def _command(*args) -> list[str]:
    return [sys.executable, "-m", "ferret_jax.infer", *args]


def _cli(*args):
    return subprocess.run(_command(*args), capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def cli_answer(tiny_export, photo, tmp_path_factory):
    """The command line asked about the photo, started in the background so that its compilation
    overlaps the in-process one; `.communicate()` waits for it. Yields (process, picture path)."""
    out = str(tmp_path_factory.mktemp("cli") / "pictures" / "answer.png")  # its directory does not exist yet
    process = subprocess.Popen(
        _command(f"--checkpoint={tiny_export}", f"--image={photo}", "--prompt=What is <region>?", "--box=30,10,80,60",
                 f"--out={out}", f"--max_new_tokens={MAX_NEW_TOKENS}"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    yield process, out
    if process.poll() is None:  # a test failed before waiting for it
        process.kill()
        process.communicate()


def test_answer_groundings_are_those_of_its_text(cli_answer, loaded, photo):
    model, params, tokenizer, ecfg, sampling = loaded
    image = np.asarray(Image.open(photo))
    reply, groundings = I.answer(model, params, tokenizer, ecfg, image, "What is <region>?", [R.Box(30, 10, 80, 60)],
                                 sampling)
    assert isinstance(reply, str)
    assert groundings == text.parse_groundings(reply, *PHOTO_SIZE)


def test_cli_answers_and_draws(cli_answer, loaded, photo):
    process, out = cli_answer
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    # Same model, prompt, seed and greedy decoding: the printed report is the in-process answer's.
    model, params, tokenizer, ecfg, sampling = loaded
    reply, groundings = I.answer(model, params, tokenizer, ecfg, np.asarray(Image.open(photo)), "What is <region>?",
                                 [R.Box(30, 10, 80, 60)], sampling)
    assert stdout == I.report(reply, groundings) + "\n"
    with Image.open(out) as picture:
        assert picture.width > PHOTO_SIZE[0] and picture.height > PHOTO_SIZE[1]


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_checkpoint", "no such directory"),
        ("unreadable_image", "cannot read image"),
        ("box_outside", "no pixel inside the 120x90"),
        ("count_mismatch", "2 <region> placeholder(s) for 1 region(s)"),
        ("bad_box", "expected x1,y1,x2,y2"),
    ],
)
def test_cli_errors_are_one_line(case, message, tiny_export, photo, tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG not really an image")
    args = {"checkpoint": tiny_export, "image": photo, "prompt": "What is <region>?", "box": "30,10,80,60"}
    args.update({
        "missing_checkpoint": {"checkpoint": str(tmp_path / "missing")},
        "unreadable_image": {"image": str(garbage)},
        "box_outside": {"box": "200,10,300,60"},
        "count_mismatch": {"prompt": "Is <region> left of <region>?"},
        "bad_box": {"box": "30,10,80"},
    }[case])
    result = _cli(*(f"--{k}={v}" for k, v in args.items()), f"--out={tmp_path / 'a.png'}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == "" and not (tmp_path / "a.png").exists()


# ----------------------------------------------------------------------------------------------
# Batch mode


def test_run_requests_writes_answers_and_pictures(loaded, photo, tmp_path):
    model, params, tokenizer, ecfg, sampling = loaded
    requests_path = tmp_path / "requests.jsonl"
    requests_path.write_text("\n".join(json.dumps(r) for r in [
        {"image": photo, "prompt": "What is <region>?", "boxes": [[30, 10, 80, 60]]},
        {"image": photo, "prompt": "What is at <region>?", "points": [[60, 40]], "id": "second"},
    ]))
    requests = I.read_requests(str(requests_path))
    assert I.check_requests(requests) == 1
    out_dir = str(tmp_path / "out")
    lines = I.run_requests(model, params, tokenizer, ecfg, requests, sampling, out_dir, log=lambda _: None)
    with open(os.path.join(out_dir, I.ANSWERS_FILE)) as f:
        saved = [json.loads(line) for line in f]
    assert saved == lines and len(saved) == 2
    assert saved[0]["question"] == "What is [250, 111, 666, 666] <region_fea>?"
    assert saved[1]["question"] == "What is at [500, 444] <region_fea>?" and saved[1]["id"] == "second"
    for line in saved:
        groundings = [I.grounding_json(g) for g in text.parse_groundings(line["answer"], *PHOTO_SIZE)]
        assert line["groundings"] == groundings
        with Image.open(os.path.join(out_dir, line["picture"])) as picture:
            assert picture.width > PHOTO_SIZE[0]
    assert sorted(os.listdir(out_dir)) == ["0000_astronaut.png", "0001_astronaut.png", I.ANSWERS_FILE]


def test_check_requests_names_the_bad_request(photo, tmp_path):
    good = I.Request(photo, "What is <region>?", ([30, 10, 80, 60],))
    with pytest.raises(I.InferError, match="request 1 .*no pixel inside"):
        I.check_requests([good, dataclasses.replace(good, boxes=([500, 10, 600, 60],))])
    with pytest.raises(I.InferError, match="request 0 .*cannot read image"):
        I.check_requests([dataclasses.replace(good, image=str(tmp_path / "missing.png"))])
