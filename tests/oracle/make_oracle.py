"""Write tests/fixtures/oracle: llm.c's test_gpt2 reference, computed by Hugging Face.

The golden fixture (tests/fixtures/golden_tiny) is written by llmpy's own torch engine, so
checking the engines against it is the project checking itself. This script computes the
same kind of reference with code the project did not write: Hugging Face `transformers`'
GPT2LMHeadModel, in float64, with torch autograd. Nothing from llmpy touches the math: the
mapping of llm.c's tensors onto the HF model is written out below (not llmpy/hf.py), and so
are the AdamW updates (not torch.optim, not an engine). llmpy supplies only the inputs: the
random init (llmpy.init.init_params), the token shard (llmpy.data.tinyshakespeare) and the
model file writer (llmpy.formats.write_model).

Regenerate with

    python tests/oracle/make_oracle.py            # writes tests/fixtures/oracle/
    python tests/oracle/make_oracle.py --out DIR  # elsewhere (tests/test_oracle.py does)

It writes model.bin (llm.c v3 fp32 model file: the parameters everything starts from) and
oracle.npz with
    x, y            (B, T) int32: the first B*T+1 tokens of tinyshakespeare val, folded into
                    the small vocabulary (id % V), y = x shifted by one (llm.c's first batch)
    logits          (B, T, V) float32, at init
    loss            float64, mean cross-entropy over B*T at init
    d<name>         the 16 gradients, llm.c's names, order and (out, in) layout, float32;
                    dwte is (Vp, C) with zero padded rows
    c_losses        (10,) float64: test_gpt2.c's 10 AdamW steps (lr 1e-4, betas 0.9/0.999,
                    eps 1e-8, weight decay 0.01 on every tensor, no clipping), the loss
                    before each update; c_params: the parameters after them (flat, float32)
    cu_losses       (10,) float64: test_gpt2.cu's rules (betas 0.9/0.95, no weight decay,
                    global grad norm clipped to 1.0); cu_params likewise
    meta            JSON string: config, B, T, seed, the hyperparameters, torch and
                    transformers versions

Where the facts come from: llm.c's test_gpt2.c / test_gpt2.cu (the batch, what is checked,
the two sets of AdamW settings: see /work/shared/LLMC_FACTS.md "The reference tests") and
train_gpt2.c's gpt2_update (p -= lr * (mhat / (sqrt(vhat) + eps) + wd * p), bias correction
with t = 1..10) and train_gpt2.cu (grad_scale = clip / norm when norm > clip).

Before writing, the script checks its own mapping against an independent float64 NumPy
forward of the whole model written below, and its gradients against central finite
differences of the HF loss along random directions.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

from llmpy.config import PARAM_NAMES, ModelConfig, from_descriptor
from llmpy.data.tinyshakespeare import ensure_tinyshakespeare
from llmpy.formats import open_shard, write_model
from llmpy.init import init_params

OUT_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "oracle"
# Odd sizes on purpose (tests/STYLE rule 9): HS=12, V=997 pads to Vp=1024 (27 padded rows),
# T=29 < maxT=48 so the last wpe rows must get zero gradient, B=3.
DESCRIPTOR = "L=2,C=48,NH=4,T=48,V=997"
B, T, SEED = 3, 29, 1337
STEPS = 10
# test_gpt2.c: gpt2_update(&model, 1e-4f, 0.9f, 0.999f, 1e-8f, 0.01f, step+1)
C_RULES = dict(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, grad_clip=None)
# test_gpt2.cu: gpt2_update(&model, 1e-4f, 0.9f, 0.95f, 1e-8f, 0.0f, 1.0f, step+1, ...)
CU_RULES = dict(lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, grad_clip=1.0)


# ----------------------------------------------------------------------------------------
# llm.c flat buffer <-> named tensors (written here, not taken from llmpy.init.param_views)

def llmc_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """llm.c's 16 tensors in file order; weights (out, in), per-layer ones stacked on L."""
    Vp, C, L, maxT = (config.padded_vocab_size, config.channels,
                      config.num_layers, config.max_seq_len)
    return {"wte": (Vp, C), "wpe": (maxT, C), "ln1w": (L, C), "ln1b": (L, C),
            "qkvw": (L, 3 * C, C), "qkvb": (L, 3 * C), "attprojw": (L, C, C),
            "attprojb": (L, C), "ln2w": (L, C), "ln2b": (L, C), "fcw": (L, 4 * C, C),
            "fcb": (L, 4 * C), "fcprojw": (L, C, 4 * C), "fcprojb": (L, C),
            "lnfw": (C,), "lnfb": (C,)}


