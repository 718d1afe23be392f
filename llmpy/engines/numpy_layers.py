"""GPT-2's layers in NumPy, each forward written next to its backward.

The counterpart of the layer functions in llm.c's train_gpt2.c. Every layer has the same
vocabulary: `<layer>_forward(inputs...) -> (out, cache)` and
`<layer>_backward(dout, cache) -> gradients in the order of the forward's inputs`.
The cache holds what the backward needs; nothing else is kept between the two.

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
    out = wte[inputs]                                   # (B, T, C)
    out += wpe[pos:pos + T]                             # (T, C) broadcast over B
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
    return dwte, dwpe


# ----------------------------------------------------------------------------------------------
# layernorm over the last axis, eps 1e-5

def layernorm_forward(x, w, b):
    """x (..., C); w, b (C,) -> out (..., C)."""
    mean = x.mean(axis=-1, keepdims=True)               # (..., 1)
    xhat = x - mean                                     # (..., C)
    var = np.einsum("...c,...c->...", xhat, xhat)[..., None] / x.shape[-1]  # (..., 1)
    rstd = 1.0 / np.sqrt(var + LN_EPS)                  # (..., 1)
    xhat *= rstd                                        # (..., C) normalized
    out = xhat * w                                      # (..., C)
    out += b
    return out, (xhat, rstd, w)


def layernorm_backward(dout, cache):
    """dout (..., C) -> dx (..., C), dw (C,), db (C,)."""
    xhat, rstd, w = cache
    C = xhat.shape[-1]
    d2 = dout.reshape(-1, C)                            # (N, C)
    x2 = xhat.reshape(-1, C)                            # (N, C)
    dw = np.einsum("nc,nc->c", d2, x2)                  # (C,)
    db = d2.sum(axis=0)                                 # (C,)
    dxhat = dout * w                                    # (..., C)
    # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    mean_dxhat = dxhat.mean(axis=-1, keepdims=True)     # (..., 1)
    mean_dxhat_xhat = np.einsum("...c,...c->...", dxhat, xhat)[..., None] / C  # (..., 1)
    dx = xhat * mean_dxhat_xhat                         # (..., C)
    dx += mean_dxhat
    np.subtract(dxhat, dx, out=dx)
    dx *= rstd
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

    dw_out: optional (OUT, IN) array to write dw into (the engine passes its gradient buffer
    when that is free to overwrite, which saves a copy of the largest gradients).
    """
    x, w, has_bias = cache
    OUT, IN = w.shape
    d2 = dout.reshape(-1, OUT)                          # (N, OUT)
    dx = np.matmul(d2, w).reshape(x.shape)              # (..., IN)
    dw = np.matmul(d2.T, x.reshape(-1, IN), out=dw_out)  # (OUT, IN)
    db = d2.sum(axis=0) if has_bias else None           # (OUT,)
    return dx, dw, db


# ----------------------------------------------------------------------------------------------
# causal self-attention, all batches and heads at once

