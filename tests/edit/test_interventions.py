"""Interventions (steer / ablate / cap / Chain, position selectors) against a PyTorch reference.

The reference is what a PyTorch user would write: forward hooks on the HF model that implement the
same math, with no jaxpersona code involved. ``resid[0]`` is the output of ``model.embed_tokens``
(which in transformers 5 already includes Gemma's sqrt(d) scale: ``Gemma2TextScaledWordEmbedding``)
and ``resid[l]`` (``l >= 1``) is the output of decoder layer ``l-1``. Every comparison runs on a
LEFT-PADDED batch (HF gets ``position_ids = cumsum(mask) - 1`` clipped at 0) and checks valid
positions only.

Tolerances: fp32 on both sides, differences are summation order only. Tiny models: 1e-4 absolute
on logits (the measured hook-free difference is ~2e-5, see test_parity.py); SmolLM2 (30 layers,
logits up to ~40): 3e-5 x max|logit| as in test_real_models.py. Each intervention is also checked
to change the logits by far more than the tolerance, so agreement is not vacuous.

Generation semantics (absolute slots; prompt width ``P``): ``Positions.prompt`` edits the prefill
only (hence the KV cache of the prompt), ``Positions.response`` = slot ``P-1`` plus every generated
token, ``Positions.all`` = every valid token including generated ones. The torch hook tells the
prefill (sequence length > 1) from decode steps (length 1) to implement the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import zlib

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import hf_tiny
import jaxpersona.compute.handle as jm
from jaxpersona.compute.batching import Batch
from jaxpersona import errors
from jaxpersona.model import registry
from jaxpersona.compute.generate import generate_loop, generate
from jaxpersona.edit.interventions import Cap, Chain, Positions, Steer, ablate, cap, check_for_model, layer_weights, steer
from jaxpersona.model.transformer import Capture, HookContext, forward

ATOL = 1e-4  # tiny models, logits
REL_TOL = 3e-5  # SmolLM2: x max|logit|
TOKENS, VALID = hf_tiny.left_padded_batch()  # [4, 12], rows of length 12, 7, 1, 10
B, T = TOKENS.shape
N_NEW = 20  # greedy tokens compared with HF
FAMILIES = ("llama", "gemma2")

# One jitted forward for the file: compiled code is reused by every hook of the same structure.
fwd = jax.jit(forward, static_argnames=("cfg", "capture", "logits"))


# ============================================================================================
# the PyTorch reference
# ============================================================================================
def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, np.float32))


def _layer_out(out):
    """A decoder layer's output: a tensor in transformers 5, ``(tensor, ...)`` in older versions."""
    return out[0] if isinstance(out, tuple) else out


def _with_layer_out(out, new):
    return (new, *out[1:]) if isinstance(out, tuple) else new


@contextlib.contextmanager
def torch_hooked(hf, fn):
    """Apply ``fn(l, h) -> h`` at every resid point of an HF causal LM via forward hooks."""
    inner = hf.model
    handles = [inner.embed_tokens.register_forward_hook(lambda m, a, o: fn(0, o))]
    for i, layer in enumerate(inner.layers):
        handles.append(
            layer.register_forward_hook(lambda m, a, o, l=i + 1: _with_layer_out(o, fn(l, _layer_out(o))))
        )
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# Each reference intervention is ``ref(l, h, sel) -> h`` with ``sel`` a bool ``[B, T]`` tensor.
def t_steer(vector, coeff, weights, unit=False):
    v = _t(vector)
    if unit:
        v = v / v.norm()
    w = np.asarray(weights, np.float32)

    def ref(l, h, sel):
        if w[l] == 0:
            return h
        return torch.where(sel[..., None], h + (float(coeff) * float(w[l])) * v, h)

    return ref


def t_ablate(vector, weights, mean=0.0, coeff=0.0):
    v = _t(vector)
    u = v / v.norm()
    w = np.asarray(weights, np.float32)

    def ref(l, h, sel):
        if w[l] == 0:
            return h
        p = (h * u).sum(-1, keepdim=True)
        return torch.where(sel[..., None], h - p * u + float(mean) * u + float(coeff) * v, h)

    return ref


def t_cap(vector, weights, lo=-np.inf, hi=np.inf):
    u = _t(vector)
    u = u / u.norm()
    w = np.asarray(weights, np.float32)

    def ref(l, h, sel):
        if w[l] == 0:
            return h
        p = (h * u).sum(-1, keepdim=True)
        return torch.where(sel[..., None], h + (p.clamp(min=float(lo), max=float(hi)) - p) * u, h)

    return ref


def t_chain(*refs):
    def ref(l, h, sel):
        for r in refs:
            h = r(l, h, sel)
        return h

    return ref


def _torch_batch(tokens, valid):
    ids = torch.tensor(np.asarray(tokens), dtype=torch.long)
    mask = torch.tensor(np.asarray(valid), dtype=torch.long)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def hf_logits(hf, tokens, valid, ref=None, sel=None) -> np.ndarray:
    """HF logits with ``ref`` applied at the tokens ``sel & valid`` (scoring: one forward)."""
    ids, mask, pos = _torch_batch(tokens, valid)
    sel_t = torch.tensor(np.asarray(sel if sel is not None else valid, bool) & np.asarray(valid, bool))
    ctx = torch_hooked(hf, lambda l, h: ref(l, h, sel_t)) if ref is not None else contextlib.nullcontext()
    with ctx, torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits.numpy()


