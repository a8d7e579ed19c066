"""The truth: real GGUF models, through ``jaxpersona.compute.handle.load``, against transformers' own GGUF loading.

Both sides read the same GGUF file and dequantize it with the same ``gguf`` package code
(transformers' ``load_gguf_checkpoint`` calls ``gguf.quants.dequantize``; so does our converter), so
the fp32 weights are bit-identical. What remains is fp32 summation order over 30 (SmolLM2),
24 (Qwen2.5) and 18 (Gemma 3) layers: measured max |ours - HF| on valid positions of a left-padded
batch of two ~15-20 token prompts is 1.4e-4 (SmolLM2, logits up to ~41), 1.4e-4 (Gemma 3, up to ~35)
and 4.7e-5 (Qwen2.5, up to ~27), i.e. at most ~4e-6 of the logit scale. The tolerance below is
3e-5 x max|logit| (~1e-3 absolute): 7x the worst measured difference, yet 50x smaller than the
smallest top-1/top-2 logit gap seen (~0.02), so a wrong weight, norm or rope shows up at once.

The Qwen and Gemma comparisons are ``slow`` (they still run in CI): each loads ~0.5 GB of GGUF on
both sides. Needs the ``models`` extra (the GGUF packages) and torch + accelerate (transformers
refuses to load a GGUF file without accelerate). A missing package makes these tests ERROR.
"""

from __future__ import annotations

import gc
import json

import jax
import numpy as np
import pytest
import torch
import transformers

import hf_tiny
import jaxpersona.compute.handle as jm
from jaxpersona.compute.batching import Batch
from jaxpersona.data.chat import conversation
from jaxpersona.model import registry
from jaxpersona.compute.generate import generate
from jaxpersona.model.transformer import Capture

SMOLLM2 = "smollm2-135m-instruct"
REL_TOL = 3e-5  # x max|logit|, see the module docstring
TEXTS = [
    "The quick brown fox jumps over the lazy dog, and then it",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
]
QUESTION = "What is the capital of France?"
SYSTEM = "You are a helpful assistant."


