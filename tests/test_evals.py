"""HellaSwag/MMLU scoring (llmpy/evals.py) and `llmpy eval`: a hand-built eval file whose
right answers are known, masks included; end to end on a tiny model, as an llm.c model
file and as a Hugging Face directory, against llm.c's Python reference scoring."""

import json
import random

import numpy as np
import pytest

from llmpy import cli
from llmpy.config import from_descriptor
from llmpy.data.hellaswag import build_hellaswag
from llmpy.data.loader import EvalLoader
from llmpy.data.mmlu import build_mmlu
from llmpy.engines import make_engine
from llmpy.evals import hellaswag_accuracy, multiple_choice_scores, token_losses
from llmpy.formats import write_eval, write_model
from llmpy.init import init_params

# ----------------------------------------------------------------------------------------
# a fake engine: the loss at a position depends only on the target token there

PAD = 0         # targets past the end of a row: if the mask let them in, shorter rows win
CTX = 7         # context tokens: if the mask let them in, shorter endings win
GOOD, MID, BAD, PLAIN = 11, 12, 13, 14
LOSS = {PAD: -100.0, CTX: -100.0, GOOD: 0.1, MID: 0.5, BAD: 50.0, PLAIN: 1.0}


class FakeEngine:
    def token_losses(self, inputs, targets):
        table = np.ones(50304, dtype=np.float32)
        for tok, loss in LOSS.items():
            table[tok] = loss
        return table[targets]


def ex(label, endings, ctx_len=3):
    return {"label": label, "ctx": [CTX] * ctx_len, "endings": endings}


EXAMPLES = [
    # the right ending is the only good one; ending 1 is short (most padding)
    ex(2, [[PLAIN, PLAIN], [PLAIN], [GOOD, GOOD, GOOD], [PLAIN, PLAIN]]),
    # the wrong endings' first token (predicted from the last context position) is awful:
    # the right one wins only if that position is in the mask
    ex(0, [[MID] * 3, [BAD] + [GOOD] * 9, [BAD] + [GOOD] * 9, [BAD] + [GOOD] * 9]),
    # with the context's low losses in the mean, the short wrong endings would win
    ex(3, [[PLAIN], [PLAIN], [PLAIN], [GOOD] * 4], ctx_len=5),
    # mean loss (acc_norm) picks the right ending 1, total loss (acc) picks ending 0
    ex(1, [[PLAIN], [MID] * 4, [PLAIN], [PLAIN]]),
    # a tie goes to the lowest index, as llm.c's argmin: wrong here
    ex(3, [[PLAIN] * 2] * 4),
]
ACC_NORM, ACC = 4 / 5, 3 / 5


@pytest.fixture
def eval_file(tmp_path):
    write_eval(tmp_path / "eval.bin", EXAMPLES)
    return tmp_path / "eval.bin"


@pytest.mark.parametrize("B,T", [(4, 16), (8, 13), (20, 32)])
def test_known_answers_and_masks(eval_file, B, T):
    loader = EvalLoader(eval_file, B, T)
    assert hellaswag_accuracy(FakeEngine(), loader) == pytest.approx(ACC_NORM)
    scores = multiple_choice_scores(FakeEngine(), loader)
    assert scores == {"acc_norm": pytest.approx(ACC_NORM), "acc": pytest.approx(ACC),
                      "examples": 5}
    preds = np.concatenate([b.predictions(FakeEngine().token_losses(b.inputs, b.targets))
                            for b in loader])
    assert preds[preds >= 0].tolist() == [2, 0, 3, 1, 0]


def test_ranks_add_up(eval_file):
    """Two ranks split the examples (3 + 2); their correct counts add to the whole."""
    correct = 0
    for rank in range(2):
        loader = EvalLoader(eval_file, 8, 16, rank=rank, world=2)
        correct += round(hellaswag_accuracy(FakeEngine(), loader) * len(loader.examples))
    assert correct == 4


