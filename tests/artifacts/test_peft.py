"""peft adapters in and out, merged HF directories, against real peft / transformers on tiny random models.

Round trips (fp32, logits at valid positions of a left-padded batch; the tolerance is 1e-4, the measured
differences are printed): an adapter made here -> ``save_peft_adapter`` -> ``peft.PeftModel.from_pretrained`` on
the HF torch model; adapters initialised non-zero and saved by peft (rank/alpha patterns, layers_to_transform,
rsLoRA, a regex, "all-linear", bf16 / fp16 files) -> ``load_peft_adapter`` -> our forward; a merged directory ->
``transformers``; a persona_vectors-shaped Trainer directory; the exported files against vLLM's loader rules;
and every bad input's typed error.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import sys
from pathlib import Path

import hf_tiny
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpersona import errors
from jaxpersona.artifacts import peft as jpeft
from jaxpersona.artifacts.adapters import save_adapter
from jaxpersona.model.lora import TARGETS, Adapter, LoraConfig, init_adapter
from jaxpersona.model.transformer import forward

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

ATOL = 1e-4
TOKENS, VALID = hf_tiny.left_padded_batch(seed=3)
MASK = VALID.astype(bool)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
fwd = jax.jit(forward, static_argnames=("cfg", "capture", "logits"))


def ours(t, adapter) -> np.ndarray:
    return np.asarray(fwd(t.params, t.cfg, jnp.asarray(TOKENS), valid=jnp.asarray(VALID), adapter=adapter).logits)


def hf_logits(m) -> np.ndarray:
    m.eval()
    with torch.no_grad():
        return m(input_ids=torch.tensor(TOKENS, dtype=torch.long), attention_mask=torch.tensor(VALID, dtype=torch.long),
                 position_ids=torch.tensor(np.maximum(np.cumsum(VALID, 1) - 1, 0), dtype=torch.long)).logits.numpy()


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a[MASK] - b[MASK]).max())


def random_adapter(cfg, lcfg: LoraConfig, seed: int) -> Adapter:
    """An adapter with non-zero ``b`` (a fresh one is exactly the base model)."""
    ad = init_adapter(cfg, lcfg, jax.random.key(seed))
    keys = jax.random.split(jax.random.key(seed + 100), len(ad.b))
    return Adapter(ad.a, {t: 0.05 * jax.random.normal(k, x.shape) for (t, x), k in zip(sorted(ad.b.items()), keys)},
                   ad.scale)


def peft_saved(t, out: Path, seed: int = 0, dtype=None, **kw) -> tuple[Path, np.ndarray]:
    """A peft LoRA with non-zero random factors (``init_lora_weights=False``: A and B keep nn.Linear's init, B
    scaled down) saved by peft to ``out``; returns (out, peft's logits). ``dtype``: the factors stored in the
    file (the reference logits use the same rounded values)."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(t.hf), peft.LoraConfig(init_lora_weights=False, lora_dropout=0.0, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.3)
            if "lora_" in name and dtype is not None:
                p.copy_(p.to(dtype).float())  # the reference runs on exactly the values the file holds
    model.save_pretrained(out)
    if dtype is not None:  # peft keeps the parameters' dtype in the file: write the factors as dtype
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        sd = {k.replace(".default", ""): v.to(dtype).contiguous() for k, v in get_peft_model_state_dict(model).items()}
        save_file(sd, str(out / jpeft.SAFETENSORS_FILE), metadata={"format": "pt"})
    return out, hf_logits(model)


def edit_config(d: Path, **changes) -> None:
    f = d / jpeft.CONFIG_FILE
    conf = json.loads(f.read_text())
    conf.update(changes)
    f.write_text(json.dumps(conf))


def edit_tensors(d: Path, fn) -> None:
    from safetensors.numpy import load_file, save_file

    f = d / jpeft.SAFETENSORS_FILE
    save_file(fn(dict(load_file(str(f)))), str(f), metadata={"format": "pt"})


# --- out: adapter made here -> peft -----------------------------------------------------------------------
@pytest.mark.parametrize("family,rslora", [("llama", False), ("qwen2", True)])
def test_exported_adapter_loads_in_peft_with_the_same_logits(tiny_zoo, tmp_path, family, rslora) -> None:
    t = tiny_zoo(family)
    lcfg = LoraConfig(rank=4, alpha=8.0, rslora=rslora, targets=("q", "k", "v", "o", "gate", "up", "down"))
    ad = random_adapter(t.cfg, lcfg, 1)
    out = jpeft.save_peft_adapter(tmp_path / "export", ad, t.cfg, lcfg, base_name=f"tiny-{family}")
    conf = json.loads((out / jpeft.CONFIG_FILE).read_text())
    assert conf["use_rslora"] is rslora and conf["r"] == 4 and conf["lora_alpha"] == 8
    mine = ours(t, ad)
    theirs = hf_logits(peft.PeftModel.from_pretrained(copy.deepcopy(t.hf), str(out)))
    d = max_diff(mine, theirs)
    print(f"\n{family} rsLoRA={rslora}: export -> peft, max |logit diff| {d:.2e}")
    assert max_diff(mine, ours(t, None)) > 1e-2  # the adapter does something
    assert d <= ATOL
    back, meta = jpeft.load_peft_adapter(out, t.cfg)  # and back: the same factors
    assert meta["lora"]["rslora"] is rslora and float(back.scale) == pytest.approx(float(ad.scale))
    for tg in ad.a:
        np.testing.assert_array_equal(np.asarray(back.a[tg]), np.asarray(ad.a[tg]))
        np.testing.assert_array_equal(np.asarray(back.b[tg]), np.asarray(ad.b[tg]))


def test_exported_files_pass_vllms_loader_rules(tiny_llama, tmp_path) -> None:
    """A transcription of vLLM's peft checks (lora/peft_helper.py, lora/utils.py): config fields it needs and
    refuses, and every key ``base_model.model.<module>.lora_{A,B}.weight`` of a module it can LoRA."""
    from safetensors import safe_open

    t = tiny_llama
    lcfg = LoraConfig(rank=8, alpha=16.0, targets=("q", "v", "down"))
    out = jpeft.save_peft_adapter(tmp_path / "v", random_adapter(t.cfg, lcfg, 2), t.cfg, lcfg, base_name="x/y")
    conf = json.loads((out / jpeft.CONFIG_FILE).read_text())
    assert {"r", "lora_alpha", "target_modules", "peft_type", "task_type", "base_model_name_or_path",
            "use_rslora"} <= set(conf)
    assert conf["peft_type"] == "LORA" and conf["task_type"] == "CAUSAL_LM" and conf["base_model_name_or_path"] == "x/y"
    assert conf["modules_to_save"] is None and conf["use_dora"] is False and conf["bias"] == "none"
    assert not conf["lora_bias"] and not conf["rank_pattern"] and not conf["alpha_pattern"]
    assert conf["r"] in (1, 8, 16, 32, 64, 128, 256, 320, 512) and sorted(conf["target_modules"]) == [
        "down_proj", "q_proj", "v_proj"]
    assert sorted(p.name for p in out.iterdir()) == [jpeft.CONFIG_FILE, jpeft.SAFETENSORS_FILE]
    key_re = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
                        r"\.lora_(A|B)\.weight")
    with safe_open(str(out / jpeft.SAFETENSORS_FILE), "numpy") as h:
        keys = list(h.keys())
        assert len(keys) == 2 * 3 * t.cfg.n_layers
        for k in keys:
            m = key_re.fullmatch(k)
            assert m, k
            module = k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
            assert module.rsplit(".", 1)[-1] in conf["target_modules"]
            shape = h.get_slice(k).get_shape()
            d_in = t.hf.get_submodule(module).in_features
            d_out = t.hf.get_submodule(module).out_features
            assert tuple(shape) == ((8, d_in) if m.group(5) == "A" else (d_out, 8)), (k, shape)
        assert (h.metadata() or {}).get("format") == "pt"