def hf_greedy(hf, tokens, valid, n, ref=None, prefill_sel=None, after=None) -> np.ndarray:
    """HF greedy continuation (EOS disabled) with ``ref`` applied at ``prefill_sel`` during the prefill
    and, in each decode step, to the new token of the rows where ``after`` is set."""
    ids, mask, _ = _torch_batch(tokens, valid)
    calls = {"prefill": 0, "decode": 0}
    if ref is not None:
        pre = torch.tensor(np.asarray(prefill_sel, bool) & np.asarray(valid, bool))
        dec = torch.tensor(np.asarray(after, bool))[:, None]

        def fn(l, h):
            is_prefill = h.shape[1] > 1
            calls["prefill" if is_prefill else "decode"] += 1
            return ref(l, h, pre if is_prefill else dec)

        ctx = torch_hooked(hf, fn)
    else:
        ctx = contextlib.nullcontext()
    with ctx, torch.no_grad():
        out = hf.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
            eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
    if ref is not None:  # one prefill, then n-1 single-token steps, each visiting all L+1 points
        n_points = len(hf.model.layers) + 1
        assert calls == {"prefill": n_points, "decode": (n - 1) * n_points}, calls
    out = out[:, tokens.shape[1] :].numpy()
    assert out.shape == (tokens.shape[0], n)
    return out


# ============================================================================================
# per-family baselines: logits and every resid point without any hook
# ============================================================================================
@dataclasses.dataclass
class Base:
    tiny: object
    logits: np.ndarray  # [B, T, V]
    resid: np.ndarray  # [L+1, B, T, D]
    hf_logits: np.ndarray

    @property
    def cfg(self):
        return self.tiny.cfg

    @property
    def n(self) -> int:
        return self.tiny.cfg.n_resid

    def direction(self, l: int, seed: int = 0) -> np.ndarray:
        """A direction with real projections: the mean valid resid[l] plus some noise."""
        x = self.resid[l][VALID]
        noise = np.random.default_rng(seed).standard_normal(x.shape[-1]) * x.std()
        return (x.mean(0) + noise).astype(np.float32)

    def proj(self, l: int, v) -> np.ndarray:
        u = np.asarray(v, np.float64) / np.linalg.norm(v)
        return self.resid[l][VALID].astype(np.float64) @ u

    def scale(self, l: int) -> float:
        """Typical norm of a token's resid[l]."""
        return float(np.linalg.norm(self.resid[l][VALID], axis=-1).mean())


@pytest.fixture(scope="module")
def base(tiny_zoo):
    cache: dict[str, Base] = {}

    def get(family: str) -> Base:
        if family not in cache:
            tiny = tiny_zoo(family)
            cap_all = Capture(tuple(range(tiny.cfg.n_resid)))
            out = fwd(tiny.params, tiny.cfg, jnp.asarray(TOKENS), valid=jnp.asarray(VALID), capture=cap_all)
            cache[family] = Base(tiny, np.asarray(out.logits), np.asarray(out.captured), hf_logits(tiny.hf, TOKENS, VALID))
        return cache[family]

    return get


def ours_logits(b: Base, hook, tokens=TOKENS, valid=VALID) -> np.ndarray:
    return np.asarray(fwd(b.tiny.params, b.cfg, jnp.asarray(tokens), valid=jnp.asarray(valid), hook=hook).logits)


def assert_matches(ours, ref, valid=VALID, atol=ATOL, changed_from=None, min_change=5e-3, msg=""):
    v = np.asarray(valid, bool)
    np.testing.assert_allclose(ours[v], ref[v], atol=atol, rtol=0, err_msg=msg)
    if changed_from is not None:
        change = np.abs(ref[v] - changed_from[v]).max()
        assert change > max(min_change, 20 * atol), f"{msg}: the intervention barely changes the logits ({change:.2g})"


# ============================================================================================
# 1. each intervention == the torch forward hook, on logits
# ============================================================================================
def _case(name: str, b: Base):
    """(our intervention, torch reference) for one named case, with vectors/thresholds from data."""
    n, L, D = b.n, b.cfg.n_layers, b.cfg.d_model
    pos = Positions.all(VALID)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    rand = rng.standard_normal(D).astype(np.float32)
    if name == "steer_resid0":  # gemma2: must act after the sqrt(d) embedding scale
        v = rand / np.linalg.norm(rand) * b.scale(0)
        return steer(n, v, 1.5, 0, pos), t_steer(v, 1.5, layer_weights(n, 0))
    if name == "steer_unit_mid":
        c = 0.8 * b.scale(2)
        return steer(n, rand, c, 2, pos, unit=True), t_steer(rand, c, layer_weights(n, 2), unit=True)
    if name == "steer_weighted_layers":  # non-uniform, signed per-layer weights
        v = rand / np.linalg.norm(rand) * b.scale(1)
        w = jnp.zeros((n,), jnp.float32).at[1:4].set(jnp.asarray([0.5, 1.0, -1.5]))
        return Steer(jnp.asarray(v), jnp.float32(0.7), w, pos), t_steer(v, 0.7, np.asarray(w))
    if name == "steer_last_layer":
        v = rand / np.linalg.norm(rand) * b.scale(L)
        return steer(n, v, 1.0, L, pos), t_steer(v, 1.0, layer_weights(n, L))
    if name == "ablate_plain":
        v = b.direction(2)
        return ablate(n, v, 2, pos), t_ablate(v, layer_weights(n, 2))
    if name == "ablate_mean_multi":  # mean-ablation on two layers
        v = b.direction(1)
        m = float(np.quantile(b.proj(1, v), 0.9)) + 1.0
        return ablate(n, v, [1, 3], pos, mean=m), t_ablate(v, layer_weights(n, [1, 3]), mean=m)
    if name == "ablate_readd":  # ablate then + coeff * v (raw v)
        v = b.direction(2)
        return ablate(n, v, 2, pos, coeff=0.5), t_ablate(v, layer_weights(n, 2), coeff=0.5)
    if name == "ablate_resid0":
        v = b.direction(0)
        return ablate(n, v, 0, pos, mean=2.0), t_ablate(v, layer_weights(n, 0), mean=2.0)
    if name == "cap_ceiling":
        v = b.direction(L)
        hi = float(np.median(b.proj(L, v)))
        return cap(n, v, L, pos, hi=hi), t_cap(v, layer_weights(n, L), hi=hi)
    if name == "cap_floor":
        v = b.direction(2)
        lo = float(np.median(b.proj(2, v)))
        return cap(n, v, 2, pos, lo=lo), t_cap(v, layer_weights(n, 2), lo=lo)
    if name == "cap_both_multi":  # both bounds on resid[1..3] via layer_weights(n, range(1, 4))
        v = b.direction(1)
        lo, hi = (float(q) for q in np.quantile(b.proj(1, v), [0.3, 0.7]))
        w = layer_weights(n, range(1, 4))
        ours = Cap(jnp.asarray(v), jnp.float32(lo), jnp.float32(hi), w, pos)
        return ours, t_cap(v, np.asarray(w), lo=lo, hi=hi)
    if name == "cap_resid0":  # gemma2: projections of the scaled embedding
        v = b.direction(0)
        hi = float(np.median(b.proj(0, v)))
        return cap(n, v, 0, pos, hi=hi), t_cap(v, layer_weights(n, 0), hi=hi)
    raise KeyError(name)


