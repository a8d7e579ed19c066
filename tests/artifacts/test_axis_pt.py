"""assistant-axis's ``assistant_axis.pt``, in and out.

Their ``save_axis`` writes ``torch.save({"axis": [n_layers, hidden], "metadata": {...}})``; their ``5_axis.py``
saves the raw tensor; ``load_axis`` reads either (``data["axis"] if dict else data``) and ``axis[i]`` is the
output of block ``i`` = our ``resid[i+1]``. Rows are all distinct, so an off-by-one cannot pass."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from jaxpersona import errors
from jaxpersona.artifacts.bank import VectorBank
from jaxpersona.artifacts.interop import (
    export_assistant_axis_pt,
    export_entry,
    import_assistant_axis_pt,
    import_pt_into_bank,
)

L, D = 5, 8


def their_load_axis(path):
    """The reference's load_axis, transcribed."""
    data = torch.load(path, map_location="cpu", weights_only=False)
    return data["axis"] if isinstance(data, dict) and "axis" in data else data


@pytest.fixture
def bank() -> VectorBank:
    v = np.random.default_rng(0).standard_normal((2, L + 1, D)).astype(np.float32)
    return VectorBank(v, ("assistant_axis", "evil"), "org/tiny", ({"kind": "axis"}, {}))


def test_export_is_their_save_axis_and_import_round_trips(bank, tmp_path) -> None:
    out = tmp_path / "assistant_axis.pt"
    export_entry(bank, "assistant_axis", "assistant-axis-pt", out)
    raw = torch.load(out, weights_only=True)  # plain tensors, dicts and strings: loads without unpickling code
    assert set(raw) == {"axis", "metadata"} and raw["axis"].dtype == torch.float32
    axis = their_load_axis(out)
    assert tuple(axis.shape) == (L, D)
    for i in range(L):  # their axis[i] (output of block i) is our resid[i+1]
        np.testing.assert_array_equal(axis[i].numpy(), bank.get("assistant_axis")[i + 1])
    meta = raw["metadata"]
    assert meta["model"] == "org/tiny" and meta["entry"] == "assistant_axis" and meta["n_layers"] == L
    assert "output of decoder block i" in meta["convention"]

    target = tmp_path / "bank"
    import_pt_into_bank(out, "assistant_axis", target, "org/tiny")  # the {"axis", ...} dict is recognised
    back = VectorBank.load(target)
    got = back.get("assistant_axis")
    np.testing.assert_array_equal(got[1:], bank.get("assistant_axis")[1:])
    assert not got[0].any()  # they have no embedding row
    m = back.meta_of("assistant_axis")
    assert m["imported_from"] == "assistant-axis .pt" and m["axis_metadata"]["entry"] == "assistant_axis"


def test_import_their_raw_tensor_and_bf16(bank, tmp_path) -> None:
    theirs = torch.from_numpy(np.random.default_rng(1).standard_normal((L, D)).astype(np.float32))
    torch.save(theirs.to(torch.bfloat16), tmp_path / "raw.pt")  # 5_axis.py saves the raw tensor
    b = import_assistant_axis_pt(tmp_path / "raw.pt", "assistant_axis", "org/tiny")
    assert b.vectors.shape == (1, L + 1, D)
    np.testing.assert_array_equal(b.get("assistant_axis")[1:], theirs.to(torch.bfloat16).float().numpy())
    # into an existing bank of the same model, with the format named (a raw [L, D] tensor is otherwise taken
    # for persona_vectors' [L+1, D])
    target = bank.save(tmp_path / "bank")
    import_pt_into_bank(tmp_path / "raw.pt", "theirs", target, "org/tiny", fmt="assistant-axis-pt")
    assert VectorBank.load(target).names == ("assistant_axis", "evil", "theirs")
    assert VectorBank.load(target).meta_of("theirs")["imported_from"] == "assistant-axis .pt"
    with pytest.raises(errors.InputError, match="shape"):
        import_pt_into_bank(tmp_path / "raw.pt", "wrong", target, "org/tiny", fmt="pt")
    with pytest.raises(errors.ModelMismatchError, match="does not belong"):  # the model id was silently dropped
        import_pt_into_bank(tmp_path / "raw.pt", "other", target, "org/another", fmt="assistant-axis-pt")
    assert "other" not in VectorBank.load(target).names
    # their metadata may hold non-JSON values: kept as text / lists
    torch.save({"axis": theirs, "metadata": {"layers": (1, 2), "t": torch.ones(2), "n": None}}, tmp_path / "m.pt")
    m = import_assistant_axis_pt(tmp_path / "m.pt", "a", "org/tiny").meta_of("a")["axis_metadata"]
    assert m == {"layers": [1, 2], "t": [1.0, 1.0], "n": None}


