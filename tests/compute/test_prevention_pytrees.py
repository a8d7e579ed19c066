"""Prevention during training takes any intervention pytree the forward takes, ``Chain`` included.

A ``Chain`` of two steers at one layer adds ``c1 v1 + c2 v2``: training under it must give the adapter that
training under the one equivalent ``Steer`` gives (same loss, same updates up to float rounding); the order of a
steer-then-ablate chain matters (other adapters); anything the compiled forward cannot take is a typed error that
names what is accepted."""

from __future__ import annotations

import numpy as np
import pytest
from test_pipeline import full_word_tokenizer

from jaxpersona import errors
from jaxpersona.compute.handle import Model
from jaxpersona.compute.train import TrainConfig, train
from jaxpersona.edit import interventions as iv

CFG = TrainConfig(rank=4, alpha=8.0, lr=2e-2, epochs=1, batch_size=4, warmup_steps=1, save_every=0)


def _data(n: int = 8):
    words = ["the", "cat", "sat", "on", "the", "mat", ".", "hello", "world", "what", "is", "the", "capital", "of", "france", "paris"]
    rng = np.random.default_rng(0)
    return [([{"role": "user", "content": " ".join(rng.choice(words, 4))}], " ".join(rng.choice(words, 5)))
            for _ in range(n)]


def test_a_chain_as_prevention(tiny_llama, tmp_path) -> None:
    model = Model(tiny_llama.cfg, tiny_llama.params, full_word_tokenizer(), "tiny-llama")
    n, d = model.cfg.n_resid, model.cfg.d_model
    rng = np.random.default_rng(1)
    v1, v2 = rng.normal(size=d).astype(np.float32), rng.normal(size=d).astype(np.float32)
    pos = iv.Positions.all(np.ones((1, 1), bool))  # replaced by the trainer: every position of each batch
    chain = iv.Chain((iv.steer(n, v1, 2.0, [2], pos), iv.steer(n, v2, -1.5, [2], pos)))
    single = iv.steer(n, 2.0 * v1 - 1.5 * v2, 1.0, [2], pos)
    data = _data()
    a = train(model, data, CFG, tmp_path / "chain", prevention=chain, progress=False)
    b = train(model, data, CFG, tmp_path / "single", prevention=single, progress=False)
    plain = train(model, data, CFG, tmp_path / "plain", progress=False)
    diff = max(float(np.abs(np.asarray(a.adapter.b[k]) - np.asarray(b.adapter.b[k])).max()) for k in a.adapter.b)
    moved = max(float(np.abs(np.asarray(a.adapter.b[k]) - np.asarray(plain.adapter.b[k])).max()) for k in a.adapter.b)
    print(f"\nChain vs the equivalent Steer: max |dB| {diff:.2e} (the prevention itself moves B by {moved:.2e}); "
          f"losses {a.log[0]['loss']:.6f} / {b.log[0]['loss']:.6f}")
    assert a.log[0]["loss"] == pytest.approx(b.log[0]["loss"], abs=1e-5)
    assert diff < 1e-4 < moved
    # nested chains and the order of the items: steer-then-ablate is not ablate-then-steer
    st, ab = iv.steer(n, v1, 3.0, [1], pos), iv.ablate(n, v1, [1], pos)
    sa = train(model, data, CFG, tmp_path / "sa", prevention=iv.Chain((iv.Chain((st,)), ab)), progress=False)
    as_ = train(model, data, CFG, tmp_path / "as", prevention=iv.Chain((ab, st)), progress=False)
    assert max(float(np.abs(np.asarray(sa.adapter.b[k]) - np.asarray(as_.adapter.b[k])).max()) for k in sa.adapter.b) > 1e-4
    # a rerun with the other order is another run, not a resume
    with pytest.raises(errors.ResumeMismatchError):
        train(model, data, CFG, tmp_path / "sa", prevention=iv.Chain((ab, st)), progress=False)


def test_prevention_that_the_forward_cannot_take_is_a_typed_error(tiny_llama, tmp_path) -> None:
    model = Model(tiny_llama.cfg, tiny_llama.params, full_word_tokenizer(), "tiny-llama")
    n, d = model.cfg.n_resid, model.cfg.d_model
    pos = iv.Positions.all(np.ones((1, 1), bool))
    st = iv.steer(n, np.ones(d), 1.0, [1], pos)
    for bad, match in [([st, st], "compose them with Chain"), ((st,), "compose them with Chain"),
                       (lambda layer, h, ctx: h, "not an array"), ("steer", "not a hook"),
                       (iv.Chain((st, "x")), "not a hook"), (iv.Chain(()), "non-empty")]:
        with pytest.raises(errors.InputError, match=match) as e:
            train(model, _data(4), CFG, tmp_path / "bad", prevention=bad, progress=False)
        assert "Chain of them" in str(e.value) and "Steer, Ablate, Cap, Mixture" in str(e.value)
    with pytest.raises(errors.InputError, match="d_model"):
        train(model, _data(4), CFG, tmp_path / "bad", prevention=iv.Chain((st, iv.steer(n, np.ones(d + 1), 1.0, [1], pos))),
              progress=False)
