"""Data loaders (llmpy/data/loader.py): coverage across ranks, shuffling, resume, bad shards,
and the HellaSwag-style EvalLoader."""

import numpy as np
import pytest

from llmpy.data.loader import DistributedDataLoader, EvalLoader
from llmpy.errors import FormatError, LlmpyError
from llmpy.formats import write_eval, write_shard

B, T = 3, 7  # odd sizes catch off-by-one windows
SHARD_SIZES = (700, 431, 1000)  # uneven, with tails that get dropped


def make_shards(d, sizes=SHARD_SIZES):
    """Shards whose tokens are their global position: token value -> (shard, offset)."""
    start = 0
    for i, n in enumerate(sizes):
        write_shard(d / f"tok_train_{i:06d}.bin", np.arange(start, start + n))
        start += n
    return str(d / "tok_train_*.bin")


def shard_start(shard):
    return sum(SHARD_SIZES[:shard])


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_ranks_cover_each_epoch_without_overlap_or_gap(tmp_path, world, shuffle):
    pattern = make_shards(tmp_path)
    loaders = [DistributedDataLoader(pattern, B, T, r, world, shuffle=shuffle)
               for r in range(world)]
    # one process with world x accumulation: the same stream (issue 16)
    single = DistributedDataLoader(pattern, B, T, shuffle=shuffle, step_samples=world)
    steps = loaders[0].batches_per_epoch
    seen = []
    for _ in range(steps):
        batches = [ld.next_batch() for ld in loaders]
        for r, (x, y) in enumerate(batches):
            assert x.shape == y.shape == (B, T) and x.dtype == np.int32
            np.testing.assert_array_equal(y, x + 1)  # targets are the next tokens
            if not shuffle:  # llm.c's layout: consecutive windows of one global sample
                assert x[0, 0] == batches[0][0][0, 0] + r * B * T
            np.testing.assert_array_equal(x, single.next_batch()[0])
            seen.append(x.ravel())
    seen = np.sort(np.concatenate(seen))
    expected = []
    for s, n in enumerate(SHARD_SIZES):
        used = (n - 1) // (world * B * T) * world * B * T  # the tail is dropped
        expected.append(shard_start(s) + np.arange(used))
    np.testing.assert_array_equal(seen, np.concatenate(expected))
    assert all(ld.epoch == 1 and ld.shard_idx == 0 and ld.sample_idx == 0 for ld in loaders)


def test_shuffle_is_seeded_and_per_epoch(tmp_path):
    pattern = make_shards(tmp_path)

    def epoch_firsts(seed, shuffle=True):
        ld = DistributedDataLoader(pattern, B, T, shuffle=shuffle, seed=seed)
        n = ld.batches_per_epoch
        return [[int(ld.next_batch()[0][0, 0]) for _ in range(n)] for _ in range(2)]

    a0, a1 = epoch_firsts(42)
    assert epoch_firsts(42) == [a0, a1]
    assert a0 != a1 and sorted(a0) == sorted(a1)  # reshuffled each epoch, same samples
    assert epoch_firsts(7)[0] != a0
    plain = epoch_firsts(42, shuffle=False)
    assert plain[0] == plain[1] == sorted(plain[0]) != a0


def _take(loader, n):
    return [loader.next_batch() for _ in range(n)]


@pytest.mark.parametrize("shuffle", [False, True])
def test_state_roundtrip_across_shard_and_epoch_boundaries(tmp_path, shuffle):
    pattern = make_shards(tmp_path)
    world = 2
    ref = DistributedDataLoader(pattern, B, T, 1, world, shuffle=shuffle)
    ref0 = DistributedDataLoader(pattern, B, T, 0, world, shuffle=shuffle)
    per_epoch = ref.batches_per_epoch
    first_shard = ref.shard_samples[int(ref.shard_order(0)[0])] // world  # batches
    # stop just before / at a shard boundary, before / at / after an epoch boundary
    for k in (first_shard - 1, first_shard, per_epoch - 1, per_epoch, per_epoch + 3):
        ref.reset()
        ref0.reset()
        _take(ref, k)
        _take(ref0, k)
        state = ref.state_dict()
        assert all(isinstance(v, int) for v in state.values())
        expected = {1: _take(ref, per_epoch + 2),  # crosses shard and epoch boundaries
                    0: _take(ref0, per_epoch + 2)}
        for rank in (1, 0):  # any rank's state continues that rank's own sequence
            fresh = DistributedDataLoader(pattern, B, T, rank, world, shuffle=shuffle)
            fresh.load_state_dict(dict(state))
            got = _take(fresh, per_epoch + 2)
            if rank == 0 and not shuffle:  # llm.c's layout: the window before rank 1's
                assert all(np.array_equal(x + B * T, x1) for (x, _), (x1, _) in
                           zip(got, expected[1]))
            for (x0, y0), (x1, y1) in zip(expected[rank], got):
                np.testing.assert_array_equal(x0, x1)
                np.testing.assert_array_equal(y0, y1)