def test_bad_axis_files(bank, tmp_path, monkeypatch) -> None:
    torch.save({"vectors": torch.ones(L, D)}, tmp_path / "nodict.pt")
    torch.save(torch.ones(2, L, D), tmp_path / "3d.pt")
    torch.save({"axis": "nope"}, tmp_path / "str.pt")
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(errors.InputError, match="not an assistant axis"):
        import_assistant_axis_pt(tmp_path / "nodict.pt", "a", "m")
    with pytest.raises(errors.InputError, match=r"shape \[2, 5, 8\]"):
        import_assistant_axis_pt(tmp_path / "3d.pt", "a", "m")
    with pytest.raises(errors.InputError, match="the axis is a str"):
        import_assistant_axis_pt(tmp_path / "str.pt", "a", "m")
    with pytest.raises(errors.CorruptCheckpointError, match="cannot be read"):
        import_assistant_axis_pt(tmp_path / "cut.pt", "a", "m")
    with pytest.raises(errors.ModelNotFoundError):
        import_assistant_axis_pt(tmp_path / "missing.pt", "a", "m")
    with pytest.raises(errors.InputError, match="unknown .pt import format"):
        import_pt_into_bank(tmp_path / "3d.pt", "a", tmp_path / "b", "m", fmt="control")
    with pytest.raises(errors.InputError, match="no entry 'nope'"):
        export_entry(bank, "nope", "assistant-axis-pt", tmp_path / "x.pt")
    monkeypatch.setitem(sys.modules, "torch", None)  # torch is optional: a clear typed error without it
    with pytest.raises(errors.InputError, match="pip install torch"):
        export_assistant_axis_pt(bank, "evil", tmp_path / "y.pt")
    with pytest.raises(errors.InputError, match="pip install torch"):
        import_assistant_axis_pt(tmp_path / "3d.pt", "a", "m")


def test_vectors_cli_assistant_axis_pt(bank, tmp_path, capsys) -> None:
    from jaxpersona.cli import main

    src = bank.save(tmp_path / "bank")
    out = tmp_path / "assistant_axis.pt"
    assert main(["vectors", "export", "--bank", str(src), "--trait", "assistant_axis", "--format",
                 "assistant-axis-pt", "--out", str(out)]) == 0
    np.testing.assert_array_equal(their_load_axis(out).numpy(), bank.get("assistant_axis")[1:])
    assert main(["vectors", "import", "--pt", str(out), "--trait", "axis_back", "--bank", str(tmp_path / "b2"),
                 "--model-id", "org/tiny"]) == 0
    np.testing.assert_array_equal(VectorBank.load(tmp_path / "b2").get("axis_back")[1:], bank.get("assistant_axis")[1:])
    torch.save(torch.ones(3), tmp_path / "1d.pt")
    assert main(["vectors", "import", "--pt", str(tmp_path / "1d.pt"), "--trait", "x", "--bank", str(tmp_path / "b3"),
                 "--format", "assistant-axis-pt"]) == 2
    assert "expected a float [n_layers, hidden] tensor" in capsys.readouterr().err