def hf_from_gguf(name: str):
    """transformers' own loading of the registered model's GGUF file (fp32, eager attention)."""
    path = registry.resolve(name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def hf_run(hf, batch: Batch):
    ids = torch.tensor(batch.tokens, dtype=torch.long)
    mask = torch.tensor(batch.valid, dtype=torch.long)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


def hf_greedy(hf, batch: Batch, n: int) -> np.ndarray:
    """HF greedy continuation (EOS disabled) of a left-padded batch: ``[B, n]``."""
    return hf_tiny.hf_greedy(hf, batch.tokens, batch.valid, n)


@pytest.fixture(scope="module")
def hf_smollm2():
    return hf_from_gguf(SMOLLM2)


def check_against_hf(model: jm.Model, hf) -> None:
    batch = model.encode(TEXTS)  # left-padded to a 16-token bucket
    assert batch.tokens.shape == (2, 32) and not batch.valid.all()
    mid = model.cfg.n_layers // 2
    out = model.run(batch, capture=Capture((0, mid)))
    ours = np.asarray(out.logits)
    ref, hidden = hf_run(hf, batch)
    v = batch.valid
    assert ours.shape == ref.shape
    scale = np.abs(ref[v]).max()
    diff = np.abs(ours[v] - ref[v]).max()
    assert diff <= REL_TOL * scale, f"max |logit diff| {diff:.3g} > {REL_TOL} x {scale:.3g}"
    np.testing.assert_array_equal(ours[v].argmax(-1), ref[v].argmax(-1))
    # the residual stream agrees too (HF hidden_states[l] == resid[l] for l < L)
    cap = np.asarray(out.captured)
    for i, l in enumerate((0, mid)):
        h_scale = np.abs(hidden[l][v]).max()
        np.testing.assert_allclose(cap[i][v], hidden[l][v], atol=REL_TOL * h_scale, rtol=0, err_msg=f"resid[{l}]")


# --------------------------------------------------------------------------------------------
# logits against transformers' GGUF loading
# --------------------------------------------------------------------------------------------
def test_smollm2_logits_match_transformers_gguf(smollm2, hf_smollm2) -> None:
    assert smollm2.cfg.family == "llama" and smollm2.cfg.n_layers == 30
    check_against_hf(smollm2, hf_smollm2)


def parse_metadata_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers parses a GGUF file's metadata (a pure-Python pass over the whole vocabulary, ~10 s for
    Qwen's or Gemma's) for every config and tokenizer it builds from it: parse each file once and serve
    every metadata-only call from that. Calls that read the tensors parse the file themselves."""
    import transformers.modeling_gguf_pytorch_utils as hf_gguf

    parsed: dict[str, dict] = {}
    parse = hf_gguf.load_gguf_checkpoint

    def parse_once(p, return_tensors=False, **kw):
        if return_tensors or kw:
            return parse(p, return_tensors=return_tensors, **kw)
        if str(p) not in parsed:
            parsed[str(p)] = parse(p, return_tensors=False)
        return dict(parsed[str(p)])

    monkeypatch.setattr(hf_gguf, "load_gguf_checkpoint", parse_once)


@pytest.mark.slow
@pytest.mark.parametrize("name, family", [("qwen2.5-coder-0.5b-instruct", "qwen2"), ("gemma3-270m", "gemma3")])
def test_real_logits_match_transformers_gguf(name: str, family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Logits and residual stream against transformers' GGUF loading; then our reader's config, tokenizer and
    family specifics against transformers' (test_gguf_loader checks SmolLM2's tensors one by one too)."""
    from test_gguf_loader import _compare_tokenizers, _compare_with_transformers

    from jaxpersona.model.loaders.gguf import read_gguf

    parse_metadata_once(monkeypatch)
    model = jm.load(name)
    assert model.cfg.family == family
    hf = hf_from_gguf(name)
    try:
        check_against_hf(model, hf)
    finally:
        del hf, model
        gc.collect()
    path = registry.resolve(name)  # the installed package's file; ModelNotFoundError (pip command) if missing
    m = read_gguf(path)
    _compare_with_transformers(path, m, tensors=False)
    tok = m.build_tokenizer()
    _compare_tokenizers(path, tok)
    if m.architecture == "gemma3":
        assert tok.add_bos_token is True and tok("Hi").input_ids[0] == tok.bos_token_id
        assert m.hf_config["layer_types"][5] == "full_attention" and m.hf_config["query_pre_attn_scalar"] == 256
        assert 106 in m.eog_token_ids  # <end_of_turn>
    else:
        assert m.hf_config["tie_word_embeddings"] is False and "lm_head.weight" in m.tensors
        assert "model.layers.0.self_attn.q_proj.bias" in m.tensors


# --------------------------------------------------------------------------------------------
# SmolLM2 chat and generation
# --------------------------------------------------------------------------------------------
def test_smollm2_chat_knows_paris(smollm2) -> None:
    reply = smollm2.chat(QUESTION, system=SYSTEM, max_new_tokens=24)
    assert "Paris" in reply, reply
    assert "<|im_end|>" not in reply and "<|im_start|>" not in reply


