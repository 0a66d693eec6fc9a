"""What the last two digits of a demo run's grounding answers are worth. A probe.

The demo's encoders tell each coordinate's hundreds digit (the box code of the dense warm-up); the
8x8 global view's patches are 125 canvas units wide. This probe rescores a run's held-out
grounding answers (`RUN/eval_stage3/grounding/predictions.jsonl`, written by `ferret_jax.demo`) by
Acc@0.5 three ways: as written; with every coordinate moved to the centre of its `--quantum`-wide
bin (the hundreds digit kept, "430" -> "450" at 100); and the true boxes themselves at their bin
centres (what the bins cost a perfect reader).

  python benchmarks/probe_box_bins.py --run RUN [--run RUN2 ...] [--quantum 100]

One row per run; the last output line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os

from data_pipelines import text
from ferret_jax import evaluate


def rescore(run: str, quantum: int) -> dict:
    """Acc@0.5 of a run's stage-3 grounding answers: as written, binned, and of the binned truth."""
    with open(os.path.join(run, "eval_stage3", "grounding", "predictions.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    world = evaluate.synthetic_world(evaluate.source_meta(os.path.join(run, "stage3")))
    records = evaluate.synthetic_grounding_records("test", len(rows), 0, True, world)
    hits = {"as_written": 0, "binned": 0, "binned_truth": 0}
    for row, record in zip(rows, records):
        if row["id"] != record["id"]:
            raise ValueError(f"{run}: answer {row['id']} does not match held-out record {record['id']}")
        hits["as_written"] += row["correct"]  # the evaluation's own score of the answer
        height, width = record["image"].shape[:2]
        truth = [text.to_canvas(v, size) for v, size in zip(record["box"], (width, height) * 2)]
        answered = text.parse_boxes(row["prediction"])
        for key, box in (("binned_truth", truth), ("binned", answered[0] if answered else None)):
            if box is None:
                continue
            # values past 999 clamp first, as the evaluation's decoding does
            binned = [text.quantize(min(v, text.CANVAS - 1), quantum) for v in box]
            overlap = evaluate.iou(evaluate.canvas_to_pixels(binned, width, height), record["box"])
            hits[key] += overlap >= evaluate.IOU_THRESHOLD
    return {"run": run, "answers": len(rows), **{k: v / len(rows) for k, v in hits.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, help="a `ferret_jax.demo` output directory")
    parser.add_argument("--quantum", type=int, default=100, help="bin width on the 0..999 canvas")
    args = parser.parse_args()
    rows = [rescore(run, args.quantum) for run in args.run]
    print(f"{'run':40s} {'answers':>7s} {'as written':>10s} {'binned':>8s} {'binned truth':>12s}")
    for r in rows:
        print(f"{r['run']:40s} {r['answers']:7d} {r['as_written']:10.3f} {r['binned']:8.3f} {r['binned_truth']:12.3f}")
    print(json.dumps({"quantum": args.quantum, "runs": rows}))


if __name__ == "__main__":
    main()