def unflatten(flat: np.ndarray, config: ModelConfig) -> dict[str, np.ndarray]:
    out, pos = {}, 0
    for name, shape in llmc_shapes(config).items():
        n = math.prod(shape)
        out[name] = flat[pos:pos + n].reshape(shape)
        pos += n
    assert pos == flat.size, (pos, flat.size)
    return out


def flatten(tensors: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([tensors[name].reshape(-1) for name in PARAM_NAMES])


# ----------------------------------------------------------------------------------------
# the HF model and the hand-written mapping

def hf_model(config: ModelConfig) -> GPT2LMHeadModel:
    """GPT2LMHeadModel with llm.c's GPT-2: tanh GELU, eps 1e-5, no dropout, 1/sqrt(HS)
    attention scale, tied wte, eager attention; float64."""
    hf_config = GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.max_seq_len, n_embd=config.channels,
        n_layer=config.num_layers, n_head=config.num_heads, n_inner=4 * config.channels,
        activation_function="gelu_new", layer_norm_epsilon=1e-5,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False, tie_word_embeddings=True, use_cache=False,
        bos_token_id=None, eos_token_id=None)
    hf_config._attn_implementation = "eager"
    model = GPT2LMHeadModel(hf_config).to(torch.float64).eval()
    assert model.lm_head.weight is model.transformer.wte.weight, "wte must be tied"
    assert model.config._attn_implementation == "eager"
    return model


def hf_pairs(model: GPT2LMHeadModel, config: ModelConfig):
    """(llm.c name, layer or None, HF parameter, transpose?) for every HF parameter.
    HF's Conv1D stores (in, out), llm.c (out, in) like nn.Linear: the matrices transpose."""
    tr = model.transformer
    pairs = [("wte", None, tr.wte.weight, False), ("wpe", None, tr.wpe.weight, False)]
    for l, h in enumerate(tr.h):
        pairs += [("ln1w", l, h.ln_1.weight, False), ("ln1b", l, h.ln_1.bias, False),
                  ("qkvw", l, h.attn.c_attn.weight, True), ("qkvb", l, h.attn.c_attn.bias, False),
                  ("attprojw", l, h.attn.c_proj.weight, True),
                  ("attprojb", l, h.attn.c_proj.bias, False),
                  ("ln2w", l, h.ln_2.weight, False), ("ln2b", l, h.ln_2.bias, False),
                  ("fcw", l, h.mlp.c_fc.weight, True), ("fcb", l, h.mlp.c_fc.bias, False),
                  ("fcprojw", l, h.mlp.c_proj.weight, True),
                  ("fcprojb", l, h.mlp.c_proj.bias, False)]
    pairs += [("lnfw", None, tr.ln_f.weight, False), ("lnfb", None, tr.ln_f.bias, False)]
    n_hf = len({id(p) for p in model.parameters()})
    assert len(pairs) == n_hf, f"mapped {len(pairs)} of {n_hf} HF parameters"
    return pairs


def load_into_hf(model, config: ModelConfig, flat: np.ndarray) -> None:
    """Copy an llm.c flat buffer (float64) into the HF model; wte loses its padded rows."""
    t = unflatten(flat, config)
    with torch.no_grad():
        for name, l, p, transpose in hf_pairs(model, config):
            a = t[name] if l is None else t[name][l]
            if name == "wte":
                a = a[:config.vocab_size]
            a = a.T if transpose else a
            assert p.shape == a.shape, (name, l, tuple(p.shape), a.shape)
            p.copy_(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)))


def grads_from_hf(model, config: ModelConfig) -> np.ndarray:
    """HF's .grad tensors mapped back into llm.c's flat layout; padded wte rows are zero."""
    t = {name: np.zeros(shape) for name, shape in llmc_shapes(config).items()}
    for name, l, p, transpose in hf_pairs(model, config):
        g = p.grad.detach().numpy()
        g = g.T if transpose else g
        if name == "wte":
            t[name][:config.vocab_size] = g
        elif l is None:
            t[name][...] = g
        else:
            t[name][l] = g
    return flatten(t)


