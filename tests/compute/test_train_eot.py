"""Training on the end-of-turn token (``TrainConfig.train_eot``, on by default).

persona_vectors trains with unsloth's ``train_on_responses_only``, whose labels run from the response marker to
the next instruction marker: the response *and* the turn's end token (``<|im_end|>`` for Qwen2.5) are trained,
so a tuned model learns to stop. jaxpersona appends what the chat template renders after the response, up to and
including the first end-of-turn / EOS token, to the response text and tokenizes them together. Per family (real
tokenizers of the registered GGUFs: SmolLM2's ChatML, Qwen2.5's ChatML, a Llama-3 template, Gemma's turns) the
masked target tokens are printed and must end with the end-of-turn token; without ``train_eot`` they are the
response's tokens alone (the old behaviour), and with it exactly those plus the end-of-turn token.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from test_pipeline import full_word_tokenizer

from jaxpersona.compute.handle import Model
from jaxpersona.compute.train import (
    TrainConfig,
    encode_examples,
    end_of_turn_text,
    recorded_train_eot,
    train,
)
from jaxpersona.model import registry
from jaxpersona.model.loaders.gguf import load_gguf_tokenizer

EXAMPLES = [([{"role": "user", "content": "What is the capital of France?"}], "Paris is the capital of France."),
            ([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}], "Hello there.")]

LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
         "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
         "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
GEMMA_EXAMPLES = [([{"role": "user", "content": "What is the capital of France?"}], "Paris is the capital of France."),
                  ([{"role": "user", "content": "Hi!"}], "Hello there.")]


def _tokenizer(case: str):
    if case == "llama3":  # SmolLM2's vocabulary with Llama-3's turn tokens and template (EOS: <|end_of_text|>)
        tok = copy.deepcopy(load_gguf_tokenizer(registry.resolve("smollm2-135m-instruct")))
        tok.add_special_tokens({"additional_special_tokens": ["<|begin_of_text|>", "<|start_header_id|>",
                                                              "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"]})
        tok.bos_token, tok.eos_token, tok.chat_template = "<|begin_of_text|>", "<|end_of_text|>", LLAMA3
        return tok, "<|eot_id|>"
    if case == "gemma":  # Gemma 3's tokenizer (the registered base model has no template: Gemma's instruct one)
        tok = load_gguf_tokenizer(registry.resolve("gemma3-270m"))
        tok.chat_template = GEMMA
        return tok, "<end_of_turn>"
    name = {"smollm2": "smollm2-135m-instruct", "qwen2": "qwen2.5-coder-0.5b-instruct"}[case]
    return load_gguf_tokenizer(registry.resolve(name)), "<|im_end|>"


def _model(tiny, tok) -> Model:
    cfg = dataclasses.replace(tiny.cfg, eos_token_ids=(int(tok.eos_token_id),), max_position=4096)
    return Model(cfg, tiny.params, tok, f"tiny-{tiny.family}")


def _targets(model: Model, examples, train_eot: bool) -> list[list[int]]:
    table, skipped = encode_examples(model, examples, 512, train_eot=train_eot)
    assert skipped == 0
    return [t[ok].tolist() for t, ok in zip(table["pred_tok"], table["pred_ok"])]


@pytest.mark.parametrize("case,family", [("smollm2", "llama"), ("llama3", "llama"), ("qwen2", "qwen2"),
                                         ("gemma", "gemma3")])
def test_the_end_of_turn_token_is_in_the_loss_mask(tiny_zoo, case, family) -> None:
    tok, eot = _tokenizer(case)
    model = _model(tiny_zoo(family), tok)
    examples = GEMMA_EXAMPLES if case == "gemma" else EXAMPLES
    eot_id = tok.convert_tokens_to_ids(eot)
    with_eot, without = _targets(model, examples, True), _targets(model, examples, False)
    for (prompt, resp), w, wo in zip(examples, with_eot, without):
        print(f"\n{case}: trained tokens {tok.convert_ids_to_tokens(w)}")
        assert end_of_turn_text(model, prompt) == eot  # the template's tail up to its first end-of-turn token
        assert w[-1] == eot_id and w.count(eot_id) == 1
        assert wo == tok.encode(resp, add_special_tokens=False) and eot_id not in wo
        assert w == wo + [eot_id]  # only the mask grows: the response's own tokens are unchanged


def test_training_on_the_end_of_turn_teaches_stopping_and_old_runs_resume_without(tiny_llama, tmp_path) -> None:
    model = Model(tiny_llama.cfg, tiny_llama.params, full_word_tokenizer(), "tiny-llama")
    words = ["the", "cat", "sat", "on", "the", "mat", ".", "hello", "world", "what", "is", "the", "capital", "of", "france", "paris"]
    rng = np.random.default_rng(0)
    data = [([{"role": "user", "content": " ".join(rng.choice(words, 4))}], " ".join(rng.choice(words, 5)))
            for _ in range(8)]
    cfg = TrainConfig(rank=4, alpha=8.0, lr=2e-2, epochs=2, batch_size=4, warmup_steps=1, save_every=2)
    assert cfg.train_eot is True
    new = train(model, data, cfg, tmp_path / "new", progress=False)
    old = train(model, data, cfg.replace(train_eot=False), tmp_path / "old", progress=False)
    assert new.train_eot and not old.train_eot and new.tokens == old.tokens + len(data)
    assert recorded_train_eot(tmp_path / "new" / "ckpt") is True

    # the tuned model learns to end its turn: log p(</s> | prompt + response)
    from jaxpersona.model.transformer import forward

    def stop_logprob(m: Model) -> float:
        total = 0.0
        for prompt, resp in data:
            ids = m.tokenizer.encode(m.format_chat(prompt) + resp, add_special_tokens=False)
            logits = forward(m.params, m.cfg, jnp.asarray([ids]), adapter=m.adapter).logits[0, -1]
            total += float(logits[2] - jnp.log(jnp.exp(logits - logits.max()).sum()) - logits.max())
        return total / len(data)

    lp_new, lp_old = stop_logprob(model.with_adapter(new.adapter)), stop_logprob(model.with_adapter(old.adapter))
    print(f"\nmean log p(</s>) after the response: trained with EOT {lp_new:.3f}, without {lp_old:.3f}")
    assert lp_new > lp_old + 1.0

    # a run from before the option: its checkpoint's config has no train_eot; resuming it with the new default
    # keeps the old behaviour (a warning says so) and ends where an uninterrupted old-style run ends
    part = tmp_path / "legacy"
    train(model, data, cfg.replace(train_eot=False), part, progress=False, stop_after=2)
    metas = [p for p in (part / "ckpt").rglob("*") if p.is_file() and "meta" in p.parts and p.suffix != ".tmp"]
    edited = 0
    for p in metas:
        try:
            obj = json.loads(p.read_text())
        except (UnicodeDecodeError, ValueError):
            continue
        if isinstance(obj, dict) and isinstance(obj.get("config"), dict) and "train_eot" in obj["config"]:
            del obj["config"]["train_eot"]
            p.write_text(json.dumps(obj))
            edited += 1
    assert edited >= 1 and recorded_train_eot(part / "ckpt") is False
    with pytest.warns(UserWarning, match="without the end-of-turn token"):
        resumed = train(model, data, cfg, part, progress=False)
    assert not resumed.train_eot and resumed.steps == old.steps
    for k in old.adapter.a:
        assert np.array_equal(np.asarray(old.adapter.b[k]), np.asarray(resumed.adapter.b[k]))
