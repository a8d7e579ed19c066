"""The vocabulary reductions: ``token_logprobs`` / ``token_kl`` against a plain log-softmax, chunked (an online
log-sum-exp over strided vocabulary chunks, or contiguous slices with the last one shifted back where the vocabulary
has no divisor to stride by) against unchunked — values and gradients — and the rematerialised block giving the
same loss and gradient as the plain one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpersona.model.config import from_hf_config
from jaxpersona.model.params import init_params
from jaxpersona.model.transformer import final_hidden, token_kl, token_logprobs, unembed, vocab_stride

# vocab 1000: strided chunks (4 of 250 ids for a chunk of 256 or 333); vocab 1009 (prime): contiguous chunks whose
# last one overlaps the previous one (1009 = 3 * 256 + 241)
CFG = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64,
       "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
       "rms_norm_eps": 1e-5, "rope_theta": 10000.0}


@pytest.fixture(scope="module", params=[(True, 1000), (False, 1000), (True, 1009), (False, 1009)],
                ids=["tied-strided", "lm_head-strided", "tied-contiguous", "lm_head-contiguous"])
def model(request: pytest.FixtureRequest):
    tied, vocab = request.param
    assert (vocab_stride(vocab, 256) > 0) == (vocab == 1000)
    cfg = from_hf_config({**CFG, "vocab_size": vocab, "tie_word_embeddings": tied,
                          **({"final_logit_softcapping": 5.0} if not tied else {})})
    params = init_params(cfg, jax.random.key(0), jnp.float32)
    # init weights are tiny (flat next-token distributions): sharpen the head so the KLs are far from zero
    return cfg, {**params, **{k: params[k] * 20 for k in ("embed", "lm_head") if k in params}}


def reference_logprobs(params, cfg, h, tokens):
    logp = jax.nn.log_softmax(unembed(params, cfg, h), axis=-1)
    return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]


def reference_kl(params, cfg, hb, hn):
    lb, ln = (jax.nn.log_softmax(unembed(params, cfg, h), axis=-1) for h in (hb, hn))
    return (jnp.exp(lb) * (lb - ln)).sum(-1)


def test_logprobs_match_log_softmax_chunked_or_not(model) -> None:
    cfg, params = model
    h = jax.random.normal(jax.random.key(1), (3, 5, cfg.d_model)) * 3
    tokens = jax.random.randint(jax.random.key(2), (3, 5), 0, cfg.vocab_size).at[0, 0].set(cfg.vocab_size - 1)
    ref = reference_logprobs(params, cfg, h, tokens)
    for chunk in (4096, 256, 333):
        got = token_logprobs(params, cfg, h, tokens, chunk=chunk)
        np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-5)
    # gradients w.r.t. the residual agree too (the chunked path is rematerialised in the backward)
    g_ref = jax.grad(lambda x: reference_logprobs(params, cfg, x, tokens).sum())(h)
    g = jax.grad(lambda x: token_logprobs(params, cfg, x, tokens, chunk=256).sum())(h)
    np.testing.assert_allclose(g, g_ref, atol=2e-5, rtol=1e-4)


def test_a_bfloat16_head_chunked_or_not_gives_the_same_logprobs(model) -> None:
    """Mixed precision: the head enters the chunk loop as its bits (``cpu_loop_weights``, strided and contiguous
    chunks alike) and gives what the unchunked bfloat16 head gives; gradients w.r.t. the residual still flow."""
    from jaxpersona.model.params import with_matmul_dtype

    cfg, params = model
    params = with_matmul_dtype(params, "bfloat16")
    h = jax.random.normal(jax.random.key(1), (3, 5, cfg.d_model)) * 3
    tokens = jax.random.randint(jax.random.key(2), (3, 5), 0, cfg.vocab_size)
    ref = reference_logprobs(params, cfg, h, tokens)
    run = jax.jit(lambda p, x: token_logprobs(p, cfg, x, tokens, chunk=256))
    np.testing.assert_allclose(run(params, h), ref, atol=2e-5, rtol=1e-5)
    # XLA:CPU would convert a bfloat16 loop operand to float32 whole before the loop: the head enters as bits
    shape = f"{cfg.vocab_size},{cfg.d_model}" if cfg.tie_embeddings else f"{cfg.d_model},{cfg.vocab_size}"
    hlo = run.lower(params, h).compile().as_text()
    assert f"f32[{shape}]" not in hlo and "u16[" in hlo
    g_ref = jax.grad(lambda x: reference_logprobs(params, cfg, x, tokens).sum())(h)
    g = jax.grad(lambda x: token_logprobs(params, cfg, x, tokens, chunk=256).sum())(h)
    # the cotangent of a bfloat16 operand is bfloat16: per chunk here, once for the whole vocabulary there
    scale = float(jnp.abs(g_ref).max())
    assert scale > 0.01
    np.testing.assert_allclose(g, g_ref, atol=2 ** -7 * scale, rtol=0)


def test_kl_matches_the_log_softmax_formula(model) -> None:
    cfg, params = model
    hb = jax.random.normal(jax.random.key(3), (2, 4, cfg.d_model)) * 3
    hn = hb + jax.random.normal(jax.random.key(4), hb.shape)
    ref = reference_kl(params, cfg, hb, hn)
    assert float(ref.min()) > 1e-2  # a real difference, not a trivially zero KL
    for chunk in (4096, 256):
        np.testing.assert_allclose(token_kl(params, cfg, hb, hn, chunk=chunk), ref, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(token_kl(params, cfg, hb, hb, chunk=256), 0.0, atol=2e-5)
    g_ref = jax.grad(lambda x: reference_kl(params, cfg, hb, x).sum())(hn)
    g = jax.grad(lambda x: token_kl(params, cfg, hb, x, chunk=256).sum())(hn)
    np.testing.assert_allclose(g, g_ref, atol=2e-5, rtol=1e-4)


def test_remat_block_gives_the_same_loss_and_gradient(model) -> None:
    cfg, params = model
    tokens = jax.random.randint(jax.random.key(5), (2, 12), 0, cfg.vocab_size)
    valid = jnp.ones(tokens.shape, bool).at[0, :3].set(False)

    def loss(p, remat):
        h = final_hidden(p, cfg, tokens, valid, remat=remat)
        return token_logprobs(p, cfg, h[:, :-1], tokens[:, 1:]).mean()

    (l0, g0), (l1, g1) = (jax.value_and_grad(loss)(params, r) for r in (False, True))
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-5)


def test_forward_only_scoring_chunks_only_where_they_stay_evenly_sharded() -> None:
    """``score_vocab_chunk``: 4,096-id strided chunks for many positions of SmolLM2's or Gemma's vocabulary (each
    chunk a multiple of 256 ids, so a vocabulary split over ``model`` splits every chunk evenly); the one-pass
    form for few positions and for vocabularies whose strided chunks would not split evenly (Qwen, Llama 3)."""
    from jaxpersona.model.transformer import SCORE_CHUNK, VOCAB_CHUNK, score_vocab_chunk

    assert score_vocab_chunk(576, 49152) == SCORE_CHUNK and score_vocab_chunk(576, 262144) == SCORE_CHUNK
    assert score_vocab_chunk(32, 49152) == VOCAB_CHUNK  # 6 MiB of logits: one pass is faster
    for vocab in (151936, 128256, 32000, 1009):
        assert score_vocab_chunk(4096, vocab) == VOCAB_CHUNK, vocab
    for vocab in (49152, 262144):
        assert (vocab // vocab_stride(vocab, SCORE_CHUNK)) % 256 == 0
