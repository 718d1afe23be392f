"""GPT-2's layers in NumPy, each forward written next to its backward.

The counterpart of the layer functions in llm.c's train_gpt2.c, in its order: encoder,
layernorm, matmul, attention, gelu, residual, softmax + cross-entropy. Every layer has the
same vocabulary: `<layer>_forward(inputs...) -> (out, cache)` and
`<layer>_backward(dout, cache) -> gradients in the order of the forward's inputs`.
The cache holds what the backward needs; nothing else is kept between the two. Each body is
the formula it implements, written as NumPy expressions, and writes in place only where its
docstring says so. (In-place sequences for GELU and the cross-entropy, as this file once
had, save 5-8 ms and ~17 ms of a 1.14 s d12 step: not worth the formula they hide.)

Dimension legend:
    B  batch size            T  sequence length (of this call)
    C  channels              V  vocabulary (50257)        Vp padded vocabulary (50304)
    NH number of heads       HS head size (C // NH)       L  number of layers
    N  rows of a matmul (B*T)   IN, OUT  a matmul's input and output widths

Everything works in the dtype of its inputs (float32 in training, float64 in tests).
Weights are (OUT, IN), like nn.Linear and llm.c's files. Every matmul is an explicit
np.matmul call (bench/cpu_step.py records and replays them to time the matmuls alone).
"""

from __future__ import annotations

import math

import numpy as np

LN_EPS = 1e-5
GELU_SCALE = math.sqrt(2.0 / math.pi)
GELU_CUBE = 0.044715


# ----------------------------------------------------------------------------------------------
# encoder: token embedding + position embedding

def encoder_forward(inputs, wte, wpe, pos=0):
    """inputs (B, T) token ids; wte (Vp, C); wpe (maxT, C) -> out (B, T, C).

    `pos` is the position of the first column (non-zero only when decoding with a KV cache).
    """
    T = inputs.shape[1]
    out = wte[inputs] + wpe[pos:pos + T]                # (B, T, C) + (T, C) over B
    return out, (inputs, pos)


def encoder_backward(dout, cache, dwte, dwpe):
    """dout (B, T, C). ADDS into dwte (Vp, C) and dwpe (maxT, C), like llm.c.

    The lookup's gradient is a scatter: each token's row receives the sum of dout over the
    places it occurs. It is added where it lands instead of being returned as a dense
    (Vp, C) array the size of wte.
    """
    inputs, pos = cache
    B, T, C = dout.shape
    np.add.at(dwte, inputs.reshape(-1), dout.reshape(B * T, C))
    dwpe[pos:pos + T] += dout.sum(axis=0)               # (T, C)


# ----------------------------------------------------------------------------------------------
# layernorm over the last axis, eps 1e-5: out = (x - mean) / sqrt(var + eps) * w + b

def layernorm_forward(x, w, b):
    """x (..., C); w, b (C,) -> out (..., C)."""
    mean = x.mean(axis=-1, keepdims=True)               # (..., 1)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)  # (..., 1) biased, as torch
    rstd = 1.0 / np.sqrt(var + LN_EPS)                  # (..., 1)
    xhat = (x - mean) * rstd                            # (..., C) normalized
    out = xhat * w + b                                  # (..., C)
    return out, (xhat, rstd, w)


def layernorm_backward(dout, cache):
    """dout (..., C) -> dx (..., C), dw (C,), db (C,)."""
    xhat, rstd, w = cache
    C = xhat.shape[-1]
    dw = (dout * xhat).reshape(-1, C).sum(axis=0)       # (C,)
    db = dout.reshape(-1, C).sum(axis=0)                # (C,)
    dxhat = dout * w                                    # (..., C)
    dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                 - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))  # (..., C)
    return dx, dw, db


# ----------------------------------------------------------------------------------------------
# matmul with bias: out = x @ w.T + b (nn.Linear)

def matmul_forward(x, w, b=None):
    """x (..., IN); w (OUT, IN); b (OUT,) or None -> out (..., OUT)."""
    OUT, IN = w.shape
    out = np.matmul(x.reshape(-1, IN), w.T)             # (N, OUT), one BLAS call
    if b is not None:
        out += b
    return out.reshape(*x.shape[:-1], OUT), (x, w, b is not None)


def matmul_backward(dout, cache, dw_out=None):
    """dout (..., OUT) -> dx (..., IN), dw (OUT, IN), db (OUT,) or None.

    dw_out: optional (OUT, IN) array that dw is written into (and returned as).
    """
    x, w, has_bias = cache
    OUT, IN = w.shape
    dout2 = dout.reshape(-1, OUT)                       # (N, OUT)
    dx = np.matmul(dout2, w).reshape(x.shape)           # (..., IN)
    dw = np.matmul(dout2.T, x.reshape(-1, IN), out=dw_out)  # (OUT, IN)
    db = dout2.sum(axis=0) if has_bias else None        # (OUT,)
    return dx, dw, db


# ----------------------------------------------------------------------------------------------
# causal self-attention, all batches and heads at once:
#     att = softmax(q @ k^T / sqrt(HS), future masked out);  out = att @ v