def test_token_losses_match_cross_entropy_of_the_logits():
    """Every engine has token_losses (the engine contract); the numpy engine's equals the
    log-sum-exp of its own logits, done here in float64."""
    from llmpy.config import from_descriptor
    from llmpy.engines import make_engine
    rng = np.random.default_rng(0)
    engine = make_engine("numpy", from_descriptor("L=1,C=16,NH=2,T=8,V=300"), seed=3)
    inputs = rng.integers(0, 300, size=(4, 5))
    targets = rng.integers(0, 300, size=(4, 5))
    got = token_losses(engine, inputs, targets)
    z = engine.logits(inputs).astype(np.float64)
    want = np.log(np.exp(z).sum(-1)) - np.take_along_axis(z, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(got, want, rtol=1e-5)


# ----------------------------------------------------------------------------------------
# end to end: `llmpy eval hellaswag|mmlu` on a tiny model

TINY = "L=2,C=32,NH=2,T=48"
WORDS = "the a man woman dog runs jumps on roof pool weight lifts swims café 🙂 . , and".split()


def hellaswag_records(n=8, seed=3):
    rng = random.Random(seed)

    def sent(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))
    return [{"ind": i, "activity_label": "Test", "ctx_a": sent(6), "ctx_b": "he",
             "ctx": sent(6) + " he", "split": "val", "split_type": "indomain",
             "label": rng.randrange(4), "endings": [sent(rng.randint(1, 9)) for _ in range(4)],
             "source_id": f"x~{i}"} for i in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    config = from_descriptor(TINY)
    params = init_params(config, 7)
    write_model(d / "model.bin", config, params)
    recs = hellaswag_records()
    with open(d / "hellaswag_val.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    path, _ = build_hellaswag(d, [str(d / "hellaswag_val.jsonl")])
    return d, config, params, recs, path


def llmc_reference(model, records):
    """llm.c's dev/data/hellaswag.py evaluate(), written out: per example a (4, N) batch of
    ctx + " " + ending tokens, shifted cross-entropy, mask over the ending tokens."""
    import torch
    import torch.nn.functional as F

    from llmpy.tokenizer import get_tokenizer
    tok = get_tokenizer()
    preds, preds_norm, avgs = [], [], []
    for r in records:
        ctx = tok.encode(r["ctx"])
        rows = [ctx + tok.encode(" " + e) for e in r["endings"]]
        n = max(map(len, rows))
        tokens = torch.zeros((4, n), dtype=torch.long)
        mask = torch.zeros((4, n))
        for i, row in enumerate(rows):
            tokens[i, :len(row)] = torch.tensor(row)
            mask[i, len(ctx):len(row)] = 1
        with torch.no_grad():
            logits = model(tokens)
        losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).double(),
                                 tokens[:, 1:].reshape(-1), reduction="none").view(4, -1)
        m = mask[:, 1:]
        total = (losses * m).sum(1)
        avg = total / m.sum(1)
        preds.append(int(total.argmin()))
        preds_norm.append(int(avg.argmin()))
        avgs.append(avg.numpy())
    return preds, preds_norm, np.array(avgs)


def test_eval_matches_llmc_reference_scoring(tiny):
    """Our file + loader + masks + numpy engine give llm.c's per-ending mean losses and
    predictions, computed independently with torch from the same weights."""
    torch = pytest.importorskip("torch")
    from llmpy.hf import to_hf_tensors
    d, config, params, recs, path = tiny
    engine = make_engine("numpy", config)
    engine.set_params(params)
    loader = EvalLoader(path, 16, 48)
    avgs = []
    for b in loader:
        losses = token_losses(engine, b.inputs, b.targets).astype(np.float64)
        avgs.append((losses * b.mask).sum(1) / np.maximum(b.mask.sum(1), 1))
    avgs = np.concatenate(avgs)[:4 * len(recs)].reshape(-1, 4)

    tensors = {k: torch.from_numpy(v) for k, v in to_hf_tensors(config, params).items()}
    model = _torch_gpt2(tensors, config)
    preds, preds_norm, ref_avgs = llmc_reference(model, recs)
    np.testing.assert_allclose(avgs, ref_avgs, rtol=1e-4)  # fp32 engine vs fp64 loss
    scores = multiple_choice_scores(engine, loader)
    labels = [r["label"] for r in recs]
    assert scores["acc_norm"] == pytest.approx(np.mean(np.equal(preds_norm, labels)))
    assert scores["acc"] == pytest.approx(np.mean(np.equal(preds, labels)))


