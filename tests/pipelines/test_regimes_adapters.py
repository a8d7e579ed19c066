"""Adapters trained elsewhere as regimes: a peft adapter (saved by peft itself) and a jaxpersona Orbax adapter run
through ``run_regimes(adapters=...)`` on the tiny llama beside the run's own fine-tune; bad adapters stop the run
before its directory is made."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from test_pipeline import full_word_tokenizer

from jaxpersona import errors
from jaxpersona.compute.handle import Model

SMALL = {"n_pairs": 1, "n_train_questions": 4, "n_eval_questions": 2, "max_new_tokens": 6, "batch_size": 4, "bipo_steps": 2,
             "bipo_batch": 2, "n_boot": 50, "n_splits": 20, "trainers": ("plain",), "datasets": ("trait",), "trait_b": ""}
TRAIN_SMALL = {"rank": 2, "epochs": 1, "batch_size": 2, "save_every": 0, "lr": 1e-2, "warmup_steps": 0}


@pytest.fixture(scope="module")
def model(tiny_llama) -> Model:
    return Model(tiny_llama.cfg, tiny_llama.params, full_word_tokenizer(), "tiny-llama")


def test_regimes_with_adapters_from_elsewhere(model, tiny_llama, tmp_path) -> None:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from test_peft import random_adapter

    from jaxpersona.artifacts.adapters import save_adapter
    from jaxpersona.compute.train import TrainConfig
    from jaxpersona.data.traits import load_trait
    from jaxpersona.model.lora import LoraConfig
    from jaxpersona.pipelines.regimes import RegimesConfig, run_regimes

    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(tiny_llama.hf), peft.LoraConfig(
        r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False, target_modules=["q_proj", "v_proj", "down_proj"]))
    pv = tmp_path / "pv_out" / "checkpoint-7"
    pm.save_pretrained(pv)
    lcfg = LoraConfig(rank=2, alpha=4.0)
    orb = save_adapter(tmp_path / "orbax", random_adapter(model.cfg, lcfg, 5), model.cfg, lcfg)
    cfg, tcfg = RegimesConfig().replace(**SMALL), TrainConfig().replace(**TRAIN_SMALL)
    trait = load_trait("evil")
    out = tmp_path / "run"
    s = run_regimes(model, trait, cfg, tcfg, out, adapters={"pv": pv.parent, "mine": orb}, progress=False,
                    log=lambda _: None)
    ext = s["adapters"]
    assert set(ext) == {"pv", "mine"}
    assert ext["pv"]["format"] == "peft" and ext["pv"]["checkpoint"] == "checkpoint-7"
    assert ext["pv"]["lora"]["scale"] == pytest.approx(8 / 2) and len(ext["pv"]["sha256"]) == 64
    assert ext["pv"]["peft_config"]["use_rslora"] is True and ext["mine"]["format"] == "orbax"
    assert ext["mine"]["lora"] == {"rank": 2, "alpha": 4.0, "rslora": False, "targets": list(lcfg.targets), "scale": 2.0}
    for a in ext.values():
        assert a["point"]["condition"].startswith("adapter:") and len(a["cos_prompt"]) == 3
    assert abs(ext["pv"]["point"]["trait_delta"][0]) > 0  # the adapter changes the model's likelihoods
    assert {"adapter:pv", "adapter:pv+prompt+steer", "adapter:mine+steer"} <= set(s["grid"])
    assert s["correlation"]["n_points"] == 1 + len(s["runs"]["plain-trait"]["checkpoints"])
    recorded = json.loads((out / "config.json").read_text())["adapters"]
    assert recorded["pv"]["sha256"] == ext["pv"]["sha256"] and recorded["pv"]["source"] == str(pv.parent)
    text = (out / "regimes.txt").read_text()
    assert "Adapters from elsewhere" in text and "checkpoint-7" in text
    # the same adapter's numbers come back from the cache on a rerun
    again = run_regimes(model, trait, cfg, tcfg, out, adapters={"pv": pv.parent, "mine": orb}, progress=False,
                        log=lambda _: None)
    assert again["adapters"]["pv"]["point"] == ext["pv"]["point"]
    np.testing.assert_equal(again["grid"]["adapter:pv"], s["grid"]["adapter:pv"])
    # bad adapters: typed errors before the run directory exists
    (pv / "adapter_config.json").write_text("not json")
    for adapters, kind in (({"pv": pv}, errors.AdapterFormatError), ({"x": tmp_path / "none"}, errors.ModelNotFoundError),
                           ({"a@b": orb}, errors.InputError)):
        with pytest.raises(kind):
            run_regimes(model, trait, cfg, tcfg, tmp_path / "bad", adapters=adapters, progress=False, log=lambda _: None)
        assert not (tmp_path / "bad").exists()
