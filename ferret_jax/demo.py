"""`make demo`: Ferret-v2's three stages on the synthetic shapes world, on a CPU, in minutes.

    python -m ferret_jax.demo --out=demo_out [--quick]

Warms up the random backbones on the synthetic world (the stand-ins for pretrained ones,
`ferret_jax.warmup`): CLIP and DINOv2 on dense patch targets, then the LLM on the stage-III
conversations without their images. Then trains the `demo` configs of stages 1 -> 2 -> 3 (stage 1
from the warmed backbones, each later stage from the previous one), evaluates
each on held-out scenes of the same world (grounding: "What is the location of <object>?" scored
by Acc@0.5 of the first box, also per number of objects in the scene, and how often the box is
another object's; referring: "Is the object <point | box | free-form> a A or a B?"
scored by accuracy), prints a table beside a constant-box baseline and chance, and writes
`OUT/results.json` and `OUT/grounded.png` (held-out answers drawn on their images).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags, logging

from data_pipelines import synthetic, text
from ferret_jax import config_lib, draw, evaluate, train, warmup
from ferret_jax.convert import CONFIGS_FILE, save_converted
from ferret_jax.models.ferret import ProjectorConfig

FINAL_RECORDS = 200  # held-out images per task after stage 3
STAGE_RECORDS = 64  # after stages 1 and 2 (progress only)


WARMUP_TRAINS = {"warmup": "clip, dino, sampler (dense patch categories and box digits, region categories); "
                           "proj_global, proj_local start from the heads' box digits (their fc1, frozen in every stage)",
                 "language_warmup": "llm (an induction phase: random sequences of the world's token ids, repeated; then "
                                    "stage-III answers and stage-I captions as text: no images, coordinates scrambled; "
                                    "the warmed sampler's features in the referring questions' region slots)"}


def stage_trains(stage: int) -> str:
    return ", ".join(config_lib.DEMO_TRAINABLE[stage]).replace("/.*", "")


def warm_up_backbones(size: str, out: str, steps: int | None = None, log=print, seed: int = 0) -> dict:
    """The warm-ups of a synthetic-world size (`demo`, `tiny`), the stand-ins for pretrained
    backbones: CLIP and DINOv2 on dense targets of the size's world, then the LLM on the world's
    stage-III conversations without images, after an induction phase (`config_lib.DEMO_WARMUP`;
    `steps` overrides every step count; `seed` their inits, scenes and order). All three are
    written to `out` for stage 1's `init.pretrained`. Returns `{'warmup': ..., 'language_warmup': ..., 'seed': seed}` metrics; a
    finished warm-up of the same seed already in `out` is kept (its saved metrics are returned)."""
    if os.path.exists(os.path.join(out, CONFIGS_FILE)):
        with open(os.path.join(out, CONFIGS_FILE)) as f:
            report = json.load(f)["report"]
        saved_seed = report.get("seed", 0)  # warm-ups saved before the seed was recorded had seed 0
        if saved_seed != seed:
            raise ValueError(f"{out} holds the warm-up of seed {saved_seed}, not {seed}: use another output directory")
        log(f"[warmup] {out} holds a finished warm-up; reusing it")
        return report
    stage3 = config_lib.stage_config(3, size)  # the model with both encoders, the world and format of every stage
    world = evaluate.synthetic_world({"config": {"data": stage3.data.to_dict()}})
    model_config = train.model_config(stage3)
    settings = {k: dict(v, **({} if steps is None else {key: steps for key in ("steps", "induction_steps") if key in v}))
                for k, v in config_lib.DEMO_WARMUP.items()}
    encoders, dense, region_bank = warmup.warm_up(model_config, world, **settings["dense"], seed=seed,
                                                  log_every=max(1, settings["dense"]["steps"] // 6), log=log)
    tokenizer = text.Tokenizer(model_proto=train.load_tokenizer(stage3, out, model_config.llm.vocab_size))
    llm, language = warmup.language_warm_up(model_config.llm, world, tokenizer, **settings["language"], seed=seed,
                                            region_bank=region_bank,
                                            system_prompt=stage3.data.system_prompt,
                                            log_every=max(1, settings["language"]["steps"] // 4), log=log)
    report = {"warmup": dense, "language_warmup": language, "seed": seed}
    configs = {k: getattr(model_config, k) for k in ("clip", "dino", "sampler", "llm")}
    width = model_config.llm.hidden_size
    projectors = {"proj_global": ProjectorConfig(model_config.clip.hidden_size, width),
                  "proj_local": ProjectorConfig(model_config.dino.hidden_size, width)}
    configs |= {k: v for k, v in projectors.items() if k in encoders}
    save_converted(out, configs, {**encoders, **llm}, report=report)
    return report


def constant_box_baseline(world: dict, num_records: int) -> float:
    """Acc@0.5 of always answering the mean training box (normalized), on the held-out records."""
    source = synthetic.SyntheticSource("train", 500, seed=0, **world)
    boxes = []
    for i in range(len(source)):
        scene = source[i]["scene"]
        w, h = scene.size
        boxes += [(o.box[0] / w, o.box[1] / h, o.box[2] / w, o.box[3] / h) for o in scene.objects]
    mean = np.mean(boxes, axis=0)
    records = evaluate.synthetic_grounding_records("test", num_records, 0, True, world)
    hits = 0
    for r in records:
        h, w = r["image"].shape[:2]
        hits += evaluate.iou((mean[0] * w, mean[1] * h, mean[2] * w, mean[3] * h), r["box"]) >= 0.5
    return hits / len(records)


# One decoding setting for every evaluation and the picture, so they share one compiled program.
EVAL_BATCH, MAX_NEW_TOKENS = 16, 32


def _evaluate(workdir: str, out: str, records: int, max_length: int) -> dict:
    options = dict(num_records=records, batch_size=EVAL_BATCH, max_new_tokens=MAX_NEW_TOKENS, max_length=max_length,
                   log=lambda _: None)
    grounding = evaluate.evaluate("synthetic_grounding", workdir, os.path.join(out, "grounding"), **options)
    referring = evaluate.evaluate("synthetic_referring", workdir, os.path.join(out, "referring"), **options)
    return {"grounding_acc50": grounding["acc50"], "grounding_mean_iou": grounding["mean_iou"],
            "grounding_acc50_by_objects": grounding["acc50_by_objects"],
            "grounding_other_object_rate": grounding["other_object_rate"],
            "grounding_acc50_by_raster_rank": grounding["acc50_by_raster_rank"],
            "referring_acc": referring["accuracy"], "eval_records": records}


def _shown(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _by_number(rates: dict) -> str:
    """'0.400 / 0.070': rates keyed by 1, 2, ... (ints, or strings once read back from JSON) in that order."""
    return " / ".join(_shown(v) for _, v in sorted(rates.items(), key=lambda kv: int(kv[0])))


def by_objects(scores: dict) -> str:
    """'0.400 / 0.070': grounding Acc@0.5 on scenes of 1, 2, ... objects."""
    return _by_number(scores["grounding_acc50_by_objects"])


def grounded_picture(workdir: str, path: str, world: dict, count: int = 8) -> None:
    """Held-out grounding answers of the final model, drawn on their images."""
    model, params, tokenizer, ecfg = evaluate.load_model(workdir)
    from ferret_jax.generate import Sampling

    records = evaluate.synthetic_grounding_records("test", count, 7, True, world)
    answers = evaluate.predict(model, params, tokenizer, ecfg, records, Sampling(MAX_NEW_TOKENS, eos_id=tokenizer.eos_id),
                               EVAL_BATCH)
    pictures = []
    for r, answer in zip(records, answers):
        h, w = r["image"].shape[:2]
        pictures.append(draw.draw_answer(r["image"], groundings=text.parse_groundings(answer, w, h), title=r["expression"]))
    draw.grid(pictures).save(path)


def table(results: dict) -> str:
    rows = [("stage", "trains", "grounding Acc@0.5", "by objects 1 / 2", "other object", "referring acc", "seconds")]
    rows += [(name, results[key]["trains"], "", "", "", "", f"{results[key]['seconds']:.0f}")
             for key, name in (("warmup", "warm-up"), ("language_warmup", "llm warm-up"))]
    for stage in (1, 2, 3):
        r = results[f"stage{stage}"]
        rows.append((str(stage), r["trains"], f"{r['grounding_acc50']:.3f}", by_objects(r), _shown(r["grounding_other_object_rate"]),
                     f"{r['referring_acc']:.3f}", f"{r['seconds']:.0f}"))
    rows.append(("baseline", "constant box / chance", f"{results['baseline_constant_box_acc50']:.3f}", "", "",
                 f"{results['chance_referring_acc']:.3f}", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)


def run(out: str, quick: bool = False, log=print, seed: int = 0) -> dict:
    """The whole demo; returns (and writes) the results. `seed` sets the warm-ups' and every
    stage's initialisation and data order (the held-out scenes stay the same)."""
    os.makedirs(out, exist_ok=True)
    start = time.time()
    results: dict = {"seed": seed}
    backbones = os.path.join(out, "warmup")
    log(f"=== warm-ups: {WARMUP_TRAINS['warmup']}; then {WARMUP_TRAINS['language_warmup']} ===")
    report = warm_up_backbones("demo", backbones, 3 if quick else None, log, seed)
    results |= {key: {"trains": trains, **report[key]} for key, trains in WARMUP_TRAINS.items()}
    init_from, world = "", None
    # Every stage is evaluated on prompts of stage III's length: stage I trains on 80-token captions,
    # shorter than a referring prompt with its image.
    eval_length = config_lib.stage_config(3, "demo").data.max_length
    for stage in (1, 2, 3):
        config = config_lib.stage_config(stage, "demo")
        config.seed = seed
        config.init.init_from = init_from
        config.init.pretrained = backbones if stage == 1 else ""
        config.tensorboard = False
        if quick:  # CI: a few steps per stage, a handful of held-out images
            config.total_steps, config.eval_every, config.ckpt_every = 3, 1000, 1000
            config.optim.warmup_steps = 1
        world = evaluate.synthetic_world({"config": {"data": config.data.to_dict()}})
        workdir = os.path.join(out, f"stage{stage}")
        log(f"\n=== stage {stage}: trains {stage_trains(stage)}; {config.total_steps} steps ===")
        t0 = time.time()
        train.train(config, workdir)
        records = 8 if quick else (FINAL_RECORDS if stage == 3 else STAGE_RECORDS)
        scores = _evaluate(workdir, os.path.join(out, f"eval_stage{stage}"), records, eval_length)
        results[f"stage{stage}"] = {"trains": stage_trains(stage), "steps": config.total_steps,
                                    **scores, "seconds": time.time() - t0}
        ranks = _by_number(scores["grounding_acc50_by_raster_rank"])
        log(f"[demo] stage {stage}: grounding Acc@0.5 {scores['grounding_acc50']:.3f} (scenes of 1 / 2 objects "
            f"{by_objects(scores)}; of 2, the asked object first / second in raster order {ranks or '-'}; "
            f"another object boxed {_shown(scores['grounding_other_object_rate'])}), "
            f"referring acc {scores['referring_acc']:.3f} ({records} held-out images each)")
        init_from = workdir
    results["baseline_constant_box_acc50"] = constant_box_baseline(world, 8 if quick else FINAL_RECORDS)
    results["chance_referring_acc"] = 0.5
    grounded_picture(init_from, os.path.join(out, "grounded.png"), world)
    results["total_seconds"] = time.time() - start
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    log("\n" + table(results))
    log(f"\n[demo] {results['total_seconds'] / 60:.1f} min; results in {out}/results.json, answers drawn in {out}/grounded.png")
    return results


def main() -> None:
    out = flags.DEFINE_string("out", "demo_out", "output directory")
    quick = flags.DEFINE_bool("quick", False, "a few steps per stage (a smoke test)")
    seed = flags.DEFINE_integer("seed", 0, "initialisation and data order of the warm-ups and stages (another sample of the same config)")

    def _run(argv) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}")
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        run(out.value, quick.value, seed=seed.value)

    app.run(_run)


if __name__ == "__main__":
    main()