# --- in: adapter saved by peft -> here ----------------------------------------------------------------------
CASES = {
    "llama-patterns": ("llama", {"r": 4, "lora_alpha": 8, "target_modules": ALL,
                                     "rank_pattern": {"layers.1.self_attn.q_proj": 6, "down_proj": 2},
                                     "alpha_pattern": {"v_proj": 3, "layers.2.mlp.up_proj": 20}}, None),
    "qwen2-rslora-layers": ("qwen2", {"r": 8, "lora_alpha": 16, "use_rslora": True, "target_modules": ["q_proj", "v_proj",
                                                                                                 "down_proj"],
                                          "layers_to_transform": [0, 2]}, None),
    "llama-regex-bf16": ("llama", {"r": 4, "lora_alpha": 4, "target_modules": r".*\.(q_proj|o_proj|up_proj)"}, "bfloat16"),
    "qwen2-all-linear-fp16": ("qwen2", {"r": 2, "lora_alpha": 5, "use_rslora": True, "target_modules": "all-linear"},
                              "float16"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_here_with_the_same_logits(tiny_zoo, tmp_path, case) -> None:
    family, kw, dtype = CASES[case]
    t = tiny_zoo(family)
    d, ref = peft_saved(t, tmp_path / "ad", seed=len(case), dtype=getattr(torch, dtype) if dtype else None, **kw)
    logs: list[str] = []
    ad, meta = jpeft.load_peft_adapter(d, t.cfg, log=logs.append)
    mine = ours(t, ad)
    diff = max_diff(mine, ref)
    print(f"\n{case}: peft -> here, max |logit diff| {diff:.2e} (adapter moves logits by "
          f"{max_diff(mine, ours(t, None)):.2f}); scale {float(ad.scale):.4f}, per-module {meta['per_module_scales']}")
    assert max_diff(mine, ours(t, None)) > 1e-2
    assert diff <= ATOL
    assert meta["format"] == "peft" and meta["checkpoint"] is None and len(meta["sha256"]) == 64
    assert meta["peft_config"]["r"] == kw["r"] and not logs
    if "layers_to_transform" in kw:  # zero factors elsewhere
        assert meta["layers"] == {"q": [0, 2], "v": [0, 2], "down": [0, 2]}
        assert not np.any(np.asarray(ad.a["q"][1])) and not np.any(np.asarray(ad.b["down"][3]))
    if "rank_pattern" in kw:  # padded to the largest rank; the scale ratio folded into b
        assert ad.rank == 6 and meta["lora"]["rank"] == 6 and float(ad.scale) == 2.0
        assert len(meta["per_module_scales"]) > 2
        assert not np.any(np.asarray(ad.a["down"])[:, :, 2:])  # rank 2 modules: zero columns
    if kw.get("target_modules") == "all-linear":
        assert meta["lora"]["targets"] == list(TARGETS)
        assert float(ad.scale) == pytest.approx(5 / np.sqrt(2))


def test_persona_vectors_trainer_directory_loads_the_highest_checkpoint(tiny_zoo, tmp_path) -> None:
    """persona_vectors' output: a Trainer directory of checkpoint-N/, each a peft adapter, rsLoRA r 32 alpha 64 on
    the seven projections, base named by unsloth. The highest N is used (numerically: 20 > 10 > 9) and said;
    the scale is 64/sqrt(32) (plain LoRA would give 2.0, 5.7x weaker)."""
    t = tiny_zoo("qwen2")
    root = tmp_path / "persona_vectors_out"
    kw = {"r": 32, "lora_alpha": 64, "use_rslora": True, "target_modules": ALL, "bias": "none", "use_dora": False}
    refs = {}
    for step, seed in ((9, 3), (10, 1), (20, 2)):
        _, refs[step] = peft_saved(t, root / f"checkpoint-{step}", seed=seed, **kw)
        edit_config(root / f"checkpoint-{step}", base_model_name_or_path="unsloth/Qwen2.5-7B-Instruct")
    (root / "checkpoint-30").mkdir()  # a Trainer checkpoint without an adapter (e.g. optimizer only): skipped
    (root / "training_config.json").write_text(json.dumps({"r": 32, "lora_alpha": 64}))
    logs: list[str] = []
    ad, meta = jpeft.load_peft_adapter(root, t.cfg, log=logs.append)
    assert meta["checkpoint"] == "checkpoint-20" and any("checkpoint-20" in m for m in logs)
    assert float(ad.scale) == pytest.approx(64 / np.sqrt(32)) and ad.rank == 32
    assert meta["base_model_name_or_path"] == "unsloth/Qwen2.5-7B-Instruct"
    d = max_diff(ours(t, ad), refs[20])
    print(f"\npersona_vectors checkpoint-20 (rsLoRA r 32, alpha 64, scale {float(ad.scale):.3f}): max |logit diff| {d:.2e}")
    assert d <= ATOL and max_diff(ours(t, ad), refs[10]) > 1e-2
    # read as plain LoRA it would be 5.7x too weak
    assert 64 / np.sqrt(32) / (64 / 32) == pytest.approx(5.657, abs=1e-3)
    _any_ad, any_meta = jpeft.load_any_adapter(root, t.cfg, log=lambda _: None)
    assert any_meta["checkpoint"] == "checkpoint-20" and any_meta["digest"]


def test_gemma3_multimodal_prefix_in_and_out(tiny_zoo, tmp_path) -> None:
    """Gemma 3's multimodal checkpoints put the text blocks under ``model.language_model.`` (transformers 5) or
    ``language_model.model.`` (4.x) and may carry vision-tower LoRA: read both layouts (vision factors are
    ignored, counted), and export with the base's own prefix when given the base directory."""
    from safetensors.numpy import load_file, save_file

    t = tiny_zoo("gemma3")
    d, ref = peft_saved(t, tmp_path / "plain", seed=5, r=4, lora_alpha=8, target_modules=ALL)
    plain, _ = jpeft.load_peft_adapter(d, t.cfg)
    assert max_diff(ours(t, plain), ref) <= ATOL
    for new in ("base_model.model.model.language_model.layers.", "base_model.model.language_model.model.layers."):
        mm = tmp_path / new.split(".")[2]
        shutil.copytree(d, mm)
        edit_tensors(mm, lambda ts, new=new: {
            **{k.replace("base_model.model.model.layers.", new): v for k, v in ts.items()},
            "base_model.model.model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.lora_A.weight":
                np.ones((4, 8), np.float32)})
        logs: list[str] = []
        ad, meta = jpeft.load_peft_adapter(mm, t.cfg, log=logs.append)
        assert len(meta["ignored"]) == 1 and any("vision" in m for m in logs)
        for tg in plain.a:
            np.testing.assert_array_equal(np.asarray(ad.b[tg]), np.asarray(plain.b[tg]))
    # export onto a multimodal-named base directory: keys and target regex take its prefix
    base = tmp_path / "mm_base"
    shutil.copytree(t.path, base)
    ts = load_file(str(base / "model.safetensors"))
    save_file({k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k: v
               for k, v in ts.items()}, str(base / "model.safetensors"), metadata={"format": "pt"})
    out = jpeft.save_peft_adapter(tmp_path / "mm_out", plain, t.cfg, base_dir=base)
    conf = json.loads((out / jpeft.CONFIG_FILE).read_text())
    assert isinstance(conf["target_modules"], str) and "language_model" in conf["target_modules"]
    keys = list(load_file(str(out / jpeft.SAFETENSORS_FILE)))
    assert all(k.startswith("base_model.model.model.language_model.layers.") for k in keys)
    assert re.fullmatch(conf["target_modules"], keys[0].removeprefix("base_model.model.").rsplit(".lora_", 1)[0])
    back, _ = jpeft.load_peft_adapter(out, t.cfg)
    np.testing.assert_allclose(ours(t, back), ours(t, plain), atol=1e-6)


def test_bin_adapter_and_the_orbax_format(tiny_llama, tmp_path, monkeypatch) -> None:
    t = tiny_llama
    d, ref = peft_saved(t, tmp_path / "st", seed=7, r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"])
    st, _ = jpeft.load_peft_adapter(d, t.cfg)
    b = tmp_path / "bin"
    shutil.copytree(d, b)
    from safetensors.torch import load_file

    torch.save(load_file(str(b / jpeft.SAFETENSORS_FILE)), b / jpeft.BIN_FILE)
    (b / jpeft.SAFETENSORS_FILE).unlink()
    got, meta = jpeft.load_peft_adapter(b, t.cfg)
    assert meta["file"] == jpeft.BIN_FILE and max_diff(ours(t, got), ref) <= ATOL
    monkeypatch.setitem(sys.modules, "torch", None)  # torch absent: a typed error naming the way out
    with pytest.raises(errors.AdapterFormatError, match="torch is not installed"):
        jpeft.load_peft_adapter(b, t.cfg)
    monkeypatch.undo()
    orb = save_adapter(tmp_path / "orbax", st, t.cfg, jpeft.lora_config_of(jpeft.load_peft_adapter(d, t.cfg)[1]))
    ad, meta = jpeft.load_any_adapter(orb, t.cfg)
    assert meta["format"] == "orbax" and max_diff(ours(t, ad), ref) <= ATOL
    _, meta = jpeft.load_any_adapter(d, t.cfg)
    assert meta["format"] == "peft"


# --- merged directories -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_merged_directory_loads_in_transformers_with_the_same_logits(tiny_zoo, tmp_path, family) -> None:
    import transformers

    t = tiny_zoo(family)
    lcfg = LoraConfig(rank=4, alpha=8.0, rslora=family == "qwen2", targets=("q", "o", "gate", "down"))
    ad = random_adapter(t.cfg, lcfg, 3)
    out = jpeft.save_merged(tmp_path / "merged", t.path, ad, log=lambda _: None)
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager")
    d = max_diff(ours(t, ad), hf_logits(merged))
    print(f"\n{family}: merged directory -> transformers, max |logit diff| {d:.2e}")
    assert d <= ATOL and max_diff(ours(t, ad), ours(t, None)) > 1e-2
    man = json.loads((out / jpeft.MERGE_MANIFEST).read_text())
    assert man["base"]["source"] == "hf" and man["base"]["files"]["model.safetensors"] == jpeft.file_sha256(
        t.path / "model.safetensors")
    assert man["adapter"]["rank"] == 4 and (out / "config.json").read_text() == (t.path / "config.json").read_text()
    with pytest.raises(errors.InputError, match="overwrite the base"):
        jpeft.save_merged(t.path, t.path, ad)


def test_merged_sharded_base_keeps_its_shards(tiny_llama, tmp_path) -> None:
    import transformers

    t = tiny_llama
    base = tmp_path / "sharded"
    t.hf.save_pretrained(base, max_shard_size="100KB")
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) > 2 and (base / "model.safetensors.index.json").exists()
    ad = random_adapter(t.cfg, LoraConfig(rank=2, alpha=2.0, targets=("k", "up")), 6)
    out = jpeft.save_merged(tmp_path / "m", base, ad, log=lambda _: None)
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert (out / "model.safetensors.index.json").read_text() == (base / "model.safetensors.index.json").read_text()
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager")
    assert max_diff(ours(t, ad), hf_logits(merged)) <= ATOL
    assert sorted(json.loads((out / jpeft.MERGE_MANIFEST).read_text())["base"]["files"]) == shards


def test_bf16_merge_is_bitwise_peft_merge_and_unload(tiny_llama, tmp_path) -> None:
    """On a bf16 base the merged weights equal peft's merge_and_unload bit for bit (ΔW in fp32, cast, added)."""
    import transformers
    from safetensors.numpy import load_file

    t = tiny_llama
    base = tmp_path / "bf16"
    copy.deepcopy(t.hf).to(torch.bfloat16).save_pretrained(base)
    lcfg = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "up"))
    ad = random_adapter(t.cfg, lcfg, 4)
    out = jpeft.save_merged(tmp_path / "m", base, ad, log=lambda _: None)
    pdir = jpeft.save_peft_adapter(tmp_path / "p", ad, t.cfg, lcfg)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
    ref = peft.PeftModel.from_pretrained(hf, str(pdir)).merge_and_unload().state_dict()
    got = load_file(str(out / "model.safetensors"))
    changed = 0
    for k, v in got.items():
        r = ref[k].float().numpy()
        assert v.dtype.name == "bfloat16"
        np.testing.assert_array_equal(v.astype(np.float32), r, err_msg=k)
        changed += "q_proj" in k or "v_proj" in k or "up_proj" in k
    assert changed == 3 * t.cfg.n_layers
    assert json.loads((out / jpeft.MERGE_MANIFEST).read_text())["base"]["dtypes"] == ["bfloat16"]


