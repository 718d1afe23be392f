"""The torch engine: GPT-2 as an nn.Module, autograd, bf16 autocast, torch.compile, SDPA
(flash) attention and fused AdamW. The counterpart of llm.c's train_gpt2.py, and the oracle
the numpy and triton engines are tested against (dtype="fp64" for tight checks).

Unlike train_gpt2.py, the module's parameters are llm.c's 16 tensors themselves (wte, wpe,
ln1w, ... lnfb, per-layer tensors stacked on a leading L axis), each a view of one flat
buffer in llm.c's file order. The gradients and AdamW's m and v are views of flat buffers
too, so params, grads and optimizer state go in and out as flat float32 arrays, the grad
norm is one reduction and a model file is the buffer itself.

Dimension legend:
    B batch   T time   C channels   V vocab (50257)   Vp padded vocab (50304)
    NH heads  HS head size (C/NH)   L layers          maxT max sequence length
"""

from __future__ import annotations

import functools
import math
import weakref

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import DECAYED, PARAM_NAMES, ModelConfig
from ..errors import LlmpyError
from ..init import init_params
from .torch_common import KVCache, resolve_device

LN_EPS = 1e-5
# The 12 per-layer tensors, in file order: each is (L, ...) and unbound into L slices.
LAYER_NAMES = PARAM_NAMES[2:14]
DTYPES = {"fp32": torch.float32, "bf16": torch.float32, "fp64": torch.float64}


class GPT(nn.Module):
    """GPT-2 whose parameters are llm.c's 16 tensors, views of `flat` (num_params,)."""

    def __init__(self, config: ModelConfig, flat: torch.Tensor):
        super().__init__()
        self.config = config
        shapes = config.param_shapes()
        for name, (a, b) in config.param_offsets().items():
            # nn.Parameter shares the storage of the view, so the flat buffer stays the truth.
            self.register_parameter(name, nn.Parameter(flat[a:b].view(shapes[name])))

    def forward(self, idx, targets=None, reduction: str = "mean"):
        """idx (B, T) int64 -> logits (B, T, V); with targets (B, T), the mean loss instead
        (reduction="none": the loss at every position, (B*T,))."""
        logits = self.head(self.hidden(idx))  # (B, T, V)
        if targets is None:
            return logits
        # flatten(0, 1) of the sliced logits is still a view: rows of stride Vp, no copy.
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction)

    def head(self, x):
        """Tied output head: x (..., C) -> logits (..., V); the padded rows of wte drop out."""
        return F.linear(x, self.wte)[..., :self.config.vocab_size]  # (..., V)

    def hidden(self, idx, cache: KVCache | None = None, pos: int = 0):
        """Token ids (B, T) at positions pos..pos+T-1 -> final normalized hidden state (B, T, C).
        With a cache, keys and values are stored there and attention sees positions 0..pos+T-1."""
        C = self.config.channels
        T = idx.size(1)
        x = F.embedding(idx, self.wte) + self.wpe[pos:pos + T]  # (B, T, C)
        # unbind once: its backward stacks the L slices' grads in one go (indexing per layer
        # would materialize a full-size zero gradient for every layer).
        layers = zip(*(getattr(self, name).unbind(0) for name in LAYER_NAMES))
        for layer, (ln1w, ln1b, qkvw, qkvb, attprojw, attprojb,
                    ln2w, ln2b, fcw, fcb, fcprojw, fcprojb) in enumerate(layers):
            h = F.layer_norm(x, (C,), ln1w, ln1b, LN_EPS)                         # (B, T, C)
            x = x + self.attention(h, qkvw, qkvb, attprojw, attprojb, cache, layer, pos)
            h = F.layer_norm(x, (C,), ln2w, ln2b, LN_EPS)                         # (B, T, C)
            h = F.gelu(F.linear(h, fcw, fcb), approximate="tanh")                 # (B, T, 4C)
            x = x + F.linear(h, fcprojw, fcprojb)                                 # (B, T, C)
        return F.layer_norm(x, (C,), self.lnfw, self.lnfb, LN_EPS)               # (B, T, C)

    def attention(self, x, qkvw, qkvb, attprojw, attprojb, cache, layer, pos):
        """Causal self-attention, scale 1/sqrt(HS): x (B, T, C) -> (B, T, C)."""
        B, T, C = x.shape
        NH, HS = self.config.num_heads, self.config.head_size
        qkv = F.linear(x, qkvw, qkvb)                                             # (B, T, 3C)
        q, k, v = (t.view(B, T, NH, HS).transpose(1, 2) for t in qkv.split(C, dim=2))  # (B, NH, T, HS)
        if cache is not None:
            k, v = cache.update(layer, pos, k, v)                                 # (B, NH, pos+T, HS)
        # From position 0 the mask is causal; one new query at pos > 0 may see every key.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=(pos == 0))         # (B, NH, T, HS)
        y = y.transpose(1, 2).reshape(B, T, C)                                    # (B, T, C)
        return F.linear(y, attprojw, attprojb)                                    # (B, T, C)