def test_state_mismatch_is_an_error(tmp_path):
    pattern = make_shards(tmp_path)
    state = DistributedDataLoader(pattern, B, T).state_dict()
    with pytest.raises(LlmpyError, match="B was 3"):
        DistributedDataLoader(pattern, B + 1, T).load_state_dict(state)
    with pytest.raises(LlmpyError, match="sample_idx"):
        DistributedDataLoader(pattern, B, T).load_state_dict({**state, "sample_idx": 10**6})


def test_permutations_for_llmc_state(tmp_path):
    pattern = make_shards(tmp_path)
    assert DistributedDataLoader(pattern, B, T).permutations() == (None, None)
    ld = DistributedDataLoader(pattern, B, T, shuffle=True)
    shards, samples = ld.permutations()
    assert sorted(shards) == [0, 1, 2] and samples.dtype == np.int32
    assert sorted(samples) == list(range(ld.shard_samples[shards[0]]))


def test_reads_through_a_memmap(tmp_path):
    ld = DistributedDataLoader(make_shards(tmp_path), B, T)
    ld.next_batch()
    assert isinstance(ld._tokens, np.memmap)


def test_no_match_names_the_pattern(tmp_path):
    with pytest.raises(LlmpyError, match="nothing_here_"):
        DistributedDataLoader(str(tmp_path / "nothing_here_*.bin"), B, T)


@pytest.mark.parametrize("damage", ["truncated", "magic", "too_small"])
def test_bad_shard_fails_up_front_naming_the_file(tmp_path, damage):
    pattern = make_shards(tmp_path)
    bad = tmp_path / "tok_train_000001.bin"
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:-2])
    elif damage == "magic":
        bad.write_bytes(np.int32(20240326).tobytes() + bad.read_bytes()[4:])
    else:
        write_shard(bad, np.arange(2 * B * T))  # world*B*T+1 tokens needed
    with pytest.raises(FormatError, match="tok_train_000001.bin"):
        DistributedDataLoader(pattern, B, T, 0, 2)


# ----------------------------------------------------------------------------------------
# EvalLoader

def make_examples(n):
    """Example i: context of 2 + i % 3 tokens, endings of 1..4 tokens, label i % 4."""
    out = []
    for i in range(n):
        base = 100 * (i + 1)
        ctx = list(range(base, base + 2 + i % 3))
        endings = [[base + 50 + 10 * c + j for j in range(c + 1)] for c in range(4)]
        out.append({"label": i % 4, "ctx": ctx, "endings": endings})
    return out


def test_eval_batches_masks_and_labels(tmp_path):
    examples = make_examples(5)
    write_eval(tmp_path / "eval.bin", examples)
    ev = EvalLoader(tmp_path / "eval.bin", B=8, T=9)
    assert ev.num_batches == 3
    batches = list(ev)
    assert [b.num_examples for b in batches] == [2, 2, 1]
    assert batches[2].labels.tolist() == [examples[4]["label"], -1]
    assert not batches[2].mask[4:].any()
    for k, batch in enumerate(batches):
        assert batch.inputs.shape == batch.targets.shape == batch.mask.shape == (8, 9)
        for i in range(batch.num_examples):
            ex = examples[2 * k + i]
            assert batch.labels[i] == ex["label"]
            for c, end in enumerate(ex["endings"]):
                row, n = 4 * i + c, len(ex["ctx"]) + len(end)
                assert batch.inputs[row, :n].tolist() == ex["ctx"] + end
                assert not batch.inputs[row, n:].any()
                np.testing.assert_array_equal(batch.targets[row, :n - 1],
                                              batch.inputs[row, 1:n])
                # mask is 1 exactly where the target is an ending token
                assert batch.targets[row][batch.mask[row] == 1].tolist() == end
                assert batch.mask[row].sum() == len(end)
    # the first row of example 0: ctx [100, 101], ending 0 = [150]
    np.testing.assert_array_equal(batches[0].mask[0], [0, 1, 0, 0, 0, 0, 0, 0, 0])


def test_eval_scoring(tmp_path):
    examples = make_examples(3)
    write_eval(tmp_path / "eval.bin", examples)
    batch = EvalLoader(tmp_path / "eval.bin", B=16, T=12).next_batch()
    losses = np.ones((16, 12), dtype=np.float32)
    for i, ex in enumerate(examples):
        losses[4 * i + ex["label"]] = 0.5  # the right ending is the most likely
    losses[4 * 2 + 3] = 0.1                # ...except in example 2
    assert batch.predictions(losses).tolist() == [0, 1, 3, -1]
    assert batch.num_correct(losses) == 2