CASES = (
    "steer_resid0", "steer_unit_mid", "steer_weighted_layers", "steer_last_layer",
    "ablate_plain", "ablate_mean_multi", "ablate_readd", "ablate_resid0",
    "cap_ceiling", "cap_floor", "cap_both_multi", "cap_resid0",
)  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_intervention_matches_torch_hook(base, family: str) -> None:
    b = base(family)
    for name in CASES:
        ours_hook, ref = _case(name, b)
        check_for_model(ours_hook, b.cfg.d_model, b.n)
        ours = ours_logits(b, ours_hook)
        assert_matches(ours, hf_logits(b.tiny.hf, TOKENS, VALID, ref), changed_from=b.hf_logits, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_cap_really_clamps_and_leaves_inside_tokens_alone(base, family: str) -> None:
    """Captured resid (after the hook) of a capped layer: projections in [lo, hi]; tokens already
    inside come out bit-identical; tokens outside land exactly on the bound."""
    b = base(family)
    l = 2
    v = b.direction(l)
    lo, hi = (float(q) for q in np.quantile(b.proj(l, v), [0.25, 0.75]))
    hook = cap(b.n, v, l, Positions.all(VALID), lo=lo, hi=hi)
    out = fwd(b.tiny.params, b.cfg, jnp.asarray(TOKENS), valid=jnp.asarray(VALID), hook=hook,
              capture=Capture((l,)), logits=False)  # fmt: skip
    got = np.asarray(out.captured)[0][VALID]
    before = b.resid[l][VALID]
    p_before, p_after = b.proj(l, v), got.astype(np.float64) @ (v / np.linalg.norm(v))
    inside = (p_before >= lo) & (p_before <= hi)
    assert 0 < inside.sum() < len(inside)
    np.testing.assert_array_equal(got[inside], before[inside])
    tol = 1e-5 * b.scale(l)
    assert (p_after >= lo - tol).all() and (p_after <= hi + tol).all()
    np.testing.assert_allclose(p_after[~inside], np.clip(p_before[~inside], lo, hi), atol=tol)


# ============================================================================================
# 2. composition: Chain order matters, each order == torch in the same order
# ============================================================================================
@pytest.mark.parametrize("family", FAMILIES)
def test_chain_order_matters_and_matches_torch(base, family: str) -> None:
    b = base(family)
    n, l = b.n, 2
    v = b.direction(l)
    hi = float(np.median(b.proj(l, v)))
    pos = Positions.all(VALID)
    s = steer(n, v, 0.5, range(1, 3), pos)  # pushes along v on resid[1] and resid[2]
    c = cap(n, v, range(2, 4), pos, hi=hi)  # clamps on resid[2] and resid[3]
    rs, rc = t_steer(v, 0.5, layer_weights(n, range(1, 3))), t_cap(v, layer_weights(n, range(2, 4)), hi=hi)

    steer_then_cap = ours_logits(b, Chain((s, c)))
    cap_then_steer = ours_logits(b, Chain((c, s)))
    assert np.abs(steer_then_cap - cap_then_steer)[VALID].max() > 0.05, "order should matter here"
    assert_matches(steer_then_cap, hf_logits(b.tiny.hf, TOKENS, VALID, t_chain(rs, rc)), changed_from=b.hf_logits,
                   msg="steer-then-cap")  # fmt: skip
    assert_matches(cap_then_steer, hf_logits(b.tiny.hf, TOKENS, VALID, t_chain(rc, rs)), changed_from=b.hf_logits,
                   msg="cap-then-steer")  # fmt: skip
    # a one-item chain is that item
    np.testing.assert_array_equal(ours_logits(b, Chain((s,))), ours_logits(b, s))


# ============================================================================================
# 3. position selectors in scoring
# ============================================================================================
def test_selectors_in_scoring_match_torch(base) -> None:
    b = base("llama")
    n = b.n
    v = np.random.default_rng(1).standard_normal(b.cfg.d_model).astype(np.float32)
    v *= b.scale(1) / np.linalg.norm(v)
    rng = np.random.default_rng(2)
    explicit = rng.random(VALID.shape) < 0.5  # also selects some padding: must be ignored
    last = np.zeros_like(VALID)
    last[:, -1] = True
    selectors = {
        "all": (Positions.all(VALID), VALID),
        "prompt": (Positions.prompt(VALID), VALID),
        "response": (Positions.response(VALID), last),
        "explicit": (Positions.explicit(explicit), explicit),
        "explicit_after": (Positions.explicit(explicit, after=True), explicit),
    }
    got = {}
    for name, (pos, sel) in selectors.items():
        hook = steer(n, v, 1.0, [1, 3], pos)
        got[name] = ours_logits(b, hook)
        ref = hf_logits(b.tiny.hf, TOKENS, VALID, t_steer(v, 1.0, layer_weights(n, [1, 3])), sel)
        assert_matches(got[name], ref, changed_from=b.hf_logits, msg=name)
    # in scoring there are no generated tokens: prompt == all, after= is irrelevant
    np.testing.assert_array_equal(got["prompt"], got["all"])
    np.testing.assert_array_equal(got["explicit_after"], got["explicit"])
    # response touches only the last token: every earlier position is the unsteered forward
    np.testing.assert_allclose(got["response"][:, :-1][VALID[:, :-1]], b.logits[:, :-1][VALID[:, :-1]], atol=1e-6, rtol=0)


def test_selector_edits_exactly_the_selected_resid(base) -> None:
    """The captured resid[1] differs from the baseline by exactly c*v at selected valid tokens, 0 elsewhere."""
    b = base("llama")
    v = np.random.default_rng(3).standard_normal(b.cfg.d_model).astype(np.float32)
    sel = np.random.default_rng(4).random(VALID.shape) < 0.5
    out = fwd(b.tiny.params, b.cfg, jnp.asarray(TOKENS), valid=jnp.asarray(VALID), logits=False,
              hook=steer(b.n, v, 2.0, 1, Positions.explicit(sel)), capture=Capture((0, 1)))  # fmt: skip
    r0, r1 = np.asarray(out.captured)
    np.testing.assert_array_equal(r0, b.resid[0])  # resid[0] untouched (layer weight 0)
    on = sel & VALID
    np.testing.assert_allclose(r1[on] - b.resid[1][on], np.broadcast_to(2.0 * v, r1[on].shape), atol=1e-5)
    np.testing.assert_array_equal(r1[~on], b.resid[1][~on])


# --- SmolLM2 -------------------------------------------------------------------------------
CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Hello there, who are you?"},
        {"role": "assistant", "content": "Arr, I be a pirate of the seven seas!"},
        {"role": "user", "content": "Where is the treasure?"},
    ],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ],
]


