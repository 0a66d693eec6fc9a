"""Rules for the per-layer tensors of a pre-LN ViT block (shared by CLIP and DINOv2)."""

from __future__ import annotations

from ferret_jax.convert.mapping import BIAS_TO_HEADS, HEADS_TO_LINEAR, IDENTITY, LINEAR, LINEAR_TO_HEADS, Rule


def vit_block_rules(names: dict[str, str]) -> list[Rule]:
    """`names` maps our sub-module (ln1, q, k, v, o, ln2, fc1, fc2, ls1, ls2) to a HF prefix with `{i}`."""
    rules = []
    for ln in ("ln1", "ln2"):
        rules += [Rule(f"layers/{ln}/scale", names[ln] + ".weight"), Rule(f"layers/{ln}/bias", names[ln] + ".bias")]
    for proj in ("q", "k", "v"):
        rules += [
            Rule(f"layers/{proj}/kernel", names[proj] + ".weight", LINEAR_TO_HEADS),
            Rule(f"layers/{proj}/bias", names[proj] + ".bias", BIAS_TO_HEADS),
        ]
    rules += [
        Rule("layers/o/kernel", names["o"] + ".weight", HEADS_TO_LINEAR),
        Rule("layers/o/bias", names["o"] + ".bias", IDENTITY),
    ]
    for fc in ("fc1", "fc2"):
        rules += [Rule(f"layers/mlp/{fc}/kernel", names[fc] + ".weight", LINEAR), Rule(f"layers/mlp/{fc}/bias", names[fc] + ".bias")]
    for ls in ("ls1", "ls2"):
        if ls in names:
            rules.append(Rule(f"layers/{ls}/scale", names[ls]))
    return rules
