"""Data loaders: llm.c's sharded, distributed training loader and its HellaSwag eval loader.

Mirrors llmc/dataloader.h (DataLoader, EvalLoader). Shards are llm.c token files (uint16,
magic 20240520) opened as memmaps, so a batch reads only its own B*T+1 tokens.

Differences from llm.c, on purpose:
- A sample is B*T tokens (llm.c: nproc*B*T), and the shuffle permutes those samples. One
  optimizer step takes `step_samples` = total batch / (B*T) consecutive samples of the
  stream; on call c rank r reads sample c*world + r. So the sequence of global batches
  depends on the seed, B*T and the total batch only: 1 rank with 4x accumulation, 2 ranks
  with 2x and 4 ranks with 1x see the same tokens in the same steps, shuffled or not.
  (llm.c's order depends on the process count, and it seeds each rank with 42 + rank.)
- The shuffle is a pure function of (seed, epoch, shard), the same on every rank. Each shard
  keeps a multiple of step_samples samples (the tail is dropped), so a step never straddles
  two shards or two epochs.
- The loader state is three integers (epoch, shard_idx, sample_idx), the same on every rank;
  loading it replays the exact batch sequence, shuffled or not, on any process count that
  divides step_samples.
- EvalLoader crops an example's context from the left when context + ending exceeds T
  (llm.c asserts); endings longer than T-1 tokens are an error.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import numpy as np

from ..errors import BadToken, FormatError, LlmpyError
from ..formats import open_shard, read_eval, shard_num_tokens

# Tags that keep the shard-order and sample-order random streams apart.
_SHARD_STREAM, _SAMPLE_STREAM = 1, 2


def _check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise LlmpyError(f"data loader: {name} must be an integer >= {lo}, got {value!r}")
    return int(value)


class DistributedDataLoader:
    """Batches (x, y) of shape (B, T) from the token shards matching `pattern`.

    A sample is B*T consecutive tokens of a shard: window = B*T+1 tokens from its start,
    x = window[:-1], y = window[1:]. Each shard holds (ntok - 1) // (B*T) samples, rounded
    down to a multiple of `step_samples` (the samples of one optimizer step, all ranks and
    micro-steps together; default `world`). Call c of rank r reads sample c*world + r of the
    stream. After the last shard the loader wraps to the first and `epoch` goes up by one.
    With shuffle=True the shard order and the sample order inside each shard are re-drawn
    every epoch.
    """

    STATE_VERSION = 2  # 1 (no "version" key): samples of world*B*T tokens

    def __init__(self, pattern, B: int, T: int, rank: int = 0, world: int = 1,
                 shuffle: bool = False, seed: int = 42, step_samples: int | None = None,
                 vocab_size: int | None = None):
        self.vocab_size = vocab_size  # token ids are checked against it batch by batch
        self.B, self.T = _check_int("B", B, 1), _check_int("T", T, 1)
        self.world = _check_int("world", world, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.world:
            raise LlmpyError(f"data loader: rank {rank} must be < world {world}")
        self.step_samples = _check_int("step_samples", step_samples or self.world, 1)
        if self.step_samples % self.world:
            raise LlmpyError(f"data loader: step_samples {self.step_samples} (total batch / "
                             f"B*T) must be a multiple of the process count {self.world}")
        self.shuffle, self.seed = bool(shuffle), _check_int("seed", seed, 0)
        self.pattern = str(pattern)
        if os.path.isdir(os.path.expanduser(self.pattern)):
            raise LlmpyError(f"data loader: {self.pattern!r} is a directory; expected a glob "
                             f"of token shards in it, e.g. '{self.pattern.rstrip('/')}/"
                             f"*_train_*.bin' for -i or '*_val_*.bin' for -j")
        self.files = sorted(glob.glob(os.path.expanduser(self.pattern)))
        if not self.files:
            raise LlmpyError(f"data loader: no token shards match {self.pattern!r} (build them "
                             f"with `llmpy data ...`, or check the -i/-j pattern)")
        # Validate every shard now, so a bad file fails before training starts.
        self.sample_tokens = self.B * self.T
        G = self.step_samples
        self.shard_tokens = [shard_num_tokens(f) for f in self.files]
        self.shard_samples = [(n - 1) // self.sample_tokens // G * G for n in self.shard_tokens]
        for f, n, s in zip(self.files, self.shard_tokens, self.shard_samples):
            if s < 1:
                raise FormatError(f, "num_tokens", f">= {G * self.sample_tokens + 1} (one step "
                                  f"of {G} samples of B*T = {self.B}*{self.T} tokens, +1)", n,
                                  "use a smaller B, T or total batch, or larger shards")
        self.reset()

    @property
    def num_shards(self) -> int:
        return len(self.files)

    @property
    def batches_per_epoch(self) -> int:
        """Batches every rank takes per epoch (samples per epoch / world)."""
        return sum(self.shard_samples) // self.world

    @property
    def tokens_per_epoch(self) -> int:
        """Tokens all ranks together consume in one epoch (B*T per sample)."""
        return sum(self.shard_samples) * self.sample_tokens

    # ---- position and shuffling ----------------------------------------------------------

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, *key]))

    def shard_order(self, epoch: int) -> np.ndarray:
        """Shard file indices in the order epoch `epoch` visits them."""
        if not self.shuffle:
            return np.arange(self.num_shards)
        return self._rng(_SHARD_STREAM, epoch).permutation(self.num_shards)

    def sample_order(self, epoch: int, shard: int) -> np.ndarray:
        """Sample indices of shard file `shard` in the order epoch `epoch` visits them."""
        n = self.shard_samples[shard]
        if not self.shuffle:
            return np.arange(n)
        return self._rng(_SAMPLE_STREAM, epoch, shard).permutation(n)

    def _seek(self, epoch: int, shard_idx: int, sample_idx: int) -> None:
        self.epoch, self.shard_idx, self.sample_idx = epoch, shard_idx, sample_idx
        self._shards = self.shard_order(epoch)
        self._enter_shard()

    def _enter_shard(self) -> None:
        shard = int(self._shards[self.shard_idx])
        self._samples = self.sample_order(self.epoch, shard)
        self._tokens = None  # opened on the next batch

    def reset(self) -> None:
        """Back to the first batch of epoch 0."""
        self._seek(0, 0, 0)

    # ---- batches -------------------------------------------------------------------------

    def next_batch_or_zeros(self):
        """(x, y, None) as next_batch(), or, where it meets a token id >= V, zeros of the
        batch's shape and that BadToken: with several ranks the one that met it runs the
        step's collectives on until all agree to stop (train.optimizer_step), where raising
        at once would leave the others waiting in a collective."""
        try:
            return (*self.next_batch(), None)
        except BadToken as e:
            zeros = np.zeros((self.B, self.T), dtype=np.int32)
            return zeros, zeros, e

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """(x, y), both (B, T) int32: inputs and next-token targets for this rank."""
        B, T = self.B, self.T
        shard = int(self._shards[self.shard_idx])
        if self._tokens is None:
            self._tokens = open_shard(self.files[shard])
            if len(self._tokens) != self.shard_tokens[shard]:
                raise FormatError(self.files[shard], "num_tokens", self.shard_tokens[shard],
                                  len(self._tokens), "the shard changed while training")
        start = int(self._samples[self.sample_idx + self.rank]) * self.sample_tokens
        window = np.array(self._tokens[start:start + B * T + 1], dtype=np.int32)  # (B*T+1,)
        if self.vocab_size and window.size and int(window.max()) >= self.vocab_size:
            at = start + int(window.argmax())
            raise BadToken(self.files[shard], f"token {at}", f"an id < V = {self.vocab_size}"
                              f" (the model's vocabulary)", int(window[at - start]),
                              "these shards were built for another vocabulary: use a model "
                              "with a larger V (-e) or rebuild the shards")
        x = window[:-1].reshape(B, T)  # (B, T)
        y = window[1:].reshape(B, T)   # (B, T)
        self._advance()
        return x, y

    def _advance(self) -> None:
        self.sample_idx += self.world  # shards hold a multiple of step_samples, so of world
        if self.sample_idx < len(self._samples):
            return
        self.sample_idx = 0
        self.shard_idx += 1
        if self.shard_idx < self.num_shards:
            self._enter_shard()
        else:
            self._seek(self.epoch + 1, 0, 0)

    def __iter__(self):
        while True:
            yield self.next_batch()

    # ---- resume --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Where the next step's samples come from, plus the settings that must match on
        resume. Identical on every rank and, between steps, on any process count."""
        return {"version": self.STATE_VERSION, "epoch": self.epoch,
                "shard_idx": self.shard_idx, "sample_idx": self.sample_idx, "B": self.B,
                "T": self.T, "world": self.world, "step_samples": self.step_samples,
                "shuffle": int(self.shuffle), "seed": self.seed, "num_shards": self.num_shards}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state_dict()` was taken (any rank's state will do), also
        with another process count, as long as the total batch (step_samples) is the same.
        A state of an older llm.py (version 1, samples of world*B*T tokens) resumes exactly
        without shuffling, and is refused with shuffling (its order cannot be reproduced)."""
        state = self._rescaled(state)
        mine = self.state_dict()
        for key, flag in (("B", "-b"), ("T", "-t"), ("step_samples", "-d / (B*T)"),
                          ("shuffle", "--shuffle"), ("seed", "--seed"),
                          ("num_shards", "the data")):
            if key in state and int(state[key]) != mine[key]:
                raise LlmpyError(f"data loader resume: {key} was {state[key]} when the state "
                                 f"was saved, but this run has {mine[key]}; resume with the "
                                 f"same {flag} (or start a fresh run)")
        epoch, shard_idx, sample_idx = self._position(state)
        shard = int(self.shard_order(epoch)[shard_idx])
        if not 0 <= sample_idx < self.shard_samples[shard]:
            raise LlmpyError(f"data loader resume: sample_idx {sample_idx} out of range for "
                             f"{self.files[shard]} ({self.shard_samples[shard]} samples)")
        if sample_idx % self.world:
            raise LlmpyError(f"data loader resume: sample_idx {sample_idx} is not a multiple "
                             f"of the process count {self.world}; resume on a process count "
                             f"that divides the samples per step ({self.step_samples})")
        self._seek(epoch, shard_idx, sample_idx)

    def _position(self, state: dict) -> tuple[int, int, int]:
        try:
            epoch, shard_idx, sample_idx = (int(state[k]) for k in
                                            ("epoch", "shard_idx", "sample_idx"))
        except (KeyError, TypeError, ValueError):
            raise LlmpyError(f"data loader resume: state needs integer epoch, shard_idx and "
                             f"sample_idx, got {state!r}") from None
        if epoch < 0 or not 0 <= shard_idx < self.num_shards:
            raise LlmpyError(f"data loader resume: epoch {epoch}, shard_idx {shard_idx} out of "
                             f"range for {self.num_shards} shards")
        return epoch, shard_idx, sample_idx

    def _at_sample(self, epoch: int, shard_idx: int, sample: int, what: str) -> None:
        """Seek to sample `sample` (B*T units) of a shard, or the next shard's start if the
        shard has no such sample (its tail was dropped)."""
        self._seek(epoch, shard_idx, 0)
        if sample >= len(self._samples):
            self.sample_idx = len(self._samples) - self.world
            self._advance()
        elif sample % self.world:
            raise LlmpyError(f"{what}: sample {sample} of {self.sample_tokens} tokens is not a "
                             f"multiple of the process count {self.world}; resume on the "
                             f"process count that wrote it")
        else:
            self.sample_idx = sample

    def resume_llmc(self, shard_idx: int, sample_idx: int, nproc: int = 1) -> None:
        """Continue after the position in an llm.c state file's header (its loader keeps the
        index of the last sample of nproc*B*T tokens it drew, in shard `shard_idx`): the next
        batch is sample sample_idx + 1 of that shard, or the start of the next shard. Exact
        without shuffling; with shuffling the shard and sample orders are this loader's, not
        llm.c's mt19937 ones."""
        if not 0 <= shard_idx < self.num_shards:
            raise LlmpyError(f"llm.c state resume: shard index {shard_idx} out of range for "
                             f"{self.num_shards} shards of {self.pattern}")
        n = (self.shard_tokens[int(self.shard_order(0)[shard_idx])] - 1) // (
            nproc * self.sample_tokens)
        if sample_idx == 2**64 - 1:  # llm.c's (size_t) -1: nothing drawn from this shard yet
            sample_idx = -1
        if not -1 <= sample_idx < n:
            raise LlmpyError(f"llm.c state resume: sample index {sample_idx} out of range for "
                             f"shard {shard_idx} ({n} samples of {nproc}*{self.sample_tokens} "
                             f"tokens)")
        self._at_sample(0, shard_idx, (sample_idx + 1) * nproc, "llm.c state resume")

    def _rescaled(self, state: dict) -> dict:
        """A version-1 state (samples of world*B*T tokens) as a version-2 one."""
        if int(state.get("version", 1)) >= self.STATE_VERSION:
            return state
        if int(state.get("shuffle", 0)):
            raise LlmpyError("data loader resume: this checkpoint was written by an older "
                             "llm.py whose shuffled order depended on the process count; it "
                             "cannot continue exactly: resume it with that llm.py, or start "
                             "a fresh run")
        try:
            old_world, old_bt = int(state["world"]), int(state["B"]) * int(state["T"])
        except (KeyError, TypeError, ValueError):
            raise LlmpyError(f"data loader resume: state needs integer world, B and T, got "
                             f"{state!r}") from None
        if old_bt != self.sample_tokens:
            return state  # the B/T check in load_state_dict names the mismatch
        epoch, shard_idx, sample_idx = self._position(state)
        self._at_sample(epoch, shard_idx, sample_idx * old_world, "data loader resume")
        return dict(self.state_dict(), B=state["B"], T=state["T"])

    def permutations(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(shard order, sample order of the current shard) as int32, for llm.c's state
        file; (None, None) without shuffling. The sample order is over samples of B*T
        tokens: llm.c reads it as its own (nproc*B*T) only for one process."""
        if not self.shuffle:
            return None, None
        return self._shards.astype(np.int32), self._samples.astype(np.int32)


# ----------------------------------------------------------------------------------------
# HellaSwag-style multiple-choice evals

NUM_COMPLETIONS = 4  # llm.c's ASSUMED_NUM_COMPLETIONS


@dataclass
class EvalBatch:
    """B/4 examples, 4 rows each (row 4*i + c = context + ending c of example i)."""
    inputs: np.ndarray   # (B, T) int32, right-padded with 0
    targets: np.ndarray  # (B, T) int32, right-padded with 0
    mask: np.ndarray     # (B, T) float32, 1 where targets[b, t] is a token of the ending
    labels: np.ndarray   # (B/4,) int64, the correct ending; -1 for empty slots
    num_examples: int    # real examples in this batch (the first ones); the rest is padding

    def predictions(self, losses: np.ndarray) -> np.ndarray:
        """(B/4,) ending with the lowest mean loss over its own tokens (-1 for empty slots),
        from per-position losses (B, T); ties go to the lower index, as in llm.c."""
        losses = np.asarray(losses, dtype=np.float64).reshape(self.mask.shape)
        count = self.mask.sum(axis=1)                                   # (B,)
        mean = (losses * self.mask).sum(axis=1) / np.maximum(count, 1)  # (B,)
        pred = mean.reshape(-1, NUM_COMPLETIONS).argmin(axis=1)         # (B/4,)
        return np.where(self.labels >= 0, pred, -1)

    def num_correct(self, losses: np.ndarray) -> int:
        return int(((self.predictions(losses) == self.labels) & (self.labels >= 0)).sum())


class EvalLoader:
    """Batches of a multiple-choice eval file (llm.c's HellaSwag format, magic 20240522).

    Examples are split across ranks in contiguous blocks, as in llm.c: with
    n = ceil(N / world), rank r takes examples [r*n, min((r+1)*n, N)). Every rank runs the
    same `num_batches` = ceil(n / (B/4)) batches; slots past a rank's last example are
    padding (mask 0, label -1), so collectives stay in step.
    """

    def __init__(self, path, B: int, T: int, rank: int = 0, world: int = 1,
                 vocab_size: int | None = None):
        self.B, self.T = _check_int("B", B, 1), _check_int("T", T, 2)
        self.world = _check_int("world", world, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.B % NUM_COMPLETIONS:
            raise LlmpyError(f"eval loader: B must be a multiple of {NUM_COMPLETIONS} (each "
                             f"example takes {NUM_COMPLETIONS} rows), got {B}")
        if self.rank >= self.world:
            raise LlmpyError(f"eval loader: rank {rank} must be < world {world}")
        self.path = str(path)
        examples = read_eval(path)
        for i, ex in enumerate(examples):
            n_end = len(ex["endings"])
            if n_end != NUM_COMPLETIONS:
                raise FormatError(path, f"example {i} completions", NUM_COMPLETIONS, n_end)
            if not ex["ctx"] or not all(ex["endings"]):
                raise FormatError(path, f"example {i}", "a non-empty context and endings",
                                  "an empty one")
            top = max(max(ex["ctx"]), *(max(e) for e in ex["endings"]))
            if vocab_size and top >= vocab_size:  # checked before any batch is scored
                raise BadToken(path, f"example {i} token", f"an id < V = {vocab_size} (the "
                               f"model's vocabulary)", top, "an eval file of another "
                               "vocabulary, or damaged: re-run `llmpy data hellaswag`")
            longest = max(len(e) for e in ex["endings"])
            if longest >= self.T:
                raise LlmpyError(f"eval loader: {path}: example {i} has an ending of {longest} "
                                 f"tokens; T={self.T} must exceed it (use a larger -t)")
        self.num_examples = len(examples)
        per_rank = -(-self.num_examples // self.world)
        self.start = min(self.rank * per_rank, self.num_examples)
        self.end = min(self.start + per_rank, self.num_examples)
        self.examples = examples[self.start:self.end]
        self.examples_per_batch = self.B // NUM_COMPLETIONS
        self.num_batches = -(-per_rank // self.examples_per_batch)
        self.reset()

    def reset(self) -> None:
        self.batch_idx = 0

    def next_batch(self) -> EvalBatch:
        B, T, E = self.B, self.T, self.examples_per_batch
        inputs = np.zeros((B, T), dtype=np.int32)   # (B, T)
        targets = np.zeros((B, T), dtype=np.int32)  # (B, T)
        mask = np.zeros((B, T), dtype=np.float32)   # (B, T)
        labels = np.full(E, -1, dtype=np.int64)     # (B/4,)
        first = self.batch_idx * E
        chunk = self.examples[first:first + E]
        for i, ex in enumerate(chunk):
            labels[i] = ex["label"]
            for c, end in enumerate(ex["endings"]):
                ctx = ex["ctx"][max(0, len(ex["ctx"]) + len(end) - T):]  # crop from the left
                row = np.array(ctx + end, dtype=np.int32)
                b = NUM_COMPLETIONS * i + c
                inputs[b, :len(row)] = row
                targets[b, :len(row) - 1] = row[1:]
                # position t predicts token t+1: the ending's tokens are targets at
                # positions len(ctx)-1 .. len(row)-2
                mask[b, len(ctx) - 1:len(row) - 1] = 1.0
        self.batch_idx = (self.batch_idx + 1) % max(self.num_batches, 1)
        return EvalBatch(inputs, targets, mask, labels, len(chunk))

    def __iter__(self):
        """All of this rank's batches once, from the start."""
        self.reset()
        for _ in range(self.num_batches):
            yield self.next_batch()