@pytest.fixture(scope="module")
def hf_smol():
    """transformers' own model on the converted HF directory that jaxpersona loads (same weights)."""
    import transformers

    path = registry.converted_dir(registry.resolve("smollm2-135m-instruct"))
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="module")
def smol(smollm2, hf_smol):
    """SmolLM2 on a left-padded batch of two multi-turn chats, with the assistant-role mask."""
    batch, role = smollm2.role_mask(CONVERSATIONS, "assistant")
    mids = (0, 10, 12)
    out = smollm2.run(batch, capture=Capture(mids))
    resid = dict(zip(mids, np.asarray(out.captured)))
    ref = hf_logits(hf_smol, batch.tokens, batch.valid)
    return dict(model=smollm2, hf=hf_smol, batch=batch, role=role, resid=resid, logits=np.asarray(out.logits),
                hf_logits=ref)  # fmt: skip


def _smol_check(s, hook, ref, sel=None, msg=""):
    m, batch = s["model"], s["batch"]
    check_for_model(hook, m.cfg.d_model, m.cfg.n_resid)
    ours = np.asarray(m.run(batch, hook=hook).logits)
    expected = hf_logits(s["hf"], batch.tokens, batch.valid, ref, sel)
    v = batch.valid
    atol = REL_TOL * np.abs(expected[v]).max()
    assert_matches(ours, expected, valid=v, atol=atol, changed_from=s["hf_logits"], min_change=0.1, msg=msg)
    return ours


def test_smollm2_role_mask_selects_the_assistant_content(smol) -> None:
    m, batch, role = smol["model"], smol["batch"], smol["role"]
    assert batch.tokens.shape[0] == 2 and not batch.valid.all() and (batch.valid.sum(1)[0] != batch.valid.sum(1)[1])
    assert not (role & ~batch.valid).any()
    for i, conv in enumerate(CONVERSATIONS):
        assert m.tokenizer.decode(batch.tokens[i][role[i]]).strip() == conv[2]["content"]


def test_smollm2_steer_ablate_cap_match_torch(smol) -> None:
    m, batch = smol["model"], smol["batch"]
    n, valid = m.cfg.n_resid, batch.valid
    pos = Positions.all(valid)
    x = smol["resid"][10][valid]
    v = (x.mean(0) + np.random.default_rng(0).standard_normal(x.shape[-1]) * x.std()).astype(np.float32)
    u = v / np.linalg.norm(v)
    p = x.astype(np.float64) @ u
    scale = float(np.linalg.norm(x, axis=-1).mean())

    # steer on the embeddings and on two middle layers
    e = np.random.default_rng(1).standard_normal(m.cfg.d_model).astype(np.float32)
    e *= np.linalg.norm(smol["resid"][0][valid], axis=-1).mean() / np.linalg.norm(e)
    _smol_check(smol, steer(n, e, 2.0, 0, pos), t_steer(e, 2.0, layer_weights(n, 0)), msg="steer resid[0]")
    _smol_check(smol, steer(n, u, 0.3 * scale, [10, 12], pos), t_steer(u, 0.3 * scale, layer_weights(n, [10, 12])),
                msg="steer resid[10,12]")  # fmt: skip
    # cap: ceiling only, floor only, both, on resid[10..13]
    hi, lo = float(np.median(p)), float(np.quantile(p, 0.3))
    layers = range(10, 14)
    w = layer_weights(n, layers)
    _smol_check(smol, cap(n, v, layers, pos, hi=hi), t_cap(v, w, hi=hi), msg="cap ceiling")
    _smol_check(smol, cap(n, v, layers, pos, lo=hi), t_cap(v, w, lo=hi), msg="cap floor")
    _smol_check(smol, cap(n, v, layers, pos, lo=lo, hi=hi), t_cap(v, w, lo=lo, hi=hi), msg="cap both")
    # mean-ablation with re-add
    _smol_check(smol, ablate(n, v, 12, pos, mean=float(np.quantile(p, 0.9)), coeff=0.2),
                t_ablate(v, layer_weights(n, 12), mean=float(np.quantile(p, 0.9)), coeff=0.2), msg="ablate")  # fmt: skip


