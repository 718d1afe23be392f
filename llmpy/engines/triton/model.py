"""The triton engine: GPT-2 with an explicit forward and backward, like llm.c's train_gpt2.cu.

bf16 parameters, gradients and activations; fp32 AdamW m and v and (with -w 1) fp32 master
weights, each one flat buffer in llm.c's order with named views. Activation and gradient
buffers are allocated once for (B, T) at the first forward and reused (again if B or T
change). The forward runs layer by layer; the backward walks the layers in reverse and
calls each op's backward by hand: no autograd anywhere.

Who does what:
- matmuls: cuBLAS through torch (addmm with the bias fused as cuBLASLt's epilogue; the
  weight gradients accumulate in place with addmm_); with -ge, the fc matmul's GELU and
  the fcproj input gradient's GELU' in cuBLASLt epilogues called by cublaslt.py;
- with -f8 1, the lm head's three matmuls in FP8 (torch._scaled_mm) by fp8.py, in chunks
  of rows, its backward done inside the forward;
- attention: torch's cuDNN or FlashAttention-2 kernels, forward and backward called
  explicitly (attention.py);
- everything else: Triton kernels in this package (encoder, layernorm fused with the residual
  add, GELU, the fused classifier, AdamW with stochastic rounding, the grad norm, bias
  gradients), deterministic: no atomics.

Recompute (-r): 0 keeps every activation; 1 recomputes GELU's output in the backward (one
(B, T, 4C) buffer instead of L); 2 also recomputes both layernorms' outputs.

On the CPU the engine runs too, slowly, for tests: with TRITON_INTERPRET=1 set before triton
is imported, the kernels run in Triton's interpreter and attention in torch's CPU kernel.

Dimension legend:
    B batch   T time   C channels   V vocab (50257)   Vp padded vocab (50304)
    NH heads  HS head size (C/NH)   L layers          maxT max sequence length   N = B*T
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ...config import DECAYED, PARAM_NAMES, ModelConfig
from ...errors import LlmpyError
from ...init import init_params
from . import attention as att
from . import cublaslt
from . import fp8 as fp8_mod
from .adamw import adamw_update
from .classifier import fused_classifier
from ..torch_common import KVCache, resolve_device
from .common import interpreting
from .encoder import bucket_plan, encoder_backward, encoder_forward
from .gelu import (gelu_backward, gelu_backward_programs, gelu_backward_rows_per_prog,
                   gelu_forward, gelu_forward_programs)
from .layernorm import (layernorm_backward, layernorm_backward_rows_per_prog, layernorm_forward,
                        layernorm_forward_programs)
from .reduce import add_partials, sum_of_squares, total

LAYER_NAMES = PARAM_NAMES[2:14]
HEAD_CHUNK = 8192  # rows of (rows, Vp) logits at a time in token_losses


class Activations:
    """The forward's saved tensors and the backward's scratch, for one (B, T).

    Per layer, llm.c's ActivationTensors: ln1, qkv, atty, residual2, ln2, fch, fch_gelu,
    residual3 (bf16) and the layernorms' mean and rstd (fp32). Each is a list of L views,
    layer l's buffer being `a.qkv[l]`, into fewer slots where fewer are kept: ln1/ln2 keep one
    layer's worth with recompute 2, fch_gelu with recompute >= 1. atty and the attention's
    logsumexp are allocated by torch's attention kernels at every forward.

    training=False: the inference forward's buffers. Nothing is kept for a backward, so
    every per-layer list holds one slot, ln1, ln2 and lnf share one buffer, and the encoder
    writes into residual3's (read by layer 0 before that layer overwrites it)."""

    def __init__(self, config: ModelConfig, B: int, T: int, recompute: int, device,
                 training: bool = True, fp8: int = 0):
        L, C, Vp = config.num_layers, config.channels, config.padded_vocab_size
        N = B * T
        self.B, self.T, self.N = B, T, N
        self.training = training
        bf, f32 = torch.bfloat16, torch.float32
        self.owned = []  # every buffer allocated here (for the memory report)

        def buf(*shape, dtype=bf):
            t = torch.empty(shape, dtype=dtype, device=device)
            self.owned.append(t)
            return t

        def per_layer(slots, *shape, dtype=bf):
            """L views into `slots` buffers of `shape`: layer l gets slot l % slots."""
            t = buf(slots, *shape, dtype=dtype)
            views = [t[s] for s in range(slots)]
            return [views[l % slots] for l in range(L)]
        keep = L if training else 1                          # layers the backward reads
        Lln = 1 if recompute >= 2 or not training else L
        Lg = 1 if recompute >= 1 or not training else L
        self.ln1 = per_layer(Lln, N, C)                      # L x (N, C)
        self.ln1_mean, self.ln1_rstd = per_layer(keep, N, dtype=f32), per_layer(keep, N, dtype=f32)
        self.qkv = per_layer(keep, N, 3 * C)                 # L x (N, 3C)
        self.residual2 = per_layer(keep, N, C)               # L x (N, C)
        self.fch = per_layer(keep, N, 4 * C)                 # L x (N, 4C) pre-GELU
        self.fch_gelu = per_layer(Lg, N, 4 * C)              # L x (N, 4C)
        self.residual3 = per_layer(keep, N, C)               # L x (N, C)
        self.proj = buf(N, C)                                # (N, C) attproj / fcproj output
        self.atty = [None] * L                               # L x (N, C) views
        self.att_saved = [None] * L
        self.mlp8 = None
        if not training:
            self.ln2, self.ln2_mean, self.ln2_rstd = self.ln1, self.ln1_mean, self.ln1_rstd
            self.lnf, self.lnf_mean, self.lnf_rstd = self.ln1[0], self.ln1_mean[0], \
                self.ln1_rstd[0]
            self.encoded = self.residual3[0]                 # (N, C)
            return
        self.encoded = buf(N, C)                             # (N, C)
        self.ln2 = per_layer(Lln, N, C)                      # L x (N, C)
        self.ln2_mean, self.ln2_rstd = per_layer(L, N, dtype=f32), per_layer(L, N, dtype=f32)
        self.lnf = buf(N, C)                                 # (N, C)
        self.lnf_mean, self.lnf_rstd = buf(N, dtype=f32), buf(N, dtype=f32)
        # (N, Vp), becomes dlogits; the FP8 head has chunk buffers instead (fp8.py)
        self.head = fp8_mod.Fp8Head(N, C, Vp, buf) if fp8 else None
        self.logits = None if fp8 else buf(N, Vp)
        # -f8 2: the MLP's FP8 buffers (e4m3 weights, activations and dfch; scales)
        self.mlp8 = fp8_mod.Fp8Mlp(
            L, N, C, max(layernorm_forward_programs(N, C), gelu_forward_programs(4 * N * C),
                         gelu_backward_programs(N, 4 * C)), buf) if fp8 >= 2 else None
        self.losses = buf(N + 1, dtype=f32)                  # (N,) and the sum
        # backward scratch (proj too)
        self.dresidual = buf(N, C)                           # (N, C)
        # with GELU recomputed, its (N, 4C) buffer takes dfch_gelu once fcprojw's gradient
        # has read it
        self.dbt4c = self.fch_gelu[0] if recompute >= 1 else buf(N, 4 * C)
        self.dqkv = buf(N, 3 * C)                            # (N, 3C)
        P = max(3 * C * -(-N // layernorm_backward_rows_per_prog(N)),
                4 * C * -(-N // gelu_backward_rows_per_prog(N)),
                3 * C * att.pack_heads_partials(B, T))
        self.partial = buf(P, dtype=f32)                     # per-block partial sums
        self.sumsq = buf(2048, dtype=f32)
        # token ids, targets and the encoder backward's plan (at most 5N + 1 entries), copied
        # to the device in one transfer from a pinned host buffer
        self.host = torch.empty(7 * N + 1, dtype=torch.int32,
                                pin_memory=torch.device(device).type == "cuda")
        self.ids = buf(7 * N + 1, dtype=torch.int32)
        self.inputs = self.ids[:N].view(B, T)                # (B, T)
        self.targets = self.ids[N:2 * N]                     # (N,)
        self.plan = None                                     # view of ids
        self.plan_counts = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.owned)


class TritonEngine:
    """The engine interface of llmpy.engines, llm.c's CUDA trainer in Python.

    recompute: -r (0, 1, 2). master_weights: -w (keep fp32 master weights). attention:
    "auto" (cuDNN if it passes a check against math attention on this GPU, else flash),
    "cudnn", "flash". gelu_fusion: -ge as in llm.c, GELU in the fc matmuls' cuBLASLt
    epilogues (cublaslt.py): 0 none, 1 the forward (GELU_AUX_BIAS writes GELU's input and
    output), 2 the backward too (DGELU: fcproj's input gradient times GELU'; fcb's gradient
    from our column sums); -1 picks 2 where cuBLASLt is available and C is a multiple of 8,
    else 0 (the CPU). fp8_head: 1 runs the lm head's three matmuls in FP8 (fp8.py: e4m3
    inputs, e5m2 gradients, the logits in chunks, so less memory), on sm89+ GPUs; 2 also
    the MLP's fc and fcproj forwards and fc's input gradient (fp8.Fp8Mlp; it replaces
    -ge's forward epilogue); 0 bf16.
    """

    name = "triton"
    param_dtype = "bf16"
    distributed = True  # flat, flat_grad and step(shard=...): llmpy.dist can drive it

    def __init__(self, config: ModelConfig, *, seed: int = 1337, device=None,
                 recompute: int = 1, master_weights: bool = True, attention: str = "auto",
                 gelu_fusion: int = -1, fp8_head: int = 0, verbose: bool = True):
        if recompute not in (0, 1, 2):
            raise LlmpyError(f"triton engine: recompute (-r) must be 0, 1 or 2, got {recompute}")
        if gelu_fusion not in (-1, 0, 1, 2):
            raise LlmpyError(f"triton engine: gelu fusion (-ge) must be -1, 0, 1 or 2, got "
                             f"{gelu_fusion}")
        self.config = config
        # on the CPU only under Triton's interpreter, for tests
        self.device = resolve_device(
            device, "triton", ("cuda", "cpu") if interpreting() else ("cuda",),
            hint="on the CPU it runs only for tests, with TRITON_INTERPRET=1 set before triton "
                 "is imported; use --engine numpy or torch")
        self.seed = int(seed)
        self.recompute = int(recompute)
        self.verbose = verbose
        self.attention = att.Attention(self._pick_attention(attention))
        fusable = self.device.type == "cuda" and cublaslt.available()
        if gelu_fusion > 0 and not fusable:
            raise LlmpyError(f"triton engine: -ge {gelu_fusion} needs cuBLASLt on a CUDA "
                             f"device (here {self.device}); use -ge 0")
        if gelu_fusion > 0 and not cublaslt.shapes_ok(config.channels):
            raise LlmpyError(f"triton engine: -ge {gelu_fusion} needs the channels C a "
                             f"multiple of 8 (cuBLASLt's epilogues), got C = "
                             f"{config.channels}; use -ge 0")
        fusable = fusable and cublaslt.shapes_ok(config.channels)
        self.gelu_fusion = (2 if fusable else 0) if gelu_fusion == -1 else int(gelu_fusion)
        if fp8_head not in (0, 1, 2):
            raise LlmpyError(f"triton engine: fp8 (-f8) must be 0, 1 or 2, got {fp8_head}")
        why = fp8_mod.supported(self.device) if fp8_head else None
        if why is not None:
            raise LlmpyError(f"triton engine: -f8 {fp8_head} (FP8 matmuls) cannot run on "
                             f"{why}; use -f8 0")
        if fp8_head and config.channels % 16:
            raise LlmpyError(f"triton engine: -f8 {fp8_head} needs the channels C a multiple "
                             f"of 16 (FP8 matmuls), got C = {config.channels}; use -f8 0")
        self.fp8_head = int(fp8_head)
        # -f8 2: the first training forward and backward after these are set measure the
        # FP8 scales (and quantize the weights); the micro-steps after use delayed scales
        self._measure_fwd = self._measure_bwd = True

        n = config.num_params
        flat = torch.from_numpy(init_params(config, seed))
        self.params = flat.to(self.device, torch.bfloat16)            # (num_params,) bf16
        self.master = flat.to(self.device) if master_weights else None  # (num_params,) fp32
        self.grads = torch.zeros(n, dtype=torch.bfloat16, device=self.device)
        self.m = torch.zeros(n, dtype=torch.float32, device=self.device)
        self.v = torch.zeros(n, dtype=torch.float32, device=self.device)
        shapes, self.offsets = config.param_shapes(), config.param_offsets()
        self.p = {k: self.params[a:b].view(shapes[k]) for k, (a, b) in self.offsets.items()}
        self.g = {k: self.grads[a:b].view(shapes[k]) for k, (a, b) in self.offsets.items()}
        self.grad_ready = None  # set by llmpy.dist (engine contract)
        self.acts = None
        self._pending = False      # a forward with targets waits for its backward
        self._cache = None         # KVCache of prefill/decode
        self._pos = 0
        self._reported = False

    def _pick_attention(self, attention: str) -> str:
        HS = self.config.head_size
        avail = att.available_backends(self.device, HS)
        if attention == "auto":
            for backend in avail:
                if backend in ("cpu", "math"):
                    return backend
                why = att.self_check(backend, self.device, HS=HS)
                if why is None:
                    return backend
                if self.verbose:
                    print(f"triton engine: attention backend {backend} skipped: {why}")
            raise LlmpyError("triton engine: no attention backend passed its check on this GPU")
        if attention not in avail:
            raise LlmpyError(f"triton engine: attention {attention!r} not available here; "
                             f"available: {', '.join(avail)}")
        return attention

    # ------------------------------------------------------------------------------------
    # inputs and buffers

    def _tokens(self, a, what: str, ndim: int = 2) -> np.ndarray:
        """Token ids as a host array: the encoder's backward plan is built on the host."""
        if isinstance(a, torch.Tensor):
            a = a.detach().cpu().numpy()
        a = np.asarray(a)
        if a.ndim != ndim:
            raise LlmpyError(f"triton engine: {what} must be {ndim}-D token ids, got shape {a.shape}")
        if ndim == 2 and a.shape[1] > self.config.max_seq_len:
            raise LlmpyError(f"triton engine: sequence length {a.shape[1]} > maxT "
                             f"{self.config.max_seq_len}; use a shorter -t")
        if a.size and (a.min() < 0 or a.max() >= self.config.vocab_size):
            raise LlmpyError(f"triton engine: {what} hold token ids outside [0, "
                             f"{self.config.vocab_size}): min {a.min()}, max {a.max()}")
        return a

    def _to_device(self, a: np.ndarray, dtype=torch.int32) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device, dtype)

    def _ensure_acts(self, B: int, T: int) -> Activations:
        if self.acts is None or (self.acts.B, self.acts.T) != (B, T):
            self.acts = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._measure_fwd = self._measure_bwd = True
            self.acts = Activations(self.config, B, T, self.recompute, self.device,
                                    fp8=self.fp8_head)
            if self.verbose and not self._reported:
                print(self.memory_report(B, T), flush=True)
                self._reported = True
        return self.acts

    def memory_report(self, B: int, T: int) -> str:
        """Memory per tensor group for (B, T), and the largest B that fits at this T."""
        n = self.config.num_params
        fixed = {"params (bf16)": 2 * n, "grads (bf16)": 2 * n,
                 "master weights (fp32)": 4 * n if self.master is not None else 0,
                 "AdamW m, v (fp32)": 8 * n}
        per_b = self.activation_bytes(2, T) - self.activation_bytes(1, T)
        rows = [(k, v) for k, v in fixed.items()] + [(f"activations, B={B} T={T}",
                                                      self.activation_bytes(B, T))]
        lines = ["triton engine memory:"] + [f"  {k:<28} {v / 2**20:10,.1f} MiB" for k, v in rows]
        lines.append(f"  {'total':<28} {sum(v for _, v in rows) / 2**20:10,.1f} MiB")
        if self.device.type == "cuda":
            cap = torch.cuda.get_device_properties(self.device).total_memory
            # 5% and 1 GiB left for cuBLAS workspaces, the CUDA context and fragmentation
            room = cap * 0.95 - 2**30 - sum(fixed.values()) - \
                (self.activation_bytes(1, T) - per_b)
            lines.append(f"  largest B at T={T} on this GPU ({cap / 2**30:.0f} GiB): "
                         f"{max(0, int(room // per_b))}")
        lines.append(f"  (recompute -r {self.recompute}, attention {self.attention.backend}, "
                     f"gelu fusion -ge {self.gelu_fusion}, fp8 head -f8 {self.fp8_head})")
        return "\n".join(lines)

    def activation_bytes(self, B: int, T: int) -> int:
        """Bytes of Activations(B, T) plus what torch's attention kernels allocate per layer
        (atty (B, T, C) bf16 and the logsumexp (B, NH, T) fp32)."""
        cfg = self.config
        own = Activations(cfg, B, T, self.recompute, "meta",
                          fp8=self.fp8_head).nbytes()
        return own + cfg.num_layers * B * T * (2 * cfg.channels + 4 * cfg.num_heads)

    # ------------------------------------------------------------------------------------
    # forward

    def forward(self, inputs, targets=None) -> float:
        """Mean cross-entropy over B*T (nan without targets), keeping what backward needs."""
        x = self._tokens(inputs, "inputs")
        self._pending = False
        if targets is None:
            self._hidden(self._to_device(x))
            return float("nan")
        y = self._tokens(targets, "targets")
        if y.shape != x.shape:
            raise LlmpyError(f"triton engine: targets shape {y.shape} != inputs shape {x.shape}")
        cfg = self.config
        B, T = x.shape
        if self.fp8_head and (B * T) % 16:
            raise LlmpyError(f"triton engine: -f8 {self.fp8_head} needs B*T a multiple of 16 (FP8 "
                             f"matmuls), got {B}*{T} = {B * T}; change -b or -t, or use -f8 0")
        # host work first, while the GPU may still run the last backward: the plan of the
        # encoder backward, then one asynchronous copy of ids, targets and plan
        plan, counts = bucket_plan(x)
        a = self._ensure_acts(B, T)
        N, L = a.N, cfg.num_layers
        p = self.p
        n_ids = 2 * N + plan.size
        host = a.host.numpy()
        host[:N] = x.reshape(-1)
        host[N:2 * N] = y.reshape(-1)
        host[2 * N:n_ids] = plan
        a.ids[:n_ids].copy_(a.host[:n_ids], non_blocking=True)
        a.plan, a.plan_counts = a.ids[2 * N:n_ids], counts
        a.atty = [None] * L
        a.att_saved = [None] * L
        if a.mlp8 is not None:
            a.mlp8.begin(self._measure_fwd, p)
            self._measure_fwd = False
        self._transformer(a, a.inputs)                                     # a.lnf (N, C)
        if a.head is not None:  # FP8: losses, and the head's gradients into proj and dw
            a.head.forward(a.lnf, p["wte"], a.targets, a.losses[:N], a.proj, cfg.vocab_size)
        else:
            torch.mm(a.lnf, p["wte"].t(), out=a.logits)                   # (N, Vp)
            # losses, and dlogits in place for a mean loss (backward scales by grad_scale)
            fused_classifier(a.logits, a.targets, a.losses[:N], cfg.vocab_size, 1.0 / N)
        total_loss = total(a.losses[:N], a.losses[N:])
        self._pending = True
        return float(total_loss.item()) / N

    def _transformer(self, a: Activations, idx: torch.Tensor, pos: int = 0,
                     cache: KVCache | None = None) -> torch.Tensor:
        """The layer sequence, written once for training and inference: token ids (B, T) on
        the device, at positions pos..pos+T-1 -> a.lnf (N, C), the final layernorm's output.
        Every op writes into `a`: the training buffers keep what the backward reads, the
        inference ones (training=False) are overwritten layer after layer."""
        cfg, p = self.config, self.p
        B, T = idx.shape
        C, L = cfg.channels, cfg.num_layers
        encoder_forward(idx, p["wte"], p["wpe"], a.encoded.view(B, T, C), pos)
        layernorm_forward(a.encoded, p["ln1w"][0], p["ln1b"][0], a.ln1[0], a.ln1_mean[0],
                          a.ln1_rstd[0])
        for l in range(L):
            residual = a.encoded if l == 0 else a.residual3[l - 1]         # (N, C)
            torch.addmm(p["qkvb"][l], a.ln1[l], p["qkvw"][l].t(), out=a.qkv[l])
            atty = self._attention(a, l, a.qkv[l].view(B, T, 3 * C), pos, cache)  # (N, C)
            torch.addmm(p["attprojb"][l], atty, p["attprojw"][l].t(), out=a.proj)
            m = a.mlp8  # -f8 2: fc and fcproj in FP8
            layernorm_forward(residual, p["ln2w"][l], p["ln2b"][l], a.ln2[l],
                              a.ln2_mean[l], a.ln2_rstd[l], delta=a.proj, xsum=a.residual2[l],
                              fp8=m and m.out(m.X, l))
            if m is not None:
                m.measure(m.X, l, a.ln2[l])
                m.fc(l, p["fcb"][l], a.fch[l])
                keep = self.recompute == 0 or m.measuring  # bf16 GELU output wanted
                gelu_forward(a.fch[l], a.fch_gelu[l] if keep else None, fp8=m.out(m.H, l))
                m.measure(m.H, l, a.fch_gelu[l])
                m.fcproj(l, p["fcprojb"][l], a.proj)
            elif self.gelu_fusion:  # fch and its GELU in one cuBLASLt matmul
                cublaslt.linear(a.ln2[l], p["fcw"][l], a.fch_gelu[l], p["fcb"][l], aux=a.fch[l])
            else:
                torch.addmm(p["fcb"][l], a.ln2[l], p["fcw"][l].t(), out=a.fch[l])
                gelu_forward(a.fch[l], a.fch_gelu[l])
            if m is None:
                torch.addmm(p["fcprojb"][l], a.fch_gelu[l], p["fcprojw"][l].t(), out=a.proj)
            if l + 1 < L:  # the next layer's ln1, fused with this residual add
                layernorm_forward(a.residual2[l], p["ln1w"][l + 1], p["ln1b"][l + 1],
                                  a.ln1[l + 1], a.ln1_mean[l + 1], a.ln1_rstd[l + 1],
                                  delta=a.proj, xsum=a.residual3[l])
            else:
                layernorm_forward(a.residual2[l], p["lnfw"], p["lnfb"], a.lnf, a.lnf_mean,
                                  a.lnf_rstd, delta=a.proj, xsum=a.residual3[l])
        return a.lnf

    def _attention(self, a: Activations, l: int, qkv: torch.Tensor, pos: int,
                   cache: KVCache | None) -> torch.Tensor:
        """Layer l's causal attention: qkv (B, T, 3C) -> (N, C). From position 0 (training,
        logits, prefill) the engine's kernels of attention.py, the training buffers keeping
        what their backward needs, a cache the keys and values; one new token at pos > 0
        (decode) attends over the cached positions 0..pos with SDPA."""
        B, T, C3 = qkv.shape
        NH = self.config.num_heads
        if pos == 0:
            y, saved = self.attention.forward(qkv, NH)
            y = y.reshape(B * T, C3 // 3)                                  # (N, C), a view
            if a.training:
                a.atty[l], a.att_saved[l] = y, saved
            if cache is not None:
                _, k, v = att.split_qkv(qkv, NH)                           # (B, NH, T, HS)
                cache.update(l, 0, k, v)
            return y
        q, k, v = att.split_qkv(qkv, NH)                                   # (B, NH, 1, HS)
        k, v = cache.update(l, pos, k, v)                                  # (B, NH, pos+1, HS)
        y = F.scaled_dot_product_attention(q, k, v)                        # (B, NH, 1, HS)
        return y.transpose(1, 2).reshape(B * T, C3 // 3)                   # (N, C)

    # ------------------------------------------------------------------------------------
    # backward

    def backward(self, grad_scale: float = 1.0) -> None:
        """ADD grad_scale * d(mean loss)/d(params) into the gradient buffer."""
        if not self._pending:
            raise RuntimeError("triton engine: backward() needs a forward() with targets first")
        self._pending = False
        cfg, a, p, g = self.config, self.acts, self.p, self.g
        B, T = a.B, a.T
        C, L, NH = cfg.channels, cfg.num_layers, cfg.num_heads
        gs = float(grad_scale)
        dres, dbtc = a.dresidual, a.proj                                   # (N, C) each
        m = a.mlp8  # -f8 2: fc's input gradient in FP8
        if m is not None:
            m.measuring = self._measure_bwd
            self._measure_bwd = False

        def ln_backward(dout, x, w, mean, rstd, dw, db, dbias, accumulate=True):
            part = layernorm_backward(dout, x, w, mean, rstd, dres, a.partial, accumulate)
            P = part.shape[0]
            if dbias is not None:  # the projection whose output fed this residual
                add_partials(part.view(P, 3 * C), dw, db, dbias)
            else:
                add_partials(part.view(P, 3 * C)[:, :2 * C], dw, db)

        # lm head (tied wte): dlogits are in a.logits since the forward; the FP8 head
        # computed its gradients there already (dlnf in proj = dbtc)
        if a.head is not None:
            a.head.backward(gs, dbtc, g["wte"])
        else:
            torch.addmm(dbtc, a.logits, p["wte"], beta=0.0, alpha=gs, out=dbtc)  # (N, C)
            g["wte"].addmm_(a.logits.t(), a.lnf, alpha=gs)                       # (Vp, C)
        ln_backward(dbtc, a.residual3[L - 1], p["lnfw"], a.lnf_mean, a.lnf_rstd, g["lnfw"],
                    g["lnfb"], g["fcprojb"][L - 1], accumulate=False)
        self._ready(["lnfw", "lnfb"])
        for l in reversed(range(L)):
            residual = a.encoded if l == 0 else a.residual3[l - 1]
            # MLP: fcproj, GELU, fc, ln2
            if self.recompute >= 1:
                gelu_forward(a.fch[l], a.fch_gelu[l])
            g["fcprojw"][l].addmm_(dres.t(), a.fch_gelu[l])                # (C, 4C)
            d8 = m and m.out(m.D, l)  # -f8 2: dfch in e4m3 too, for fc's input gradient
            if self.gelu_fusion >= 2:  # times GELU' in the epilogue; then fcb's gradient
                # (cuBLASLt's DGELU_BGRAD measured 1.9x slower than DGELU + our column sums)
                cublaslt.mm_dgelu(dres, p["fcprojw"][l], a.fch[l], a.dbt4c)
                add_partials(gelu_backward(a.dbt4c, None, a.partial, fp8=d8), g["fcb"][l])
            else:
                torch.mm(dres, p["fcprojw"][l], out=a.dbt4c)               # (N, 4C)
                add_partials(gelu_backward(a.dbt4c, a.fch[l], a.partial, fp8=d8),
                             g["fcb"][l])
            if m is not None:
                m.measure(m.D, l, a.dbt4c)
            if self.recompute >= 2:
                layernorm_forward(a.residual2[l], p["ln2w"][l], p["ln2b"][l], a.ln2[l],
                                  a.ln2_mean[l], a.ln2_rstd[l])
            g["fcw"][l].addmm_(a.dbt4c.t(), a.ln2[l])                      # (4C, C)
            if m is not None:
                m.fc_input_grad(l, dbtc)                                   # (N, C)
            else:
                torch.mm(a.dbt4c, p["fcw"][l], out=dbtc)                   # (N, C)
            ln_backward(dbtc, a.residual2[l], p["ln2w"][l], a.ln2_mean[l], a.ln2_rstd[l],
                        g["ln2w"][l], g["ln2b"][l], g["attprojb"][l])
            # attention: attproj, attention, qkv, ln1
            g["attprojw"][l].addmm_(dres.t(), a.atty[l])                   # (C, C)
            torch.mm(dres, p["attprojw"][l], out=dbtc)                     # (N, C)
            part = self.attention.backward(dbtc.view(B, T, C), a.qkv[l].view(B, T, 3 * C),
                                           a.att_saved[l], NH, a.dqkv,
                                           a.partial[:3 * C * att.pack_heads_partials(B, T)]
                                           .view(-1, 3 * C))
            add_partials(part, g["qkvb"][l])
            a.atty[l] = a.att_saved[l] = None
            if self.recompute >= 2:
                layernorm_forward(residual, p["ln1w"][l], p["ln1b"][l], a.ln1[l],
                                  a.ln1_mean[l], a.ln1_rstd[l])
            g["qkvw"][l].addmm_(a.dqkv.t(), a.ln1[l])                      # (3C, C)
            torch.mm(a.dqkv, p["qkvw"][l], out=dbtc)                       # (N, C)
            ln_backward(dbtc, residual, p["ln1w"][l], a.ln1_mean[l], a.ln1_rstd[l],
                        g["ln1w"][l], g["ln1b"][l], g["fcprojb"][l - 1] if l > 0 else None)
            self._ready(LAYER_NAMES, layer=l)  # all of layer l (fcprojb[l] came before)
        encoder_backward(dres.view(B, T, C), a.plan, a.plan_counts, g["wte"], g["wpe"])
        self._ready(["wpe", "wte"])

    def _ready(self, names, layer=None) -> None:
        """Tell grad_ready (if set) that these tensors' gradients (layer `layer` of each, for
        the stacked ones) are final for this backward."""
        if self.grad_ready is None:
            return
        L, ranges = self.config.num_layers, []
        for name in names:
            a, b = self.offsets[name]
            if layer is not None:
                a, b = a + layer * (b - a) // L, a + (layer + 1) * (b - a) // L
            ranges.append((a, b))
        self.grad_ready(ranges)

    def zero_grad(self) -> None:
        self.grads.zero_()
        self._measure_fwd = self._measure_bwd = True

    def grad_norm(self) -> float:
        buf = self.acts.sumsq if self.acts is not None else None
        return math.sqrt(float(sum_of_squares(self.grads, buf).item()))

    # ------------------------------------------------------------------------------------
    # AdamW

    def _rounding_seed(self, t: int, tensor: int) -> int:
        """31-bit seed of the stochastic rounding: a function of (seed, step, tensor) only,
        so a resumed run rounds exactly as the uninterrupted one."""
        return int(np.random.SeedSequence([self.seed, int(t), tensor]).generate_state(1)[0]
                   & 0x7FFFFFFF)

    def step(self, lr: float, t: int, weight_decay: float = 0.0, beta1: float = 0.9,
             beta2: float = 0.95, eps: float = 1e-8, grad_scale: float = 1.0,
             shard: tuple[int, int] | None = None) -> None:
        """One AdamW update, llm.c's rules; with `shard` = [start, end) only that slice of
        the flat buffers (ZeRO-1), rounded with the same random bits as a full update."""
        if t < 1:
            raise ValueError(f"triton engine: step t must be >= 1 (t = step + 1), got {t}")
        start, end = shard if shard is not None else (0, self.config.num_params)
        self._measure_fwd = self._measure_bwd = True  # new weights: FP8 scales anew
        for i, name in enumerate(PARAM_NAMES):
            a, b = self.offsets[name]
            lo, hi = max(a, start), min(b, end)
            if lo >= hi:
                continue
            adamw_update(self.params[lo:hi], self.grads[lo:hi],
                         None if self.master is None else self.master[lo:hi], self.m[lo:hi],
                         self.v[lo:hi], lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                         weight_decay=weight_decay if name in DECAYED else 0.0, t=t,
                         grad_scale=grad_scale, seed=self._rounding_seed(t, i), base=lo - a)

    # the flat buffers, for the training loop's gradient averaging and ZeRO-1 (llmpy.dist)
    @property
    def flat(self) -> torch.Tensor:
        return self.params

    @property
    def flat_grad(self) -> torch.Tensor:
        return self.grads

    # ------------------------------------------------------------------------------------
    # inference: fresh buffers, the training buffers are left alone

    def _hidden(self, idx: torch.Tensor, pos: int = 0, cache: KVCache | None = None):
        """Token ids (B, T) on the device at positions pos.. -> lnf output (B*T, C) bf16,
        through the training forward's layers in fresh buffers."""
        B, T = idx.shape
        a = Activations(self.config, B, T, 0, self.device, training=False)
        return self._transformer(a, idx, pos, cache)

    @torch.no_grad()
    def logits(self, inputs) -> np.ndarray:
        x = self._tokens(inputs, "inputs")
        B, T = x.shape
        V = self.config.vocab_size
        h = self._hidden(self._to_device(x))
        logits = torch.mm(h, self.p["wte"][:V].t())                       # (N, V)
        return logits.float().view(B, T, V).cpu().numpy()

    @torch.no_grad()
    def token_losses(self, inputs, targets) -> np.ndarray:
        """Cross-entropy at every position (B, T) float32, without (B, T, V) leaving the GPU."""
        x = self._tokens(inputs, "inputs")
        y = self._tokens(targets, "targets")
        B, T = x.shape
        N, Vp = B * T, self.config.padded_vocab_size
        h = self._hidden(self._to_device(x))
        tgt = self._to_device(y.reshape(-1))
        losses = torch.empty(N, dtype=torch.float32, device=self.device)
        chunk = min(N, HEAD_CHUNK)
        logits = torch.empty(chunk, Vp, dtype=torch.bfloat16, device=self.device)
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            torch.mm(h[s:e], self.p["wte"].t(), out=logits[:e - s])
            fused_classifier(logits[:e - s], tgt[s:e], losses[s:e], self.config.vocab_size, None)
        return losses.view(B, T).cpu().numpy()

    @torch.no_grad()
    def prefill(self, inputs) -> np.ndarray:
        x = self._tokens(inputs, "inputs")
        B, T0 = x.shape
        if T0 < 1:
            raise LlmpyError("triton engine: prefill needs at least one token per row")
        self._cache = KVCache(self.config, B, torch.bfloat16, self.device)
        h = self._hidden(self._to_device(x), 0, self._cache)
        self._pos = T0
        return self._head_last(h.view(B, T0, -1)[:, -1])

    @torch.no_grad()
    def decode(self, tokens) -> np.ndarray:
        if self._cache is None:
            raise RuntimeError("triton engine: decode() needs a prefill() first")
        if self._pos >= self.config.max_seq_len:
            raise LlmpyError(f"triton engine: decode at position {self._pos} would pass maxT "
                             f"{self.config.max_seq_len}; prefill a shorter context")
        x = self._tokens(np.asarray(tokens).reshape(-1, 1), "tokens")      # (B, 1)
        if x.shape[0] != self._cache.B:
            raise LlmpyError(f"triton engine: decode got {x.shape[0]} rows, prefill had "
                             f"{self._cache.B}")
        h = self._hidden(self._to_device(x), self._pos, self._cache)      # (B, C)
        self._pos += 1
        return self._head_last(h)

    def _head_last(self, h) -> np.ndarray:
        V = self.config.vocab_size
        return torch.mm(h.contiguous(), self.p["wte"][:V].t()).float().cpu().numpy()

    # ------------------------------------------------------------------------------------
    # state in and out (flat float32 arrays in llm.c's order)

    def _flat_in(self, a, what: str) -> torch.Tensor:
        a = np.asarray(a, dtype=np.float32)
        if a.shape != (self.config.num_params,):
            raise LlmpyError(f"triton engine: {what} must have shape ({self.config.num_params},)"
                             f" for {self.config.describe()}, got {a.shape}")
        return torch.from_numpy(a).to(self.device)

    @staticmethod
    def _flat_out(t: torch.Tensor) -> np.ndarray:
        return t.detach().to("cpu", torch.float32).numpy().copy()

    def get_params(self) -> np.ndarray:
        """The bf16 parameters, upcast (what a v5 model file holds)."""
        return self._flat_out(self.params)

    def set_params(self, flat) -> None:
        """Master weights take the fp32 values exactly; bf16 parameters round to nearest."""
        f = self._flat_in(flat, "params")
        self.params.copy_(f)
        self._measure_fwd = self._measure_bwd = True
        if self.master is not None:
            self.master.copy_(f)

    def get_grads(self) -> np.ndarray:
        return self._flat_out(self.grads)

    def get_optimizer_state(self) -> dict:
        return {"m": self._flat_out(self.m), "v": self._flat_out(self.v),
                "master": None if self.master is None else self._flat_out(self.master)}

    def set_optimizer_state(self, m, v, master=None) -> None:
        """m, v and (if kept) the fp32 master weights; the bf16 parameters stay as set by
        set_params (a checkpoint's model file holds them exactly)."""
        self.m.copy_(self._flat_in(m, "AdamW m"))
        self.v.copy_(self._flat_in(v, "AdamW v"))
        if master is not None and self.master is not None:
            self.master.copy_(self._flat_in(master, "master weights"))

    def __repr__(self) -> str:
        return (f"TritonEngine({self.config.describe()}, device={self.device}, "
                f"recompute={self.recompute}, attention={self.attention.backend}, "
                f"gelu_fusion={self.gelu_fusion}, fp8_head={self.fp8_head}, "
                f"master_weights={self.master is not None})")