def hf_loss_and_grads(model, config, flat, x, y, need_grads=True):
    """Mean cross-entropy over B*T (HF's logits, torch's cross_entropy, float64)."""
    load_into_hf(model, config, flat)
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(need_grads):
        logits = model(input_ids=torch.from_numpy(x.astype(np.int64))).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, config.vocab_size), torch.from_numpy(y.astype(np.int64)).reshape(-1))
        if need_grads:
            loss.backward()
    grads = grads_from_hf(model, config) if need_grads else None
    return float(loss.detach()), logits.detach().numpy(), grads


# ----------------------------------------------------------------------------------------
# independent checks of the mapping

def numpy_forward(config: ModelConfig, flat: np.ndarray, x: np.ndarray) -> np.ndarray:
    """GPT-2 forward written from the paper's equations, float64: logits (B, T, V)."""
    p = unflatten(flat.astype(np.float64), config)
    NH, C = config.num_heads, config.channels
    HS = C // NH
    Bx, Tx = x.shape

    def ln(h, w, b):
        mu = h.mean(-1, keepdims=True)
        var = ((h - mu) ** 2).mean(-1, keepdims=True)
        return (h - mu) / np.sqrt(var + 1e-5) * w + b

    h = p["wte"][x] + p["wpe"][:Tx]                                   # (B, T, C)
    mask = np.triu(np.ones((Tx, Tx), dtype=bool), 1)
    for l in range(config.num_layers):
        a = ln(h, p["ln1w"][l], p["ln1b"][l])
        qkv = a @ p["qkvw"][l].T + p["qkvb"][l]                       # (B, T, 3C)
        q, k, v = (qkv[..., i * C:(i + 1) * C].reshape(Bx, Tx, NH, HS).transpose(0, 2, 1, 3)
                   for i in range(3))                                 # (B, NH, T, HS)
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(HS)               # (B, NH, T, T)
        s = np.where(mask, -np.inf, s)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = (s @ v).transpose(0, 2, 1, 3).reshape(Bx, Tx, C)
        h = h + o @ p["attprojw"][l].T + p["attprojb"][l]
        a = ln(h, p["ln2w"][l], p["ln2b"][l])
        f = a @ p["fcw"][l].T + p["fcb"][l]                           # (B, T, 4C)
        f = 0.5 * f * (1 + np.tanh(math.sqrt(2 / math.pi) * (f + 0.044715 * f ** 3)))
        h = h + f @ p["fcprojw"][l].T + p["fcprojb"][l]
    h = ln(h, p["lnfw"], p["lnfb"])
    return h @ p["wte"][:config.vocab_size].T                         # (B, T, V)


def check_mapping(model, config, flat, x, y, logits, loss, grads) -> None:
    ref = numpy_forward(config, flat, x)
    err = np.abs(logits - ref).max() / np.abs(ref).max()
    assert err < 1e-12, f"HF logits vs NumPy forward: rel err {err:.3g}"
    lse = np.log(np.exp(ref - ref.max(-1, keepdims=True)).sum(-1)) + ref.max(-1)
    ref_loss = float((lse - np.take_along_axis(ref, y[..., None], -1)[..., 0]).mean())
    assert abs(loss - ref_loss) < 1e-12, (loss, ref_loss)
    # directional derivatives: one direction per tensor, plus one over all of them
    rng = np.random.default_rng(0)
    offs, pos = {}, 0
    for name, shape in llmc_shapes(config).items():
        offs[name] = (pos, pos + math.prod(shape))
        pos += math.prod(shape)
    for name, (a, b) in list(offs.items()) + [("all", (0, flat.size))]:
        d = np.zeros_like(flat)
        d[a:b] = rng.standard_normal(b - a)
        if name in ("wte", "all"):
            d[config.vocab_size * config.channels:offs["wte"][1]] = 0  # padded rows: not in HF
        d /= np.linalg.norm(d)
        h = 1e-5
        lp = hf_loss_and_grads(model, config, flat + h * d, x, y, need_grads=False)[0]
        lm = hf_loss_and_grads(model, config, flat - h * d, x, y, need_grads=False)[0]
        fd, an = (lp - lm) / (2 * h), float(grads @ d)
        assert abs(fd - an) <= 1e-7 * max(1.0, abs(an)), f"d{name}: fd {fd} vs autograd {an}"
    wte_pad = unflatten(grads, config)["wte"][config.vocab_size:]
    assert not wte_pad.any()


