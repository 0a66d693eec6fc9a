"""LLaMA decoder: logits parity with HF (MHA and GQA), the embeddings entry, and KV-cache decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ferret_jax.convert import convert_llama
from ferret_jax.models import Llama, init_kv_cache

ATOL = 1e-4


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def converted(request, hf, tmp_path_factory):
    model = hf.llama(seed=7, num_key_value_heads=request.param)
    directory = hf.save(model, tmp_path_factory.mktemp(f"llama{request.param}"))
    # attention_chunk=8: the 33-token parity inputs run the block-causal path (5 blocks, one partial).
    config, params, _ = convert_llama(directory, added_tokens=0, attention_chunk=8)
    return model, config, params


def test_logits_parity_with_hf(converted):
    model, config, params = converted
    ids = np.random.RandomState(0).randint(0, config.vocab_size, (2, 33))
    ours, cache = Llama(config).apply({"params": params}, jnp.asarray(ids))
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
    assert cache is None
    assert np.abs(ref).std() > 0.5
    np.testing.assert_allclose(np.asarray(ours), ref, atol=ATOL, rtol=0)


def test_embeddings_entry_matches_hf_inputs_embeds(converted):
    """Arbitrary embeddings (not rows of the table), as Ferret feeds them."""
    model, config, params = converted
    emb = np.random.RandomState(1).randn(2, 19, config.hidden_size).astype(np.float32)
    ours, _ = Llama(config).apply({"params": params}, embeddings=jnp.asarray(emb))
    with torch.no_grad():
        ref = model(inputs_embeds=torch.tensor(emb)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="exactly one"):
        Llama(config).apply({"params": params})


def test_unrolled_layer_stack_matches_hf_and_cache(converted):
    """`scan_unroll=num_layers` (the demo's setting) keeps the stacked params and the outputs."""
    import dataclasses

    model, config, params = converted
    unrolled = Llama(dataclasses.replace(config, scan_unroll=config.num_layers))
    ids = np.random.RandomState(3).randint(0, config.vocab_size, (2, 20))
    ours, _ = unrolled.apply({"params": params}, jnp.asarray(ids))
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, atol=ATOL, rtol=0)
    logits, cache = unrolled.apply({"params": params}, jnp.asarray(ids[:, :12]), cache=init_kv_cache(config, 2, 20))
    step, _ = unrolled.apply({"params": params}, jnp.asarray(ids[:, 12:]), cache=cache, cache_index=12)
    np.testing.assert_allclose(np.asarray(jnp.concatenate([logits, step], 1)), ref, atol=ATOL, rtol=0)


def test_kv_cache_decoding_equals_full_forward(converted):
    """Prefill 8 tokens, then decode 16 one at a time; logits equal the full forward's."""
    _, config, params = converted
    model = Llama(config)
    ids = jnp.asarray(np.random.RandomState(2).randint(0, config.vocab_size, (3, 24)))
    full, _ = model.apply({"params": params}, ids)

    step = jax.jit(lambda p, t, c, i: model.apply({"params": p}, t, cache=c, cache_index=i))
    cache = init_kv_cache(config, batch=3, max_len=32)
    logits, cache = step(params, ids[:, :8], cache, 0)
    pieces = [logits]
    for t in range(8, 24):
        logits, cache = step(params, ids[:, t : t + 1], cache, t)
        pieces.append(logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(pieces, 1)), np.asarray(full), atol=ATOL, rtol=0)


def test_left_padded_row_decodes_like_unpadded(converted):
    """kv_mask and explicit positions: a row padded on the left gives the unpadded row's logits."""
    _, config, params = converted
    model = Llama(config)
    rng = np.random.RandomState(3)
    short = rng.randint(0, config.vocab_size, (1, 6))
    pad = 4
    padded = np.concatenate([np.zeros((1, pad), np.int64), short], 1)
    positions = np.concatenate([np.zeros((1, pad)), np.arange(6)[None]], 1).astype(np.int32)
    valid = np.arange(padded.shape[1] + 3)[None] >= pad
    ref, _ = model.apply({"params": params}, jnp.asarray(short))

    cache = init_kv_cache(config, 1, padded.shape[1] + 3)
    logits, cache = model.apply(
        {"params": params}, jnp.asarray(padded), positions=jnp.asarray(positions),
        kv_mask=jnp.asarray(valid), cache=cache, cache_index=0,
    )
    np.testing.assert_allclose(np.asarray(logits[:, pad:]), np.asarray(ref), atol=ATOL, rtol=0)
    # One more step continues the sequence at position 6 (slot 10).
    nxt = rng.randint(0, config.vocab_size, (1, 1))
    step, _ = model.apply(
        {"params": params}, jnp.asarray(nxt), positions=jnp.asarray([[6]]), kv_mask=jnp.asarray(valid),
        cache=cache, cache_index=padded.shape[1],
    )
    ref7, _ = model.apply({"params": params}, jnp.asarray(np.concatenate([short, nxt], 1)))
    np.testing.assert_allclose(np.asarray(step[:, 0]), np.asarray(ref7[:, -1]), atol=ATOL, rtol=0)


def test_added_token_rows(hf, tmp_path):
    """`<region_fea>` grows the vocabulary by one row; original logits are untouched."""
    model = hf.llama(seed=8)
    directory = hf.save(model, tmp_path)
    config0, params0, _ = convert_llama(directory, added_tokens=0)
    config1, params1, _ = convert_llama(directory, added_tokens=1)
    assert config1.vocab_size == config0.vocab_size + 1
    np.testing.assert_allclose(params1["embed"][-1], params0["embed"].mean(0), rtol=1e-6)
    ids = jnp.asarray(np.random.RandomState(4).randint(0, config0.vocab_size, (1, 9)))
    l0, _ = Llama(config0).apply({"params": params0}, ids)
    l1, _ = Llama(config1).apply({"params": params1}, ids)
    np.testing.assert_allclose(np.asarray(l1[..., :-1]), np.asarray(l0), atol=1e-6)
