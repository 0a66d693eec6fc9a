"""Does the demo's LLM warm-up teach the LLM to copy the asked name into the answer? A probe.

The demo's text-only LLM warm-up (`ferret_jax.warmup.language_warm_up`, the `demo` config's
settings) trains the LLM on the synthetic world's stage-III conversations without their images;
it is where the LLM learns to take the object's name from the question. This probe runs it with
the demo's tokenizer, where a name is two words ("red circle" -> "red", "circle"), or with one
piece per colour-shape name (`mixture.synthetic_tokenizer(whole_names=True)`), then scores it
teacher-forced on 256 held-out warm-up conversations: how often each answer token that is a name
token (a colour or shape word, or a whole-name piece) is predicted right, beside all answer tokens.

  python benchmarks/probe_name_copy.py [--names words|whole] [--steps 800]

The last output line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import mixture, synthetic, text
from ferret_jax import config_lib, evaluate, train, warmup
from ferret_jax.models.llama import Llama

HELD_OUT_BATCHES, HELD_OUT_BATCH, HELD_OUT_SEED = 4, 64, 12345


def name_ids(tokenizer: text.Tokenizer, whole: bool) -> set[int]:
    """The ids a name is written with: the 24 whole-name pieces, or the 10 colour and shape words."""
    forms = synthetic.category_names(name_sizes=False) if whole else (*synthetic.COLOURS, *synthetic.SHAPES)
    ids = [tokenizer.encode(f) for f in forms]
    if any(len(i) != 1 for i in ids):
        raise ValueError("every name form should be one piece of the tokenizer")
    return {i[0] for i in ids}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--names", choices=("words", "whole"), default="words")
    p.add_argument("--steps", type=int, default=config_lib.DEMO_WARMUP["language"]["steps"])
    args = p.parse_args()

    stage3 = config_lib.stage_config(3, "demo")
    world = evaluate.synthetic_world({"config": {"data": stage3.data.to_dict()}})
    llm_config = train.model_config(stage3).llm
    whole = args.names == "whole"
    tokenizer = text.Tokenizer(model_proto=mixture.synthetic_tokenizer(llm_config.vocab_size - 1, whole_names=whole))
    ids = name_ids(tokenizer, whole)
    settings = dict(config_lib.DEMO_WARMUP["language"], steps=args.steps)
    start = time.time()
    params, metrics = warmup.language_warm_up(llm_config, world, tokenizer, **settings, system_prompt=stage3.data.system_prompt,
                                              log_every=max(1, args.steps // 4))

    model = Llama(llm_config)
    predict = jax.jit(lambda p, tokens: jnp.argmax(model.apply({"params": p}, tokens)[0], -1))
    held_out = iter(warmup.language_dataset(world, tokenizer, HELD_OUT_BATCH, settings["max_length"], HELD_OUT_SEED,
                                            stage3.data.system_prompt, None, settings["caption_share"]))
    name_right = name_count = right = count = 0
    for _ in range(HELD_OUT_BATCHES):
        b = next(held_out)
        hit = np.asarray(predict(params["llm"], b["tokens"])) == b["targets"]
        answer = b["loss_mask"] > 0
        is_name = answer & np.isin(b["targets"], list(ids))
        name_right += int(hit[is_name].sum())
        name_count += int(is_name.sum())
        right += int(hit[answer].sum())
        count += int(answer.sum())
    result = {"names": args.names, "steps": args.steps, "name_token_accuracy": round(name_right / name_count, 4),
              "name_positions": name_count, "chance": round(1 / len(ids), 4), "answer_token_accuracy": round(right / count, 4),
              "warmup_train_accuracy": round(float(metrics["accuracy"]), 4), "seconds": round(time.time() - start, 1)}
    print(f"name tokens right {result['name_token_accuracy']:.3f} of {name_count} (chance {result['chance']:.3f}); "
          f"all answer tokens {result['answer_token_accuracy']:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