def test_cached_merge_reuses_and_refuses_bad_adapters_before_writing(tiny_llama, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("JAXPERSONA_CACHE", str(tmp_path / "cache"))
    t = tiny_llama
    d, _ref = peft_saved(t, tmp_path / "ad", seed=8, r=2, lora_alpha=2, target_modules=["k_proj", "down_proj"])
    out = jpeft.cached_merge(t.path, d, log=lambda _: None)
    logs: list[str] = []
    assert jpeft.cached_merge(t.path, d, log=logs.append) == out and "reusing" in logs[0]
    edit_config(d, use_dora=True)
    with pytest.raises(errors.AdapterFormatError, match="use_dora"):
        jpeft.cached_merge(t.path, d, log=lambda _: None)
    assert [p.name for p in (tmp_path / "cache" / "merged").iterdir()] == [out.name]


# --- bad input -------------------------------------------------------------------------------------------------
def _bad_key(suffix: str):
    def fn(ts: dict) -> dict:
        return {**ts, f"base_model.model.model.layers.0.self_attn.q_proj.{suffix}": np.ones(4, np.float32)}
    return fn


BAD_CONFIG = {
    "dora": ({"use_dora": True}, errors.AdapterFormatError, "use_dora.*DoRA"),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, errors.AdapterFormatError, "modules_to_save"),
    "lora_bias": ({"lora_bias": True}, errors.AdapterFormatError, "lora_bias"),
    "bias": ({"bias": "all"}, errors.AdapterFormatError, "bias = 'all'"),
    "pissa": ({"init_lora_weights": "pissa"}, errors.AdapterFormatError, "init_lora_weights.*rewrites the base"),
    "loftq": ({"init_lora_weights": "loftq"}, errors.AdapterFormatError, "init_lora_weights"),
    "ia3": ({"peft_type": "IA3"}, errors.AdapterFormatError, "peft_type"),
    "rank": ({"r": 3}, errors.AdapterFormatError, "rank 2 .* r = 3"),
    "targets": ({"target_modules": ["q_proj"]}, errors.AdapterFormatError, "disagree.*untargeted"),
    "layers": ({"layers_to_transform": [0]}, errors.AdapterFormatError, "disagree"),
    "regex-layers": ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, errors.AdapterFormatError,
                     "layers_to_transform"),
    "token-indices": ({"trainable_token_indices": [5]}, errors.AdapterFormatError, "trainable_token_indices"),
}
BAD_FILE = {
    "dora-key": (_bad_key("lora_magnitude_vector"), errors.AdapterFormatError, "DoRA"),
    "embedding": (_bad_key("lora_embedding_A"), errors.AdapterFormatError, "embedding LoRA"),
    "bias-key": (_bad_key("lora_B.bias"), errors.AdapterFormatError, "lora_bias"),
    "named": (_bad_key("lora_A.default.weight"), errors.AdapterFormatError, "adapter name"),
    "modules-to-save-key": (lambda ts: {**ts, "base_model.model.lm_head.weight": np.ones((4, 4), np.float32)},
                            errors.AdapterFormatError, "modules_to_save"),
    "unknown-module": (lambda ts: {**ts, "base_model.model.model.layers.0.mlp.fc1.lora_A.weight": np.ones((2, 64),
                       np.float32), "base_model.model.model.layers.0.mlp.fc1.lora_B.weight": np.ones((64, 2),
                       np.float32)}, errors.AdapterFormatError, "does not adapt"),
    "lm-head-lora": (lambda ts: {**ts, "base_model.model.lm_head.lora_A.weight": np.ones((2, 64), np.float32),
                                 "base_model.model.lm_head.lora_B.weight": np.ones((256, 2), np.float32)},
                     errors.AdapterFormatError, "embedding / output layer"),
    "missing-half": (lambda ts: {k: v for k, v in ts.items() if k != next(iter(sorted(ts)))},
                     errors.AdapterFormatError, "missing"),
    "int-dtype": (lambda ts: {k: v.astype(np.int32) if i == 0 else v for i, (k, v) in enumerate(sorted(ts.items()))},
                  errors.AdapterFormatError, "dtype"),
}


