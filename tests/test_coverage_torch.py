"""The torch backend's composite-op rewrites (``deepshap_opt/torch/_decompositions.py``), one small model per
rewrite and variant: each explanation is complete in float64 (Σφ = f(x) − E f to 1e-8 of the output scale),
and each rewrite that is refused names the op and why."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

from deepshap_opt import UnsupportedOperatorError
from deepshap_opt.torch import DeepExplainer


class Fn(nn.Module):
    """``fn(self, x)`` as a module with a few parameters of its own."""

    def __init__(self, fn, d=6, k=3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5)
        self.v = nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))
        self.head = nn.Linear(d, k).double()
        self.fn = fn

    def forward(self, x):
        return self.head(self.fn(self, x))


def _complete(model, shape, n_bg=4, n_x=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    bg = torch.randn(n_bg, *shape, generator=g, dtype=torch.float64)
    X = torch.randn(n_x, *shape, generator=g, dtype=torch.float64)
    model = model.double().eval()
    phi = DeepExplainer(model, bg).shap_values(X, check_additivity=False)
    with torch.no_grad():
        fx, fr = model(X).numpy(), model(bg).numpy()
    assert phi.shape == (n_x, *shape, fx.shape[1])
    scale = max(np.abs(fx).max(), 1e-12)
    err = np.abs(phi.reshape(n_x, -1, fx.shape[1]).sum(1) - (fx - fr.mean(0))).max() / scale
    assert err <= 1e-8, err
    return phi


VEC = {
    "addmv": lambda m, x: torch.stack([torch.addmv(m.v, m.w, r, beta=0.5, alpha=2.0) for r in x]),
    "addbmm": lambda m, x: torch.stack([torch.addbmm(m.v, r.reshape(1, 1, 6), m.w.unsqueeze(0))[0] for r in x]),
    "addcmul": lambda m, x: torch.addcmul(m.v, x, torch.tanh(x @ m.w), value=0.7),
    "addcdiv": lambda m, x: torch.addcdiv(m.v, x, 2.0 + torch.sigmoid(x @ m.w), value=-1.5),
    "tensor_norm": lambda m, x: x + (x @ m.w).norm(dim=1, keepdim=True),
    "normalize": lambda m, x: F.normalize(x @ m.w + 3.0, dim=1),
    "var": lambda m, x: x * torch.var(x @ m.w, 1, True, keepdim=True),
    "var_correction0": lambda m, x: x + torch.var(x, dim=1, correction=0, keepdim=True),
    "std": lambda m, x: x * torch.std(x @ m.w, dim=1, keepdim=True),
    "logsumexp": lambda m, x: x - torch.logsumexp(x @ m.w, dim=1, keepdim=True),
    "glu": lambda m, x: torch.cat([F.glu(x @ m.w, dim=1), F.glu(x, dim=-1)], 1),
}


@pytest.mark.parametrize("name", sorted(VEC))
def test_vector_decompositions_are_complete(name):
    _complete(Fn(VEC[name]), (6,))


def test_linear_decomposition_gives_the_exact_linear_attribution():
    """addmv is linear in x: φ_i = (W_head·α·W)_{k,i} (x_i − E r_i), the exact Shapley value."""
    model = Fn(lambda m, x: torch.stack([torch.addmv(m.v, m.w, r, beta=0.5, alpha=2.0) for r in x])).double()
    g = torch.Generator().manual_seed(3)
    bg, X = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(2, 6, generator=g, dtype=torch.float64)
    phi = DeepExplainer(model.eval(), bg).shap_values(X)
    J = (model.head.weight @ (2.0 * model.w)).detach().numpy()                       # (K, d)
    expected = (X - bg.mean(0)).numpy()[:, :, None] * J.T[None]
    np.testing.assert_allclose(phi, expected, atol=1e-12)


class Attn(nn.Module):
    def __init__(self, e=8, heads=2, kdim=None, bias_kv=False, **call):
        super().__init__()
        self.mha = nn.MultiheadAttention(e, heads, kdim=kdim, vdim=kdim, add_bias_kv=bias_kv, batch_first=True)
        self.kproj = nn.Linear(e, kdim) if kdim else nn.Identity()
        self.head = nn.Linear(e, 3)
        self.call = call

    def forward(self, x):                        # x: (N, T, E)
        call = dict(self.call)
        if call.pop("causal_mask", False):
            T = x.shape[1]
            call["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(T, dtype=x.dtype)
            call["is_causal"] = True
        if call.pop("bool_mask", False):
            call["attn_mask"] = torch.eye(x.shape[1], dtype=torch.bool).roll(1, 0)
        if call.pop("padding", False):
            pad = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool)
            pad[:, -1] = True
            call["key_padding_mask"] = pad
        kv = self.kproj(x)
        out, w = self.mha(x, kv, kv, **call)
        return self.head(out.mean(1) + (w.flatten(1)[:, :1] if w is not None else 0.0))


@pytest.mark.parametrize("kwargs", [{}, {"need_weights": False}, {"average_attn_weights": False}, {"kdim": 5}],
                         ids=["plain", "no_weights", "per_head_weights", "separate_proj"])
def test_multi_head_attention_variants_are_complete(kwargs):
    kwargs = dict(kwargs)
    torch.manual_seed(0)
    model = Attn(kdim=kwargs.pop("kdim", None), **kwargs)
    _complete(model, (4, 8))


@pytest.mark.parametrize("kwargs", [{"causal_mask": True}, {"bool_mask": True}, {"padding": True}],
                         ids=["causal", "bool_mask", "key_padding"])
def test_masked_multi_head_attention_is_complete(kwargs):
    torch.manual_seed(0)
    _complete(Attn(**kwargs), (4, 8))


def test_nan_attributions_fail_the_additivity_check():
    from deepshap_opt import AdditivityError
    from deepshap_opt._explainer import assert_additivity

    outputs, expected = np.array([[1.0, 2.0]]), np.array([0.5, 0.5])
    idx = np.array([[0, 1]])
    good = np.array([[[0.5, 1.5]]])                                   # (N=1, in=1, k=2): sums match
    assert_additivity([good], outputs, expected, idx, np.float64)
    with pytest.raises(AdditivityError, match="output 1"):
        assert_additivity([np.array([[[0.5, np.nan]]])], outputs, expected, idx, np.float64)


@pytest.mark.parametrize("p", [2, 1])
def test_torch_norm_with_dim(p):
    model = Fn(lambda m, x: x + torch.norm(x @ m.w, p=p, dim=1, keepdim=True))
    if p == 2:
        _complete(model, (6,))
    else:       # not a 2-norm: refused, naming the op
        with pytest.raises(UnsupportedOperatorError, match="torch.norm"):
            _complete(model, (6,))


def test_linalg_vector_norm_is_complete():
    _complete(Fn(lambda m, x: x * torch.linalg.vector_norm(x @ m.w, dim=1, keepdim=True)), (6,))


SDPA = {
    "plain": {}, "causal": {"is_causal": True}, "scale": {"scale": 0.3},
    "bool_mask": {"attn_mask": torch.ones(4, 4, dtype=torch.bool).tril()},
    "float_mask": {"attn_mask": torch.linspace(-1, 1, 16, dtype=torch.float64).reshape(4, 4)},
}


@pytest.mark.parametrize("name", sorted(SDPA))
def test_scaled_dot_product_attention_is_complete(name):
    class Sdpa(nn.Module):
        def __init__(self, gqa=False):
            super().__init__()
            self.q, self.kv = nn.Linear(6, 8), nn.Linear(6, 8 // (2 if gqa else 1))
            self.gqa = gqa
            self.head = nn.Linear(8, 2)

        def forward(self, x):                                       # (N, T, 6) → heads (N, H, T, 4 or 2)
            q = self.q(x).unflatten(-1, (2, 4)).transpose(1, 2)
            k = self.kv(x).unflatten(-1, (1 if self.gqa else 2, 4)).transpose(1, 2)
            extra = {"enable_gqa": True} if self.gqa else SDPA[name]
            o = F.scaled_dot_product_attention(q, k, k, **extra)
            return self.head(o.transpose(1, 2).flatten(2).mean(1))

    torch.manual_seed(0)
    _complete(Sdpa(), (4, 6))
    if name == "plain":
        _complete(Sdpa(gqa=True), (4, 6))


def test_instance_norm_with_running_stats_and_group_norm_are_complete():
    torch.manual_seed(0)
    inorm = nn.InstanceNorm2d(3, affine=True, track_running_stats=True)
    with torch.no_grad():
        inorm.running_mean.uniform_(-0.5, 0.5)
        inorm.running_var.uniform_(0.5, 2.0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), inorm, nn.GELU(), nn.GroupNorm(3, 3), nn.SiLU(),
                          nn.Flatten(), nn.Linear(3 * 5 * 5, 2))
    _complete(model, (2, 5, 5))
    # eval-mode instance norm with running stats is the per-channel affine map: linear, no activations needed
    lin = nn.Sequential(inorm, nn.Flatten(), nn.Linear(3 * 5 * 5, 2)).double().eval()
    g = torch.Generator().manual_seed(2)
    bg, X = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64), torch.randn(2, 3, 5, 5, generator=g,
                                                                                     dtype=torch.float64)
    phi = DeepExplainer(lin, bg).shap_values(X)
    scale = (inorm.weight * torch.rsqrt(inorm.running_var + inorm.eps)).detach().reshape(1, 3, 1, 1)
    J = lin[2].weight.detach().reshape(2, 3, 5, 5) * scale                       # (K, C, H, W)
    expected = ((X - bg.mean(0)).unsqueeze(-1) * J.permute(1, 2, 3, 0).unsqueeze(0)).numpy()
    np.testing.assert_allclose(phi, expected, atol=1e-12)


REFUSED = {
    "vector_norm_ord1": (lambda m, x: x * torch.linalg.vector_norm(x, ord=1, dim=1, keepdim=True), "vector_norm"),
    "tensor_norm_all": (lambda m, x: x * x.norm(), "torch.norm"),
    "normalize_p1": (lambda m, x: F.normalize(x, p=1.0, dim=1), "normalize"),
    "var_all_axes": (lambda m, x: x * torch.var(x), "torch.var"),
    "sdpa_dropout": (lambda m, x: F.scaled_dot_product_attention(x[:, None, None], x[:, None, None],
                                                                 x[:, None, None], dropout_p=0.5)[:, 0, 0],
                     "scaled_dot_product_attention"),
    "batch_stats": (lambda m, x: F.batch_norm(x, None, None, training=True), "batch_norm"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_rewrites_name_the_op(name):
    fn, op = REFUSED[name]
    model = Fn(fn).double().eval()
    bg = torch.randn(4, 6, dtype=torch.float64)
    with pytest.raises(UnsupportedOperatorError, match=op):
        DeepExplainer(model, bg).shap_values(torch.randn(2, 6, dtype=torch.float64))


def test_mha_with_bias_kv_is_refused():
    torch.manual_seed(0)
    model = Attn(bias_kv=True).double().eval()
    with pytest.raises(UnsupportedOperatorError, match="add_bias_kv"):
        DeepExplainer(model, torch.randn(3, 4, 8, dtype=torch.float64)).shap_values(torch.randn(2, 4, 8,
                                                                                            dtype=torch.float64))