@pytest.mark.parametrize("world", [2, 3])
def test_eval_ranks_split_contiguously(tmp_path, world):
    examples = make_examples(7)
    write_eval(tmp_path / "eval.bin", examples)
    seen, num_batches = [], set()
    for r in range(world):
        ev = EvalLoader(tmp_path / "eval.bin", B=4, T=12, rank=r, world=world)
        num_batches.add(ev.num_batches)
        for batch in ev:
            seen += [int(batch.inputs[4 * i, 0]) for i in range(batch.num_examples)]
    assert len(num_batches) == 1  # every rank runs the same number of batches
    assert seen == [ex["ctx"][0] for ex in examples]  # each example once, in order


def test_eval_crops_long_context_from_the_left(tmp_path):
    ex = {"label": 1, "ctx": list(range(1, 11)), "endings": [[20], [21, 22], [23], [24]]}
    write_eval(tmp_path / "eval.bin", [ex])
    batch = EvalLoader(tmp_path / "eval.bin", B=4, T=6).next_batch()
    assert batch.inputs[1].tolist() == [7, 8, 9, 10, 21, 22]
    assert batch.targets[1][batch.mask[1] == 1].tolist() == [21, 22]
    with pytest.raises(LlmpyError, match="ending of 2 tokens"):
        EvalLoader(tmp_path / "eval.bin", B=4, T=2)


def test_eval_bad_batch_size(tmp_path):
    write_eval(tmp_path / "eval.bin", make_examples(2))
    with pytest.raises(LlmpyError, match="multiple of 4"):
        EvalLoader(tmp_path / "eval.bin", B=6, T=16)


def test_resume_llmc_position_is_the_sample_after_the_last_drawn(tmp_path):
    """llm.c's state header holds the last sample drawn (size_t -1 when none of the shard):
    the next batch is the one after it, across a shard boundary too."""
    make_shards(tmp_path)
    ref = DistributedDataLoader(tmp_path / "*.bin", 2, 5)
    seq = [ref.next_batch()[0] for _ in range(sum(ref.shard_samples) + 1)]
    n0 = ref.shard_samples[0]
    for shard_idx, sample_idx, expect in [(0, 0, 1), (0, n0 - 1, n0), (1, 2**64 - 1, n0),
                                          (1, 0, n0 + 1)]:
        dl = DistributedDataLoader(tmp_path / "*.bin", 2, 5)
        dl.resume_llmc(shard_idx, sample_idx)
        assert np.array_equal(dl.next_batch()[0], seq[expect])
    with pytest.raises(LlmpyError, match="sample index"):
        DistributedDataLoader(tmp_path / "*.bin", 2, 5).resume_llmc(0, n0)


def _steps(pattern, world, G, shuffle, n, state=None):
    """The tokens of n optimizer steps of G samples, from `world` ranks (G/world each)."""
    lds = [DistributedDataLoader(pattern, B, T, r, world, shuffle=shuffle, step_samples=G)
           for r in range(world)]
    for ld in lds:
        if state is not None:
            ld.load_state_dict(dict(state))
    out = [sorted(int(ld.next_batch()[0][0, 0]) for ld in lds for _ in range(G // world))
           for _ in range(n)]
    return out, lds[0].state_dict()


@pytest.mark.parametrize("shuffle", [False, True])
def test_global_batches_do_not_depend_on_the_process_count(tmp_path, shuffle):
    """Issue 16: 1, 2 and 4 ranks at one total batch see the same samples in the same steps,
    across shard and epoch boundaries, and a state saved by 2 ranks continues that stream on
    1 and on 4."""
    pattern = make_shards(tmp_path)
    G = 4
    ref, _ = _steps(pattern, 1, G, shuffle, 30)
    assert _steps(pattern, 2, G, shuffle, 30)[0] == ref == _steps(pattern, 4, G, shuffle, 30)[0]
    _, state = _steps(pattern, 2, G, shuffle, 7)
    for world in (1, 4):
        assert _steps(pattern, world, G, shuffle, 23, state)[0] == ref[7:]
    with pytest.raises(LlmpyError, match="step_samples was 4"):
        _steps(pattern, 1, 2, shuffle, 1, state)


def test_old_loader_states_resume_or_are_refused(tmp_path):
    """Version-1 states (samples of world*B*T tokens): exact without shuffling, one line
    with it."""
    pattern = make_shards(tmp_path)
    old = {"epoch": 0, "shard_idx": 1, "sample_idx": 3, "B": B, "T": T, "world": 2,
           "shuffle": 0, "seed": 42, "num_shards": 3}
    ld = DistributedDataLoader(pattern, B, T)
    ld.load_state_dict(old)
    assert ld.next_batch()[0][0, 0] == shard_start(1) + 3 * 2 * B * T
    with pytest.raises(LlmpyError, match="older llm.py"):
        DistributedDataLoader(pattern, B, T, shuffle=True).load_state_dict({**old, "shuffle": 1})


def test_resume_llmc_with_several_processes(tmp_path):
    """llm.c's header counts samples of nproc*B*T tokens."""
    pattern = make_shards(tmp_path)
    ld = DistributedDataLoader(pattern, B, T)
    ld.resume_llmc(0, 4, nproc=2)
    assert ld.next_batch()[0][0, 0] == 5 * 2 * B * T