def test_smollm2_selectors_match_torch(smol) -> None:
    m, batch, role = smol["model"], smol["batch"], smol["role"]
    n, valid = m.cfg.n_resid, batch.valid
    x = smol["resid"][10][valid]
    u = np.random.default_rng(5).standard_normal(m.cfg.d_model).astype(np.float32)
    u /= np.linalg.norm(u)
    c = 0.5 * float(np.linalg.norm(x, axis=-1).mean())
    last = np.zeros_like(valid)
    last[:, -1] = True
    explicit = np.random.default_rng(6).random(valid.shape) < 0.3
    selectors = {
        "all": (Positions.all(valid), valid),
        "prompt": (Positions.prompt(valid), valid),
        "response": (Positions.response(valid), last),
        "explicit": (Positions.explicit(explicit), explicit),
        "assistant_role": (Positions.explicit(role, after=True), role),
    }
    ref = t_steer(u, c, layer_weights(n, [10, 12]))
    got = {}
    for name, (pos, sel) in selectors.items():
        got[name] = _smol_check(smol, steer(n, u, c, [10, 12], pos), ref, sel, msg=name)
    np.testing.assert_array_equal(got["prompt"], got["all"])
    # the role selector leaves every position before the first assistant token unchanged
    for i in range(2):
        first = int(np.argmax(role[i]))
        before = valid[i, :first]
        np.testing.assert_allclose(got["assistant_role"][i, :first][before], smol["logits"][i, :first][before],
                                   atol=1e-5, rtol=0)  # fmt: skip
    # ... and a cap restricted to the role as well
    p = x.astype(np.float64) @ u
    hi = float(np.median(p))
    _smol_check(smol, cap(n, u, range(10, 13), Positions.explicit(role, after=True), hi=hi),
                t_cap(u, layer_weights(n, range(10, 13)), hi=hi), role, msg="role cap")  # fmt: skip


# ============================================================================================
# 4. greedy generation with interventions == HF generate with the same torch hook
# ============================================================================================
def _gen_selectors():
    last = np.zeros_like(VALID)
    last[:, -1] = True
    explicit = np.random.default_rng(8).random(VALID.shape) < 0.5
    rows = np.array([True, False, True, False])
    # name -> (Positions, torch prefill selection, torch decode rows)
    return {
        "all": (Positions.all(VALID), VALID, np.ones(B, bool)),
        "response": (Positions.response(VALID), last, np.ones(B, bool)),
        "prompt": (Positions.prompt(VALID), VALID, np.zeros(B, bool)),
        "explicit_after_some_rows": (Positions.explicit(explicit, after=rows), explicit, rows),
    }


@pytest.fixture(scope="module")
def free_greedy():
    cache = {}

    def get(b: Base):
        if b.tiny.family not in cache:
            ours = generate(b.tiny.params, b.cfg, TOKENS, VALID, max_new_tokens=N_NEW, eos_ids=())
            ref = hf_greedy(b.tiny.hf, TOKENS, VALID, N_NEW)
            np.testing.assert_array_equal(np.asarray(ours.tokens), ref)
            cache[b.tiny.family] = ref
        return cache[b.tiny.family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["steer", "steer_then_cap"])
def test_greedy_generation_with_intervention_matches_hf(base, free_greedy, family: str, kind: str) -> None:
    b = base(family)
    n = b.n
    free = free_greedy(b)
    v = np.random.default_rng(11).standard_normal(b.cfg.d_model).astype(np.float32)
    v *= 1.5 * b.scale(2) / np.linalg.norm(v)
    hi = float(np.median(b.proj(2, v)))
    outs = {}
    for name, (pos, pre_sel, after) in _gen_selectors().items():
        s = steer(n, v, 1.0, [1, 2], pos)
        ref = t_steer(v, 1.0, layer_weights(n, [1, 2]))
        if kind == "steer_then_cap":
            hook = Chain((s, cap(n, v, [2, 3], pos, hi=hi)))
            ref = t_chain(ref, t_cap(v, layer_weights(n, [2, 3]), hi=hi))
        else:
            hook = s
        ours = generate(b.tiny.params, b.cfg, TOKENS, VALID, max_new_tokens=N_NEW, eos_ids=(), hook=hook)
        toks = np.asarray(ours.tokens)
        assert toks.shape == (B, N_NEW) and (np.asarray(ours.lengths) == N_NEW).all()
        expected = hf_greedy(b.tiny.hf, TOKENS, VALID, N_NEW, ref, pre_sel, after)
        np.testing.assert_array_equal(toks, expected, err_msg=f"{kind} / {name}")
        assert (toks != free).any(), f"{kind} / {name}: the intervention did not change the generation"
        outs[name] = toks
    # prompt-only edits only the KV cache: it differs from steering the generated tokens too
    assert (outs["prompt"] != outs["all"]).any()
    assert (outs["response"] != outs["all"]).any()