# ----------------------------------------------------------------------------------------
# AdamW, from train_gpt2.c's gpt2_update, in float64

def adamw_run(model, config, flat0, x, y, lr, beta1, beta2, eps, weight_decay, grad_clip):
    """10 steps; returns (the loss before each update, final params)."""
    p = flat0.astype(np.float64).copy()
    m, v = np.zeros_like(p), np.zeros_like(p)
    losses = []
    for t in range(1, STEPS + 1):
        loss, _, g = hf_loss_and_grads(model, config, p, x, y)
        losses.append(loss)
        if grad_clip is not None:
            norm = math.sqrt(float(g @ g))
            g = g * (grad_clip / norm if norm > grad_clip else 1.0)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        mhat = m / (1 - beta1 ** t)
        vhat = v / (1 - beta2 ** t)
        p_prev = p
        p = p - lr * (mhat / (np.sqrt(vhat) + eps) + weight_decay * p)  # decay: every tensor
        if t == 1:  # bias correction makes step 1 a signed step: mhat/sqrt(vhat) = g/|g|
            closed = p_prev * (1 - lr * weight_decay) - lr * g / (np.abs(g) + eps)
            assert np.abs(p - closed).max() < 1e-15, "AdamW step 1 is not lr * sign(g)"
    losses = np.array(losses)
    assert np.all(np.diff(losses) < 0), f"10 AdamW steps must lower the loss: {losses}"
    return losses, p


# ----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"default {OUT_DIR}")
    out_dir = parser.parse_args(argv).out
    torch.manual_seed(0)
    config = from_descriptor(DESCRIPTOR)
    params = init_params(config, SEED)                      # (num_params,) float32
    _, val = ensure_tinyshakespeare()
    buf = np.asarray(open_shard(val)[:B * T + 1], dtype=np.int64) % config.vocab_size
    x = buf[:-1].reshape(B, T).astype(np.int32)
    y = buf[1:].reshape(B, T).astype(np.int32)

    model = hf_model(config)
    flat0 = params.astype(np.float64)                       # exactly the model file's values
    loss, logits, grads = hf_loss_and_grads(model, config, flat0, x, y)
    check_mapping(model, config, flat0, x, y, logits, loss, grads)
    c_losses, c_params = adamw_run(model, config, flat0, x, y, **C_RULES)
    cu_losses, cu_params = adamw_run(model, config, flat0, x, y, **CU_RULES)
    assert abs(c_losses[0] - loss) < 1e-12 and abs(cu_losses[0] - loss) < 1e-12

    meta = dict(descriptor=DESCRIPTOR, B=B, T=T, seed=SEED, steps=STEPS, c_rules=C_RULES,
                cu_rules=CU_RULES, torch=torch.__version__, transformers=transformers.__version__,
                numpy=np.__version__, fold_vocab="token id % V",
                data="first B*T+1 tokens of tiny_shakespeare_val.bin")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_model(out_dir / "model.bin", config, params, dtype="fp32")
    named = {"d" + k: g.astype(np.float32) for k, g in unflatten(grads, config).items()}
    np.savez_compressed(
        out_dir / "oracle.npz", x=x, y=y, logits=logits.astype(np.float32),
        loss=np.float64(loss), **named, c_losses=c_losses, c_params=c_params.astype(np.float32),
        cu_losses=cu_losses, cu_params=cu_params.astype(np.float32), meta=np.array(json.dumps(meta)))
    size = sum(f.stat().st_size for f in out_dir.iterdir())
    print(f"{config.describe()}  B={B} T={T}  loss {loss:.12f}")
    print("c  losses", np.round(c_losses, 9).tolist())
    print("cu losses", np.round(cu_losses, 9).tolist())
    print(f"wrote {out_dir} ({size:,} bytes) with torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