def attention_forward(qkv, NH, kv_cache=None, pos=0):
    """qkv (B, T, 3C) -> out (B, T, C), causal, scale 1/sqrt(HS).

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
    att = np.matmul(q, k.transpose(0, 1, 3, 2))         # (B, NH, T, Tk)
    att *= 1.0 / math.sqrt(HS)
    # query i sits at position Tk - T + i and may only see keys at positions <= its own
    future = np.arange(Tk)[None, :] > (np.arange(T) + (Tk - T))[:, None]  # (T, Tk)
    if future.any():
        att += np.where(future, -np.inf, 0.0).astype(att.dtype)     # (T, Tk) broadcast
    att -= att.max(axis=-1, keepdims=True)
    np.exp(att, out=att)
    att /= att.sum(axis=-1, keepdims=True)              # (B, NH, T, Tk) softmax rows
    y = np.matmul(att, v)                               # (B, NH, T, HS)
    out = y.transpose(0, 2, 1, 3).reshape(B, T, C)      # (B, T, C) heads side by side
    return out, (q, k, v, att)


def attention_backward(dout, cache):
    """dout (B, T, C) -> dqkv (B, T, 3C)."""
    q, k, v, att = cache
    B, NH, T, HS = q.shape
    dy = dout.reshape(B, T, NH, HS).transpose(0, 2, 1, 3)  # (B, NH, T, HS)
    dqkv = np.empty((B, T, 3, NH, HS), dtype=dout.dtype)    # (B, T, 3, NH, HS)
    dq, dk, dv = dqkv.transpose(2, 0, 3, 1, 4)               # each (B, NH, T, HS), views
    np.matmul(att.transpose(0, 1, 3, 2), dy, out=dv)        # (B, NH, T, HS)
    datt = np.matmul(dy, v.transpose(0, 1, 3, 2))           # (B, NH, T, T)
    # softmax backward: dpre = att * (datt - sum(datt * att)); masked entries have att = 0
    datt -= np.einsum("bhij,bhij->bhi", datt, att)[..., None]
    datt *= att
    datt *= 1.0 / math.sqrt(HS)                             # (B, NH, T, T) d(pre-softmax)
    np.matmul(datt, k, out=dq)                              # (B, NH, T, HS)
    np.matmul(datt.transpose(0, 1, 3, 2), q, out=dk)        # (B, NH, T, HS)
    return dqkv.reshape(B, T, 3 * NH * HS)


# ----------------------------------------------------------------------------------------------
# GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))

def gelu_forward(x):
    """x (...) -> out (...)."""
    th = x * x                                          # (...)
    th *= GELU_SCALE * GELU_CUBE
    th += GELU_SCALE
    th *= x                                             # sqrt(2/pi) (x + 0.044715 x^3)
    np.tanh(th, out=th)
    out = th + 1.0                                      # (...)
    out *= x
    out *= 0.5
    return out, (x, th)


def gelu_backward(dout, cache):
    """dout (...) -> dx (...)."""
    x, th = cache
    # d/dx = 0.5 (1 + th) + 0.5 x (1 - th^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    dudx = x * x                                        # (...)
    dudx *= GELU_SCALE * 3.0 * GELU_CUBE
    dudx += GELU_SCALE
    dudx *= x
    sech2 = th * th
    np.subtract(1.0, sech2, out=sech2)
    dudx *= sech2                                       # x (1 - th^2) du/dx
    dudx += th
    dudx += 1.0
    dudx *= 0.5
    dudx *= dout
    return dudx


# ----------------------------------------------------------------------------------------------
# residual: out = a + b

def residual_forward(a, b):
    """a, b (B, T, C) -> out (B, T, C)."""
    return a + b, None


def residual_backward(dout, cache):
    """dout (B, T, C) -> da, db (both dout itself: the gradient passes through unchanged)."""
    return dout, dout


# ----------------------------------------------------------------------------------------------
# softmax + cross-entropy, fused, over the first V of Vp columns

def softmax_crossentropy_forward(logits, targets, V):
    """logits (N, Vp); targets (N,) -> losses (N,).

    Columns V..Vp (the vocabulary padding) take no part: not in the softmax, not in the loss,
    and their gradient is zero. `logits` is overwritten with exp(logits - max) (it is the
    largest activation; the backward turns the same buffer into dlogits).
    """
    N = logits.shape[0]
    rows = np.arange(N)
    lv = logits[:, :V]                                  # (N, V) view, padding left out
    lv -= lv.max(axis=1, keepdims=True)
    target_logit = lv[rows, targets]                    # (N,) shifted logit of the target
    np.exp(lv, out=lv)
    sums = lv.sum(axis=1)                               # (N,)
    losses = np.log(sums) - target_logit                # (N,) = -log softmax[target]
    return losses, (logits, targets, sums, V)


def softmax_crossentropy_backward(dlosses, cache):
    """dlosses (N,) -> dlogits (N, Vp), written over the forward's logits buffer.

    dlogits = dloss * (softmax - onehot(target)) on the first V columns, 0 on the padding.
    """
    logits, targets, sums, V = cache
    dlogits = logits                                    # (N, Vp), same memory
    dl = dlogits[:, :V]                                 # (N, V)
    dl *= (dlosses / sums)[:, None]                     # exp / sum * dloss = softmax * dloss
    dl[np.arange(len(targets)), targets] -= dlosses
    dlogits[:, V:] = 0.0
    return dlogits
