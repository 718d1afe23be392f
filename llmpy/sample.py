"""Text generation with a KV cache, for every engine; and the `llmpy sample` command.

llm.c samples from an EOT start token by re-running the whole sequence for each new token and
has no prompt encoding. Here the prompt is encoded, run once (engine.prefill fills the KV
cache), and each new token costs one position (engine.decode). Temperature and top-k as in
nanoGPT; sampling draws from numpy's PCG64 seeded by the caller, so it never disturbs the
training run's random state.
"""

from __future__ import annotations


import numpy as np

from .config import EOT
from .errors import LlmpyError, OneLineParser


def sample_next(logits: np.ndarray, rng: np.random.Generator, temperature: float = 1.0,
                top_k: int | None = None) -> np.ndarray:
    """Draw one token per row from logits (B, V); temperature 0 means argmax."""
    logits = np.asarray(logits, dtype=np.float64)  # (B, V)
    if temperature <= 0:
        return logits.argmax(axis=-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]  # (B, 1)
        logits = np.where(logits < kth, -np.inf, logits)
    logits -= logits.max(axis=-1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=-1, keepdims=True)
    # inverse-CDF draw, one uniform per row (llm.c's sample_mult does the same)
    coins = rng.random(probs.shape[0])[:, None]
    cdf = np.cumsum(probs, axis=-1)
    return np.minimum((cdf < coins).sum(axis=-1), probs.shape[-1] - 1)


def prompt_ids(prompt: str, config) -> list[int]:
    """The prompt's token ids (empty: EOT), checked against the model: every id inside the
    vocabulary, room for at least one new token under maxT."""
    from .tokenizer import get_tokenizer
    ids = get_tokenizer().encode(prompt) if prompt else [EOT]
    V, maxT = config.vocab_size, config.max_seq_len
    if max(ids) >= V:
        what = f"--prompt {prompt!r}" if prompt else "sampling (-s, or the sample at the end)"
        raise LlmpyError(f"{what}: starts from token {max(ids)} (GPT-2 BPE; the EOT start "
                         f"token is {EOT}), outside the model's vocabulary V = {V}; expected "
                         f"a model with V > {max(ids)}, or -s 0 to train without samples")
    if len(ids) >= maxT:
        raise LlmpyError(f"--prompt: {len(ids)} tokens, expected fewer than the model's maxT "
                         f"{maxT}; shorten it")
    return ids


def generate(engine, prompt: list[int], max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, seed: int = 0, num_samples: int = 1) -> list[list[int]]:
    """Continue `prompt` (token ids) by up to max_new_tokens tokens, `num_samples` rows at once.
    Stops early at the model's maxT. Returns the new tokens of each row."""
    if not prompt:
        prompt = [EOT]
    maxT = engine.config.max_seq_len
    if len(prompt) >= maxT:
        raise LlmpyError(f"prompt: {len(prompt)} tokens, the model's maxT is {maxT}")
    rng = np.random.default_rng(seed)
    steps = min(max_new_tokens, maxT - len(prompt))
    x = np.tile(np.asarray(prompt, dtype=np.int32), (num_samples, 1))  # (B, T0)
    out = np.zeros((num_samples, steps), dtype=np.int32)  # (B, steps)
    if steps == 0:
        return out.tolist()
    logits = engine.prefill(x)  # (B, V)
    for i in range(steps):
        tok = sample_next(logits, rng, temperature, top_k)  # (B,)
        out[:, i] = tok
        if i + 1 < steps:
            logits = engine.decode(tok.astype(np.int32))
    return out.tolist()


DOC_BREAK = "\n[document break]\n"  # what the EOT token looks like in printed samples


def detokenize(tok, ids, eot: int = EOT) -> str:
    """Text of sampled ids; each EOT (a document boundary) shows as DOC_BREAK rather than
    the literal <|endoftext|>."""
    pieces, cur = [], []
    for i in ids:
        if int(i) == eot:
            pieces.append(tok.decode(cur))
            cur = []
        else:
            cur.append(i)
    return DOC_BREAK.join(pieces + [tok.decode(cur)])