def attention_forward(qkv, NH, kv_cache=None, pos=0):
    """qkv (B, T, 3C) -> out (B, T, C).

    qkv holds q, k, v side by side, each (B, T, C) with the heads interleaved as NH x HS.
    kv_cache: optional (K, V) arrays (B, NH, maxT, HS) for inference. This call's keys and
    values are written at [pos:pos+T] and the queries attend to all of [0:pos+T]; decoding
    one token then costs one position, not a re-run of the prefix.
    """
    B, T, C3 = qkv.shape
    C = C3 // 3
    HS = C // NH
    q, k, v = qkv.reshape(B, T, 3, NH, HS).transpose(2, 0, 3, 1, 4)  # each (B, NH, T, HS)
    if kv_cache is not None:
        K, V = kv_cache
        K[:, :, pos:pos + T] = k
        V[:, :, pos:pos + T] = v
        k, v = K[:, :, :pos + T], V[:, :, :pos + T]     # (B, NH, Tk, HS), Tk = pos + T
    Tk = k.shape[2]
    preatt = np.matmul(q, k.transpose(0, 1, 3, 2)) / math.sqrt(HS)  # (B, NH, T, Tk)
    # query i sits at position Tk - T + i and may only see keys at positions <= its own
    future = np.triu(np.ones((T, Tk), dtype=bool), k=Tk - T + 1)    # (T, Tk)
    preatt = np.where(future, -np.inf, preatt)          # (B, NH, T, Tk)
    att = np.exp(preatt - preatt.max(axis=-1, keepdims=True))
    att = att / att.sum(axis=-1, keepdims=True)         # (B, NH, T, Tk) softmax rows
    y = np.matmul(att, v)                               # (B, NH, T, HS)
    out = y.transpose(0, 2, 1, 3).reshape(B, T, C)      # (B, T, C) heads side by side
    return out, (q, k, v, att)


def attention_backward(dout, cache):
    """dout (B, T, C) -> dqkv (B, T, 3C)."""
    q, k, v, att = cache
    B, NH, T, HS = q.shape
    dy = dout.reshape(B, T, NH, HS).transpose(0, 2, 1, 3)  # (B, NH, T, HS)
    dv = np.matmul(att.transpose(0, 1, 3, 2), dy)       # (B, NH, T, HS)
    datt = np.matmul(dy, v.transpose(0, 1, 3, 2))       # (B, NH, T, T)
    # softmax backward: dpre = att * (datt - sum(datt * att)); masked entries have att = 0
    dpreatt = att * (datt - (datt * att).sum(axis=-1, keepdims=True)) / math.sqrt(HS)
    dq = np.matmul(dpreatt, k)                          # (B, NH, T, HS)
    dk = np.matmul(dpreatt.transpose(0, 1, 3, 2), q)    # (B, NH, T, HS)
    dqkv = np.stack([dq, dk, dv])                       # (3, B, NH, T, HS)
    return dqkv.transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * NH * HS)  # (B, T, 3C)


# ----------------------------------------------------------------------------------------------
# GELU, tanh approximation: out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))

def gelu_forward(x):
    """x (...) -> out (...)."""
    th = np.tanh(GELU_SCALE * (x + GELU_CUBE * x * x * x))  # (...)
    out = 0.5 * x * (1.0 + th)                          # (...)
    return out, (x, th)


def gelu_backward(dout, cache):
    """dout (...) -> dx (...)."""
    x, th = cache
    # d/dx = 0.5 (1 + th) + 0.5 x (1 - th^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    dudx = GELU_SCALE * (1.0 + 3.0 * GELU_CUBE * x * x)  # (...)
    return dout * (0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * dudx)


# ----------------------------------------------------------------------------------------------
# residual: out = a + b

def residual_forward(a, b):
    """a, b (B, T, C) -> out (B, T, C)."""
    return a + b, None


def residual_backward(dout, cache):
    """dout (B, T, C) -> da, db (both dout itself: the gradient passes through unchanged)."""
    return dout, dout


# ----------------------------------------------------------------------------------------------
# softmax + cross-entropy, fused, over the first V of Vp columns:
#     probs = softmax(logits);  loss = -log probs[target];  dlogits = probs - onehot(target)

def softmax_crossentropy_forward(logits, targets, V):
    """logits (N, Vp); targets (N,) -> losses (N,).

    Columns V..Vp (the vocabulary padding) take no part: not in the softmax, not in the loss,
    and their gradient is zero.
    """
    N, Vp = logits.shape
    lv = logits[:, :V]                                  # (N, V) view, padding left out
    shifted = lv - lv.max(axis=1, keepdims=True)        # (N, V) max 0, so exp cannot overflow
    exp = np.exp(shifted)                               # (N, V)
    sums = exp.sum(axis=1, keepdims=True)               # (N, 1)
    probs = exp / sums                                  # (N, V) softmax
    # -log probs[target] = log sum - shifted[target]: exact where probs[target] underflows
    losses = np.log(sums[:, 0]) - shifted[np.arange(N), targets]  # (N,)
    return losses, (probs, targets, Vp)


def softmax_crossentropy_backward(dlosses, cache):
    """dlosses (N,) -> dlogits (N, Vp): dloss * (probs - onehot(target)), 0 on the padding."""
    probs, targets, Vp = cache
    N, V = probs.shape
    dlogits = np.zeros((N, Vp), dtype=probs.dtype)      # (N, Vp)
    dlogits[:, :V] = probs * dlosses[:, None]           # (N, V)
    dlogits[np.arange(N), targets] -= dlosses
    return dlogits
