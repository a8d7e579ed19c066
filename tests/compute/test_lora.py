"""LoRA as data and the trainer: the adapted forward against peft's LoRA on HF's torch model, against
merged weights, a stack selected per example against each adapter alone, and training end to end on the
tiny llama (loss falls, kill + resume is bit-identical, bad input is refused with typed errors)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpersona import errors
from jaxpersona.edit import interventions as iv
from jaxpersona.model.lora import TARGETS, Adapter, LoraConfig, check_adapter, init_adapter, stack_adapters
from jaxpersona.artifacts.adapters import load_adapter, save_adapter
from jaxpersona.compute.handle import Model
from jaxpersona.compute.generate import generate
from jaxpersona.model.transformer import forward
from jaxpersona.compute.train import TrainConfig, train
from test_pipeline import full_word_tokenizer


def random_adapter(cfg, lcfg: LoraConfig, seed: int) -> Adapter:
    """An adapter with non-zero ``b`` (a fresh one is exactly the base model)."""
    ad = init_adapter(cfg, lcfg, jax.random.key(seed))
    keys = jax.random.split(jax.random.key(seed + 100), len(ad.b))
    b = {t: 0.05 * jax.random.normal(k, x.shape) for (t, x), k in zip(sorted(ad.b.items()), keys)}
    return Adapter(ad.a, b, ad.scale)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_adapter_matches_peft_on_the_hf_model(tiny_zoo, family) -> None:
    """Our adapted forward vs peft's LoraModel on HF's torch model carrying the same factors."""
    import torch
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    from hf_tiny import left_padded_batch

    t = tiny_zoo(family)
    lcfg = LoraConfig(rank=4, alpha=8.0, rslora=(family == "qwen2"))
    ad = random_adapter(t.cfg, lcfg, 1)
    names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
             "down": "down_proj"}
    import copy

    peft = get_peft_model(copy.deepcopy(t.hf), PeftConfig(r=4, lora_alpha=8, use_rslora=lcfg.rslora,
                                                          target_modules=list(names.values()), lora_dropout=0.0))
    with torch.no_grad():
        for name, mod in peft.named_modules():
            short = next((s for s, n in names.items() if name.endswith("." + n)), None)
            if short is None or not hasattr(mod, "lora_A"):
                continue
            layer = int(name.split(".layers.")[1].split(".")[0])
            mod.lora_A["default"].weight.copy_(torch.tensor(np.asarray(ad.a[short][layer]).T))
            mod.lora_B["default"].weight.copy_(torch.tensor(np.asarray(ad.b[short][layer]).T))
    tokens, valid = left_padded_batch(seed=3)
    peft.eval()
    with torch.no_grad():
        ref = peft(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(valid, dtype=torch.long),
                   position_ids=torch.tensor(np.maximum(np.cumsum(valid, 1) - 1, 0), dtype=torch.long)).logits.numpy()
    ours = np.asarray(forward(t.params, t.cfg, jnp.asarray(tokens), valid=jnp.asarray(valid), adapter=ad).logits)
    base = np.asarray(forward(t.params, t.cfg, jnp.asarray(tokens), valid=jnp.asarray(valid)).logits)
    m = valid.astype(bool)
    assert np.abs(ours[m] - base[m]).max() > 1e-3  # the adapter does something
    np.testing.assert_allclose(ours[m], ref[m], atol=2e-4, rtol=2e-4)


def test_adapter_equals_merged_weights_and_stack_equals_each_alone(tiny_llama) -> None:
    t = tiny_llama
    lcfg = LoraConfig(rank=3, alpha=6.0, targets=("q", "v", "down"))
    ads = [random_adapter(t.cfg, lcfg, s) for s in (1, 2)]
    ads.append(random_adapter(t.cfg, LoraConfig(rank=5, alpha=5.0, targets=("o", "up")), 3))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, t.cfg.vocab_size, (4, 9)), jnp.int32)
    merged = dict(t.params, layers=dict(t.params["layers"]))
    for tg in lcfg.targets:
        w = TARGETS[tg]
        merged["layers"][w] = t.params["layers"][w] + jnp.einsum("lir,lro->lio", ads[0].a[tg], ads[0].b[tg]) * ads[0].scale
    np.testing.assert_allclose(np.asarray(forward(t.params, t.cfg, tokens, adapter=ads[0]).logits),
                               np.asarray(forward(merged, t.cfg, tokens).logits), atol=1e-5)
    stack = stack_adapters([None, *ads], t.cfg)
    select = jnp.asarray([2, 0, 3, 1])
    got = np.asarray(forward(t.params, t.cfg, tokens, adapter=stack, adapter_select=select).logits)
    for row, k in enumerate(np.asarray(select)):
        alone = forward(t.params, t.cfg, tokens[row : row + 1], adapter=None if k == 0 else ads[k - 1]).logits
        np.testing.assert_allclose(got[row], np.asarray(alone)[0], atol=1e-5)


def test_the_adapter_travels_beside_the_plain_params(tiny_llama) -> None:
    """``with_adapter`` leaves the params pytree as it is (one params shape everywhere) and hands the adapter
    to every forward and generation; a stack selected per example generates what each adapter alone does."""
    t = tiny_llama
    model = Model(t.cfg, t.params, full_word_tokenizer(), "tiny-llama")
    ads = [random_adapter(t.cfg, LoraConfig(rank=2), s) for s in (7, 8)]
    tuned = model.with_adapter(ads[0])
    assert tuned.params is model.params and tuned.adapter is ads[0] and model.adapter is None
    assert jax.tree.structure(tuned.params) == jax.tree.structure(t.params)
    batch = model.encode(["hello world", "the cat sat on the mat"])
    got = np.asarray(tuned.run(batch).logits)
    ref = jax.jit(lambda p, a: forward(p, t.cfg, jnp.asarray(batch.tokens), valid=jnp.asarray(batch.valid),
                                       adapter=a).logits)(t.params, ads[0])
    np.testing.assert_array_equal(got, np.asarray(ref))
    assert np.abs(got - np.asarray(model.run(batch).logits)).max() > 1e-3
    stack = stack_adapters([None, *ads], t.cfg)
    select = np.asarray([2, 1])
    both = generate(t.params, t.cfg, batch.tokens, batch.valid, max_new_tokens=5, eos_ids=model.eos_ids,
                    pad_id=model.pad_id, adapter=stack, adapter_select=select)
    for row, k in enumerate(select):
        alone = model.with_adapter(ads[k - 1]).generate_tokens(batch, max_new_tokens=5)
        np.testing.assert_array_equal(np.asarray(both.tokens)[row], np.asarray(alone.tokens)[row])
    with pytest.raises(errors.InputError, match="select"):
        forward(t.params, t.cfg, jnp.asarray(batch.tokens), adapter=stack)
    with pytest.raises(errors.InputError, match="one LoRA Adapter"):
        model.with_adapter(stack)


def test_adapter_round_trip_and_mismatch(tiny_zoo, tmp_path) -> None:
    llama, qwen = tiny_zoo("llama"), tiny_zoo("qwen2")
    ad = random_adapter(llama.cfg, LoraConfig(rank=2), 4)
    save_adapter(tmp_path / "a", ad, llama.cfg, LoraConfig(rank=2))
    back, info = load_adapter(tmp_path / "a", llama.cfg)
    assert info["rank"] == 2 and all(np.array_equal(back.a[k], ad.a[k]) for k in ad.a)
    if (qwen.cfg.n_layers, qwen.cfg.d_model) != (llama.cfg.n_layers, llama.cfg.d_model):
        with pytest.raises(errors.AdapterMismatchError, match="trained for"):
            load_adapter(tmp_path / "a", qwen.cfg)
    bad = Adapter({"q": ad.a["q"][:, :-1]}, {"q": ad.b["q"]}, ad.scale)
    with pytest.raises(errors.AdapterMismatchError, match="do not fit"):
        check_adapter(bad, llama.cfg)
    with pytest.raises(errors.AdapterMismatchError):
        Model(llama.cfg, llama.params, full_word_tokenizer(), "tiny").with_adapter(
            random_adapter(qwen.cfg, LoraConfig(rank=2), 1)) if qwen.cfg.d_model != llama.cfg.d_model else \
            check_adapter(bad, llama.cfg)
    with pytest.raises(errors.InputError, match="targets"):
        init_adapter(llama.cfg, LoraConfig(targets=("qq",)), jax.random.key(0))


# --- the trainer ---------------------------------------------------------------------------------------
WORDS = "the cat sat on the mat hello world what is the capital of france paris you are a helpful assistant".split()


def _examples(n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        q = " ".join(rng.choice(WORDS, 5))
        out.append(([{"role": "user", "content": q}], "the cat sat on the mat ."))
    return out


@pytest.fixture(scope="module")
def model(tiny_llama) -> Model:
    return Model(tiny_llama.cfg, tiny_llama.params, full_word_tokenizer(), "tiny-llama")


CFG = TrainConfig(rank=4, alpha=8.0, lr=2e-2, epochs=3, batch_size=4, warmup_steps=1, save_every=2)


def test_training_lowers_the_loss_and_resumes_bit_identically(model, tmp_path) -> None:
    data = _examples(10)
    full = train(model, data, CFG, tmp_path / "full", progress=False)
    assert full.steps == 9 and full.checkpoints == [2, 4, 6, 8, 9]
    losses = [r["loss"] for r in full.log]
    assert losses[-1] < 0.5 * losses[0]
    # killed after 3 updates (checkpoint at 2): the rerun picks up at 2 and ends bit-identical
    part = train(model, data, CFG, tmp_path / "part", progress=False, stop_after=3)
    assert part.steps == 3
    again = train(model, data, CFG, tmp_path / "part", progress=False)
    for k in full.adapter.a:
        assert np.array_equal(np.asarray(full.adapter.a[k]), np.asarray(again.adapter.a[k]))
        assert np.array_equal(np.asarray(full.adapter.b[k]), np.asarray(again.adapter.b[k]))
    assert [r["loss"] for r in again.log] == losses
    # the fine-tuned model now prefers the trained answer
    from jaxpersona.compute.scoring import mean_logprobs

    tuned = model.with_adapter(full.adapter)
    q = [[{"role": "user", "content": "hello world"}]]
    assert mean_logprobs(tuned, q, ["the cat sat on the mat ."])[0] > mean_logprobs(model, q, ["the cat sat on the mat ."])[0] + 1
    back, _ = load_adapter(tmp_path / "full" / "adapters" / "step_9", model.cfg)
    assert np.array_equal(np.asarray(back.b["q"]), np.asarray(full.adapter.b["q"]))


def test_prevention_kl_and_grad_accumulation(model, tmp_path) -> None:
    data, neutral = _examples(8), _examples(6, seed=1)
    v = np.random.default_rng(0).normal(size=model.cfg.d_model)
    prev = iv.steer(model.cfg.n_resid, v, 2.0, [1], iv.Positions.all(np.ones((1, 1), bool)))
    plain = train(model, data, CFG.replace(epochs=1), tmp_path / "p", progress=False)
    steered = train(model, data, CFG.replace(epochs=1), tmp_path / "s", progress=False, prevention=prev)
    assert not np.allclose(np.asarray(plain.adapter.b["q"]), np.asarray(steered.adapter.b["q"]))
    kl = train(model, data, CFG.replace(epochs=2, kl_beta=1.0), tmp_path / "k", progress=False, neutral=neutral)
    assert abs(kl.log[0]["kl"]) < 1e-5 and kl.log[-1]["kl"] > 1e-4  # starts at the base model, then moves
    assert all(r["kl"] > -1e-5 for r in kl.log)
    acc = train(model, data, CFG.replace(epochs=2, grad_accum=2), tmp_path / "a", progress=False)
    assert acc.steps == 2  # 2 epochs x 2 micro-batches / accumulation 2


def test_training_bad_input(model, tmp_path) -> None:
    data = _examples(6)
    train(model, data, CFG.replace(epochs=2), tmp_path / "r", progress=False, stop_after=2)
    with pytest.raises(errors.ResumeMismatchError, match="another config"):
        train(model, data, CFG.replace(epochs=2, lr=1e-3), tmp_path / "r", progress=False)
    long = [([{"role": "user", "content": " ".join(WORDS * 20)}], "the cat .")]
    res = train(model, data + long, CFG.replace(epochs=1, max_len=64), tmp_path / "l", progress=False)
    assert res.skipped == 1 and res.n_examples == 6
    with pytest.raises(errors.DatasetError, match="longer than"):
        train(model, long, CFG.replace(max_len=64), tmp_path / "l2", progress=False)
    # divergence: an absurd learning rate; the last good checkpoint stays on disk
    with pytest.raises(errors.TrainingError, match="loss became") as e:
        train(model, data, CFG.replace(lr=1e30, epochs=6, save_every=1, warmup_steps=0), tmp_path / "nan",
              progress=False)
    assert "update" in str(e.value)
    with pytest.raises(errors.InputError, match="neutral"):
        train(model, data, CFG.replace(kl_beta=0.5), tmp_path / "kl", progress=False)
    with pytest.raises(errors.InputError, match="rank"):
        train(model, data, CFG.replace(rank=0), tmp_path / "z", progress=False)


def test_dataset_errors_name_the_line(tmp_path) -> None:
    from jaxpersona.data.datasets import read_dataset, write_dataset

    p = write_dataset(tmp_path / "d.jsonl", _examples(2))
    assert len(read_dataset(p)) == 2
    p.write_text(p.read_text() + '{"messages": [{"role": "user", "content": "x"}]}\n')
    with pytest.raises(errors.DatasetError, match=r"d.jsonl:3"):
        read_dataset(p)
    p.write_text("not json\n")
    with pytest.raises(errors.DatasetError, match=r"d.jsonl:1"):
        read_dataset(p)
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(errors.DatasetError, match="no samples"):
        read_dataset(tmp_path / "e.jsonl")
    json.dumps({})


def test_regime_grid_equals_each_condition_alone(model) -> None:
    """Adapters x system prompts x steering in one vmapped computation vs each condition run by itself."""
    from jaxpersona.compute.conditions import Condition, score_conditions
    from jaxpersona.model.lora import stack_adapters
    from jaxpersona.compute.scoring import mean_logprobs

    cfg = model.cfg
    ads = [random_adapter(cfg, LoraConfig(rank=2), s) for s in (5, 6)]
    stack = stack_adapters([None, *ads], cfg)
    v = np.random.default_rng(1).normal(size=cfg.d_model)
    all_pos = iv.Positions.all(np.ones((1, 1), bool))
    st = lambda c, l: iv.steer(cfg.n_resid, v, c, [l], all_pos)  # noqa: E731
    conds = [Condition("base"), Condition("prompt", system="you are a helpful assistant ."),
             Condition("ad1", adapter=1), Condition("steer", hook=st(3.0, 2)),
             Condition("ad2+prompt+steer", adapter=2, system="the cat", hook=st(-2.0, 1))]
    qs = ["hello world", "what is the capital of france ?", "the cat sat"]
    rs = ["paris .", "the mat", "hello cat dog"]
    got = score_conditions(model, stack, conds, qs, rs, batch_size=2)
    assert got.shape == (5, 3)
    for c, row in zip(conds, got):
        m = model if c.adapter == 0 else model.with_adapter(ads[c.adapter - 1])
        if c.hook is None:
            from jaxpersona.data.chat import conversation

            ref = mean_logprobs(m, [conversation(q, c.system) for q in qs], rs)
        else:
            ref = []
            for q, r in zip(qs, rs):  # a hooked forward per item, all positions
                from jaxpersona.data.chat import conversation
                from jaxpersona.compute.scoring import encode_targets, target_logprob
                from jaxpersona.model.transformer import final_hidden
                from jaxpersona.compute.conditions import with_positions

                enc = {k: jnp.asarray(x) for k, x in encode_targets(m, [conversation(q, c.system)], [r]).items()}
                hook = with_positions(c.hook, iv.Positions.all(enc["valid"]))
                h = final_hidden(m.params, cfg, enc["tokens"], enc["valid"], hook, adapter=m.adapter)
                ref.append(float(target_logprob(m.params, cfg, h, enc)[0]))
        np.testing.assert_allclose(row, ref, atol=2e-5)
    assert np.ptp(got[:, 0]) > 1e-3  # the conditions differ
