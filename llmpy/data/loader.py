"""Data loaders: llm.c's sharded, distributed training loader and its HellaSwag eval loader.

Mirrors llmc/dataloader.h (DataLoader, EvalLoader). Shards are llm.c token files (uint16,
magic 20240520) opened as memmaps, so a batch reads only its own B*T+1 tokens.

Differences from llm.c, on purpose:
- The shuffle is a pure function of (seed, epoch, shard): every rank draws the same shard
  order and the same sample order, so the ranks read disjoint windows of one global sample.
  (llm.c seeds each rank with 42 + rank, so ranks can read overlapping windows.)
- The loader state is three integers (epoch, shard_idx, sample_idx) that are the same on
  every rank; loading it replays the exact batch sequence, shuffled or not.
- EvalLoader crops an example's context from the left when context + ending exceeds T
  (llm.c asserts); endings longer than T-1 tokens are an error.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import numpy as np

from ..errors import FormatError, LlmpyError
from ..formats import open_shard, read_eval, shard_num_tokens

# Tags that keep the shard-order and sample-order random streams apart.
_SHARD_STREAM, _SAMPLE_STREAM = 1, 2


def _check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise LlmpyError(f"data loader: {name} must be an integer >= {lo}, got {value!r}")
    return int(value)


class DistributedDataLoader:
    """Batches (x, y) of shape (B, T) from the token shards matching `pattern`.

    One global sample is world*B*T consecutive tokens of a shard; rank r reads the B*T+1
    tokens starting at sample_start + r*B*T, so x = window[:-1] and y = window[1:]. Each
    shard holds (ntok - 1) // (world*B*T) samples (the tail is dropped). After the last
    shard the loader wraps to the first and `epoch` goes up by one. With shuffle=True the
    shard order and the sample order inside each shard are re-drawn every epoch.
    """

    def __init__(self, pattern, B: int, T: int, rank: int = 0, world: int = 1,
                 shuffle: bool = False, seed: int = 42, vocab_size: int | None = None):
        self.vocab_size = vocab_size  # token ids are checked against it batch by batch
        self.B, self.T = _check_int("B", B, 1), _check_int("T", T, 1)
        self.world = _check_int("world", world, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.world:
            raise LlmpyError(f"data loader: rank {rank} must be < world {world}")
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
        self.sample_tokens = self.world * self.B * self.T
        self.shard_tokens = [shard_num_tokens(f) for f in self.files]
        self.shard_samples = [(n - 1) // self.sample_tokens for n in self.shard_tokens]
        for f, n, s in zip(self.files, self.shard_tokens, self.shard_samples):
            if s < 1:
                raise FormatError(f, "num_tokens", f">= {self.sample_tokens + 1} (one window of "
                                  f"world*B*T+1 = {self.world}*{self.B}*{self.T}+1 tokens)", n,
                                  "use a smaller B or T, fewer ranks, or larger shards")
        self.reset()

    @property
    def num_shards(self) -> int:
        return len(self.files)

    @property
    def batches_per_epoch(self) -> int:
        """Global samples per epoch: every rank takes this many batches per epoch."""
        return sum(self.shard_samples)

    @property
    def tokens_per_epoch(self) -> int:
        """Tokens all ranks together consume in one epoch (world*B*T per batch)."""
        return self.batches_per_epoch * self.sample_tokens

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

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """(x, y), both (B, T) int32: inputs and next-token targets for this rank."""
        B, T = self.B, self.T
        shard = int(self._shards[self.shard_idx])
        if self._tokens is None:
            self._tokens = open_shard(self.files[shard])
            if len(self._tokens) != self.shard_tokens[shard]:
                raise FormatError(self.files[shard], "num_tokens", self.shard_tokens[shard],
                                  len(self._tokens), "the shard changed while training")
        start = int(self._samples[self.sample_idx]) * self.sample_tokens + self.rank * B * T
        window = np.array(self._tokens[start:start + B * T + 1], dtype=np.int32)  # (B*T+1,)
        if self.vocab_size and window.size and int(window.max()) >= self.vocab_size:
            at = start + int(window.argmax())
            raise FormatError(self.files[shard], f"token {at}", f"an id < V = {self.vocab_size}"
                              f" (the model's vocabulary)", int(window[at - start]),
                              "these shards were built for another vocabulary: use a model "
                              "with a larger V (-e) or rebuild the shards")
        x = window[:-1].reshape(B, T)  # (B, T)
        y = window[1:].reshape(B, T)   # (B, T)
        self._advance()
        return x, y

    def _advance(self) -> None:
        self.sample_idx += 1
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
        """Where the next batch comes from, plus the settings that must match on resume.
        Identical on every rank (the rank is not part of it)."""
        return {"epoch": self.epoch, "shard_idx": self.shard_idx, "sample_idx": self.sample_idx,
                "B": self.B, "T": self.T, "world": self.world, "shuffle": int(self.shuffle),
                "seed": self.seed, "num_shards": self.num_shards}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state_dict()` was taken (any rank's state will do). A state
        saved with another process count keeps its epoch and shard, and maps the sample index
        by tokens consumed (exact without shuffling; with shuffling the rest of that shard is
        drawn in this run's order)."""
        state = self._rescaled(state)
        mine = self.state_dict()
        for key in ("B", "T", "world", "shuffle", "seed", "num_shards"):
            if key in state and int(state[key]) != mine[key]:
                raise LlmpyError(f"data loader resume: {key} was {state[key]} when the state "
                                 f"was saved, but this run has {mine[key]}; resume with the "
                                 f"same -b/-t/process count/data (or start a fresh run)")
        try:
            epoch, shard_idx, sample_idx = (int(state[k]) for k in
                                            ("epoch", "shard_idx", "sample_idx"))
        except (KeyError, TypeError, ValueError):
            raise LlmpyError(f"data loader resume: state needs integer epoch, shard_idx and "
                             f"sample_idx, got {state!r}") from None
        if epoch < 0 or not 0 <= shard_idx < self.num_shards:
            raise LlmpyError(f"data loader resume: epoch {epoch}, shard_idx {shard_idx} out of "
                             f"range for {self.num_shards} shards")
        shard = int(self.shard_order(epoch)[shard_idx])
        if not 0 <= sample_idx < self.shard_samples[shard]:
            raise LlmpyError(f"data loader resume: sample_idx {sample_idx} out of range for "
                             f"{self.files[shard]} ({self.shard_samples[shard]} samples)")
        self._seek(epoch, shard_idx, sample_idx)

    def resume_llmc(self, shard_idx: int, sample_idx: int) -> None:
        """Continue after the position in an llm.c state file's header (its loader keeps the
        index of the last sample it drew, in shard `shard_idx`): the next batch is sample
        sample_idx + 1 of that shard, or the start of the next shard. Exact without
        shuffling; with shuffling the shard and sample orders are this loader's, not llm.c's
        mt19937 ones."""
        if not 0 <= shard_idx < self.num_shards:
            raise LlmpyError(f"llm.c state resume: shard index {shard_idx} out of range for "
                             f"{self.num_shards} shards of {self.pattern}")
        self._seek(0, shard_idx, 0)
        n = len(self._samples)
        if sample_idx == 2**64 - 1:  # llm.c's (size_t) -1: nothing drawn from this shard yet
            sample_idx = -1
        if not -1 <= sample_idx < n:
            raise LlmpyError(f"llm.c state resume: sample index {sample_idx} out of range for "
                             f"shard {shard_idx} ({n} samples of {self.sample_tokens} tokens)")
        self.sample_idx = sample_idx
        self._advance()

    def _rescaled(self, state: dict) -> dict:
        if int(state.get("world", self.world)) == self.world:
            return state
        try:
            old_tokens = (int(state["sample_idx"]) * int(state["world"]) * int(state["B"]) *
                          int(state["T"]))
            epoch, shard_idx = int(state["epoch"]), int(state["shard_idx"])
        except (KeyError, TypeError, ValueError):
            raise LlmpyError(f"data loader resume: state needs integer epoch, shard_idx, "
                             f"sample_idx, world, B and T, got {state!r}") from None
        if epoch < 0 or not 0 <= shard_idx < self.num_shards:
            raise LlmpyError(f"data loader resume: epoch {epoch}, shard_idx {shard_idx} out of "
                             f"range for {self.num_shards} shards")
        shard = int(self.shard_order(epoch)[shard_idx])
        sample_idx = min(old_tokens // self.sample_tokens, self.shard_samples[shard] - 1)
        return dict(state, world=self.world, B=self.B, T=self.T, sample_idx=sample_idx)

    def permutations(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(shard order, sample order of the current shard) as int32, for llm.c's state
        file; (None, None) without shuffling."""
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

    def __init__(self, path, B: int, T: int, rank: int = 0, world: int = 1):
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
