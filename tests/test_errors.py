"""Every bad input gets a typed error from ``jaxpersona.errors`` with a message that helps.

Each test asserts the exact error type and a key phrase of the message. Model directories are
copies of the session's tiny random Llama (``conftest.tiny_zoo``) with a small word-level tokenizer,
edited to be broken in one specific way.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import hf_tiny
import jaxpersona.compute.handle as jm
from jaxpersona.compute.batching import Batch, pad_left
from jaxpersona import errors
from jaxpersona.model.config import from_hf_config
from jaxpersona.compute.generate import generate
from jaxpersona.model.loaders.hf import load_hf_dir
from jaxpersona.model.transformer import Capture, forward

# A template without a system role, as Gemma's: it raises on role 'system'.
NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "<{{ m['role'] }}> {{ m['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
# A template that rejects anything but alternating user/assistant turns starting with user.
STRICT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "<{{ m['role'] }}> {{ m['content'] }}\n"
    "{% endfor %}"
)


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------
@pytest.fixture
def model_dir(tmp_path: Path, tiny_llama, word_tokenizer) -> Path:
    """A fresh, editable copy of the tiny Llama HF directory, with a tokenizer (no chat template)."""
    d = tmp_path / "model"
    shutil.copytree(tiny_llama.path, d)
    word_tokenizer().save_pretrained(d)
    return d


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def small_ctx_dir(tmp_path_factory: pytest.TempPathFactory, word_tokenizer) -> Path:
    """A tiny Llama whose context (max_position_embeddings) is 24 tokens."""
    import transformers

    hf_cfg = transformers.AutoConfig.for_model("llama", **{**hf_tiny.COMMON, "max_position_embeddings": 24})
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    d = tmp_path_factory.mktemp("small_ctx")
    model.save_pretrained(d)
    word_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def small_ctx(small_ctx_dir: Path) -> jm.Model:
    m = jm.load(small_ctx_dir)
    assert m.cfg.max_position == 24
    return m


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, tiny_llama, word_tokenizer) -> jm.Model:
    """The tiny Llama as a :class:`jaxpersona.compute.handle.Model` (tokenizer without a chat template)."""
    d = tmp_path_factory.mktemp("tiny_model") / "m"
    shutil.copytree(tiny_llama.path, d)
    word_tokenizer().save_pretrained(d)
    return jm.load(d)


@pytest.fixture
def with_template(tiny_model: jm.Model, word_tokenizer):
    """``with_template(template)`` -> the tiny model with a tokenizer carrying that chat template."""
    return lambda template: dataclasses.replace(tiny_model, tokenizer=word_tokenizer(template))


# --------------------------------------------------------------------------------------------
# the hierarchy
# --------------------------------------------------------------------------------------------
def test_error_hierarchy() -> None:
    for name in (
        "ModelNotFoundError", "CorruptCheckpointError", "UnsupportedQuantizationError",
        "UnsupportedArchitectureError", "UnsupportedConfigError", "ShapeMismatchError", "UnsupportedDtypeError",
        "InputError", "ContextLengthError", "ChatTemplateError",
    ):  # fmt: skip
        assert issubclass(getattr(errors, name), errors.JaxPersonaError), name
    assert issubclass(errors.ModelNotFoundError, FileNotFoundError)
    assert issubclass(errors.InputError, ValueError)
    assert issubclass(errors.ContextLengthError, errors.InputError)
    assert issubclass(errors.ChatTemplateError, errors.InputError)


# --------------------------------------------------------------------------------------------
# finding models
# --------------------------------------------------------------------------------------------
def test_unknown_registry_name() -> None:
    with pytest.raises(errors.ModelNotFoundError, match="unknown model 'llama-7b'.*smollm2-135m-instruct"):
        jm.load("llama-7b")


def test_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(errors.ModelNotFoundError, match="not a registered name"):
        jm.load(tmp_path / "nope")
    with pytest.raises(errors.ModelNotFoundError, match="does not exist"):
        jm.load(tmp_path / "nope.gguf")
    with pytest.raises(errors.ModelNotFoundError, match="not a directory"):
        load_hf_dir(tmp_path / "nope")


def test_dir_without_config_json(model_dir: Path) -> None:
    (model_dir / "config.json").unlink()
    with pytest.raises(errors.ModelNotFoundError, match="no config.json"):
        load_hf_dir(model_dir)
    with pytest.raises(errors.ModelNotFoundError, match="no config.json"):
        jm.load(model_dir)


def test_dir_without_weights(model_dir: Path) -> None:
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(errors.ModelNotFoundError, match=r"no \*\.safetensors"):
        jm.load(model_dir)


def test_index_with_missing_shard(model_dir: Path) -> None:
    (model_dir / "model.safetensors").rename(model_dir / "model-00001-of-00002.safetensors")
    names = list(safetensors.numpy.load_file(model_dir / "model-00001-of-00002.safetensors"))
    weight_map = {n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(errors.ModelNotFoundError, match="model-00002-of-00002.safetensors.*download every shard"):
        load_hf_dir(model_dir)


# --------------------------------------------------------------------------------------------
# corrupt files
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [0.5, 0.01, 6], ids=["half", "1pct", "6-bytes"])
def test_truncated_safetensors(model_dir: Path, keep: float) -> None:
    f = model_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep) if keep < 1 else int(keep)])
    with pytest.raises(errors.CorruptCheckpointError, match="truncated or corrupt.*re-download"):
        load_hf_dir(model_dir)
    with pytest.raises(errors.CorruptCheckpointError, match="truncated or corrupt"):
        jm.load(model_dir)


def test_garbage_safetensors(model_dir: Path) -> None:
    (model_dir / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(errors.CorruptCheckpointError, match="re-download"):
        load_hf_dir(model_dir)


def test_invalid_json_files(model_dir: Path) -> None:
    good = (model_dir / "config.json").read_text()
    (model_dir / "config.json").write_text(good[: len(good) // 2])
    with pytest.raises(errors.CorruptCheckpointError, match="config.json is not valid JSON"):
        load_hf_dir(model_dir)
    (model_dir / "config.json").write_text(good)
    (model_dir / "generation_config.json").write_text("{not json")
    with pytest.raises(errors.CorruptCheckpointError, match="generation_config.json is not valid JSON"):
        load_hf_dir(model_dir)
    (model_dir / "generation_config.json").unlink()
    (model_dir / "model.safetensors.index.json").write_text('{"no_weight_map": {}}')
    with pytest.raises(errors.CorruptCheckpointError, match="not a valid safetensors index"):
        load_hf_dir(model_dir)


# --------------------------------------------------------------------------------------------
# config / weights disagreements
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, phrase",
    [
        ({"hidden_size": 32}, r"weights have shape \(256, 64\), config implies \(256, 32\)"),
        ({"num_hidden_layers": 3}, "config says 3 layers"),
        ({"num_hidden_layers": 5}, r"config says 5 layers \(missing \[4\]\)"),
        ({"vocab_size": 300}, r"\['embed'\]: weights have shape \(256, 64\), config implies \(300, 64\)"),
        ({"intermediate_size": 100}, r"w_gate'\]: weights have shape \(4, 64, 128\), config implies \(4, 64, 100\)"),
        ({"num_key_value_heads": 4}, r"\['wk'\]"),
    ],
    ids=["hidden_size", "fewer-layers", "more-layers", "vocab", "ffn", "kv-heads"],
)
def test_config_weights_shape_mismatch(model_dir: Path, change: dict, phrase: str) -> None:
    _edit_config(model_dir, **change)
    with pytest.raises(errors.ShapeMismatchError, match=phrase):
        load_hf_dir(model_dir)


def test_missing_and_foreign_weights(model_dir: Path, tiny_zoo) -> None:
    f = model_dir / "model.safetensors"
    tensors = safetensors.numpy.load_file(f)
    del tensors["model.layers.2.mlp.up_proj.weight"]
    safetensors.numpy.save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(errors.ShapeMismatchError, match=r"w_up.*missing \[2\]"):
        load_hf_dir(model_dir)
    # Qwen2 weights (q/k/v biases, tied embeddings) under an untied Llama config: refused, not dropped.
    shutil.copy(tiny_zoo("qwen2").path / "model.safetensors", f)
    with pytest.raises(errors.ShapeMismatchError, match=r"(?s)missing \['lm_head'\].*unexpected weight.*\['bq'\]"):
        load_hf_dir(model_dir)


# --------------------------------------------------------------------------------------------
# unsupported architectures and configs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["gpt2", "phi3", "mixtral"])
def test_unsupported_model_type(model_dir: Path, model_type: str) -> None:
    _edit_config(model_dir, model_type=model_type)
    with pytest.raises(errors.UnsupportedArchitectureError, match=f"model_type '{model_type}' is not supported.*llama"):
        load_hf_dir(model_dir)


def test_unsupported_architecture_objects() -> None:
    import transformers

    with pytest.raises(errors.UnsupportedArchitectureError, match="'gpt2'"):
        from_hf_config(transformers.GPT2Config())
    with pytest.raises(errors.UnsupportedArchitectureError, match="model_type None"):
        from_hf_config({"hidden_size": 64})


ROPE = {"rope_theta": 10000.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize(
    "change, phrase",
    [
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, **ROPE}}, "rope type 'yarn' is not implemented"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, **ROPE}}, "rope type 'dynamic'"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
         "partial_rotary_factor"),
        ({"mlp_bias": True}, "mlp_bias=True is not implemented"),
        ({"hidden_act": "relu"}, "activation 'relu' is not implemented"),
        ({"pretraining_tp": 2}, "pretraining_tp"),
    ],
    ids=["yarn", "dynamic", "partial-rotary", "mlp_bias", "relu", "pretraining_tp"],
)  # fmt: skip
def test_unsupported_config(model_dir: Path, change: dict, phrase: str) -> None:
    _edit_config(model_dir, **change)
    with pytest.raises(errors.UnsupportedConfigError, match=phrase):
        load_hf_dir(model_dir)
    with pytest.raises(errors.UnsupportedConfigError, match=phrase):
        jm.load(model_dir)


def test_legacy_rope_scaling_yarn_is_refused() -> None:
    d = {**hf_tiny.COMMON, "model_type": "qwen2", "rope_theta": 1e6}
    d["rope_scaling"] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    with pytest.raises(errors.UnsupportedConfigError, match="yarn"):
        from_hf_config(d)


# --------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float16", "fp16", "int8", jnp.float16, np.float64])
def test_unsupported_dtype(model_dir: Path, dtype) -> None:
    with pytest.raises(errors.UnsupportedDtypeError, match="use 'float32' or 'bfloat16'|use float32 or bfloat16"):
        jm.load(model_dir, dtype=dtype)


def test_load_hf_dir_refuses_float16(model_dir: Path) -> None:
    """The lower-level loader is public too; it must not hand back float16 params silently."""
    with pytest.raises(errors.UnsupportedDtypeError, match="float16"):
        load_hf_dir(model_dir, dtype=jnp.float16)


# --------------------------------------------------------------------------------------------
# inputs: context, batches, sampling, capture
# --------------------------------------------------------------------------------------------
def test_prompt_longer_than_context(small_ctx: jm.Model) -> None:
    cfg, params = small_ctx.cfg, small_ctx.params
    with pytest.raises(errors.ContextLengthError, match="exceeds the model's context of 24 tokens"):
        generate(params, cfg, np.full((1, 20), 5), max_new_tokens=5)
    with pytest.raises(errors.ContextLengthError, match="context of 24"):
        generate(params, cfg, np.full((2, 30), 5), max_new_tokens=1)
    out = generate(params, cfg, np.full((1, 20), 5), max_new_tokens=4)  # exactly fills the context
    assert out.tokens.shape == (1, 4)
    long_text = " ".join(["hello world"] * 20)
    with pytest.raises(errors.ContextLengthError, match="exceeds the model's context of 24 tokens"):
        small_ctx.generate([long_text], chat=False, max_new_tokens=2)
    with pytest.raises(errors.ContextLengthError, match="shorten the prompt"):
        small_ctx.resid([long_text], [1])
    assert isinstance(errors.ContextLengthError("x"), errors.InputError)


def test_bucketing_does_not_refuse_prompts_that_fit(small_ctx: jm.Model) -> None:
    """8 prompt tokens + 10 new = 18 <= 24: must work although the 16-token bucket + 10 = 26 > 24."""
    batch = small_ctx.encode(["the cat sat on the mat hello world"], chat=False)
    assert int(batch.valid.sum()) == 8
    texts = small_ctx.generate(["the cat sat on the mat hello world"], chat=False, max_new_tokens=10)
    assert len(texts) == 1


@pytest.mark.parametrize(
    "tokens",
    [np.zeros((0, 4), np.int32), np.zeros((2, 0), np.int32), []],
    ids=["no-rows", "no-columns", "empty-list"],
)
def test_empty_batch_generate(tiny_llama, tokens) -> None:
    with pytest.raises(errors.InputError, match="empty"):
        generate(tiny_llama.params, tiny_llama.cfg, tokens, max_new_tokens=2)


def test_empty_batch_model(tiny_model: jm.Model) -> None:
    with pytest.raises(errors.InputError, match="empty batch"):
        tiny_model.generate([], chat=False)
    with pytest.raises(errors.InputError, match="empty"):
        tiny_model.generate([""], chat=False)
    with pytest.raises(errors.InputError, match="empty"):
        tiny_model.resid([], [1])
    with pytest.raises(errors.InputError, match="empty"):
        pad_left([], 0)
    with pytest.raises(errors.InputError, match="empty"):
        pad_left([[1, 2], []], 0)


def test_empty_batch_run(tiny_model: jm.Model) -> None:
    with pytest.raises(errors.InputError, match="empty"):
        tiny_model.run(Batch(np.zeros((0, 4), np.int32), np.zeros((0, 4), bool)))


def test_right_padding_is_refused(tiny_llama) -> None:
    with pytest.raises(errors.InputError, match="must be left-padded"):
        generate(tiny_llama.params, tiny_llama.cfg, [[5, 6, 7]], valid=[[True, True, False]], max_new_tokens=2)


def test_valid_mask_shape_mismatch(tiny_llama) -> None:
    with pytest.raises(errors.InputError, match="shape"):
        generate(tiny_llama.params, tiny_llama.cfg, [[5, 6, 7]], valid=[[True, True]], max_new_tokens=2)


def test_tokens_must_be_two_dimensional(tiny_llama) -> None:
    with pytest.raises(errors.InputError, match=r"\[B, T\]|rank|2-D|two-dimensional"):
        generate(tiny_llama.params, tiny_llama.cfg, [5, 6, 7], max_new_tokens=2)


@pytest.mark.parametrize("bad_id", [256, 10_000, -1])
def test_token_ids_outside_vocab(tiny_llama, tiny_model: jm.Model, bad_id: int) -> None:
    """JAX clamps out-of-range gathers silently; a wrong id must be an error, not another token."""
    with pytest.raises(errors.InputError, match="vocab"):
        generate(tiny_llama.params, tiny_llama.cfg, [[5, bad_id, 7]], max_new_tokens=2)
    batch = Batch(np.array([[5, bad_id, 7]], np.int32), np.ones((1, 3), bool))
    with pytest.raises(errors.InputError, match="vocab"):
        tiny_model.run(batch)


@pytest.mark.parametrize(
    "kw, phrase",
    [
        ({"temperature": -0.5}, "temperature must be >= 0"),
        ({"temperature": float("nan")}, "temperature must be >= 0"),
        ({"temperature": 1.0, "top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"temperature": 1.0, "top_p": -0.1}, "top_p"),
        ({"temperature": 1.0, "top_p": 1.5}, "top_p"),
        ({"temperature": 1.0, "top_p": float("nan")}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"max_new_tokens": -3}, "max_new_tokens"),
    ],
    ids=["temp<0", "temp-nan", "top_p=0", "top_p<0", "top_p>1", "top_p-nan", "no-new-tokens", "negative-new"],
)
def test_bad_sampling_params(tiny_llama, tiny_model: jm.Model, kw: dict, phrase: str) -> None:
    kw = {"max_new_tokens": 2, **kw}
    with pytest.raises(errors.InputError, match=phrase):
        generate(tiny_llama.params, tiny_llama.cfg, [[5, 6, 7]], **kw)
    with pytest.raises(errors.InputError, match=phrase):
        tiny_model.generate(["hello world"], chat=False, **kw)


@pytest.mark.parametrize(
    "layers, reduce, phrase",
    [
        ((5,), "mean", r"\[5\] are outside resid\[0\.\.4\]"),
        ((0, 4, 99), "tokens", r"\[99\]"),
        ((-1,), "last", r"\[-1\] are outside"),
        ((), "mean", "Capture.layers is empty"),
        ((1,), "max", "capture reduce 'max'"),
    ],
)
def test_capture_out_of_range(tiny_llama, tiny_model: jm.Model, layers, reduce, phrase: str) -> None:
    tokens = jnp.full((1, 3), 5, jnp.int32)
    with pytest.raises(errors.InputError, match=phrase):
        forward(tiny_llama.params, tiny_llama.cfg, tokens, capture=Capture(layers, reduce))
    with pytest.raises(errors.InputError, match=phrase):
        tiny_model.resid(["hello world"], layers, reduce)
    batch = tiny_model.encode(["hello world"])
    with pytest.raises(errors.InputError, match=phrase):
        tiny_model.run(batch, capture=Capture(layers, reduce))


# --------------------------------------------------------------------------------------------
# chat templates
# --------------------------------------------------------------------------------------------
def test_chat_without_template(tiny_model: jm.Model) -> None:
    assert not tiny_model.tokenizer.chat_template
    with pytest.raises(errors.ChatTemplateError, match="has no chat template.*chat=False"):
        tiny_model.chat("hello", max_new_tokens=2)
    with pytest.raises(errors.ChatTemplateError, match="no chat template"):
        tiny_model.generate(["hello"], max_new_tokens=2)  # chat=True is the default
    with pytest.raises(errors.ChatTemplateError, match="no chat template"):
        tiny_model.resid(["hello"], [1], chat=True)
    # raw text still works
    assert len(tiny_model.generate(["hello world"], chat=False, max_new_tokens=2)) == 1


def test_chat_template_saved_in_dir_is_used(model_dir: Path, word_tokenizer) -> None:
    """A template saved with the tokenizer is picked up by load(); none saved -> ChatTemplateError."""
    with pytest.raises(errors.ChatTemplateError):
        jm.load(model_dir).chat("hello", max_new_tokens=1)
    word_tokenizer(NO_SYSTEM_TEMPLATE).save_pretrained(model_dir)
    m = jm.load(model_dir)
    assert m.format_chat([{"role": "user", "content": "hello"}]) == "<user> hello\n<assistant>"


def test_system_prompt_fallback_for_templates_without_system_role(with_template) -> None:
    m = with_template(NO_SYSTEM_TEMPLATE)
    conv = [{"role": "system", "content": "you are helpful"}, {"role": "user", "content": "hello world"}]
    expected = "<user> you are helpful\n\nhello world\n<assistant>"
    assert m.format_chat(conv) == expected
    assert m.format_chat(conv[1:]) == "<user> hello world\n<assistant>"
    # later turns are kept
    longer = [*conv, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "what"}]
    assert m.format_chat(longer) == "<user> you are helpful\n\nhello world\n<assistant> hi\n<user> what\n<assistant>"
    # the encoded chat prompt is exactly the merged text, through every entry point
    batch = m.encode(["hello world"], chat=True, system="you are helpful", bucket=1)
    ids = m.tokenizer.encode(expected, add_special_tokens=False)
    assert batch.tokens[0].tolist() == ids
    assert m.encode_conversations([conv], bucket=1).tokens[0].tolist() == ids
    assert isinstance(m.chat("hello world", system="you are helpful", max_new_tokens=2), str)


def test_template_rejections_are_chat_template_errors(with_template) -> None:
    m = with_template(NO_SYSTEM_TEMPLATE)
    with pytest.raises(errors.ChatTemplateError, match="rejected the messages.*System role not supported"):
        m.format_chat([{"role": "system", "content": "only a system turn"}])
    strict = with_template(STRICT_TEMPLATE)
    with pytest.raises(errors.ChatTemplateError, match="rejected.*alternate"):
        strict.chat([{"role": "assistant", "content": "hi"}], max_new_tokens=1)
    with pytest.raises(errors.ChatTemplateError, match="needs 'role' and 'content'"):
        strict.chat([{"role": "user"}], max_new_tokens=1)
    with pytest.raises(errors.ChatTemplateError, match="needs 'role' and 'content'"):
        strict.format_chat(["just a string"])
