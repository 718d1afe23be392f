"""The NumPy engine: GPT-2 forward, backward and AdamW written out by hand.

The counterpart of llm.c's train_gpt2.c, and the law for the other engines: same 16 tensors
in one flat buffer, same layers (llmpy/engines/numpy_layers.py), same AdamW. No PyTorch.
Tests check it against torch autograd in float64 (tests/test_engine_numpy.py);
bench/cpu_step.py times one training step against its matmuls alone.

Every layer and AdamW are their formulas. Three speed tricks stay, each worth more than it
costs to read; measured with bench/cpu_step.py at d12, B=4, T=64 on 2 cores, where a step
takes ~1.14 s against ~0.84 s of matmuls alone, they save: keep_freed_memory 0.07-0.13 s,
AdamW in cache-sized chunks on a thread per core 0.08 s (0.5 s against whole arrays),
zero_grad's write-instead-of-add flag 0.04-0.08 s. Each says so where it is.

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

# AdamW walks the flat buffers in chunks of 128K elements, so the formula's temporaries stay
# in a core's L2 cache, and shares the chunks out to one thread per core (NumPy releases the
# GIL inside its loops). One d12 update on 2 cores: whole arrays ~0.7 s, chunks ~0.25 s,
# chunks on 2 threads ~0.15 s (the step 1.26 s single-threaded, 1.14 s threaded); smaller
# chunks pay Python's per-call overhead, larger ones spill the cache.
ADAMW_CHUNK = 1 << 17
# rows of logits at a time in token_losses: its memory stays at a training step's
LOSS_ROWS = 256


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back.

    By default it serves every array over 32 MB (logits, probs, dlogits, dwte) with a fresh
    mmap and returns the top of the heap to the OS as soon as a step frees its activations,
    so every step faults its memory back in page by page: ~2,300 page faults and 0.12 s of
    system time a d12 step, which then takes 0.07-0.13 s longer. Process-wide and harmless:
    memory stays at its peak instead of shrinking between steps. A no-op where the C
    library has no mallopt.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-1, 1 << 30)     # M_TRIM_THRESHOLD: keep up to 1 GB of free heap
        libc.mallopt(-4, 0)           # M_MMAP_MAX: no mmaps, every array from the heap
    except (OSError, AttributeError):
        pass


class NumpyEngine:
    """GPT-2 in NumPy behind the engine interface of llmpy/engines/__init__.py.

    `params` and `grads` are dicts of named views (llm.c names) into the flat buffers
    `params_flat` and `grads_flat`, in the engine's dtype (float32, or float64 for tests).
    Between zero_grad and the next backward `grads_flat` still holds the old gradients (see
    zero_grad); get_grads() and grad_norm() see zeros.
    It takes only the options it uses: a misspelled one is a TypeError that names it.
    """

    name = "numpy"
    param_dtype = "fp32"
    distributed = False

    def __init__(self, config: ModelConfig, seed: int = 1337, dtype=np.float32,
                 device: str | None = None):
        if device not in (None, "auto", "cpu"):
            raise LlmpyError(f"numpy engine: runs on the CPU only, got device {device!r}; "
                             f"use --engine torch or triton for a GPU")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise LlmpyError(f"numpy engine: dtype must be float32 or float64, got {self.dtype}")
        keep_freed_memory()
        self.config = config
        self.params_flat = init_params(config, seed).astype(self.dtype)   # (num_params,)
        self.grads_flat = np.zeros_like(self.params_flat)                 # (num_params,)
        self.params = param_views(self.params_flat, config)
        self.grads = param_views(self.grads_flat, config)
        self._grads_zero = True       # zero_grad pending: see zero_grad below
        self._m = self._v = None      # AdamW moments, (num_params,) each, made at first step
        self._acts = None             # what the last training forward keeps for the backward
        self._kv = None               # KV cache: list of L (K, V) pairs (B, NH, maxT, HS)
        self._pos = 0                 # next position to decode
        self._pool = None             # AdamW's threads, one per core (up to 8), made at first step
        self._workers = 1
        self._chunks = None           # AdamW's work list: (start, end, decayed)

    def _check_inputs(self, inputs, targets=None):
        """Token ids (B, T) as int64, checked against maxT and V (targets too, if given)."""
        inputs = np.asarray(inputs)
        if inputs.ndim != 2:
            raise LlmpyError(f"numpy engine: inputs must be (B, T) token ids, got shape "
                             f"{inputs.shape}")
        cfg = self.config
        if inputs.shape[1] > cfg.max_seq_len:
            raise LlmpyError(f"numpy engine: sequence length {inputs.shape[1]} > maxT "
                             f"{cfg.max_seq_len}; use a shorter -t")
        if targets is not None and np.shape(targets) != inputs.shape:
            raise LlmpyError(f"numpy engine: targets must have the shape of inputs "
                             f"{inputs.shape}, got {np.shape(targets)}")
        for what, a in (("inputs", inputs), ("targets", targets)):
            a = np.asarray(a) if a is not None else inputs
            if a.size and (a.min() < 0 or a.max() >= cfg.vocab_size):
                raise LlmpyError(f"numpy engine: {what} hold token ids outside [0, "
                                 f"{cfg.vocab_size}): min {a.min()}, max {a.max()}")
        return inputs.astype(np.int64, copy=False)

    # ------------------------------------------------------------------------------------------
    # one transformer block, forward then backward (llm.c's gpt2_forward / gpt2_backward):
    #     x2 = x + attproj(attention(qkv(ln1(x))));  out = x2 + fcproj(gelu(fc(ln2(x2))))

    def _block_forward(self, l, x, kv=None, pos=0):
        """Layer l on x (B, T, C) -> (out (B, T, C), caches). kv/pos: KV cache and the
        position of x's first column (inference only)."""
        p, NH = self.params, self.config.num_heads
        ln1, c_ln1 = layernorm_forward(x, p["ln1w"][l], p["ln1b"][l])          # (B, T, C)
        qkv, c_qkv = matmul_forward(ln1, p["qkvw"][l], p["qkvb"][l])           # (B, T, 3C)
        atty, c_att = attention_forward(qkv, NH, None if kv is None else kv[l], pos)  # (B,T,C)
        attproj, c_ap = matmul_forward(atty, p["attprojw"][l], p["attprojb"][l])  # (B, T, C)
        x2, _ = residual_forward(x, attproj)                                   # (B, T, C)
        ln2, c_ln2 = layernorm_forward(x2, p["ln2w"][l], p["ln2b"][l])         # (B, T, C)
        fch, c_fc = matmul_forward(ln2, p["fcw"][l], p["fcb"][l])              # (B, T, 4C)
        fch_gelu, c_gelu = gelu_forward(fch)                                   # (B, T, 4C)
        fcproj, c_fp = matmul_forward(fch_gelu, p["fcprojw"][l], p["fcprojb"][l])  # (B, T, C)
        out, _ = residual_forward(x2, fcproj)                                  # (B, T, C)
        return out, (c_ln1, c_qkv, c_att, c_ap, c_ln2, c_fc, c_gelu, c_fp)

    def _block_backward(self, l, dout, caches):
        """dout (B, T, C) -> dx (B, T, C); adds layer l's 12 parameter gradients."""
        c_ln1, c_qkv, c_att, c_ap, c_ln2, c_fc, c_gelu, c_fp = caches
        g = self.grads

        def dw_out(name):             # after zero_grad, a matmul writes dw into the buffer
            return g[name][l] if self._grads_zero else None

        dx2, dfcproj = residual_backward(dout, None)                           # (B, T, C)
        dfch_gelu, dfcprojw, dfcprojb = matmul_backward(
            dfcproj, c_fp, dw_out("fcprojw"))                                  # (B, T, 4C)
        dfch = gelu_backward(dfch_gelu, c_gelu)                                # (B, T, 4C)
        dln2, dfcw, dfcb = matmul_backward(dfch, c_fc, dw_out("fcw"))          # (B, T, C)
        dx2_ln2, dln2w, dln2b = layernorm_backward(dln2, c_ln2)                # (B, T, C)
        dx, dattproj = residual_backward(dx2 + dx2_ln2, None)                  # (B, T, C)
        datty, dattprojw, dattprojb = matmul_backward(
            dattproj, c_ap, dw_out("attprojw"))                                # (B, T, C)
        dqkv = attention_backward(datty, c_att)                                # (B, T, 3C)
        dln1, dqkvw, dqkvb = matmul_backward(dqkv, c_qkv, dw_out("qkvw"))      # (B, T, C)
        dx_ln1, dln1w, dln1b = layernorm_backward(dln1, c_ln1)                 # (B, T, C)
        for name, grad in (("ln1w", dln1w), ("ln1b", dln1b), ("qkvw", dqkvw), ("qkvb", dqkvb),
                           ("attprojw", dattprojw), ("attprojb", dattprojb),
                           ("ln2w", dln2w), ("ln2b", dln2b), ("fcw", dfcw), ("fcb", dfcb),
                           ("fcprojw", dfcprojw), ("fcprojb", dfcprojb)):
            self._accumulate(g[name][l], grad)
        return dx + dx_ln1

    # ------------------------------------------------------------------------------------------
    # the whole model, forward then backward

    def _hidden(self, inputs, kv=None, pos=0):
        """inputs (B, T) -> the blocks' output (B, T, C) and every layer's caches."""
        x, c_enc = encoder_forward(inputs, self.params["wte"], self.params["wpe"], pos)
        caches = []
        for l in range(self.config.num_layers):
            x, c = self._block_forward(l, x, kv, pos)                          # (B, T, C)
            caches.append(c)
        return x, (c_enc, caches)

    def _lm_head(self, x):
        """x (N, C) -> lnf (N, C), logits (N, Vp) = lnf @ wte^T (tied weights, no bias)."""
        lnf, c_lnf = layernorm_forward(x, self.params["lnfw"], self.params["lnfb"])  # (N, C)
        return np.matmul(lnf, self.params["wte"].T), (lnf, c_lnf)              # (N, Vp)

    def forward(self, inputs, targets=None) -> float:
        """Mean cross-entropy over B*T (nan without targets); keeps caches for backward."""
        inputs = self._check_inputs(inputs, targets)
        self._acts = None
        B, T = inputs.shape
        x, c_blocks = self._hidden(inputs)                                     # (B, T, C)
        logits, c_head = self._lm_head(x.reshape(B * T, -1))                   # (B*T, Vp)
        if targets is None:
            return float("nan")
        targets = np.asarray(targets, dtype=np.int64).reshape(-1)              # (B*T,)
        losses, c_ce = softmax_crossentropy_forward(logits, targets, self.config.vocab_size)
        self._acts = (c_blocks, c_head, c_ce, (B, T))
        return float(losses.mean(dtype=np.float64))

    def backward(self, grad_scale: float = 1.0):
        """Add grad_scale * d(mean loss)/d(params) into the gradient buffer."""
        if self._acts is None:
            raise RuntimeError("numpy engine: backward() needs a forward() with targets first")
        (c_enc, caches), (lnf, c_lnf), c_ce, (B, T) = self._acts
        self._acts = None
        g = self.grads
        # the loss is the mean over B*T positions, so each position's loss gets 1/(B*T)
        dlosses = np.full(B * T, grad_scale / (B * T), dtype=self.dtype)       # (B*T,)
        dlogits = softmax_crossentropy_backward(dlosses, c_ce)                 # (B*T, Vp)
        # lm head: logits = lnf @ wte^T, so dlnf = dlogits @ wte and dwte = dlogits^T @ lnf
        dlnf = np.matmul(dlogits, self.params["wte"])                          # (B*T, C)
        dwte = np.matmul(dlogits.T, lnf, out=g["wte"] if self._grads_zero else None)  # (Vp, C)
        dx, dlnfw, dlnfb = layernorm_backward(dlnf, c_lnf)                     # (B*T, C)
        self._accumulate(g["lnfw"], dlnfw)
        self._accumulate(g["lnfb"], dlnfb)
        dx = dx.reshape(B, T, -1)                                              # (B, T, C)
        for l in reversed(range(self.config.num_layers)):
            dx = self._block_backward(l, dx, caches[l])                        # (B, T, C)
        # wte is tied: the encoder's scatter joins the lm head's dwte before the buffer sees
        # it, so accumulation adds one gradient per backward (two backward(0.5) on one batch
        # then equal one backward(1.0) bit for bit)
        dwpe = np.zeros_like(g["wpe"])                                         # (maxT, C)
        encoder_backward(dx, c_enc, dwte, dwpe)
        self._accumulate(g["wte"], dwte)
        self._accumulate(g["wpe"], dwpe)
        self._grads_zero = False

    # zero_grad only raises a flag; the next backward then writes its gradients into the
    # buffer, the weight matmuls straight into it, instead of adding them to zeros. That
    # saves a 500 MB fill, a temporary per weight gradient and the pass adding it: 0.04-0.08
    # s a d12 step (1.17-1.23 s without). Anything that reads the buffer calls _grads().

    def zero_grad(self):
        self._grads_zero = True

    def _accumulate(self, dst, grad):
        """Add one gradient into its view of the buffer dst; after zero_grad, write it."""
        if grad is dst:               # a matmul wrote it there already
            return
        if self._grads_zero:
            dst[...] = grad
        else:
            dst += grad

    def _grads(self):
        """The flat gradient buffer, a pending zero_grad carried out."""
        if self._grads_zero:
            self.grads_flat.fill(0.0)
            self._grads_zero = False
        return self.grads_flat

    def grad_norm(self) -> float:
        """Global L2 norm of the gradients: BLAS dots of 4M-element chunks, summed in
        float64 (one fp32 dot over 124M elements would lose digits)."""
        g, step = self._grads(), 1 << 22
        return math.sqrt(sum(float(np.dot(g[i:i + step], g[i:i + step]))
                             for i in range(0, g.size, step)))

    # ------------------------------------------------------------------------------------------
    # AdamW, as llm.c: p -= lr * (mhat / (sqrt(vhat) + eps) + wd * p), wd on 2-D tensors only.
    # (Folding its constants into a sequence of in-place updates saves only ~0.05 s a step.)

    def step(self, lr, t, weight_decay=0.0, beta1=0.9, beta2=0.95, eps=1e-8, grad_scale=1.0):
        """One AdamW update with bias correction for step t (= step + 1); gradients are
        multiplied by grad_scale first (the loop folds gradient clipping into it)."""
        if self._m is None:
            self._m = np.zeros_like(self.params_flat)                          # (num_params,)
            self._v = np.zeros_like(self.params_flat)                          # (num_params,)
        if self._chunks is None:
            self._chunks = [(s, min(s + ADAMW_CHUNK, b), name in DECAYED)
                            for name, (a, b) in self.config.param_offsets().items()
                            for s in range(a, b, ADAMW_CHUNK)]
            self._workers = max(1, min(os.cpu_count() or 1, 8))
            self._pool = ThreadPoolExecutor(self._workers) if self._workers > 1 else None
        params, grads, m, v = self.params_flat, self._grads(), self._m, self._v
        # Python floats, so that float32 arrays stay float32 (NEP 50)
        lr, weight_decay, beta1, beta2, eps, grad_scale = map(
            float, (lr, weight_decay, beta1, beta2, eps, grad_scale))

        def update(chunks):
            for s, e, decayed in chunks:
                g = grads[s:e] * grad_scale
                m[s:e] = beta1 * m[s:e] + (1 - beta1) * g
                v[s:e] = beta2 * v[s:e] + (1 - beta2) * g * g
                mhat = m[s:e] / (1 - beta1 ** t)
                vhat = v[s:e] / (1 - beta2 ** t)
                wd = weight_decay if decayed else 0.0
                params[s:e] -= lr * (mhat / (np.sqrt(vhat) + eps) + wd * params[s:e])

        if self._pool is None:
            update(self._chunks)
        else:
            n = self._workers
            list(self._pool.map(update, [self._chunks[i::n] for i in range(n)]))

    # ------------------------------------------------------------------------------------------
    # inference and evaluation (no gradient state touched)

    def logits(self, inputs) -> np.ndarray:
        """inputs (B, T) -> logits (B, T, V) float32, padding dropped."""
        inputs = self._check_inputs(inputs)
        B, T = inputs.shape
        x, _ = self._hidden(inputs)                                            # (B, T, C)
        logits, _ = self._lm_head(x.reshape(B * T, -1))                        # (B*T, Vp)
        V = self.config.vocab_size
        return logits[:, :V].reshape(B, T, V).astype(np.float32)               # (B, T, V)

    def token_losses(self, inputs, targets) -> np.ndarray:
        """inputs, targets (B, T) -> cross-entropy at every position (B, T) float32.

        The logits are made LOSS_ROWS rows at a time, so memory stays bounded at any B*T."""
        inputs = self._check_inputs(inputs, targets)
        B, T = inputs.shape
        targets = np.asarray(targets, dtype=np.int64).reshape(-1)              # (B*T,)
        x, _ = self._hidden(inputs)
        x = x.reshape(B * T, -1)                                               # (B*T, C)
        losses = np.empty(B * T, dtype=np.float32)                             # (B*T,)
        for s in range(0, B * T, LOSS_ROWS):
            logits, _ = self._lm_head(x[s:s + LOSS_ROWS])                      # (rows, Vp)
            losses[s:s + LOSS_ROWS], _ = softmax_crossentropy_forward(
                logits, targets[s:s + LOSS_ROWS], self.config.vocab_size)
        return losses.reshape(B, T)                                            # (B, T)

    def _last_logits(self, x):
        """x (B, T, C) -> logits of the last position (B, V) float32."""
        p, V = self.params, self.config.vocab_size
        lnf, _ = layernorm_forward(x[:, -1], p["lnfw"], p["lnfb"])             # (B, C)
        return np.matmul(lnf, p["wte"][:V].T).astype(np.float32)               # (B, V)

    def prefill(self, inputs) -> np.ndarray:
        """Run the prompt (B, T0), fill the KV cache, return the last position's logits (B, V)."""
        inputs = self._check_inputs(inputs)
        cfg = self.config
        B = inputs.shape[0]
        shape = (B, cfg.num_heads, cfg.max_seq_len, cfg.head_size)             # (B,NH,maxT,HS)
        if self._kv is None or self._kv[0][0].shape != shape:
            self._kv = [(np.zeros(shape, self.dtype), np.zeros(shape, self.dtype))
                        for _ in range(cfg.num_layers)]
        x, _ = self._hidden(inputs, kv=self._kv, pos=0)                        # (B, T0, C)
        self._pos = inputs.shape[1]
        return self._last_logits(x)

    def decode(self, tokens) -> np.ndarray:
        """Feed one token per row (B,) at the next position; return its logits (B, V)."""
        if self._kv is None:
            raise RuntimeError("numpy engine: decode() needs a prefill() first")
        if self._pos >= self.config.max_seq_len:
            raise LlmpyError(f"numpy engine: decode position {self._pos} reaches maxT "
                             f"{self.config.max_seq_len}; generate fewer tokens")
        inputs = self._check_inputs(np.asarray(tokens).reshape(-1, 1))          # (B, 1)
        if inputs.shape[0] != self._kv[0][0].shape[0]:
            raise LlmpyError(f"numpy engine: decode got {inputs.shape[0]} rows, the prefill "
                             f"had {self._kv[0][0].shape[0]}")
        x, _ = self._hidden(inputs, kv=self._kv, pos=self._pos)                # (B, 1, C)
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
        return self._grads().astype(np.float32)

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
