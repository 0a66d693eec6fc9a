"""The trainer's stage-III step of the `demo` config on one real batch, for the benchmarks."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import example as ex
from data_pipelines import mixture
from ferret_jax import compiler, config_lib, optim, sharding, train
from ferret_jax.losses import token_cross_entropy
from ferret_jax.models.ferret import Ferret

STAGE, SIZE = 3, "demo"


def demo_inputs():
    """(stage config, synthetic tokenizer proto) of the benchmarked stage."""
    cfg = config_lib.stage_config(STAGE, SIZE)
    return cfg, mixture.synthetic_tokenizer(train.model_config(cfg).llm.vocab_size - 1)


class FerretStep:
    """The stage's model, a real batch, the optimizer and the jitted step, built as `train.train`
    builds them (one-device mesh, the config's sharding rules, donated state)."""

    def __init__(self, cfg, proto: bytes, **model_overrides):
        self.cfg = cfg
        self.mcfg = config_lib.ferret_config(SIZE, **{**dict(cfg.model), **model_overrides})
        self.model = Ferret(self.mcfg)
        ecfg = train.example_config(cfg, self.mcfg)
        local = next(iter(mixture.build_stage_dataset(cfg.data, STAGE, proto, ecfg, cfg.data.batch_size, cfg.seed)))
        self.host = {k: np.asarray(v) for k, v in local.items() if k not in train.HOST_ONLY}
        self.tokens = int((self.host["tokens"] != ex.PAD_ID).sum())
        self.visual_per_example = [int(n) for n in (self.host["visual_index"] >= 0).sum(1)]
        self.loss_positions = [int(n) for n in self.host["loss_mask"].sum(1)]

        o = cfg.optim
        self.mesh = sharding.make_mesh(tuple(cfg.mesh.shape), devices=jax.devices()[:1])
        self.rules = tuple((n, tuple(a) if isinstance(a, list) else a) for n, a in cfg.sharding_rules)
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            self.batch = {k: jnp.asarray(v) for k, v in self.host.items()}
            params = train._values(self.model.init(jax.random.key(cfg.seed), self.batch)["params"])
            self.mask = optim.trainable_mask(params, o.trainable)
            self.tx, _ = optim.make_optimizer(
                params, trainable=o.trainable, lr=o.lr, total_steps=cfg.total_steps, warmup_steps=0, b1=o.b1, b2=o.b2,
                eps=o.eps, weight_decay=o.weight_decay, clip_norm=o.clip_norm, min_lr_ratio=o.min_lr_ratio,
                lr_multipliers=dict(o.lr_multipliers) or None,
            )
            schedule = optim.lr_schedule(o.lr, cfg.total_steps, 0, o.min_lr_ratio)
            self.step = jax.jit(
                train.make_train_step(self.model, self.tx, self.mask, schedule, o.grad_accum_steps, cfg.seed, cfg.loss_positions),
                donate_argnums=0, compiler_options=compiler.step_options(),
            )
            self.state = train.init_state(params, self.tx)

    def __call__(self) -> float:
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            self.state, m = self.step(self.state, self.batch)
            jax.block_until_ready(m)
        return float(m["loss"])

    # Pieces of the step, for --profile.
    def pieces(self) -> dict:
        model, batch = self.model, self.batch
        key = jax.random.key(0)

        def loss_fn(p):
            logits = model.apply({"params": p}, batch, rngs={"sampler": key})
            loss, _ = token_cross_entropy(logits, batch["targets"], batch["loss_mask"])
            return loss.sum() / jnp.maximum(batch["loss_mask"].sum(), 1.0)

        def encoders(p):
            f_g, f_l, h_g, h_l = model.apply({"params": p}, batch["global_image"], batch["tiles"], method=Ferret.encode_images)
            return model.apply({"params": p}, batch, f_g, f_l, h_g, h_l, rngs={"sampler": key}, method=Ferret.region_features)

        def enc_loss(p):  # encoders + projectors + sampler, no LLM
            return encoders(p).sum()

        def vision_loss(p):  # encoders + projectors only
            out = model.apply({"params": p}, batch["global_image"], batch["tiles"], method=Ferret.encode_images)
            return sum(x.sum() for x in out if x is not None)

        fwd = jax.jit(loss_fn)
        grad = jax.jit(jax.value_and_grad(loss_fn))
        enc_grad = jax.jit(jax.value_and_grad(enc_loss))
        vision_grad = jax.jit(jax.value_and_grad(vision_loss))

        def wrap(f):
            def run():
                with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
                    jax.block_until_ready(f(self.state["params"]))  # the step donates the state
            return run

        return {"fwd": wrap(fwd), "fwd_bwd": wrap(grad), "vision_fwd_bwd": wrap(vision_grad),
                "vision+sampler_fwd_bwd": wrap(enc_grad)}
