"""Memory plans: the shipped paper-model configs, the arithmetic of the shards, the compiled activation
estimate against a real compile, and the CLI's refusals (exit 2)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxpersona.cli import main
from jaxpersona.compute.plan import GIB, make_plan, read_config

PAPER = {"qwen2.5-7b-instruct": 7.62e9, "gemma-2-27b-it": 27.2e9, "qwen3-32b": 32.8e9, "llama-3.3-70b-instruct": 70.6e9}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_models_plan(name) -> None:
    one = make_plan(name, "1x1", batch=1, seq=64, dtype="bfloat16")
    assert abs(one.params / 2 - PAPER[name]) / PAPER[name] < 0.01  # bf16: 2 bytes per parameter
    _, cfg = read_config(name)
    model_axis = 4 if cfg.n_kv_heads % 8 else 8
    tp = make_plan(name, f"2x{model_axis}", batch=8, seq=512, new_tokens=64, dtype="bfloat16", accelerator="h100")
    assert tp.params < one.params / model_axis * 1.1  # every big matrix is split over the model axis
    kv = 2 * cfg.n_layers * 4 * (cfg.n_kv_heads // model_axis) * 576 * cfg.head_dim * 2
    assert tp.kv_cache == kv and tp.rows_per_device == 4
    assert 0 < tp.activations < tp.params and tp.fits is not None


def test_70b_needs_fsdp_on_v5e_and_the_cli_says_so(capsys) -> None:
    tp = make_plan("llama-3.3-70b-instruct", "8x8", batch=8, seq=2048, accelerator="v5e")
    fsdp = make_plan("llama-3.3-70b-instruct", "8x8", batch=8, seq=2048, accelerator="v5e", fsdp=True)
    assert tp.fits is False and fsdp.fits is True and fsdp.params < tp.params / 7
    assert main(["plan", "--model", "llama-3.3-70b-instruct", "--mesh", "8x8", "--batch", "8", "--accelerator",
                 "v5e"]) == 2
    assert "exceeds 90% of v5e" in capsys.readouterr().err
    assert main(["plan", "--model", "qwen2.5-7b-instruct", "--mesh", "1x8"]) == 2  # 28 heads, 4 kv heads
    assert "does not divide the attention heads (28)" in capsys.readouterr().err
    assert main(["plan", "--model", "qwen2.5-7b-instruct", "--mesh", "2x4", "--accelerator", "h100"]) == 0
    assert "fits on h100" in capsys.readouterr().out
    assert main(["plan", "--model", "nope-13b"]) == 2
    assert main(["plan", "--model", "qwen3-32b", "--accelerator", "tpu9"]) == 2


def test_plan_of_a_real_small_model_matches_its_compile(smollm2) -> None:
    """On the embedded model (fp32, one device): the params bytes are the loaded arrays' bytes, and the
    activation estimate is the compiled prefill's own temporary memory."""
    from jaxpersona.model import registry
    from jaxpersona.model.transformer import KVCache, forward

    plan = make_plan(str(registry.converted_dir(registry.resolve("smollm2-135m-instruct"))), "1x1", batch=4,
                     seq=128, new_tokens=32, dtype="float32")
    assert plan.params == sum(x.nbytes for x in jax.tree.leaves(smollm2.params))
    cfg = smollm2.cfg
    cache = KVCache.empty(cfg, 4, 160, np.float32)
    assert plan.kv_cache == cache.k.nbytes + cache.v.nbytes
    tokens = np.zeros((4, 128), np.int32)
    compiled = jax.jit(lambda p, t, c: forward(p, cfg, t, cache=c, logits="last"), donate_argnums=(2,)).lower(
        smollm2.params, tokens, cache).compile()
    assert plan.activations == compiled.memory_analysis().temp_size_in_bytes
    assert plan.total < 2 * GIB