def _avoid_mix_order_reduction() -> None:
    """Turn off Inductor's mix-order reduction (on by default since torch 2.10). It fuses a
    layernorm backward's row and column reductions into one kernel, and when the column sums
    (dweight, dbias) are views into one shared buffer, as the (L, C) stacked ln1w/ln1b/ln2w/
    ln2b gradients of this model are, the generated code writes them to a fresh tensor and
    never into the buffer: those gradients come back as uninitialized or stale memory once
    B*T reaches about 16K tokens on CUDA (pytorch/pytorch#193061; d12 at B=16, T=1024 gave a
    step-0 grad norm of 127,114 instead of 20.9). Older torch has no such option."""
    from torch._inductor import config as inductor_config
    if hasattr(inductor_config.triton, "mix_order_reduction"):
        inductor_config.triton.mix_order_reduction = False


def _report_ready(engine_ref, span, _param) -> None:
    """A post-accumulate-grad hook: tell the engine's grad_ready (if set) that this
    parameter's gradient, flat span [a, b), is final."""
    engine = engine_ref()
    if engine is not None and engine.grad_ready is not None:
        engine.grad_ready([span])


class TorchEngine:
    """The engine interface of llmpy.engines over `GPT`.

    dtype: "fp32"; "bf16" (autocast to bfloat16, fp32 parameters, grads and AdamW state, as
    train_gpt2.py); "fp64" (everything float64, for tests and golden fixtures).
    compile: torch.compile the training and logits forward. fused: fused AdamW where torch
    has it (CUDA, CPU), else the foreach/single-tensor one.
    """

    name = "torch"
    param_dtype = "fp32"
    distributed = True  # flat, flat_grad and step(shard=...): llmpy.dist can drive it

    def __init__(self, config: ModelConfig, *, seed: int = 1337, device: str | None = None,
                 dtype: str = "fp32", compile: bool = False, fused: bool = True):
        if dtype not in DTYPES:
            raise LlmpyError(f"torch engine: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.config = config
        self.device = resolve_device(device, "torch")
        if dtype == "fp64" and self.device.type == "mps":
            raise LlmpyError("torch engine: MPS has no float64; use dtype fp32 or --device cpu")
        self.dtype = dtype
        tdtype = DTYPES[dtype]
        self._autocast_dtype = torch.bfloat16 if dtype == "bf16" else None

        # One flat buffer each for params, grads, AdamW m and v (num_params,); views name them.
        self.flat = torch.from_numpy(init_params(config, seed)).to(self.device, tdtype)
        self.flat_grad = torch.zeros_like(self.flat)
        self.m = torch.zeros_like(self.flat)
        self.v = torch.zeros_like(self.flat)
        self.model = GPT(config, self.flat)
        shapes, offsets = config.param_shapes(), config.param_offsets()
        views = {buf: {n: t[a:b].view(shapes[n]) for n, (a, b) in offsets.items()}
                 for buf, t in (("grad", self.flat_grad), ("m", self.m), ("v", self.v))}
        # the hooks hold the engine weakly: autograd keeps them where Python's garbage
        # collector cannot see, so a strong reference would keep the engine alive forever
        me = weakref.ref(self)
        for name, p in self.model.named_parameters():
            # autograd adds into an existing .grad in place, so grads accumulate in flat_grad.
            p.grad = views["grad"][name]
            # a stacked tensor is used by every layer, so its gradient is final only when
            # autograd has accumulated the last use (layer 0): overlap is per tensor here
            p.register_post_accumulate_grad_hook(functools.partial(_report_ready, me, offsets[name]))
        self.grad_ready = None  # set by llmpy.dist (engine contract)

        # AdamW over two groups (decayed 2-D tensors, the rest); its state is the m, v views,
        # and the step count is set from t before every step, so nothing else needs saving.
        use_fused = fused and self.device.type in ("cuda", "cpu")
        params = dict(self.model.named_parameters())
        groups = [{"params": [params[n] for n in PARAM_NAMES if n in DECAYED], "decayed": True},
                  {"params": [params[n] for n in PARAM_NAMES if n not in DECAYED], "decayed": False}]
        self.optimizer = torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0,
                                           fused=True if use_fused else None)
        step_device = self.device if use_fused else torch.device("cpu")
        for name, p in params.items():
            self.optimizer.state[p] = {
                "step": torch.zeros((), dtype=torch.float32, device=step_device),
                "exp_avg": views["m"][name], "exp_avg_sq": views["v"][name]}

        if compile:
            _avoid_mix_order_reduction()
        self._forward = torch.compile(self.model) if compile else self.model
        self._loss = None      # the last forward's loss tensor, kept for backward
        self._cache = None     # KVCache of prefill/decode
        self._pos = 0          # next position to decode

    # ------------------------------------------------------------------------------------
    # helpers

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self._autocast_dtype or torch.bfloat16,
                              enabled=self._autocast_dtype is not None)

    def _tokens(self, a, ndim: int = 2):
        """int array or tensor -> int64 tensor on the device, shape-checked."""
        # torch.tensor copies (B*T ints): read-only memmap slices are fine, uint16 too
        t = a if isinstance(a, torch.Tensor) else torch.tensor(np.asarray(a), dtype=torch.long)
        V = self.config.vocab_size
        # checked on the host: out of range, CPU gives an IndexError, CUDA a device assert
        if t.numel() and t.device.type == "cpu" and (int(t.min()) < 0 or int(t.max()) >= V):
            raise LlmpyError(f"torch engine: token ids must be in [0, {V}) (the model's "
                             f"vocabulary), got [{int(t.min())}, {int(t.max())}]; the data "
                             f"or prompt was made for another vocabulary")
        if t.dim() != ndim:
            raise LlmpyError(f"torch engine: token array must be {ndim}-D, got shape {tuple(t.shape)}")
        if ndim == 2 and t.size(1) > self.config.max_seq_len:
            raise LlmpyError(f"torch engine: sequence length {t.size(1)} > maxT "
                             f"{self.config.max_seq_len} of the model")
        return t.to(self.device, torch.long, non_blocking=True)

    def _flat_in(self, a, what: str) -> torch.Tensor:
        a = np.asarray(a, dtype=np.float32)
        if a.shape != (self.config.num_params,):
            raise LlmpyError(f"torch engine: {what} must have shape ({self.config.num_params},) "
                             f"for {self.config.describe()}, got {a.shape}")
        return torch.from_numpy(a).to(self.device, self.flat.dtype)

    @staticmethod
    def _flat_out(t: torch.Tensor) -> np.ndarray:
        return t.detach().to("cpu", torch.float32, copy=True).numpy()

    # ------------------------------------------------------------------------------------
    # training

    def forward(self, inputs, targets=None) -> float:
        idx = self._tokens(inputs)
        self._loss = None
        if targets is None:
            with torch.no_grad(), self._autocast():
                self._forward(idx)
            return float("nan")
        with self._autocast():
            self._loss = self._forward(idx, self._tokens(targets))
        return self._loss.item()

    def backward(self, grad_scale: float = 1.0) -> None:
        if self._loss is None:
            raise RuntimeError("torch engine: backward() needs a forward() with targets first")
        loss = self._loss if grad_scale == 1.0 else self._loss * grad_scale
        self._loss = None
        loss.backward()

    def zero_grad(self) -> None:
        self.flat_grad.zero_()

    def grad_norm(self) -> float:
        acc = torch.float64 if self.flat_grad.dtype == torch.float64 else torch.float32
        return torch.linalg.vector_norm(self.flat_grad, dtype=acc).item()

    def step(self, lr: float, t: int, weight_decay: float = 0.0, beta1: float = 0.9,
             beta2: float = 0.95, eps: float = 1e-8, grad_scale: float = 1.0,
             shard: tuple[int, int] | None = None) -> None:
        """One AdamW update with llm.c's rules. grad_scale scales the gradient buffer in
        place first (the loop zeroes it before the next accumulation). With `shard` =
        [start, end) only that slice of the flat parameters is updated (ZeRO-1)."""
        if t < 1:
            raise ValueError(f"torch engine: step t must be >= 1 (t = step + 1), got {t}")
        if shard is not None:
            self._step_slice(lr, t, weight_decay, beta1, beta2, eps, grad_scale, *shard)
            return
        if grad_scale != 1.0:
            self.flat_grad.mul_(grad_scale)
        for group in self.optimizer.param_groups:
            group.update(lr=lr, betas=(beta1, beta2), eps=eps,
                         weight_decay=weight_decay if group["decayed"] else 0.0)
        for state in self.optimizer.state.values():
            state["step"].fill_(t - 1)  # AdamW adds 1, then bias-corrects with it
        self.optimizer.step()

    @torch.no_grad()
    def _step_slice(self, lr, t, weight_decay, beta1, beta2, eps, grad_scale, start, end):
        """AdamW on flat[start:end] only (ZeRO-1), written out: the same update as
        torch.optim.AdamW's, with decoupled decay on the slice's parts of 2-D tensors."""
        p, g = self.flat[start:end], self.flat_grad[start:end]
        m, v = self.m[start:end], self.v[start:end]
        if grad_scale != 1.0:
            g.mul_(grad_scale)
        if weight_decay:
            for name, (a, b) in self.config.param_offsets().items():
                lo, hi = max(a, start), min(b, end)
                if name in DECAYED and lo < hi:
                    p[lo - start:hi - start].mul_(1.0 - lr * weight_decay)
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        bias1, bias2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
        denom = (v.sqrt() / math.sqrt(bias2)).add_(eps)
        p.addcdiv_(m, denom, value=-lr / bias1)

    # ------------------------------------------------------------------------------------
    # inference

    @torch.no_grad()
    def logits(self, inputs) -> np.ndarray:
        with self._autocast():
            logits = self._forward(self._tokens(inputs))  # (B, T, V)
        return logits.float().cpu().numpy()

    @torch.no_grad()
    def token_losses(self, inputs, targets) -> np.ndarray:
        """Cross-entropy at every position (B, T) float32: the training forward's loss
        before its mean, so no (B, T, V) logits leave the device."""
        idx, tgt = self._tokens(inputs), self._tokens(targets)
        if tgt.shape != idx.shape:
            raise LlmpyError(f"torch engine: targets shape {tuple(tgt.shape)} != inputs shape "
                             f"{tuple(idx.shape)}")
        with self._autocast():
            losses = self._forward(idx, tgt, reduction="none")  # (B*T,)
        return losses.float().view(idx.shape).cpu().numpy()

    @torch.no_grad()
    def prefill(self, inputs) -> np.ndarray:
        idx = self._tokens(inputs)  # (B, T0)
        B, T0 = idx.shape
        if T0 < 1:
            raise LlmpyError("torch engine: prefill needs at least one token per row")
        cache_dtype = self._autocast_dtype or self.flat.dtype
        self._cache = KVCache(self.config, B, cache_dtype, self.device)
        with self._autocast():
            x = self.model.hidden(idx, self._cache, 0)           # (B, T0, C)
            logits = self.model.head(x[:, -1])                   # (B, V)
        self._pos = T0
        return logits.float().cpu().numpy()

    @torch.no_grad()
    def decode(self, tokens) -> np.ndarray:
        if self._cache is None:
            raise RuntimeError("torch engine: decode() needs a prefill() first")
        if self._pos >= self.config.max_seq_len:
            raise LlmpyError(f"torch engine: decode at position {self._pos} would pass maxT "
                             f"{self.config.max_seq_len}; prefill a shorter context")
        idx = self._tokens(tokens, ndim=1)[:, None]              # (B, 1)
        if idx.size(0) != self._cache.B:
            raise LlmpyError(f"torch engine: decode got {idx.size(0)} rows, prefill had "
                             f"{self._cache.B}")
        with self._autocast():
            x = self.model.hidden(idx, self._cache, self._pos)   # (B, 1, C)
            logits = self.model.head(x[:, 0])                    # (B, V)
        self._pos += 1
        return logits.float().cpu().numpy()

    # ------------------------------------------------------------------------------------
    # state in and out (flat float32 arrays in llm.c's order)

    def get_params(self) -> np.ndarray:
        return self._flat_out(self.flat)

    def set_params(self, flat) -> None:
        self.flat.copy_(self._flat_in(flat, "params"))

    def get_grads(self) -> np.ndarray:
        return self._flat_out(self.flat_grad)

    def get_optimizer_state(self) -> dict:
        return {"m": self._flat_out(self.m), "v": self._flat_out(self.v), "master": None}

    def set_optimizer_state(self, m, v, master=None) -> None:
        """AdamW m, v (num_params,). Parameters here are already fp32 master weights, so a
        `master` (from a bf16 engine's state file) replaces them: it is the more exact copy."""
        self.m.copy_(self._flat_in(m, "AdamW m"))
        self.v.copy_(self._flat_in(v, "AdamW v"))
        if master is not None:
            self.set_params(master)

    def __repr__(self) -> str:
        return (f"TorchEngine({self.config.describe()}, device={self.device}, dtype={self.dtype})")
