"""The NumPy engine: GPT-2 forward, backward and AdamW written out by hand.

The counterpart of llm.c's train_gpt2.c, and the law for the other engines: same 16 tensors
in one flat buffer, same layers (llmpy/engines/numpy_layers.py), same AdamW. No PyTorch.
Tests check it against torch autograd in float64 (tests/test_engine_numpy.py);
bench/cpu_step.py times one training step against its matmuls alone.

Dimension legend (as in numpy_layers.py):
    B  batch size            T  sequence length        C  channels
    V  vocabulary            Vp padded vocabulary      NH number of heads
    HS head size (C // NH)   L  number of layers       maxT maximum sequence length
"""

from __future__ import annotations

import ctypes
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..config import DECAYED, ModelConfig
from ..errors import LlmpyError
from ..init import init_params, param_views
from .numpy_layers import (
    attention_backward, attention_forward, encoder_backward, encoder_forward,
    gelu_backward, gelu_forward, layernorm_backward, layernorm_forward, matmul_backward,
    matmul_forward, residual_backward, residual_forward, softmax_crossentropy_backward,
    softmax_crossentropy_forward,
)

# AdamW walks the flat buffers in chunks that fit in a core's L2 cache, so its temporaries
# never touch main memory; the chunks are shared out to one thread per core (NumPy releases
# the GIL inside its loops). On 124M parameters this is ~3x faster than whole-array NumPy.
ADAMW_CHUNK = 1 << 17


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back.

    By default it returns the top of the heap to the OS as soon as a step frees its
    activations, and serves some multi-MB arrays with fresh mmaps, so every step faults its
    ~200 MB of activations back in page by page (about a fifth of a d12 step on 2 cores).
    Process-wide and harmless: memory stays at its peak instead of shrinking between steps.
    A no-op where the C library has no mallopt.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-1, 1 << 30)     # M_TRIM_THRESHOLD: keep up to 1 GB of free heap
        libc.mallopt(-3, 1 << 25)     # M_MMAP_THRESHOLD: heap, not mmap, below 32 MB
    except (OSError, AttributeError):
        pass