@pytest.fixture
def good(tiny_llama, tmp_path) -> Path:
    d, _ = peft_saved(tiny_llama, tmp_path / "good", seed=9, r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"])
    jpeft.load_peft_adapter(d, tiny_llama.cfg)  # loads before it is damaged
    return d


@pytest.mark.parametrize("case", list(BAD_CONFIG))
def test_bad_config_is_a_typed_error_naming_the_field(tiny_llama, good, case) -> None:
    change, kind, needle = BAD_CONFIG[case]
    edit_config(good, **change)
    with pytest.raises(kind, match=needle):
        jpeft.load_peft_adapter(good, tiny_llama.cfg)


@pytest.mark.parametrize("case", list(BAD_FILE))
def test_bad_tensors_are_a_typed_error(tiny_llama, good, case) -> None:
    fn, kind, needle = BAD_FILE[case]
    edit_tensors(good, fn)
    with pytest.raises(kind, match=needle):
        jpeft.load_peft_adapter(good, tiny_llama.cfg)


def test_bad_files_and_wrong_base(tiny_llama, good, tmp_path) -> None:
    from jaxpersona.model.config import from_hf_config

    cfg = tiny_llama.cfg

    def other(**kw):  # the tiny llama's config with other sizes: a base model of another shape
        return from_hf_config({**hf_tiny.COMMON, **hf_tiny.FAMILY_CONFIGS["llama"], **kw})

    assert other() == cfg
    with pytest.raises(errors.AdapterMismatchError, match=r"in block \d but this llama model has 2 blocks"):
        jpeft.load_peft_adapter(good, other(num_hidden_layers=2))
    with pytest.raises(errors.AdapterMismatchError, match="does not fit"):
        jpeft.load_peft_adapter(good, other(intermediate_size=96))
    f = good / jpeft.SAFETENSORS_FILE
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(errors.CorruptCheckpointError, match="truncated or corrupt"):
        jpeft.load_peft_adapter(good, cfg)
    f.write_bytes(np.random.default_rng(0).bytes(4096))  # garbage
    with pytest.raises(errors.CorruptCheckpointError):
        jpeft.load_peft_adapter(good, cfg)
    f.unlink()
    with pytest.raises(errors.ModelNotFoundError, match="weights are missing"):
        jpeft.load_peft_adapter(good, cfg)
    (good / jpeft.CONFIG_FILE).write_text("{'r': 8,")  # not JSON
    with pytest.raises(errors.AdapterFormatError, match="not JSON"):
        jpeft.load_peft_adapter(good, cfg)
    (good / jpeft.CONFIG_FILE).write_text("[8]")
    with pytest.raises(errors.AdapterFormatError, match="not a JSON object"):
        jpeft.load_peft_adapter(good, cfg)
    with pytest.raises(errors.ModelNotFoundError, match="does not exist"):
        jpeft.load_any_adapter(tmp_path / "nowhere", cfg)
    (tmp_path / "empty" / "other").mkdir(parents=True)
    with pytest.raises(errors.ModelNotFoundError, match="no adapter_config.json"):
        jpeft.load_peft_adapter(tmp_path / "empty", cfg)
    with pytest.raises(errors.InputError, match="one Adapter"):
        jpeft.save_peft_adapter(tmp_path / "x", {"a": 1}, cfg)  # type: ignore[arg-type]
    for e in (errors.AdapterFormatError, errors.AdapterMismatchError, errors.CorruptCheckpointError,
              errors.ModelNotFoundError):
        assert issubclass(e, errors.JaxPersonaError) and e.exit_code == 2


def test_peft_matching_rules_match_peft() -> None:
    """Our transcription of target / pattern matching against peft's own functions on module names."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    names = [f"{p}layers.{l}.{m}" for p in ("model.", "model.language_model.") for l in (0, 1, 2, 10, 11)
             for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj", "mlp.up_proj")]
    configs = [{"target_modules": ["q_proj", "down_proj"]}, {"target_modules": ["q_proj"], "layers_to_transform": [1, 10]},
               {"target_modules": ["mlp.up_proj"], "layers_to_transform": 2, "layers_pattern": "layers"},
               {"target_modules": r".*language_model.*\.(q|v)_proj"}, {"target_modules": ["v_proj", "up_proj"],
                                                                             "exclude_modules": ["layers.1.self_attn.v_proj"]},
               {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": ["blocks", "layers"]}]
    for kw in configs:
        pc = peft.LoraConfig(**kw)
        for n in names:
            assert jpeft.peft_targets(kw, n) == bool(check_target_module_exists(pc, n)), (kw, n)
    patterns = {"layers.1.self_attn.q_proj": 6, "q_proj": 3, "mlp.*": 2, "layers.1": 9}
    for n in names:
        k = jpeft.pattern_key(patterns, n)
        assert (k if k is not None else n) == get_pattern_key(list(patterns), n), n