def test_smollm2_chat_prompt_uses_the_template(smollm2) -> None:
    text = smollm2.format_chat(conversation(QUESTION, SYSTEM))
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_greedy_matches_transformers(smollm2, hf_smollm2) -> None:
    """16 greedy tokens on the chat-templated prompt: ours == HF, EOS disabled on both sides."""
    batch = smollm2.encode_conversations([conversation(QUESTION, SYSTEM)])
    n = 16
    ours = generate(smollm2.params, smollm2.cfg, batch.tokens, batch.valid, max_new_tokens=n, eos_ids=())
    # HF gets the unpadded prompt: padding must not matter to us
    unpadded = Batch(batch.tokens[batch.valid][None], batch.valid[batch.valid][None])
    ref = hf_greedy(hf_smollm2, unpadded, n)
    np.testing.assert_array_equal(np.asarray(ours.tokens), ref)
    assert "Paris" in smollm2.tokenizer.decode(ref[0])
    assert (ref[0] == smollm2.tokenizer.convert_tokens_to_ids("<|im_end|>")).any(), "EOS must be compared too"

    # The user path (EOS on): the same tokens up to and including <|im_end|>, then padding.
    out = smollm2.generate_tokens(batch, max_new_tokens=n)
    k = int(out.lengths[0])
    np.testing.assert_array_equal(np.asarray(out.tokens)[0, :k], ref[0, :k])
    if k < n:
        assert int(out.tokens[0, k - 1]) in smollm2.eos_ids
        assert (np.asarray(out.tokens)[0, k:] == smollm2.pad_id).all()


def test_smollm2_left_padded_batch_generation_matches_transformers(smollm2, hf_smollm2) -> None:
    batch = smollm2.encode(["Name three colors.", "Write one short sentence about the sea and the sky."], chat=True)
    assert not batch.valid.all() and batch.valid.sum(1)[0] != batch.valid.sum(1)[1]
    n = 16
    ours = generate(smollm2.params, smollm2.cfg, batch.tokens, batch.valid, max_new_tokens=n, eos_ids=())
    np.testing.assert_array_equal(np.asarray(ours.tokens), hf_greedy(hf_smollm2, batch, n))


def test_smollm2_sampling_is_reproducible(smollm2) -> None:
    kw = dict(max_new_tokens=12, temperature=0.8, top_p=0.9)
    a = smollm2.generate(["Tell me a story."], seed=3, **kw)
    b = smollm2.generate(["Tell me a story."], seed=3, **kw)
    assert a == b and a[0]


# --------------------------------------------------------------------------------------------
# the conversion cache
# --------------------------------------------------------------------------------------------
def test_second_load_is_served_from_the_cache(smollm2, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf_path = registry.resolve(SMOLLM2)
    converted = registry.converted_dir(gguf_path)
    assert converted.parent.parent == registry.cache_dir()
    assert (converted / "config.json").exists() and (converted / "model.safetensors").exists()
    assert json.loads((converted / "config.json").read_text())["model_type"] == "llama"

    def no_conversion(*args, **kwargs):
        raise AssertionError("the GGUF file was converted again instead of using the cache")

    monkeypatch.setattr(jm, "convert_gguf_to_hf_dir", no_conversion)  # the name handle.load calls
    again = jm.load(SMOLLM2)
    assert again.cfg == smollm2.cfg
    for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(smollm2.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert again.format_chat(conversation(QUESTION)) == smollm2.format_chat(conversation(QUESTION))


# --------------------------------------------------------------------------------------------
# the real-user path: a sharded HF directory of safetensors
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gemma3"])  # untied and tied embeddings
def test_sharded_hf_directory_loads_and_matches_hf(tmp_path, tiny_zoo, word_tokenizer, family: str) -> None:
    hf = tiny_zoo(family).hf
    d = tmp_path / "sharded"
    hf.save_pretrained(d, max_shard_size="200KB")
    word_tokenizer().save_pretrained(d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and not (d / "model.safetensors").exists()

    model = jm.load(d)
    assert model.cfg.family == family and model.cfg == tiny_zoo(family).cfg
    tokens, valid = hf_tiny.left_padded_batch()
    batch = Batch(tokens, valid)
    ours = np.asarray(model.run(batch).logits)
    ref, _ = hf_run(hf, batch)
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)
    # and text in, text out works through the same directory's tokenizer
    assert len(model.generate(["hello world"], chat=False, max_new_tokens=3)) == 1
