"""Tiny random HF models of every supported family (no download), saved as HF directories."""

from __future__ import annotations

from pathlib import Path

import numpy as np

VOCAB = 256

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.15,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

FAMILY_CONFIGS: dict[str, dict] = {
    "llama": dict(
        model_type="llama",
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=10000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
        tie_word_embeddings=False,
    ),
    "mistral": dict(model_type="mistral", sliding_window=6, head_dim=16, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=1e6)),
    "qwen3": dict(model_type="qwen3", head_dim=32, tie_word_embeddings=True),
    "gemma2": dict(
        model_type="gemma2",
        head_dim=16,
        sliding_window=6,
        query_pre_attn_scalar=20,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
        layer_types=["sliding_attention", "full_attention"] * 2,
    ),
    "gemma3": dict(
        model_type="gemma3_text",
        head_dim=16,
        sliding_window=6,
        query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
        },
    ),
}


def hf_config(family: str):
    import transformers

    d = {**COMMON, **FAMILY_CONFIGS[family]}
    model_type = d.pop("model_type")
    cfg = transformers.AutoConfig.for_model(model_type, **d)
    cfg._attn_implementation = "eager"
    return cfg


def hf_model(family: str, seed: int = 0):
    """A random HF causal LM in fp32 eval mode, with non-trivial norm weights and biases."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family), attn_implementation="eager")
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # perturb norms/biases so their handling is really tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


def save_hf_dir(model, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    return path


def left_padded_batch(seed: int = 0, lengths=(12, 7, 1, 10), vocab: int = VOCAB):
    """tokens [B, T] with left padding (pad id 0) and the valid mask."""
    rng = np.random.default_rng(seed)
    t = max(lengths)
    tokens = np.zeros((len(lengths), t), np.int32)
    valid = np.zeros((len(lengths), t), bool)
    for i, n in enumerate(lengths):
        tokens[i, t - n :] = rng.integers(3, vocab, n)
        valid[i, t - n :] = True
    return tokens, valid


def hf_greedy(hf, tokens, valid, n: int) -> np.ndarray:
    """HF greedy continuation (EOS disabled) of a left-padded batch: ``[B, n]`` new tokens."""
    import torch

    ids = torch.tensor(np.asarray(tokens), dtype=torch.long)
    mask = torch.tensor(np.asarray(valid), dtype=torch.long)
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0
        )
    out = out[:, ids.shape[1] :].numpy()
    assert out.shape == (ids.shape[0], n), "HF stopped early: EOS was not disabled"
    return out