# ============================================================================================
# 5. vmap over intervention arrays; new values never recompile
# ============================================================================================
def test_vmap_over_stacked_steers_equals_one_by_one(base) -> None:
    b = base("llama")
    cfg, params, n = b.cfg, b.tiny.params, b.n
    rng = np.random.default_rng(12)
    pos = Positions.all(VALID)
    items = [
        steer(n, rng.standard_normal(cfg.d_model) * b.scale(1), c, layers, pos)
        for c, layers in [(0.0, 1), (1.0, 1), (-2.0, [2, 3]), (0.5, range(0, n))]
    ]
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *items)
    assert stacked.coeff.shape == (4,) and stacked.layers.shape == (4, n) and stacked.positions.mask.shape == (4, B, T)
    tokens, valid = jnp.asarray(TOKENS), jnp.asarray(VALID)
    run = jax.jit(jax.vmap(lambda hk: forward(params, cfg, tokens, valid=valid, hook=hk).logits))
    batched = np.asarray(run(stacked))
    for i, it in enumerate(items):
        np.testing.assert_allclose(batched[i][VALID], ours_logits(b, it)[VALID], atol=1e-5, rtol=0, err_msg=str(i))
    np.testing.assert_allclose(batched[0][VALID], b.logits[VALID], atol=1e-5, rtol=0)  # coeff 0 = no steer
    assert np.abs(batched[1] - batched[2])[VALID].max() > 1e-2

    # vmap over one field only (a sweep of cap ceilings), the rest shared
    v = b.direction(2)
    p = b.proj(2, v)
    his = jnp.asarray(np.quantile(p, [0.1, 0.5, 0.9, 1.0]) + [0, 0, 0, 1.0], jnp.float32)  # last: above all
    c0 = cap(n, v, 2, pos, hi=0.0)
    sweep = jax.jit(jax.vmap(lambda hi: forward(params, cfg, tokens, valid=valid,
                                                  hook=dataclasses.replace(c0, hi=hi)).logits))  # fmt: skip
    swept = np.asarray(sweep(his))
    for i in range(4):
        single = ours_logits(b, cap(n, v, 2, pos, hi=float(his[i])))
        np.testing.assert_allclose(swept[i][VALID], single[VALID], atol=1e-5, rtol=0)
    np.testing.assert_allclose(swept[3][VALID], b.logits[VALID], atol=1e-5, rtol=0)  # nothing to cap


def test_new_values_do_not_recompile(base, word_tokenizer) -> None:
    b = base("llama")
    cfg, params, n = b.cfg, b.tiny.params, b.n
    traces = []

    @jax.jit
    def run(tokens, valid, hook):
        traces.append(1)  # runs once per trace
        return forward(params, cfg, tokens, valid=valid, hook=hook).logits

    tokens, valid = jnp.asarray(TOKENS), jnp.asarray(VALID)
    rng = np.random.default_rng(13)
    mask2 = rng.random(VALID.shape) < 0.5
    hooks = [
        steer(n, rng.standard_normal(cfg.d_model), 1.0, 1, Positions.all(VALID)),
        steer(n, rng.standard_normal(cfg.d_model), -3.0, [2, 4], Positions.explicit(mask2, after=True)),
        steer(n, rng.standard_normal(cfg.d_model), 0.25, range(n), Positions.response(VALID)),
    ]
    outs = [np.asarray(run(tokens, valid, h)) for h in hooks]
    assert len(traces) == 1, "new coeff / vector / layer / position values must not retrace"
    assert np.abs(outs[0] - outs[1]).max() > 1e-3 and np.abs(outs[1] - outs[2]).max() > 1e-3
    run(tokens, valid, Chain((hooks[0], hooks[1])))  # a new structure does trace (the counter works)
    assert len(traces) == 2
    run(tokens, valid, Chain((hooks[2], hooks[0])))
    assert len(traces) == 2

    # Model.run and generate: their jitted functions gain no cache entry for new values
    model = jm.Model(cfg, params, word_tokenizer(), "tiny-llama")
    batch = Batch(TOKENS, VALID)
    caps = [cap(n, rng.standard_normal(cfg.d_model), [1, 2], Positions.all(VALID), hi=float(hi)) for hi in (-1, 0, 2)]
    model.run(batch, hook=caps[0])
    size = jm._forward_jit._cache_size()
    for c in caps[1:]:
        model.run(batch, hook=c)
    assert jm._forward_jit._cache_size() == size
    gen = functools.partial(generate, params, cfg, TOKENS, VALID, max_new_tokens=4, eos_ids=())
    gen(hook=caps[0])
    size = generate_loop._cache_size()
    for c in caps[1:]:
        gen(hook=c)
    assert generate_loop._cache_size() == size


# ============================================================================================
# 6. properties on random residuals (direct calls with a hand-made HookContext)
# ============================================================================================
N_RESID = 5


@st.composite
def hook_inputs(draw):
    """Random (layer, h, ctx, vector, layer weights, Positions) for a direct intervention call."""
    b = draw(st.sampled_from([1, 3]))
    t = draw(st.sampled_from([1, 6]))
    d = draw(st.sampled_from([4, 16]))
    p = draw(st.sampled_from(sorted({1, t})))  # prompt width <= T: later slots use `after`
    h = draw(hnp.arrays(np.float32, (b, t, d), elements=st.floats(-100, 100, width=32)))
    v = draw(hnp.arrays(np.float32, (d,), elements=st.floats(-10, 10, width=32)))
    assume(np.linalg.norm(v) > 1e-2)
    valid = draw(hnp.arrays(bool, (b, t)))
    mask = draw(hnp.arrays(bool, (b, p)))
    after = draw(hnp.arrays(bool, (b,)))
    weights = draw(hnp.arrays(np.float32, (N_RESID,), elements=st.sampled_from([0.0, 1.0, -0.5, 3.0])))
    layer = draw(st.integers(0, N_RESID - 1))
    slots = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    ctx = HookContext(jnp.asarray(slots), jnp.asarray(slots), jnp.asarray(valid))
    pos = Positions.explicit(mask, after)
    # which tokens the intervention may touch, computed independently of Positions.at
    sel = np.where(slots < p, mask[:, np.minimum(slots[0], p - 1)], after[:, None]) & valid & (weights[layer] != 0)
    return dict(layer=jnp.int32(layer), h=jnp.asarray(h), ctx=ctx, v=v, w=jnp.asarray(weights), pos=pos, sel=sel)


call = jax.jit(lambda it, layer, h, ctx: it(layer, h, ctx))
PROPS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def _proj_np(h, v):
    return np.asarray(h, np.float64) @ (np.asarray(v, np.float64) / np.linalg.norm(v))


def _along(h, u) -> np.ndarray:
    """The component of ``h`` along the unit vector ``u`` (float64)."""
    return (np.asarray(h, np.float64) @ u)[..., None] * u


def _bits(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)