def sample_text(engine, prompt: str, gen_tokens: int, temperature: float = 1.0,
                top_k: int = 0, seed: int = 1337) -> str:
    """The prompt (empty: start from EOT) and `gen_tokens` sampled tokens after it, as text."""
    from .tokenizer import get_tokenizer
    tok = get_tokenizer()
    ids = prompt_ids(prompt, engine.config)
    row = generate(engine, ids, gen_tokens, temperature=temperature, top_k=top_k or None,
                   seed=seed)[0]
    return prompt + detokenize(tok, row)


def _file_tokenizer(path: str, config, start_from_eot: bool):
    """llm.c's tokenizer file, read and checked before anything is generated: it must name
    every id the model can sample, and its EOT, where samples start without --prompt, must
    be an id the model has."""
    from .tokenizer import read_tokenizer_file
    tok = read_tokenizer_file(path)
    if tok.n_vocab < config.vocab_size:
        raise LlmpyError(f"--tokenizer {path}: {tok.n_vocab} tokens, expected at least the "
                         f"model's vocabulary V = {config.vocab_size}; pass the tokenizer "
                         f"of this model's vocabulary")
    if start_from_eot and not 0 <= tok.eot < config.vocab_size:
        raise LlmpyError(f"--tokenizer {path}: its EOT token {tok.eot}, where samples start "
                         f"without --prompt, is outside the model's vocabulary V = "
                         f"{config.vocab_size}; give a --prompt or this model's tokenizer")
    return tok


def main(argv: list[str]) -> int:
    """`llmpy sample CHECKPOINT [--prompt TEXT] [-g N] ...`: print generated text."""
    import sys

    from .models import build_engine
    from .settings import saved_run_config
    from .tokenizer import get_tokenizer

    p = OneLineParser(prog="llmpy sample", description=main.__doc__)
    p.add_argument("checkpoint", help="model .bin (llm.c format), an output dir (newest "
                   "checkpoint), or a Hugging Face GPT-2 name/dir")
    p.add_argument("--prompt", default="", help="text to continue (default: start from EOT)")
    p.add_argument("-g", "--gen-tokens", type=int, default=None,
                   help="default: the run's -g (run dir), else 64")
    p.add_argument("--temperature", type=float, default=None,
                   help="default: the run's (run dir), else 1.0")
    p.add_argument("--top-k", type=int, default=None, help="0 = no top-k filtering; default: "
                   "the run's (run dir), else 0")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--tokenizer", default="", metavar="FILE",
                   help="decode with llm.c's tokenizer file (gpt2_tokenizer.bin, as llm.c's "
                   "trainer prints its samples) instead of the built-in GPT-2 BPE; without "
                   "--prompt the samples start from its EOT (a --prompt is still encoded "
                   "with the built-in GPT-2 BPE)")
    p.add_argument("--engine", default="auto")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    run = (saved_run_config(a.checkpoint) or {}).get("settings", {})
    for name, fallback in (("gen_tokens", 64), ("temperature", 1.0), ("top_k", 0)):
        if getattr(a, name) is None:
            setattr(a, name, run.get(name, fallback))
    if a.gen_tokens < 1:
        raise LlmpyError(f"-g/--gen-tokens: expected >= 1, got {a.gen_tokens}")
    if a.num_samples < 1:
        raise LlmpyError(f"--num-samples: expected >= 1, got {a.num_samples}")
    engine, where = build_engine(a.checkpoint, a.engine, a.device, flag="MODEL")
    tok = _file_tokenizer(a.tokenizer, engine.config, not a.prompt) if a.tokenizer \
        else get_tokenizer()
    print(f"llmpy sample: model {where}", file=sys.stderr, flush=True)
    # llm.c's trainer starts its samples from the tokenizer file's EOT
    eot = tok.eot if a.tokenizer else EOT
    prompt = [eot] if a.tokenizer and not a.prompt else prompt_ids(a.prompt, engine.config)
    rows = generate(engine, prompt, a.gen_tokens, temperature=a.temperature,
                    top_k=a.top_k or None, seed=a.seed, num_samples=a.num_samples)
    for i, row in enumerate(rows):
        if a.num_samples > 1:
            print(f"--- sample {i}")
        print(a.prompt + detokenize(tok, row, eot))
    return 0