def _torch_gpt2(t, config):
    """A minimal GPT-2 forward from Hugging Face's state dict (Conv1D weights are (in, out)),
    independent of llm.py's engines."""
    import torch.nn.functional as F
    L, C, NH = config.num_layers, config.channels, config.num_heads

    def ln(x, name):
        return F.layer_norm(x, (C,), t[name + ".weight"], t[name + ".bias"], 1e-5)

    def model(idx):
        B, T = idx.shape
        x = t["transformer.wte.weight"][idx] + t["transformer.wpe.weight"][:T]
        for layer in range(L):
            p = f"transformer.h.{layer}."
            h = ln(x, p + "ln_1") @ t[p + "attn.c_attn.weight"] + t[p + "attn.c_attn.bias"]
            q, k, v = (z.view(B, T, NH, C // NH).transpose(1, 2) for z in h.split(C, dim=2))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            a = a.transpose(1, 2).reshape(B, T, C)
            x = x + a @ t[p + "attn.c_proj.weight"] + t[p + "attn.c_proj.bias"]
            h = ln(x, p + "ln_2") @ t[p + "mlp.c_fc.weight"] + t[p + "mlp.c_fc.bias"]
            h = F.gelu(h, approximate="tanh")
            x = x + h @ t[p + "mlp.c_proj.weight"] + t[p + "mlp.c_proj.bias"]
        return ln(x, "transformer.ln_f") @ t["transformer.wte.weight"].T
    return model


def _printed_accuracy(out, task):
    line = next(ln for ln in out.splitlines() if ln.startswith(f"{task} accuracy:"))
    return float(line.split()[2])


def test_llmpy_eval_hellaswag_model_file_and_hf_dir(tiny, capsys):
    d, config, params, recs, path = tiny
    engine = make_engine("numpy", config)
    engine.set_params(params)
    want = hellaswag_accuracy(engine, EvalLoader(path, 16, 48))
    args = ["--file", str(path), "-b", "16", "--engine", "numpy", "--device", "cpu"]
    assert cli.main(["eval", "hellaswag", str(d / "model.bin"), *args]) == 0
    out = capsys.readouterr().out
    assert _printed_accuracy(out, "hellaswag") == pytest.approx(want, abs=1e-4)
    assert f"({len(recs)} examples" in out and "acc (lowest total loss)" in out
    pytest.importorskip("safetensors")
    from llmpy.hf import export_hf
    export_hf(d / "model.bin", d / "hf")
    assert cli.main(["eval", "hellaswag", str(d / "hf"), *args]) == 0
    assert _printed_accuracy(capsys.readouterr().out, "hellaswag") == pytest.approx(want,
                                                                                    abs=1e-4)


def test_llmpy_eval_mmlu(tiny, tmp_path, capsys):
    d = tiny[0]
    recs = [{"question": f"What is {i} + {i}?", "subject": "math",
             "choices": [str(2 * i), str(i), "cat", "none of these"], "answer": 0}
            for i in range(5)]
    with open(tmp_path / "mmlu.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    path, _ = build_mmlu(tmp_path, [str(tmp_path / "mmlu.jsonl")])
    assert cli.main(["eval", "mmlu", str(d / "model.bin"), "--file", str(path), "--engine",
                     "numpy", "--device", "cpu", "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert 0.0 <= _printed_accuracy(out, "mmlu") <= 1.0 and "(3 examples" in out


def test_llmpy_eval_missing_file_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMPY_CACHE", str(tmp_path))
    assert cli.main(["eval", "mmlu", TINY]) == 2
    err = capsys.readouterr().err
    assert "llmpy data mmlu" in err and "Traceback" not in err
    assert cli.main(["eval", "hellaswag", TINY]) == 2
    assert "llmpy data hellaswag" in capsys.readouterr().err
