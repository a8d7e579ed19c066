"""VectorBank: validation, Orbax persistence (bit-exact, atomic, typed errors on corruption) and
interop with persona_vectors ``.pt``, assistant-axis ``[L, D]`` arrays and llama.cpp control vectors.

Every interop test checks the layer-index mapping against rows that are all distinct, so an
off-by-one cannot pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest

from jaxpersona import errors
from jaxpersona.artifacts.bank import CONVENTION, VectorBank
from jaxpersona.artifacts.interop import export_control_vector, export_pt, from_assistant_axis, import_control_vector, import_pt, to_assistant_axis
from jaxpersona.model.config import ModelConfig

K, L, D = 3, 4, 8  # 3 entries, 4 blocks -> 5 resid points, d_model 8
NAMES = ("evil", "sycophantic", "hallucinating")
META = (
    {"variant": "response_mean", "n_pairs": 17, "best_layer": 3, "date": "2026-01-02", "scores": [0.5, -1.25]},
    {"variant": "prompt_last", "nested": {"a": None, "b": True}},
    {},
)


def make_cfg(n_layers: int = L, d_model: int = D) -> ModelConfig:
    return ModelConfig(family="llama", vocab_size=32, d_model=d_model, n_layers=n_layers, n_heads=2,
                       n_kv_heads=1, head_dim=d_model // 2, d_ff=16, max_position=64)


def make_vectors(k: int = K, n_resid: int = L + 1, d: int = D, seed: int = 0) -> np.ndarray:
    """Random float32 with awkward values (tiny, huge, negative zero) to catch lossy round trips."""
    v = np.random.default_rng(seed).standard_normal((k, n_resid, d)).astype(np.float32)
    v[0, 0, 0] = np.float32(1e-38)
    v[0, 0, 1] = np.float32(3.4e38)
    v[0, 0, 2] = np.float32(-0.0)
    return v


@pytest.fixture
def bank() -> VectorBank:
    return VectorBank(make_vectors(), NAMES, "org/tiny-model", META, created="2026-01-02T03:04:05+00:00")


@pytest.fixture
def saved(bank: VectorBank, tmp_path: Path) -> Path:
    return bank.save(tmp_path / "bank")


def assert_same_bank(a: VectorBank, b: VectorBank) -> None:
    assert a.vectors.dtype == b.vectors.dtype == np.float32
    assert a.vectors.shape == b.vectors.shape
    assert a.vectors.tobytes() == b.vectors.tobytes()  # bit-exact, incl. -0.0
    assert (a.names, a.model, a.meta, a.convention, a.created) == (b.names, b.model, b.meta, b.convention, b.created)


# --------------------------------------------------------------------------------------------------
# construction and access
# --------------------------------------------------------------------------------------------------
def test_validation_errors() -> None:
    v = make_vectors()
    nan = v.copy()
    nan[1, 2, 3] = np.nan
    with pytest.raises(errors.InputError, match=r"non-finite.*entry 1 at resid\[2\]"):
        VectorBank(nan, NAMES, "m")
    inf = v.copy()
    inf[0, 0, 0] = np.inf
    with pytest.raises(errors.InputError, match="non-finite"):
        VectorBank(inf, NAMES, "m")
    with pytest.raises(errors.InputError, match="unique.*'evil'"):
        VectorBank(v, ("evil", "evil", "x"), "m")
    with pytest.raises(errors.InputError, match="3 vectors but 2 names"):
        VectorBank(v, NAMES[:2], "m")
    with pytest.raises(errors.InputError, match="non-empty"):
        VectorBank(v, ("a", "", "c"), "m")
    with pytest.raises(errors.InputError, match=r"3-D.*\[5, 8\]"):
        VectorBank(v[0], ("a",), "m")
    with pytest.raises(errors.InputError, match="K >= 1"):
        VectorBank(v[:0], (), "m")
    with pytest.raises(errors.InputError, match="2 meta dicts"):
        VectorBank(v, NAMES, "m", META[:2])
    with pytest.raises(errors.InputError, match="JSON"):
        VectorBank(v, NAMES, "m", ({"x": object()}, {}, {}))
    with pytest.raises(errors.InputError, match="JSON"):
        VectorBank(v, NAMES, "m", ({"x": float("nan")}, {}, {}))
    with pytest.raises(errors.InputError, match="model id"):
        VectorBank(v, NAMES, "")
    with pytest.raises(errors.InputError, match="dtype"):
        VectorBank(v.astype(np.complex64), NAMES, "m")


def test_access(bank: VectorBank) -> None:
    ref = make_vectors()
    assert (len(bank), bank.n_resid, bank.d_model) == (K, L + 1, D)
    assert bank.convention == CONVENTION
    assert not bank.vectors.flags.writeable
    np.testing.assert_array_equal(bank.get("sycophantic"), ref[1])
    with pytest.raises(errors.InputError, match="available: evil, sycophantic, hallucinating"):
        bank.get("nope")
    u = bank.unit("hallucinating", 3)
    np.testing.assert_allclose(u, ref[2, 3] / np.linalg.norm(ref[2, 3]), rtol=1e-6)
    np.testing.assert_allclose(bank.unit("evil", -1), ref[0, L] / np.linalg.norm(ref[0, L]), rtol=1e-6)
    with pytest.raises(errors.InputError, match="out of range"):
        bank.unit("evil", L + 1)
    zero = bank.with_entry("z", np.zeros((L + 1, D)))
    with pytest.raises(errors.InputError, match="all zeros"):
        zero.unit("z", 2)


def test_from_vectors() -> None:
    v = make_vectors()
    b = VectorBank.from_vectors("m", {"b": v[1], "a": v[0]}, meta={"a": {"n_pairs": 3}})
    assert b.names == ("b", "a") and b.meta == ({}, {"n_pairs": 3})
    assert b.meta_of("a") == {"n_pairs": 3}
    np.testing.assert_array_equal(b.vectors, v[[1, 0]])
    with pytest.raises(errors.InputError, match="same shape"):
        VectorBank.from_vectors("m", {"a": v[0], "b": v[0, :2]})


def test_with_entry_adds_and_replaces(bank: VectorBank) -> None:
    new = np.full((L + 1, D), 2.5, np.float32)
    added = bank.with_entry("new", new, {"variant": "prompt_mean"})
    assert added.names == NAMES + ("new",)
    np.testing.assert_array_equal(added.get("new"), new)
    assert added.meta[-1] == {"variant": "prompt_mean"}
    assert len(bank) == K  # original untouched
    replaced = bank.with_entry("sycophantic", new)
    assert replaced.names == NAMES
    np.testing.assert_array_equal(replaced.get("sycophantic"), new)
    np.testing.assert_array_equal(replaced.get("evil"), bank.get("evil"))
    np.testing.assert_array_equal(bank.get("sycophantic"), make_vectors()[1])
    with pytest.raises(errors.InputError, match=r"\[6, 8\].*\[5, 8\]"):
        bank.with_entry("bad", np.zeros((L + 2, D)))


def test_check_model(bank: VectorBank) -> None:
    bank.check_model(make_cfg())
    with pytest.raises(errors.ModelMismatchError, match=r"\[5, 8\].*\[5, 16\]"):
        bank.check_model(make_cfg(d_model=16))
    with pytest.raises(errors.ModelMismatchError, match=r"\[5, 8\].*\[7, 8\]"):
        bank.check_model(make_cfg(n_layers=6))


# --------------------------------------------------------------------------------------------------
# Orbax persistence
# --------------------------------------------------------------------------------------------------
def test_round_trip_bit_exact(bank: VectorBank, saved: Path) -> None:
    loaded = VectorBank.load(saved)
    assert_same_bank(loaded, bank)
    assert loaded.meta[0]["scores"] == [0.5, -1.25]
    assert_same_bank(VectorBank.load(str(saved), cfg=make_cfg()), bank)
    assert sorted(p.name for p in saved.parent.iterdir()) == ["bank"]  # no temp leftovers


def test_load_checks_model(saved: Path) -> None:
    with pytest.raises(errors.ModelMismatchError, match="layers"):
        VectorBank.load(saved, cfg=make_cfg(n_layers=L + 1))
    with pytest.raises(errors.ModelMismatchError, match="d_model"):
        VectorBank.load(saved, cfg=make_cfg(d_model=2 * D))


def test_overwrite(bank: VectorBank, saved: Path) -> None:
    other = VectorBank(make_vectors(k=1, seed=7), ("other",), "org/tiny-model")
    with pytest.raises(errors.InputError, match="overwrite=True"):
        other.save(saved)
    assert_same_bank(VectorBank.load(saved), bank)
    other.save(saved, overwrite=True)
    assert_same_bank(VectorBank.load(saved), other)
    assert sorted(p.name for p in saved.parent.iterdir()) == ["bank"]
    # an existing empty directory may be written into; a non-bank directory is never deleted
    empty = saved.parent / "empty"
    empty.mkdir()
    bank.save(empty, overwrite=True)
    assert_same_bank(VectorBank.load(empty), bank)
    precious = saved.parent / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("do not delete")
    with pytest.raises(errors.InputError, match="not a vector bank"):
        bank.save(precious, overwrite=True)
    assert (precious / "thesis.txt").read_text() == "do not delete"


def _data_files(path: Path) -> list[Path]:
    """Tensorstore OCDBT data files: small arrays live inline in b-tree nodes, large ones out of line."""
    files = sorted(p for p in (path / "vectors").rglob("*") if p.is_file() and p.parent.name == "d")
    assert files, "expected tensorstore data files under vectors/**/d/"
    return files


def _delete_data(p: Path) -> None:
    for f in _data_files(p):
        f.unlink()


def _truncate_data(p: Path) -> None:
    for f in _data_files(p):
        os.truncate(f, f.stat().st_size // 2)


def _flip_data_byte(p: Path) -> None:
    f = max(_data_files(p), key=lambda f: f.stat().st_size)
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0xFF
    f.write_bytes(bytes(b))


def _delete_bank_json(p: Path) -> None:
    for f in (p / "bank").iterdir():
        f.unlink()


def _truncate_bank_json(p: Path) -> None:
    for f in (p / "bank").iterdir():
        if f.name != "commit_success.txt":
            os.truncate(f, 10)


def _delete_vectors(p: Path) -> None:
    import shutil

    shutil.rmtree(p / "vectors")


def _delete_manifest(p: Path) -> None:
    (p / "vectors" / "manifest.ocdbt").unlink()


def _truncate_array_metadata(p: Path) -> None:
    os.truncate(p / "vectors" / "_METADATA", 20)


@pytest.mark.parametrize(
    "damage",
    [_delete_data, _truncate_data, _flip_data_byte, _delete_bank_json, _truncate_bank_json, _delete_vectors,
     _delete_manifest, _truncate_array_metadata],
)
@pytest.mark.parametrize("shape", [(K, L + 1, D), (2, 5, 4096)], ids=["small", "large"])
def test_corrupt_bank(tmp_path: Path, damage, shape: tuple[int, int, int]) -> None:
    saved = VectorBank(make_vectors(*shape), NAMES[: shape[0]], "m").save(tmp_path / "bank")
    damage(saved)
    with pytest.raises(errors.CorruptCheckpointError, match="save the bank again") as ei:
        VectorBank.load(saved)
    assert str(saved) in str(ei.value)
    assert "tensorstore_spec" not in str(ei.value)


def test_tampered_metadata(bank: VectorBank, saved: Path) -> None:
    import json

    (meta_file,) = [f for f in (saved / "bank").iterdir() if f.name != "commit_success.txt"]
    info = json.loads(meta_file.read_text())
    info["shape"] = [K, L + 2, D]
    meta_file.write_text(json.dumps(info))
    with pytest.raises(errors.CorruptCheckpointError, match=r"metadata says float32 \[3, 6, 8\]"):
        VectorBank.load(saved)
    info["shape"] = [K, L + 1, D]
    info["format"] = "something.else"
    meta_file.write_text(json.dumps(info))
    with pytest.raises(errors.CorruptCheckpointError, match="not a jaxpersona vector bank"):
        VectorBank.load(saved)


def test_not_a_bank(tmp_path: Path) -> None:
    with pytest.raises(errors.ModelNotFoundError, match="no vector bank"):
        VectorBank.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(errors.CorruptCheckpointError, match="not a vector bank"):
        VectorBank.load(tmp_path / "empty")
    rand = tmp_path / "random"
    (rand / "sub").mkdir(parents=True)
    (rand / "bank").write_bytes(os.urandom(64))
    (rand / "sub" / "x.bin").write_bytes(os.urandom(64))
    with pytest.raises(errors.CorruptCheckpointError, match="not a vector bank"):
        VectorBank.load(rand)
    (tmp_path / "file").write_text("hi")
    with pytest.raises(errors.CorruptCheckpointError, match="is a file"):
        VectorBank.load(tmp_path / "file")


# A save killed at two points: inside Orbax before its commit rename (an `*.orbax-checkpoint-tmp-*`
# dir is left), and after Orbax committed but before the swap onto the target path.
_KILLED_SAVE = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import orbax.checkpoint as ocp
    import jaxpersona.artifacts.bank as jb
    where, path = sys.argv[1], sys.argv[2]
    if where == "orbax":
        ocp.CompositeCheckpointHandler.finalize = lambda self, directory: os._exit(3)
    elif where == "swap":
        jb._swap_into_place = lambda new, dest: os._exit(3)
    else:  # "mid-swap": the old bank was renamed aside, the new one not yet renamed in
        rename = os.rename
        def dying_rename(src, dst):
            name = os.path.basename(str(src))
            if ".jaxpersona-tmp-" in name and ".orbax-checkpoint-tmp" not in name:
                os._exit(3)  # Orbax has committed and the old bank is aside; die before renaming in
            rename(src, dst)
        jb.os.rename = dying_rename
    v = np.full((1, 5, 8), 9.0, np.float32)
    jb.VectorBank(v, ("killed",), "m").save(path, overwrite=True)
    """
)


