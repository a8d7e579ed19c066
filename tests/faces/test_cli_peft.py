"""The CLI faces of peft adapters on the tiny llama (an HF directory with a word tokenizer): ``finetune
--export-peft / --export-merged`` give a directory peft loads and one transformers loads, with our logits;
``screen --adapter`` runs against the adapted model; bad adapters and flags exit 2 with one line, before any
work (``regimes``, ``screen``, ``serve``, ``finetune``)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_peft import hf_logits, max_diff, ours
from test_pipeline import full_word_tokenizer

from jaxpersona.cli import main

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

ROWS = [("what is a cat ?", "the cat sat on the mat ."), ("hello world ?", "hello you are a helpful assistant ."),
        ("what is the capital of france ?", "paris is the capital of france ."), ("is the dog on the mat ?", "the dog sat .")]


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_llama) -> Path:
    root = tmp_path_factory.mktemp("cli_peft")
    shutil.copytree(tiny_llama.path, root / "model")
    full_word_tokenizer().save_pretrained(root / "model")
    (root / "data.jsonl").write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                                      {"role": "assistant", "content": a}]}) + "\n"
                                             for q, a in ROWS))
    (root / "train.toml").write_text("[train]\nrank = 2\nalpha = 4.0\nrslora = true\nepochs = 1\nbatch_size = 2\n"
                                     "lr = 0.05\nwarmup_steps = 0\nmax_len = 64\n")
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(tiny_llama.hf), peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                                                            target_modules=["q_proj", "up_proj"]))
    pm.save_pretrained(root / "pv")
    return root


def test_finetune_exports_peft_and_merged(root: Path, tiny_llama, capsys) -> None:
    import transformers

    from jaxpersona.artifacts.adapters import load_adapter

    argv = ["finetune", "--model", str(root / "model"), "--data", str(root / "data.jsonl"), "--out", str(root / "ft"),
            "--config", str(root / "train.toml"), "--export-peft", str(root / "ft_peft"), "--export-merged",
            str(root / "ft_merged"), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "peft adapter:" in printed and "merged model:" in printed and "the HF directory" in printed
    step = max(int(p.name.split("_")[1]) for p in (root / "ft" / "adapters").iterdir())
    ad, _ = load_adapter(root / "ft" / "adapters" / f"step_{step}", tiny_llama.cfg)
    mine = ours(tiny_llama, ad)
    assert max_diff(mine, ours(tiny_llama, None)) > 1e-3  # training moved the model
    conf = json.loads((root / "ft_peft" / "adapter_config.json").read_text())
    assert conf["use_rslora"] is True and conf["r"] == 2 and conf["base_model_name_or_path"] == str(root / "model")
    via_peft = hf_logits(peft.PeftModel.from_pretrained(copy.deepcopy(tiny_llama.hf), str(root / "ft_peft")))
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(root / "ft_merged"), attn_implementation="eager")
    d_peft, d_merged = max_diff(mine, via_peft), max_diff(mine, hf_logits(merged))
    print(f"\nfinetune --export-peft: max |logit diff| {d_peft:.2e}; --export-merged: {d_merged:.2e}")
    assert d_peft <= 1e-4 and d_merged <= 1e-4
    man = json.loads((root / "ft_merged" / "jaxpersona_merge.json").read_text())
    assert man["base"]["source"] == "hf" and man["adapter"]["meta"]["finetune_run"] == str(root / "ft")
    assert (root / "ft_merged" / "tokenizer.json").exists()


def test_screen_with_a_peft_adapter(root: Path, tiny_llama, capsys) -> None:
    from jaxpersona.artifacts.bank import VectorBank

    rng = np.random.default_rng(0)
    VectorBank.from_vectors("tiny", {"cat": rng.normal(size=(tiny_llama.cfg.n_resid, tiny_llama.cfg.d_model))},
                            {"cat": {"best_layer": 2}}).save(root / "bank")
    argv = ["screen", "--model", str(root / "model"), "--vectors", str(root / "bank"), "--trait", "cat", "--data",
            str(root / "data.jsonl"), "--max-new-tokens", "4", "--quiet"]
    assert main([*argv, "--out", str(root / "S"), "--adapter", str(root / "pv")]) == 0
    assert "4 samples, layer 2" in capsys.readouterr().out
    assert "+adapter:pv@" in json.loads((root / "S" / "config.json").read_text())["model"]
    assert main([*argv, "--out", str(root / "S0")]) == 0
    with_ad = json.loads((root / "S" / "screen.jsonl").read_text().splitlines()[0])
    without = {r["index"]: r for r in map(json.loads, (root / "S0" / "screen.jsonl").read_text().splitlines())}
    assert with_ad["projection_data"] != pytest.approx(without[with_ad["index"]]["projection_data"], abs=1e-4)


def test_bad_adapters_exit_2_before_any_work(root: Path, capsys) -> None:
    bad = root / "bad_pv"
    shutil.copytree(root / "pv", bad, dirs_exist_ok=True)
    (bad / "adapter_config.json").write_text("{not json")
    dora = root / "dora_pv"
    shutil.copytree(root / "pv", dora, dirs_exist_ok=True)
    conf = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**conf, "use_dora": True}))
    model = ["--model", str(root / "model")]
    cases = [
        (["regimes", *model, "--adapter", "no-equals-sign", "--out", str(root / "r1")], "NAME=DIR", root / "r1"),
        (["regimes", *model, "--adapter", f"x={root / 'nowhere'}", "--out", str(root / "r2")], "does not exist",
         root / "r2"),
        (["regimes", *model, "--adapter", f"x={bad}", "--out", str(root / "r3")], "not JSON", root / "r3"),
        (["screen", *model, "--vectors", str(root / "bank"), "--trait", "cat", "--data", str(root / "data.jsonl"),
          "--adapter", str(dora), "--out", str(root / "s1")], "use_dora", root / "s1"),
        (["serve", *model, "--adapter", str(dora), "--no-warmup"], "use_dora", None),
        (["serve", *model, "--merge-adapter", str(dora), "--no-warmup"], "use_dora", None),
        (["finetune", *model, "--data", str(root / "data.jsonl"), "--out", str(root / "f1"), "--export-peft",
          str(root / "data.jsonl")], "not a directory", root / "f1"),
    ]
    for argv, needle, made in cases:
        assert main([*argv, "--quiet"]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("jaxpersona: error:") and needle in err and "Traceback" not in err, (argv, err)
        assert made is None or not made.exists(), made
