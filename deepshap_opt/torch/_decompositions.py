"""Composite torch ops rewritten into primitives that have rules (``rules.spec.Normalization`` and the
softmax/bilinear rules for attention). Each function runs with the :class:`RuleMode` active, so every
primitive it calls is routed to its own rule; signatures follow ``torch.nn.functional``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import UnsupportedOperatorError


def _normalize_last(x, dims, eps, center=True):
    """(x − mean) · rsqrt(var + eps) over ``dims`` — the Normalization decomposition."""
    c = x - x.mean(dim=dims, keepdim=True) if center else x
    return c * torch.rsqrt(c.square().mean(dim=dims, keepdim=True) + eps)


def layer_norm(mode, func, input, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(normalized_shape), 0))
    y = _normalize_last(input, dims, eps)
    if weight is not None:
        y = y * weight
    return y + bias if bias is not None else y


def rms_norm(mode, func, input, normalized_shape, weight=None, eps=None):
    dims = tuple(range(-len(normalized_shape), 0))
    eps = torch.finfo(input.dtype).eps if eps is None else eps
    y = _normalize_last(input, dims, eps, center=False)
    return y * weight if weight is not None else y


def group_norm(mode, func, input, num_groups, weight=None, bias=None, eps=1e-5):
    n, c = input.shape[:2]
    g = input.reshape(n, num_groups, -1)
    y = _normalize_last(g, (-1,), eps).reshape(input.shape)
    shape = (1, c) + (1,) * (input.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    return y + bias.reshape(shape) if bias is not None else y


def instance_norm(mode, func, input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5):
    if not use_input_stats:   # the running statistics' affine map, as eval batch-norm
        return batch_norm(mode, func, input, running_mean, running_var, weight, bias, eps=eps)
    shape = (1, input.shape[1]) + (1,) * (input.dim() - 2)
    y = _normalize_last(input, tuple(range(2, input.dim())), eps)
    if weight is not None:
        y = y * weight.reshape(shape)
    return y + bias.reshape(shape) if bias is not None else y


# ---- ops that are linear under a condition: checked, then run as they are ---------------------------
def dropout(mode, func, input, p=0.5, training=True, inplace=False):
    if training and p > 0:
        raise UnsupportedOperatorError(
            f"torch.nn.functional.{func.__name__}", mode.where(),
            "dropout in training mode is random; call it with training=self.training (the explainer uses eval)")


def embedding(mode, func, input, weight, *args, **kwargs):
    raise UnsupportedOperatorError(
        "torch.nn.functional.embedding", mode.where(),
        "integer token ids cannot be attributed; explain the embedding's output with DeepExplainer((model, "
        "model.<embedding layer>), data)")


# ---- decompositions into primitives ---------------------------------------------------------------
def batch_norm(mode, func, input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """Eval-mode batch-norm as the per-channel affine map x·s + t it is.

    Run as ``F.batch_norm``, its backward under ``vmap`` over the references folds the reference axis
    into the channels and copies every (n·M, C, ...) gradient twice; a broadcast product has a free
    batching rule and a cheaper backward."""
    if training:
        raise UnsupportedOperatorError(
            "torch.nn.functional.batch_norm", mode.where(),
            "batch statistics (training=True, or track_running_stats=False) mix the samples of a batch")
    shape = (1, -1) + (1,) * (input.dim() - 2)
    with torch.no_grad():
        scale = torch.rsqrt(running_var + eps)
        if weight is not None:
            scale = scale * weight
        shift = -running_mean * scale
        if bias is not None:
            shift = shift + bias
    return input * scale.reshape(shape) + shift.reshape(shape)


def addmm(mode, func, input, mat1, mat2, *, beta=1, alpha=1):
    return beta * input + alpha * (mat1 @ mat2)


def addmv(mode, func, input, mat, vec, *, beta=1, alpha=1):
    return beta * input + alpha * (mat @ vec)


def baddbmm(mode, func, input, batch1, batch2, *, beta=1, alpha=1):
    return beta * input + alpha * torch.bmm(batch1, batch2)


def addbmm(mode, func, input, batch1, batch2, *, beta=1, alpha=1):
    return beta * input + alpha * torch.bmm(batch1, batch2).sum(0)


def addcmul(mode, func, input, tensor1, tensor2, *, value=1):
    return input + value * (tensor1 * tensor2)


def addcdiv(mode, func, input, tensor1, tensor2, *, value=1):
    return input + value * (tensor1 / tensor2)


def _norm2(x, dim, keepdim):
    return torch.sqrt(x.square().sum(dim=dim, keepdim=keepdim))


def vector_norm(mode, func, x, ord=2, dim=None, keepdim=False, *, dtype=None, out=None):
    if ord != 2 or dim is None:
        raise UnsupportedOperatorError("torch.linalg.vector_norm", mode.where(), "only the 2-norm over given dims")
    return _norm2(x, dim, keepdim)


def norm(mode, func, input, p="fro", dim=None, keepdim=False, dtype=None, out=None):
    if p not in (2, "fro") or dim is None:
        raise UnsupportedOperatorError("torch.norm", mode.where(), "only the 2-norm over given dims")
    return _norm2(input, dim, keepdim)


def normalize(mode, func, input, p=2.0, dim=1, eps=1e-12, out=None):
    if p != 2:
        raise UnsupportedOperatorError("torch.nn.functional.normalize", mode.where(), "only p=2")
    return input / _norm2(input, dim, True).clamp_min(eps)


def var(mode, func, input, dim=None, *args, unbiased=None, correction=None, keepdim=False):
    if args:
        unbiased = args[0] if isinstance(args[0], bool) else unbiased
        keepdim = args[1] if len(args) > 1 else keepdim
    corr = correction if correction is not None else (0 if unbiased is False else 1)
    if dim is None:
        raise UnsupportedOperatorError("torch.var", mode.where(), "a variance over all axes mixes samples")
    c = input - input.mean(dim=dim, keepdim=True)
    n = math.prod(input.shape[d] for d in ((dim,) if isinstance(dim, int) else dim))
    return c.square().sum(dim=dim, keepdim=keepdim) / (n - corr)


def std(mode, func, input, *args, **kwargs):
    return torch.sqrt(var(mode, func, input, *args, **kwargs))


def logsumexp(mode, func, input, dim, keepdim=False):
    return torch.log(torch.exp(input).sum(dim=dim, keepdim=keepdim))


def glu(mode, func, input, dim=-1):
    a, b = input.chunk(2, dim=dim)
    return a * torch.sigmoid(b)


def scaled_dot_product_attention(mode, func, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False):
    if dropout_p > 0:
        raise UnsupportedOperatorError("scaled_dot_product_attention", mode.where(), "dropout_p > 0 is random")
    L, S = query.shape[-2], key.shape[-2]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
    scores = (query @ key.transpose(-2, -1)) * scale
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return torch.softmax(scores, dim=-1) @ value


def multi_head_attention_forward(
        mode, func, query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias, bias_k, bias_v,
        add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training=True, key_padding_mask=None,
        need_weights=True, attn_mask=None, use_separate_proj_weight=False, q_proj_weight=None, k_proj_weight=None,
        v_proj_weight=None, static_k=None, static_v=None, average_attn_weights=True, is_causal=False):
    """nn.MultiheadAttention's functional core (sequence-first (L, N, E) layout, as torch passes it),
    written with the batch axis kept separate from the heads so that every site broadcasts per sample."""
    if training and dropout_p > 0:
        raise UnsupportedOperatorError("multi_head_attention_forward", mode.where(), "attention dropout in training")
    if bias_k is not None or add_zero_attn or static_k is not None or static_v is not None:
        raise UnsupportedOperatorError("multi_head_attention_forward", mode.where(),
                                       "add_bias_kv / add_zero_attn / static_k,v are not supported")
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    L, N, E = query.shape
    S, H = key.shape[0], num_heads
    hd = E // H
    if use_separate_proj_weight:
        wq, wk, wv = q_proj_weight, k_proj_weight, v_proj_weight
    else:
        wq, wk, wv = in_proj_weight.chunk(3)
    bq, bk, bv = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
    q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
    # (L, N, E) -> (N, H, L, hd): batch and heads stay separate axes
    q = q.reshape(L, N, H, hd).permute(1, 2, 0, 3)
    k = k.reshape(S, N, H, hd).permute(1, 2, 0, 3)
    v = v.reshape(S, N, H, hd).permute(1, 2, 0, 3)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
    if attn_mask is not None:
        m = attn_mask if attn_mask.dim() == 2 else attn_mask.reshape(N, H, L, S)
        scores = scores.masked_fill(m, float("-inf")) if m.dtype == torch.bool else scores + m
    elif is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if key_padding_mask is not None:
        kpm = key_padding_mask.reshape(N, 1, 1, S)
        scores = scores.masked_fill(kpm, float("-inf")) if kpm.dtype == torch.bool else scores + kpm
    attn = torch.softmax(scores, dim=-1)
    out = (attn @ v).permute(2, 0, 1, 3).reshape(L, N, E)
    out = F.linear(out, out_proj_weight, out_proj_bias)
    weights = None
    if need_weights:
        weights = attn.mean(dim=1) if average_attn_weights else attn
        if unbatched:
            weights = weights.squeeze(0)
    return (out.squeeze(1) if unbatched else out), weights


#: name → precondition check; the op then takes the linear rule
LINEAR_IF = {
    "embedding": embedding,
    **dict.fromkeys(("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"),
                    dropout),
}

#: name → rewrite into primitives (run with the RuleMode active)
DECOMPOSITIONS = {
    "batch_norm": batch_norm, "layer_norm": layer_norm, "rms_norm": rms_norm, "group_norm": group_norm,
    "instance_norm": instance_norm,
    "addmm": addmm, "addmv": addmv, "baddbmm": baddbmm, "addbmm": addbmm, "addcmul": addcmul, "addcdiv": addcdiv,
    "vector_norm": vector_norm, "linalg_vector_norm": vector_norm, "norm": norm, "normalize": normalize, "var": var,
    "std": std,
    "logsumexp": logsumexp, "glu": glu, "scaled_dot_product_attention": scaled_dot_product_attention,
    "multi_head_attention_forward": multi_head_attention_forward,
}