@PROPS
@given(x=hook_inputs(), data=st.data())
def test_prop_cap_containing_every_projection_is_bit_identical(x, data) -> None:
    p = _proj_np(x["h"], x["v"])
    margin = 1e-3 * (1.0 + np.abs(p).max())
    lo = data.draw(st.sampled_from([-np.inf, float(p.min() - margin - 1.0), float(p.min() - margin)]))
    hi = data.draw(st.sampled_from([np.inf, float(p.max() + margin + 1.0), float(p.max() + margin)]))
    it = Cap(jnp.asarray(x["v"]), jnp.float32(lo), jnp.float32(hi), x["w"], x["pos"])
    out = call(it, x["layer"], x["h"], x["ctx"])
    np.testing.assert_array_equal(_bits(out), _bits(x["h"]))


@PROPS
@given(x=hook_inputs(), lo=st.floats(-50, 50), width=st.floats(0, 50))
def test_prop_cap_lands_within_bounds(x, lo, width) -> None:
    hi = lo + width
    it = cap(N_RESID, x["v"], 0, x["pos"], lo=lo, hi=hi)
    it = dataclasses.replace(it, layers=x["w"])
    out = np.asarray(call(it, x["layer"], x["h"], x["ctx"]))
    h, sel = np.asarray(x["h"]), x["sel"]
    np.testing.assert_array_equal(_bits(out[~sel]), _bits(h[~sel]))  # untouched tokens: bit-identical
    p_out, p_in = _proj_np(out, x["v"])[sel], _proj_np(h, x["v"])[sel]
    tol = 1e-5 * (1.0 + np.abs(h).max() * np.sqrt(h.shape[-1]))
    assert (p_out >= lo - tol).all() and (p_out <= hi + tol).all()
    np.testing.assert_allclose(p_out, np.clip(p_in, lo, hi), atol=tol)
    # the orthogonal complement is untouched
    u = x["v"] / np.linalg.norm(x["v"])
    np.testing.assert_allclose((out - _along(out, u))[sel], (h - _along(h, u))[sel], atol=tol)


@PROPS
@given(x=hook_inputs(), mean=st.one_of(st.just(0.0), st.floats(-50, 50)))
def test_prop_ablate_is_idempotent_and_zeroes_the_projection(x, mean) -> None:
    it = dataclasses.replace(ablate(N_RESID, x["v"], 0, x["pos"], mean=mean), layers=x["w"])
    once = np.asarray(call(it, x["layer"], x["h"], x["ctx"]))
    twice = np.asarray(call(it, x["layer"], jnp.asarray(once), x["ctx"]))
    h, sel = np.asarray(x["h"]), x["sel"]
    tol = 1e-5 * (1.0 + np.abs(h).max() * np.sqrt(h.shape[-1]) + abs(mean))
    np.testing.assert_allclose(twice, once, atol=tol, rtol=0)
    np.testing.assert_array_equal(_bits(once[~sel]), _bits(h[~sel]))
    np.testing.assert_allclose(_proj_np(once, x["v"])[sel], mean, atol=tol)  # ~0 for plain ablation


@PROPS
@given(x=hook_inputs(), unit=st.booleans(), bf16=st.booleans())
def test_prop_steer_with_zero_coeff_is_identity(x, unit, bf16) -> None:
    h = x["h"].astype(jnp.bfloat16) if bf16 else x["h"]
    it = Steer(jnp.asarray(x["v"]), jnp.float32(0.0), x["w"], x["pos"], unit)
    out = call(it, x["layer"], h, x["ctx"])
    assert out.dtype == h.dtype
    assert np.array_equal(np.asarray(out, np.float32), np.asarray(h, np.float32))


@PROPS
@given(x=hook_inputs(), coeff=st.floats(-5, 5, width=32))
def test_prop_steer_adds_exactly_at_selected_tokens(x, coeff) -> None:
    it = Steer(jnp.asarray(x["v"]), jnp.float32(coeff), x["w"], x["pos"])
    out = np.asarray(call(it, x["layer"], x["h"], x["ctx"]))
    h, sel = np.asarray(x["h"]), x["sel"]
    w = float(x["w"][int(x["layer"])])
    np.testing.assert_array_equal(_bits(out[~sel]), _bits(h[~sel]))
    np.testing.assert_allclose(out[sel], h[sel] + coeff * w * x["v"], atol=1e-4 * (1 + np.abs(h).max()), rtol=0)


# ============================================================================================
# 7. bad input
# ============================================================================================
D, N = 8, 5
POS = Positions.all(np.ones((1, 3), bool))
GOOD = np.ones(D, np.float32)


def _with(i, value):
    v = GOOD.copy()
    v[i] = value
    return v


BAD_INPUT = {
    "steer nan vector": lambda: steer(N, _with(2, np.nan), 1.0, 1, POS),
    "steer inf vector": lambda: steer(N, _with(0, np.inf), 1.0, 1, POS),
    "steer nan coeff": lambda: steer(N, GOOD, np.nan, 1, POS),
    "steer inf coeff": lambda: steer(N, GOOD, np.inf, 1, POS),
    "steer -inf coeff": lambda: steer(N, GOOD, -np.inf, 1, POS),
    "ablate nan vector": lambda: ablate(N, _with(1, np.nan), 1, POS),
    "ablate -inf vector": lambda: ablate(N, _with(1, -np.inf), 1, POS),
    "ablate zero vector": lambda: ablate(N, np.zeros(D), 1, POS),
    "ablate nan mean": lambda: ablate(N, GOOD, 1, POS, mean=np.nan),
    "ablate inf coeff": lambda: ablate(N, GOOD, 1, POS, coeff=np.inf),
    "cap nan vector": lambda: cap(N, _with(3, np.nan), 1, POS, hi=1.0),
    "cap inf vector": lambda: cap(N, _with(3, np.inf), 1, POS, hi=1.0),
    "cap zero vector": lambda: cap(N, np.zeros(D), 1, POS, hi=1.0),
    "cap nan ceiling": lambda: cap(N, GOOD, 1, POS, hi=np.nan),
    "cap nan floor": lambda: cap(N, GOOD, 1, POS, lo=np.nan),
    "cap floor above ceiling": lambda: cap(N, GOOD, 1, POS, lo=2.0, hi=1.0),
    "cap inf floor above -inf ceiling": lambda: cap(N, GOOD, 1, POS, lo=np.inf, hi=-np.inf),
    "steer layer -1": lambda: steer(N, GOOD, 1.0, -1, POS),
    "steer layer L+1": lambda: steer(N, GOOD, 1.0, N, POS),
    "steer one layer out of many": lambda: steer(N, GOOD, 1.0, [0, 2, N + 3], POS),
    "ablate layer L+1": lambda: ablate(N, GOOD, N, POS),
    "cap range past L": lambda: cap(N, GOOD, range(2, N + 1), POS, hi=1.0),
    "layer_weights -1": lambda: layer_weights(N, -1),
}


