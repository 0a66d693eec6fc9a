"""`make demo` in miniature: the encoder and LLM warm-ups and three stages of a few steps each on the
synthetic world, evaluation, the results file and the picture of grounded answers."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from ferret_jax import demo, evaluate
from ferret_jax.convert import load_converted


def test_quick_demo_runs_end_to_end(tmp_path):
    results = demo.run(str(tmp_path), quick=True, log=lambda _: None, seed=1)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved.keys() == results.keys()
    assert saved["seed"] == 1 and all(evaluate.source_meta(str(tmp_path / f"stage{s}"))["config"]["seed"] == 1 for s in (1, 2, 3))
    with pytest.raises(ValueError, match="warm-up of seed 1, not 0"):  # another seed does not reuse it
        demo.warm_up_backbones("demo", str(tmp_path / "warmup"), 3, lambda _: None, seed=0)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "warmup").rglob("*")}
    logged = []
    reused = demo.warm_up_backbones("demo", str(tmp_path / "warmup"), 3, logged.append, seed=1)  # the same seed reuses it
    assert reused["seed"] == 1 and all(reused[k]["loss"] == saved[k]["loss"] for k in ("warmup", "language_warmup"))
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "warmup").rglob("*")} == before and "reusing" in logged[-1]
    for stage in (1, 2, 3):
        for task in ("grounding", "referring"):  # every prompt fits, stage I's short training length too
            lines = (tmp_path / f"eval_stage{stage}" / task / "predictions.jsonl").read_text().splitlines()
            assert lines and not [p["error"] for p in map(json.loads, lines) if "error" in p]
        r = saved[f"stage{stage}"]
        assert 0 <= r["grounding_acc50"] <= 1 and 0 <= r["referring_acc"] <= 1 and r["seconds"] > 0
        assert set(r["grounding_acc50_by_objects"]) <= {"1", "2"} and r["grounding_acc50_by_objects"]
        assert all(v is None or 0 <= v <= 1 for v in (*r["grounding_acc50_by_objects"].values(), r["grounding_other_object_rate"],
                                                      *r["grounding_acc50_by_raster_rank"].values()))
        assert set(r["grounding_acc50_by_raster_rank"]) <= {"1", "2"}
        assert r["trains"] == {1: "proj_global/fc2", 2: "proj_global/fc2, proj_local/fc2, sampler, llm",
                               3: "clip, dino, proj_global/fc2, proj_local/fc2, sampler, llm"}[stage]
    assert 0 <= saved["baseline_constant_box_acc50"] <= 1 and saved["chance_referring_acc"] == 0.5
    with Image.open(tmp_path / "grounded.png") as im:
        assert im.width > 300 and im.height > 300
    for key in demo.WARMUP_TRAINS:
        warm = saved[key]
        assert warm["steps"] == 3 and warm["seconds"] > 0 and warm["loss"] > 0
    assert saved["language_warmup"]["induction_ids"] >= 10  # the LLM's induction phase ran, on the world's ids
    # The warm-up's projectors (from its dense heads) reach the stages: stage I leaves proj_local as
    # it is, and stage II starts from it instead of copying proj_global.
    assert saved["warmup"]["projectors_from_heads"]
    _, warm = load_converted(str(tmp_path / "warmup"))
    p1, p2 = (evaluate.load_model(str(tmp_path / f"stage{s}"))[1] for s in (1, 2))
    for w, a in zip(jax.tree.leaves(warm["proj_local"]), jax.tree.leaves(p1["proj_local"])):
        np.testing.assert_array_equal(np.asarray(w), np.asarray(a))
    step = max(np.abs(np.asarray(a) - np.asarray(w)).max() for a, w in zip(jax.tree.leaves(p2["proj_local"]), jax.tree.leaves(warm["proj_local"])))
    apart = max(np.abs(np.asarray(a) - np.asarray(g)).max() for a, g in zip(jax.tree.leaves(p2["proj_local"]), jax.tree.leaves(p1["proj_global"])))
    assert step < 0.01 < apart, (step, apart)
    # The projectors' fc1, the heads' box code, is the warm-up's bit for bit after every stage;
    # their fc2 and the encoders under them train.
    p3 = evaluate.load_model(str(tmp_path / "stage3"))[1]
    for name in ("proj_global", "proj_local"):
        for p in (p1, p2, p3):
            jax.tree.map(np.testing.assert_array_equal, p[name]["fc1"], warm[name]["fc1"])
        assert np.abs(np.asarray(p3[name]["fc2"]["kernel"]) - np.asarray(warm[name]["fc2"]["kernel"])).max() > 1e-4
    assert max(np.abs(np.asarray(a) - np.asarray(w)).max() for a, w in zip(jax.tree.leaves(p3["clip"]), jax.tree.leaves(warm["clip"]))) > 0


def test_by_objects_orders_the_scene_sizes_as_numbers():
    scores = {"grounding_acc50_by_objects": {"10": 0.1, "2": 0.25, "1": None}}
    assert demo.by_objects(scores) == "- / 0.250 / 0.100"