@pytest.mark.parametrize("where", ["orbax", "swap"])
def test_interrupted_save(bank: VectorBank, tmp_path: Path, where: str) -> None:
    target = tmp_path / "fresh"
    existing = bank.save(tmp_path / "existing")
    for path in (target, existing):
        proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, where, str(path)], capture_output=True, text=True)
        assert proc.returncode == 3, proc.stderr
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert len(leftovers) == 2  # one per killed save
    # the existing bank is untouched; the never-finished one does not exist, and says why
    assert_same_bank(VectorBank.load(existing), bank)
    with pytest.raises(errors.ModelNotFoundError, match="interrupted save"):
        VectorBank.load(target)
    for p in leftovers:
        with pytest.raises(errors.CorruptCheckpointError, match="interrupted save"):
            VectorBank.load(p)
    bank.save(target)  # a later save works despite the leftovers
    assert_same_bank(VectorBank.load(target), bank)


# --------------------------------------------------------------------------------------------------
# persona_vectors .pt
# --------------------------------------------------------------------------------------------------
def test_pt_round_trip(bank: VectorBank, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    out = export_pt(bank, "sycophantic", tmp_path / "syco.pt")
    t = torch.load(out, weights_only=True)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and tuple(t.shape) == (L + 1, D)
    np.testing.assert_array_equal(t.numpy(), make_vectors()[1])
    back = import_pt(out, "syco", "org/tiny-model")
    assert back.names == ("syco",) and back.model == "org/tiny-model"
    assert back.get("syco").tobytes() == bank.get("sycophantic").tobytes()


def test_pt_written_by_torch(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    ref = torch.arange((L + 1) * D, dtype=torch.float32).reshape(L + 1, D) / 7
    path = tmp_path / "evil_response_avg_diff.pt"
    torch.save(ref, path)
    b = import_pt(path, "evil", "Qwen/Qwen2.5-7B-Instruct", meta={"n_pairs": 5})
    np.testing.assert_array_equal(b.get("evil"), ref.numpy())
    assert b.meta[0]["variant"] == "response_mean" and b.meta[0]["n_pairs"] == 5
    bf = tmp_path / "evil_prompt_last_diff.pt"
    torch.save(ref.to(torch.bfloat16), bf)
    b = import_pt(bf, "evil", "m")
    np.testing.assert_array_equal(b.get("evil"), ref.to(torch.bfloat16).float().numpy())
    assert b.meta[0]["variant"] == "prompt_last"


def test_pt_bad_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    torch.save(torch.zeros(2, L + 1, D), tmp_path / "3d.pt")
    with pytest.raises(errors.InputError, match=r"shape \[2, 5, 8\]"):
        import_pt(tmp_path / "3d.pt", "x", "m")
    torch.save({"v": torch.zeros(L + 1, D)}, tmp_path / "dict.pt")
    with pytest.raises(errors.InputError, match="holds a dict"):
        import_pt(tmp_path / "dict.pt", "x", "m")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(errors.CorruptCheckpointError, match="weights_only"):
        import_pt(tmp_path / "junk.pt", "x", "m")
    with pytest.raises(errors.ModelNotFoundError):
        import_pt(tmp_path / "missing.pt", "x", "m")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(errors.InputError, match="pip install torch"):
        import_pt(tmp_path / "3d.pt", "x", "m")


# --------------------------------------------------------------------------------------------------
# assistant-axis
# --------------------------------------------------------------------------------------------------
def test_assistant_axis_mapping() -> None:
    theirs = np.arange(L * D, dtype=np.float32).reshape(L, D) + 1  # row i = output of block i
    ours = from_assistant_axis(theirs)
    assert ours.shape == (L + 1, D) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours[0], np.zeros(D))  # no embedding row in assistant-axis
    for i in range(L):
        np.testing.assert_array_equal(ours[i + 1], theirs[i])  # their i = our resid[i+1]
    np.testing.assert_array_equal(to_assistant_axis(ours), theirs)
    resid = make_vectors()[0]
    back = to_assistant_axis(resid)
    for i in range(L):
        np.testing.assert_array_equal(back[i], resid[i + 1])
    with pytest.raises(errors.InputError, match="2-D"):
        from_assistant_axis(np.zeros((2, L, D)))
    with pytest.raises(errors.InputError, match="2-D"):
        to_assistant_axis(np.zeros(D))


# --------------------------------------------------------------------------------------------------
# llama.cpp control vectors
# --------------------------------------------------------------------------------------------------
def _read_gguf(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    r = gguf.GGUFReader(path)
    fields = {k: r.fields[k].contents() for k in r.fields if not k.startswith("GGUF.")}
    tensors = {}
    for t in r.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        tensors[t.name] = np.array(t.data)
    return fields, tensors


def test_control_vector_export(bank: VectorBank, tmp_path: Path) -> None:
    path = export_control_vector(bank, "evil", tmp_path / "evil.gguf", coeff=-1.5)
    fields, tensors = _read_gguf(path)
    assert fields["general.architecture"] == "controlvector"
    assert fields["controlvector.model_hint"] == "llama"
    assert fields["controlvector.layer_count"] == L - 1
    assert sorted(tensors) == [f"direction.{n}" for n in range(1, L)]
    ref = make_vectors()[0]
    for l in range(2, L + 1):  # our resid[l] = output of block l-1 = llama.cpp direction.{l-1}
        t = tensors[f"direction.{l - 1}"]
        assert t.shape == (D,)
        np.testing.assert_array_equal(t, np.float32(-1.5) * ref[l])
    back = import_control_vector(path, "org/tiny-model", L + 1)
    np.testing.assert_array_equal(back[:2], np.zeros((2, D)))
    np.testing.assert_array_equal(back[2:], np.float32(-1.5) * ref[2:])


def test_control_vector_layers_and_hint(bank: VectorBank, tmp_path: Path) -> None:
    b = bank.with_entry("q", bank.get("evil"), {"family": "qwen2"})
    path = export_control_vector(b, "q", tmp_path / "q.gguf", layers=[3])
    fields, tensors = _read_gguf(path)
    assert fields["controlvector.model_hint"] == "qwen2" and fields["controlvector.layer_count"] == 1
    assert list(tensors) == ["direction.2"]
    np.testing.assert_array_equal(tensors["direction.2"], make_vectors()[0, 3])
    path = export_control_vector(bank, "evil", tmp_path / "h.gguf", layers=[2], model_hint="mistral")
    assert _read_gguf(path)[0]["controlvector.model_hint"] == "mistral"
    for bad in ([0], [1, 2], [L + 1], []):
        with pytest.raises(errors.InputError, match="resid"):
            export_control_vector(bank, "evil", tmp_path / "bad.gguf", layers=bad)
    assert not (tmp_path / "bad.gguf").exists()


def test_control_vector_import_errors(bank: VectorBank, tmp_path: Path) -> None:
    path = export_control_vector(bank, "evil", tmp_path / "cv.gguf")
    with pytest.raises(errors.ModelMismatchError, match="only 3 blocks"):
        import_control_vector(path, "shallow", L)
    w = gguf.GGUFWriter(tmp_path / "model.gguf", "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, D), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(errors.InputError, match="'llama', not a llama.cpp control vector"):
        import_control_vector(tmp_path / "model.gguf", "m", L + 1)
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + os.urandom(40))
    with pytest.raises(errors.CorruptCheckpointError, match="not a readable GGUF"):
        import_control_vector(tmp_path / "junk.gguf", "m", L + 1)
    w = gguf.GGUFWriter(tmp_path / "zero.gguf", "controlvector")
    w.add_tensor("direction.0", np.zeros(D, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(errors.CorruptCheckpointError, match="N >= 1"):
        import_control_vector(tmp_path / "zero.gguf", "m", L + 1)


def test_interrupted_overwrite_mid_swap(bank: VectorBank, tmp_path: Path) -> None:
    existing = bank.save(tmp_path / "existing")
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, "mid-swap", str(existing)], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    with pytest.raises(errors.ModelNotFoundError, match="previous bank is intact in .existing.jaxpersona-old-") as ei:
        VectorBank.load(existing)
    (old,) = tmp_path.glob(".existing.jaxpersona-old-*")
    assert old.name in str(ei.value)
    old.rename(existing)
    assert_same_bank(VectorBank.load(existing), bank)