class NumpyEngine:
    """GPT-2 in NumPy behind the engine interface of llmpy/engines/__init__.py.

    `params` and `grads` are dicts of named views (llm.c names) into the flat buffers
    `params_flat` and `grads_flat`, in the engine's dtype (float32, or float64 for tests).
    """

    name = "numpy"
    param_dtype = "fp32"

    def __init__(self, config: ModelConfig, seed: int = 1337, dtype=np.float32, **ignored):
        keep_freed_memory()
        self.config = config
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise LlmpyError(f"numpy engine: dtype must be float32 or float64, got {self.dtype}")
        self.params_flat = init_params(config, seed).astype(self.dtype)   # (num_params,)
        self.grads_flat = np.zeros_like(self.params_flat)                 # (num_params,)
        self.params = param_views(self.params_flat, config)
        self.grads = param_views(self.grads_flat, config)
        # zero_grad only sets this flag; the next backward then writes its gradients instead
        # of adding them, which saves a pass over the gradient buffer (500 MB at d12).
        self._grads_zero = True
        self._m = self._v = None      # AdamW moments, (num_params,) each, made at first step
        self._acts = None             # what the last training forward keeps for the backward
        self._logits_buf = None       # (B*T, Vp), reused: the largest activation
        self._kv = None               # KV cache: list of L (K, V) pairs (B, NH, maxT, HS)
        self._pos = 0                 # next position to decode
        self._pool = None             # threads for AdamW (one per core, up to 8)
        self._workers = 1
        self._chunks = None           # AdamW work list: (start, end, decayed)

    # ------------------------------------------------------------------------------------------
    # forward

    def _check_inputs(self, inputs, targets=None):
        inputs = np.asarray(inputs)
        if inputs.ndim != 2:
            raise LlmpyError(f"numpy engine: inputs must be (B, T) token ids, got shape "
                             f"{inputs.shape}")
        cfg = self.config
        if inputs.shape[1] > cfg.max_seq_len:
            raise LlmpyError(f"numpy engine: sequence length {inputs.shape[1]} > maxT "
                             f"{cfg.max_seq_len}; use a shorter -t")
        for what, a in (("inputs", inputs), ("targets", targets)):
            if a is not None and a.size and (a.min() < 0 or a.max() >= cfg.vocab_size):
                raise LlmpyError(f"numpy engine: {what} hold token ids outside [0, "
                                 f"{cfg.vocab_size}): min {a.min()}, max {a.max()}")
        return inputs.astype(np.int64, copy=False)

    def _blocks_forward(self, x, keep, kv=None, pos=0):
        """Run the L transformer blocks on x (B, T, C). keep: save caches for the backward.
        kv/pos: KV cache and the position of x's first column (inference only)."""
        p, NH = self.params, self.config.num_heads
        caches = []
        for l in range(self.config.num_layers):
            ln1, c_ln1 = layernorm_forward(x, p["ln1w"][l], p["ln1b"][l])        # (B, T, C)
            qkv, c_qkv = matmul_forward(ln1, p["qkvw"][l], p["qkvb"][l])         # (B, T, 3C)
            atty, c_att = attention_forward(qkv, NH, None if kv is None else kv[l], pos)
            attproj, c_ap = matmul_forward(atty, p["attprojw"][l], p["attprojb"][l])  # (B,T,C)
            x2, _ = residual_forward(x, attproj)                                 # (B, T, C)
            ln2, c_ln2 = layernorm_forward(x2, p["ln2w"][l], p["ln2b"][l])       # (B, T, C)
            fch, c_fc = matmul_forward(ln2, p["fcw"][l], p["fcb"][l])            # (B, T, 4C)
            fch_gelu, c_gelu = gelu_forward(fch)                                 # (B, T, 4C)
            fcproj, c_fp = matmul_forward(fch_gelu, p["fcprojw"][l], p["fcprojb"][l])  # (B,T,C)
            x, _ = residual_forward(x2, fcproj)                                  # (B, T, C)
            if keep:
                caches.append((c_ln1, c_qkv, c_att, c_ap, c_ln2, c_fc, c_gelu, c_fp))
        return x, caches

    def _lm_head(self, x):
        """x (B, T, C) -> lnf, then logits (B*T, Vp) in the reused buffer, and lnf's caches."""
        p = self.params
        B, T, C = x.shape
        lnf, c_lnf = layernorm_forward(x, p["lnfw"], p["lnfb"])                  # (B, T, C)
        Vp = self.config.padded_vocab_size
        if self._logits_buf is None or self._logits_buf.shape[0] != B * T:
            self._logits_buf = np.empty((B * T, Vp), dtype=self.dtype)           # (B*T, Vp)
        # tied weights: logits = lnf @ wte^T, no bias
        np.matmul(lnf.reshape(B * T, C), p["wte"].T, out=self._logits_buf)       # (B*T, Vp)
        return self._logits_buf, c_lnf, lnf

    def forward(self, inputs, targets=None) -> float:
        """Mean cross-entropy over B*T (nan without targets); keeps caches for backward."""
        inputs = self._check_inputs(inputs, None if targets is None else np.asarray(targets))
        self._acts = None
        x, c_enc = encoder_forward(inputs, self.params["wte"], self.params["wpe"])  # (B, T, C)
        x, caches = self._blocks_forward(x, keep=targets is not None)
        logits, c_lnf, lnf = self._lm_head(x)                                    # (B*T, Vp)
        if targets is None:
            return float("nan")
        targets = np.asarray(targets).astype(np.int64, copy=False).reshape(-1)  # (B*T,)
        losses, c_ce = softmax_crossentropy_forward(logits, targets, self.config.vocab_size)
        self._acts = (c_enc, caches, c_lnf, lnf, c_ce, inputs.shape)
        return float(losses.mean(dtype=np.float64))

    # ------------------------------------------------------------------------------------------
    # backward

    def _store(self, dst, value):
        """Put one gradient into the buffer view dst: write after zero_grad, else add."""
        if value is dst:              # a matmul already wrote it there
            return
        if self._grads_zero:
            dst[...] = value
        else:
            dst += value

    def _matmul_backward(self, dout, cache, wname, bname, l):
        """matmul_backward for layer l's (wname, bname); stores dw, db; returns dx."""
        dw_dst = self.grads[wname][l]                   # right after zero_grad: write in place
        dx, dw, db = matmul_backward(dout, cache, dw_dst if self._grads_zero else None)
        self._store(dw_dst, dw)
        self._store(self.grads[bname][l], db)
        return dx

    def _layernorm_backward(self, dout, cache, wname, bname, l=None):
        """layernorm_backward for (wname, bname) (of layer l); stores dw, db; returns dx."""
        dx, dw, db = layernorm_backward(dout, cache)
        self._store(self.grads[wname] if l is None else self.grads[wname][l], dw)
        self._store(self.grads[bname] if l is None else self.grads[bname][l], db)
        return dx

    def backward(self, grad_scale: float = 1.0):
        """Add grad_scale * d(mean loss)/d(params) into the gradient buffer."""
        if self._acts is None:
            raise RuntimeError("numpy engine: backward() needs a forward() with targets first")
        c_enc, caches, c_lnf, lnf, c_ce, (B, T) = self._acts
        self._acts = None
        g = self.grads
        # the loss is the mean over B*T positions, so each position's loss gets 1/(B*T)
        dlosses = np.full(B * T, grad_scale / (B * T), dtype=self.dtype)        # (B*T,)
        dlogits = softmax_crossentropy_backward(dlosses, c_ce)                  # (B*T, Vp)
        # lm head: logits = lnf @ wte^T, so dlnf = dlogits @ wte (dwte comes at the end)
        C = self.config.channels
        dlnf = np.matmul(dlogits, self.params["wte"]).reshape(B, T, C)          # (B, T, C)
        dx = self._layernorm_backward(dlnf, c_lnf, "lnfw", "lnfb")               # (B, T, C)
        for l in reversed(range(self.config.num_layers)):
            c_ln1, c_qkv, c_att, c_ap, c_ln2, c_fc, c_gelu, c_fp = caches[l]
            dx2, dfcproj = residual_backward(dx, None)                          # (B, T, C)
            dfch_gelu = self._matmul_backward(dfcproj, c_fp, "fcprojw", "fcprojb", l)  # 4C
            dfch = gelu_backward(dfch_gelu, c_gelu)                             # (B, T, 4C)
            dln2 = self._matmul_backward(dfch, c_fc, "fcw", "fcb", l)           # (B, T, C)
            dx2 = dx2 + self._layernorm_backward(dln2, c_ln2, "ln2w", "ln2b", l)  # (B, T, C)
            dx, dattproj = residual_backward(dx2, None)                         # (B, T, C)
            datty = self._matmul_backward(dattproj, c_ap, "attprojw", "attprojb", l)
            dqkv = attention_backward(datty, c_att)                             # (B, T, 3C)
            dln1 = self._matmul_backward(dqkv, c_qkv, "qkvw", "qkvb", l)        # (B, T, C)
            dx = dx + self._layernorm_backward(dln1, c_ln1, "ln1w", "ln1b", l)  # (B, T, C)
        # wte is tied: the lm head's dwte = dlogits^T @ lnf plus the encoder's scatter. Both are
        # summed before they reach the buffer, so accumulation adds one gradient per backward
        # (two backward(0.5) on one batch then equal one backward(1.0) bit for bit).
        dwte = np.matmul(dlogits.T, lnf.reshape(B * T, C),
                         out=g["wte"] if self._grads_zero else None)           # (Vp, C)
        if self._grads_zero:
            g["wpe"][...] = 0.0       # the encoder adds into it, and only into rows [0:T]
        encoder_backward(dx, c_enc, dwte, g["wpe"])
        self._store(g["wte"], dwte)
        self._grads_zero = False

    def zero_grad(self):
        self._grads_zero = True

    def _grads_now(self):
        """The flat gradient buffer, with a pending zero_grad carried out."""
        if self._grads_zero:
            self.grads_flat.fill(0.0)
            self._grads_zero = False
        return self.grads_flat

    def grad_norm(self) -> float:
        """Global L2 norm of the gradients: per-chunk BLAS dots, summed in float64."""
        g = self._grads_now()
        step = 1 << 22
        return math.sqrt(sum(float(np.dot(g[i:i + step], g[i:i + step]))
                             for i in range(0, g.size, step)))

    # ------------------------------------------------------------------------------------------
    # AdamW, as llm.c: p -= lr * (mhat / (sqrt(vhat) + eps) + wd * p), wd on 2-D tensors only

    def _adamw_work(self):
        """Chunks of the flat buffers, each inside one tensor, with its weight decay flag."""
        if self._chunks is None:
            self._chunks = []
            for name, (a, b) in self.config.param_offsets().items():
                for s in range(a, b, ADAMW_CHUNK):
                    self._chunks.append((s, min(s + ADAMW_CHUNK, b), name in DECAYED))
            self._workers = max(1, min(os.cpu_count() or 1, 8))
            self._pool = ThreadPoolExecutor(self._workers) if self._workers > 1 else None
        return self._chunks

    def step(self, lr, t, weight_decay=0.0, beta1=0.9, beta2=0.95, eps=1e-8, grad_scale=1.0):
        """One AdamW update with bias correction for step t (= step + 1); gradients are
        multiplied by grad_scale first (the loop folds gradient clipping into it)."""
        if self._m is None:
            self._m = np.zeros_like(self.params_flat)
            self._v = np.zeros_like(self.params_flat)
        p, g, m, v = self.params_flat, self._grads_now(), self._m, self._v
        dt = self.dtype.type
        # folded constants: m = b1 m + (1 - b1) s g;  v = b2 v + (1 - b2) s^2 g^2
        cm, cv = dt((1 - beta1) * grad_scale), dt((1 - beta2) * grad_scale * grad_scale)
        b1, b2 = dt(beta1), dt(beta2)
        # mhat / (sqrt(vhat) + eps) = (m / bc1) / (sqrt(v) / sqrt(bc2) + eps)
        #                          = m / ((sqrt(v) + eps sqrt(bc2)) * bc1 / sqrt(bc2))
        bc1, bc2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
        eps_ = dt(eps * math.sqrt(bc2))
        denom_scale = dt(bc1 / math.sqrt(bc2) / lr if lr else np.inf)   # folds lr in too
        shrink = dt(1.0 - lr * weight_decay)

        def update(chunks):
            tmp = np.empty(ADAMW_CHUNK, dtype=self.dtype)                        # (chunk,)
            for s, e, decayed in chunks:
                pc, gc, mc, vc, tc = p[s:e], g[s:e], m[s:e], v[s:e], tmp[:e - s]
                mc *= b1
                np.multiply(gc, cm, out=tc)
                mc += tc                                                         # m
                np.multiply(gc, gc, out=tc)
                tc *= cv
                vc *= b2
                vc += tc                                                         # v
                np.sqrt(vc, out=tc)
                tc += eps_
                tc *= denom_scale
                np.divide(mc, tc, out=tc)                   # lr * mhat / (sqrt(vhat) + eps)
                if decayed and weight_decay != 0.0:
                    pc *= shrink                                                 # p - lr wd p
                pc -= tc

        chunks = self._adamw_work()
        if self._pool is None:
            update(chunks)
        else:
            n = self._workers
            list(self._pool.map(update, [chunks[i::n] for i in range(n)]))

    # ------------------------------------------------------------------------------------------
    # inference

    def logits(self, inputs) -> np.ndarray:
        """inputs (B, T) -> logits (B, T, V) float32, padding dropped."""
        inputs = self._check_inputs(inputs)
        B, T = inputs.shape
        x, _ = encoder_forward(inputs, self.params["wte"], self.params["wpe"])   # (B, T, C)
        x, _ = self._blocks_forward(x, keep=False)
        logits, _, _ = self._lm_head(x)                                          # (B*T, Vp)
        V = self.config.vocab_size
        return logits[:, :V].reshape(B, T, V).astype(np.float32)                 # (B, T, V)

    def _last_logits(self, x):
        """x (B, T, C) -> logits of the last position (B, V) float32."""
        p, V = self.params, self.config.vocab_size
        lnf, _ = layernorm_forward(x[:, -1], p["lnfw"], p["lnfb"])              # (B, C)
        return np.matmul(lnf, p["wte"][:V].T).astype(np.float32)                 # (B, V)

    def prefill(self, inputs) -> np.ndarray:
        """Run the prompt (B, T0), fill the KV cache, return the last position's logits (B, V)."""
        inputs = self._check_inputs(inputs)
        cfg = self.config
        B = inputs.shape[0]
        shape = (B, cfg.num_heads, cfg.max_seq_len, cfg.head_size)               # (B,NH,maxT,HS)
        if self._kv is None or self._kv[0][0].shape != shape:
            self._kv = [(np.zeros(shape, self.dtype), np.zeros(shape, self.dtype))
                        for _ in range(cfg.num_layers)]
        x, _ = encoder_forward(inputs, self.params["wte"], self.params["wpe"])   # (B, T0, C)
        x, _ = self._blocks_forward(x, keep=False, kv=self._kv, pos=0)
        self._pos = inputs.shape[1]
        return self._last_logits(x)

    def decode(self, tokens) -> np.ndarray:
        """Feed one token per row (B,) at the next position; return its logits (B, V)."""
        if self._kv is None:
            raise RuntimeError("numpy engine: decode() needs a prefill() first")
        if self._pos >= self.config.max_seq_len:
            raise LlmpyError(f"numpy engine: decode position {self._pos} reaches maxT "
                             f"{self.config.max_seq_len}; generate fewer tokens")
        inputs = self._check_inputs(np.asarray(tokens).reshape(-1, 1))             # (B, 1)
        if inputs.shape[0] != self._kv[0][0].shape[0]:
            raise LlmpyError(f"numpy engine: decode got {inputs.shape[0]} rows, the prefill "
                             f"had {self._kv[0][0].shape[0]}")
        x, _ = encoder_forward(inputs, self.params["wte"], self.params["wpe"], pos=self._pos)
        x, _ = self._blocks_forward(x, keep=False, kv=self._kv, pos=self._pos)   # (B, 1, C)
        self._pos += 1
        return self._last_logits(x)

    # ------------------------------------------------------------------------------------------
    # state in and out (float32, llm.c order)

    def _check_flat(self, what, flat):
        flat = np.asarray(flat)
        if flat.shape != (self.config.num_params,):
            raise LlmpyError(f"numpy engine: {what} must be ({self.config.num_params},) for "
                             f"{self.config.describe()}, got shape {flat.shape}")
        return flat

    def get_params(self) -> np.ndarray:
        return self.params_flat.astype(np.float32)

    def set_params(self, flat):
        self.params_flat[...] = self._check_flat("params", flat)

    def get_grads(self) -> np.ndarray:
        return self._grads_now().astype(np.float32)

    def get_optimizer_state(self) -> dict:
        if self._m is None:
            zeros = np.zeros(self.config.num_params, dtype=np.float32)
            return dict(m=zeros, v=zeros.copy(), master=None)
        return dict(m=self._m.astype(np.float32), v=self._v.astype(np.float32), master=None)

    def set_optimizer_state(self, m, v, master=None):
        """m, v: (num_params,) float32. master: fp32 weights from an engine that keeps them
        apart from bf16 parameters; here the parameters are fp32, so they become the params."""
        self._m = self._check_flat("AdamW m", m).astype(self.dtype)
        self._v = self._check_flat("AdamW v", v).astype(self.dtype)
        if master is not None:
            self.set_params(master)