@pytest.mark.parametrize("make", list(BAD_INPUT.values()), ids=list(BAD_INPUT))
def test_constructors_reject_bad_input(make) -> None:
    with pytest.raises(errors.InputError):
        make()


def test_constructors_accept_edge_values() -> None:
    steer(N, np.zeros(D), 1.0, [0, N - 1], POS)  # a zero steering vector is a no-op, not an error
    cap(N, GOOD, range(N), POS)  # +-inf: no bounds
    cap(N, GOOD, 1, POS, lo=1.0, hi=1.0)  # a point is a valid range
    cap(N, GOOD, 1, POS, lo=-np.inf, hi=0.0)
    ablate(N, GOOD, 0, POS, mean=-3.0, coeff=2.0)


def test_check_for_model() -> None:
    ok = steer(N, GOOD, 1.0, 1, POS)
    check_for_model(ok, D, N)
    check_for_model(Chain((ok, cap(N, GOOD, 2, POS, hi=0.0), ablate(N, GOOD, 3, POS))), D, N)
    with pytest.raises(errors.InputError, match="d_model"):
        check_for_model(ok, D + 1, N)
    with pytest.raises(errors.InputError, match="layer weights"):
        check_for_model(ok, D, N + 1)
    with pytest.raises(errors.InputError, match="layer weights"):
        check_for_model(cap(N - 1, GOOD, 1, POS, hi=0.0), D, N)
    with pytest.raises(errors.InputError):  # one bad item in a chain
        check_for_model(Chain((ok, ablate(N, np.ones(D + 2), 1, POS))), D, N)


def test_role_selector_without_chat_template(tiny_zoo, word_tokenizer) -> None:
    tiny = tiny_zoo("llama")
    model = jm.Model(tiny.cfg, tiny.params, word_tokenizer(), "tiny-base")  # no chat template
    with pytest.raises(errors.ChatTemplateError):
        model.role_mask([[{"role": "user", "content": "hello world"}]], "assistant")


# --------------------------------------------------------------------------------------------
# regressions: library bugs found while writing this file (now fixed)
# --------------------------------------------------------------------------------------------
def test_check_for_model_nested_chain() -> None:
    ok = steer(N, GOOD, 1.0, 1, POS)
    check_for_model(Chain((Chain((ok, ok)), ok)), D, N)  # Chain.__call__ supports nesting
    with pytest.raises(errors.InputError):
        check_for_model(Chain((Chain((ok, steer(N, np.ones(D + 1), 1.0, 1, POS))),)), D, N)


@pytest.mark.parametrize("bounds", [dict(hi=-np.inf), dict(lo=np.inf), dict(lo=-np.inf, hi=-np.inf)])
def test_cap_rejects_infinite_empty_range(bounds) -> None:
    with pytest.raises(errors.InputError):
        cap(N, GOOD, 1, POS, **bounds)


@pytest.mark.parametrize("make", [steer, ablate, cap])
def test_scalar_vector_is_input_error(make) -> None:
    args = (N, 3.0, 1.0, 1, POS) if make is steer else (N, 3.0, 1, POS)
    with pytest.raises(errors.InputError):
        make(*args)


@pytest.mark.parametrize("bad", ["n_resid", "d_model"])
def test_model_run_checks_the_intervention(tiny_zoo, word_tokenizer, bad: str) -> None:
    tiny = tiny_zoo("llama")
    cfg = tiny.cfg
    model = jm.Model(cfg, tiny.params, word_tokenizer(), "tiny-llama")
    if bad == "n_resid":  # built for a deeper model: resid[7] does not exist here
        hook = steer(cfg.n_resid + 3, np.ones(cfg.d_model), 1.0, 7, Positions.all(VALID))
    else:
        hook = steer(cfg.n_resid, np.ones(cfg.d_model + 1), 1.0, 1, Positions.all(VALID))
    with pytest.raises(errors.InputError):
        model.run(Batch(TOKENS, VALID), hook=hook)


@pytest.mark.parametrize("layers", [1.7, [2, 3.5], "3"])
def test_non_integer_layers_are_input_error(layers) -> None:
    with pytest.raises(errors.InputError, match="whole resid indices"):
        steer(N, GOOD, 1.0, layers, POS)


def test_zero_steer_keeps_subnormals_bit_identical() -> None:
    """Found by hypothesis in CI: XLA on CPU flushes subnormals in h + 0*v; a zero steer must not touch h."""
    h = jnp.asarray(np.array([[[1e-45, -3e-42, 0.0, 1.0]]], np.float32))
    ctx = HookContext(jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), bool))
    it = Steer(jnp.ones(4), jnp.float32(0.0), jnp.ones(5), Positions.all(np.ones((1, 1), bool)))
    out = jax.jit(lambda h: it(jnp.int32(0), h, ctx))(h)
    np.testing.assert_array_equal(np.asarray(out).view(np.uint32), np.asarray(h).view(np.uint32))
