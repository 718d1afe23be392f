"""Dataset builders (llmpy/data/prepare.py, fineweb.py, tinystories.py, hellaswag.py,
mmlu.py) on small fixtures written in each dataset's real schema, all offline."""

import csv
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from llmpy import cli as llmpy_cli
from llmpy.data import cli
from llmpy.data.fineweb import build_fineweb
from llmpy.data.hellaswag import build_hellaswag
from llmpy.data.mmlu import build_mmlu
from llmpy.data.prepare import read_progress
from llmpy.data.tinystories import build_tinystories
from llmpy.errors import LlmpyError
from llmpy.formats import open_shard, read_eval, shard_num_tokens
from llmpy.tokenizer import get_tokenizer

EOT = 50256
WORDS = ("the quick brown fox jumps over lazy dog Rome data model café naïve 東京 🙂 "
         "don't we'll 1234 3.14 <|endoftext|> \n \n\n \t").split(" ")


def random_text(rng, n_words):
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def fineweb_docs(n=60, seed=0):
    """FineWeb records: a text field among the real ones; odd lengths, an empty text, a
    document longer than the small shard sizes used below."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        text = random_text(rng, rng.choice([0, 1, 7, 40, 150, 900] if i else [700]))
        docs.append({"text": text, "id": f"<urn:uuid:{i:08d}>", "dump": "CC-MAIN-2013-20",
                     "url": f"http://example.com/{i}", "date": "2013-05-18T07:24:47Z",
                     "file_path": "s3://commoncrawl/x.warc.gz", "language": "en",
                     "language_score": 0.9, "token_count": 0})
    return docs


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def reference_stream(texts):
    """llm.c's document encoding: EOT + encode_ordinary(text), concatenated."""
    tok = get_tokenizer()
    out = []
    for t in texts:
        out.append(EOT)
        out.extend(tok.encode(t))
    return np.array(out, dtype=np.uint16)


def shard_files(d, name="fineweb"):
    """The built files, in index order (val_000000 first)."""
    return sorted((p for p in d.iterdir() if p.name.startswith(name) and p.suffix == ".bin"),
                  key=lambda p: p.name.rsplit("_", 1)[-1])


def read_all(d, name="fineweb"):
    return {p.name: p.read_bytes() for p in shard_files(d, name)}


@pytest.fixture(scope="module")
def fineweb_input(tmp_path_factory):
    d = tmp_path_factory.mktemp("fineweb_in")
    docs = fineweb_docs()
    write_jsonl(d / "part_000.jsonl", docs[:35])
    write_jsonl(d / "part_001.jsonl", docs[35:])
    return d, reference_stream([r["text"] for r in docs])


SHARD = 1000  # tokens per shard in these tests (llm.c: 1e8)


def build(inp, out, **kw):
    kw.setdefault("shard_size", SHARD)
    kw.setdefault("workers", 0)
    return build_fineweb("fineweb", "10B", out, [str(inp / "part_*.jsonl")], progress=False, **kw)


@pytest.fixture(scope="module")
def fineweb_built(fineweb_input, tmp_path_factory):
    inp, ref = fineweb_input
    out = tmp_path_factory.mktemp("fineweb_out")
    res = build(inp, out)
    return out, res, ref


# ----------------------------------------------------------------------------------------
# FineWeb: names, headers, counts, split, boundaries

def test_fineweb_shards_follow_llmc(fineweb_built):
    out, res, ref = fineweb_built
    n = len(ref)
    num = -(-n // SHARD)
    names = [f"fineweb_val_{0:06d}.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, num)]
    assert [p.name for p in shard_files(out)] == names
    assert res["complete"] and res["tokens"] == n and len(res["shards"]) == num
    assert res["docs"] == 60
    for i, name in enumerate(names):
        ntok = min(SHARD, n - i * SHARD)  # full shards, then the remainder
        header = np.fromfile(out / name, dtype="<i4", count=256)
        assert list(header[:3]) == [20240520, 1, ntok] and not header[3:].any()
        assert (out / name).stat().st_size == 1024 + 2 * ntok
        np.testing.assert_array_equal(open_shard(out / name), ref[i * SHARD:i * SHARD + ntok])
    # every document starts with EOT, including the empty one; the long first document
    # (about 3 shards) is split across shard boundaries
    assert (ref == EOT).sum() == 60 and ref[0] == EOT
    assert open_shard(out / names[1])[0] != EOT


def test_fineweb_progress_records_docs_and_offsets(fineweb_built, fineweb_input):
    out, _, ref = fineweb_built
    state = read_progress(out / "fineweb_progress.json")
    assert state["complete"] and state["settings"]["shard_size"] == SHARD
    starts = np.flatnonzero(ref == EOT)            # every document starts with EOT
    ends = np.append(starts[1:], len(ref))
    for i, s in enumerate(state["shards"]):
        end = min((i + 1) * SHARD, len(ref))       # tokens written up to shard i's end
        docs = int((ends <= end).sum())            # documents written in full
        offset = end - starts[docs] if docs < 60 and starts[docs] < end else 0
        assert (s["docs"], s["offset"]) == (docs, offset)
    assert any(s["offset"] for s in state["shards"])  # some documents were split


def test_fineweb_process_pool_and_parquet_match(fineweb_built, fineweb_input, tmp_path):
    out, _, _ = fineweb_built
    inp, _ = fineweb_input
    build(inp, tmp_path / "pool", workers=2)
    assert read_all(tmp_path / "pool") == read_all(out)
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    docs = fineweb_docs()
    pq.write_table(pa.Table.from_pylist(docs[:20]), tmp_path / "a.parquet", row_group_size=7)
    pq.write_table(pa.Table.from_pylist(docs[20:]), tmp_path / "b.parquet")
    build_fineweb("fineweb", "10B", tmp_path / "pq", [str(tmp_path / "*.parquet")],
                  shard_size=SHARD, workers=0, progress=False)
    assert read_all(tmp_path / "pq") == read_all(out)


def test_shard_boundary_exactly_at_a_document_end(tmp_path):
    texts = ["hello world", "second doc here", "third"]
    write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    ref = reference_stream(texts)
    first = len(reference_stream(texts[:1]))
    res = build_fineweb("fineweb", "10B", tmp_path / "out", [str(tmp_path / "in.jsonl")],
                        shard_size=first, workers=0, progress=False)
    shards = [open_shard(p) for p, _ in res["shards"]]
    np.testing.assert_array_equal(np.concatenate(shards), ref)
    assert shards[0].tolist() == ref[:first].tolist() and shards[1][0] == EOT
    state = read_progress(tmp_path / "out" / "fineweb_progress.json")
    assert (state["shards"][0]["docs"], state["shards"][0]["offset"]) == (1, 0)


def test_edu_fineweb_names(fineweb_input, tmp_path):
    inp, ref = fineweb_input
    res = build_fineweb("edu_fineweb", "100B", tmp_path, [str(inp / "part_000.jsonl")],
                        shard_size=10**8, workers=0, progress=False)
    assert [p.name for p, _ in res["shards"]] == ["edu_fineweb_val_000000.bin"]
    assert (tmp_path / "edu_fineweb_progress.json").exists()


# ----------------------------------------------------------------------------------------
# FineWeb: resuming

@pytest.mark.parametrize("limit", [{"limit_tokens": 2345}, {"limit_docs": 13},
                                   {"limit_tokens": 3000}])
def test_limit_then_rerun_is_identical(fineweb_built, fineweb_input, tmp_path, limit):
    out, _, ref = fineweb_built
    inp, _ = fineweb_input
    res = build(inp, tmp_path, **limit)
    assert not res["complete"]
    if "limit_tokens" in limit:
        assert res["tokens"] == limit["limit_tokens"]
        got = np.concatenate([open_shard(p) for p, _ in res["shards"]])
        np.testing.assert_array_equal(got, ref[:limit["limit_tokens"]])
    else:
        assert (np.concatenate([open_shard(p) for p, _ in res["shards"]]) == EOT).sum() == 13
    res = build(inp, tmp_path)
    assert res["complete"] and read_all(tmp_path) == read_all(out)


KILL_SCRIPT = """
import os, signal, sys
from llmpy.data import prepare
from llmpy.data.fineweb import build_fineweb
write = prepare.ShardWriter.write
def write_then_die(self, tokens):
    write(self, tokens)
    if self.path.name.endswith("_000002.bin"):  # halfway through the third shard
        os.kill(os.getpid(), signal.SIGKILL)
prepare.ShardWriter.write = write_then_die
build_fineweb("fineweb", "10B", sys.argv[2], [sys.argv[1] + "/part_*.jsonl"],
              shard_size=int(sys.argv[3]), workers=0, progress=False)
"""


def test_killed_build_resumes_identically(fineweb_built, fineweb_input, tmp_path):
    out, _, _ = fineweb_built
    inp, _ = fineweb_input
    dest = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(inp), str(dest), str(SHARD)],
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    # two finished shards and the progress file survive, plus the killed shard's temp file
    assert [p.name for p in shard_files(dest)] == ["fineweb_val_000000.bin",
                                                   "fineweb_train_000001.bin"]
    assert len(read_progress(dest / "fineweb_progress.json")["shards"]) == 2
    assert any(p.name.endswith(".tmp") for p in dest.iterdir())
    before = (dest / "fineweb_val_000000.bin").stat().st_mtime_ns
    assert build(inp, dest)["complete"]
    assert read_all(dest) == read_all(out)
    assert (dest / "fineweb_val_000000.bin").stat().st_mtime_ns == before  # not rewritten
    assert not any(p.name.endswith(".tmp") for p in dest.iterdir())


def test_rerun_of_complete_build_is_a_noop(fineweb_built, fineweb_input):
    out, _, _ = fineweb_built
    inp, _ = fineweb_input
    stamps = {p.name: p.stat().st_mtime_ns for p in shard_files(out)}
    assert build(inp, out)["complete"]
    assert {p.name: p.stat().st_mtime_ns for p in shard_files(out)} == stamps


def test_damaged_shard_is_rebuilt_from_there(fineweb_built, fineweb_input, tmp_path):
    out, _, _ = fineweb_built
    inp, _ = fineweb_input
    build(inp, tmp_path)
    p = tmp_path / "fineweb_train_000002.bin"
    p.write_bytes(p.read_bytes()[:-2])
    before = (tmp_path / "fineweb_train_000001.bin").stat().st_mtime_ns
    assert build(inp, tmp_path)["complete"]
    assert read_all(tmp_path) == read_all(out)
    assert (tmp_path / "fineweb_train_000001.bin").stat().st_mtime_ns == before


def test_changed_settings_need_fresh(fineweb_input, tmp_path):
    inp, ref = fineweb_input
    build(inp, tmp_path)
    with pytest.raises(LlmpyError, match="shard_size.*--fresh"):
        build(inp, tmp_path, shard_size=2 * SHARD)
    res = build(inp, tmp_path, shard_size=2 * SHARD, fresh=True)
    assert len(res["shards"]) == -(-len(ref) // (2 * SHARD))
    assert len(shard_files(tmp_path)) == len(res["shards"])  # stale smaller shards removed


def test_fineweb_cli_and_bad_input(fineweb_input, tmp_path, capsys):
    inp, ref = fineweb_input
    assert cli.main(["fineweb", "--input", str(inp / "part_*.jsonl"), "--out", str(tmp_path),
                     "-s", "1e3", "-w", "0", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"{len(ref):,} tokens, complete" in printed
    assert sum(shard_num_tokens(p) for p in shard_files(tmp_path)) == len(ref)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no text field"}\n')
    assert llmpy_cli.main(["data", "fineweb", "--input", str(tmp_path / "bad.jsonl"), "--out",
                           str(tmp_path / "b"), "-w", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "'text'" in err and "--field" in err
    assert llmpy_cli.main(["data", "fineweb", "--input", str(tmp_path / "none*.jsonl")]) == 2


# ----------------------------------------------------------------------------------------
# TinyStories

def tinystories_files(d, sizes=(9, 12, 7)):
    """TinyStories_all_data/data*.json: json arrays of records with a `story` field."""
    rng = random.Random(5)
    d.mkdir(parents=True, exist_ok=True)
    stories = []
    for f, n in enumerate(sizes):
        recs = [{"story": "  " + random_text(rng, rng.randint(1, 60)) + " \n",
                 "instruction": {"prompt:": "Write a short story", "words": ["x"],
                                 "features": []},
                 "summary": "s", "source": "GPT-4"} for _ in range(n)]
        (d / f"data{f:02d}.json").write_text(json.dumps(recs))
        stories.append([r["story"] for r in recs])
    return stories


def tinystories_reference(stories):
    """llm.c: shuffle each file with Random(1337 + index inside its split), strip, EOT."""
    out = []
    for split in (stories[:1], stories[1:]):
        texts = []
        for i, s in enumerate(split):
            s = list(s)
            random.Random(1337 + i).shuffle(s)
            texts += [t.strip() for t in s]
        out.append(reference_stream(texts))
    return out  # val, train


@pytest.mark.parametrize("workers", [0, 2])
def test_tinystories_follows_llmc(tmp_path, workers):
    stories = tinystories_files(tmp_path / "TinyStories_all_data")
    val, train = tinystories_reference(stories)
    res = build_tinystories(tmp_path / "out", [str(tmp_path / "TinyStories_all_data/*.json")],
                            workers=workers, progress=False)
    assert res["complete"] and res["docs"] == 28
    (vp, vn), (tp, tn) = res["shards"]
    assert (vp.name, tp.name) == ("TinyStories_val.bin", "TinyStories_train.bin")
    assert (vn, tn) == (len(val), len(train))
    for path, ref in ((vp, val), (tp, train)):
        header = np.fromfile(path, dtype="<i4", count=256)
        assert list(header[:3]) == [20240520, 1, len(ref)] and not header[3:].any()
        np.testing.assert_array_equal(open_shard(path), ref)
    assert (val == EOT).sum() == 9 and (train == EOT).sum() == 19


def test_tinystories_limit_resume_and_noop(tmp_path):
    stories = tinystories_files(tmp_path / "in")
    val, train = tinystories_reference(stories)
    inp = [str(tmp_path / "in" / "*.json")]
    res = build_tinystories(tmp_path / "out", inp, limit_docs=5, workers=0, progress=False)
    assert not res["complete"] and res["docs"] == 10
    assert (open_shard(res["shards"][1][0]) == EOT).sum() == 5
    res = build_tinystories(tmp_path / "out", inp, workers=0, progress=False)
    assert res["complete"]
    np.testing.assert_array_equal(open_shard(res["shards"][0][0]), val)
    np.testing.assert_array_equal(open_shard(res["shards"][1][0]), train)
    stamps = [p.stat().st_mtime_ns for p, _ in res["shards"]]
    build_tinystories(tmp_path / "out", inp, workers=0, progress=False)
    assert [p.stat().st_mtime_ns for p, _ in res["shards"]] == stamps
    with pytest.raises(LlmpyError, match="at least 2 input files"):
        build_tinystories(tmp_path / "o2", [str(tmp_path / "in" / "data00.json")], workers=0)
    assert cli.main(["tinystories", "--input", *inp, "--out", str(tmp_path / "cli"), "-w", "0",
                     "--no-progress"]) == 0
    assert (tmp_path / "cli" / "TinyStories_train.bin").read_bytes() == \
        res["shards"][1][0].read_bytes()



def test_tinystories_never_replaces_a_file_it_did_not_write(tmp_path):
    """A TinyStories_train.bin that no progress file records (llm.c's, copied in) stops the
    build, --fresh or not; `llmpy data tinystories` as typed: one line, exit 2, file intact.
    The files it wrote itself (a --limit build included) it rebuilds as before."""
    tinystories_files(tmp_path / "in")
    inp = [str(tmp_path / "in" / "*.json")]
    out = tmp_path / "out"
    out.mkdir()
    theirs = b"llm.c wrote this"
    (out / "TinyStories_train.bin").write_bytes(theirs)
    with pytest.raises(LlmpyError, match="no progress file here records"):
        build_tinystories(out, inp, workers=0, progress=False)
    with pytest.raises(LlmpyError, match="TinyStories_train.bin"):
        build_tinystories(out, inp, workers=0, fresh=True, progress=False)
    r = subprocess.run([sys.executable, "-m", "llmpy", "data", "tinystories", "--input", *inp,
                        "--out", str(out), "-w", "0", "--no-progress"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "TinyStories_train.bin" in r.stderr and "move it away" in r.stderr
    assert (out / "TinyStories_train.bin").read_bytes() == theirs
    # its own partial build (--limit), then the full one and --fresh replace its own files
    mine = tmp_path / "mine"
    assert not build_tinystories(mine, inp, limit_docs=3, workers=0, progress=False)["complete"]
    assert build_tinystories(mine, inp, workers=0, progress=False)["complete"]
    assert build_tinystories(mine, inp, workers=0, fresh=True, progress=False)["complete"]


# ----------------------------------------------------------------------------------------
# HellaSwag

HELLASWAG = [  # rowanz/hellaswag jsonl records (the first is llm.c's docstring example)
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
     "ctx_b": "he", "ctx": "A man is sitting on a roof. he", "split": "val",
     "split_type": "indomain", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
     "source_id": "activitynet~v_-JhWjGDPHMY"},
    {"ind": 92, "activity_label": "Clean and jerk", "ctx_a": "A lady walks to a barbell.",
     "ctx_b": "she", "ctx": "A lady walks to a barbell. she", "split": "val",
     "split_type": "zeroshot", "label": 0,
     "endings": ["lifts the weight over her head.", "eats a 東京 café sandwich 🙂.",
                 "swims  across\nthe pool.", "is"],
     "source_id": "activitynet~v_x"},
    {"ind": 106, "activity_label": "Finance and Business", "ctx_a": "[header] How to save "
     "money [title] Make a budget.", "ctx_b": "", "ctx": "[header] How to save money [title] "
     "Make a budget.", "split": "val", "split_type": "indomain", "label": 2,
     "endings": ["[step] Spend it all.", "Don't.", "[step] Write down what you spend.",
                 "<|endoftext|> weird"], "source_id": "wikihow~1"},
]


def llmc_eval_bytes(examples):
    """llm.c's write_evalfile, written out independently: header, then per example the
    uint16 stream 65535, bytes, index, label, 4, ctx_len, ctx, (len, ending) x 4."""
    tok = get_tokenizer()
    stream, longest = [], 0
    for i, ex in enumerate(examples):
        ctx = tok.encode(ex["ctx"])
        ends = [tok.encode(" " + e) for e in ex["endings"]]
        body = [int(ex["label"]), 4, len(ctx), *ctx]
        for e in ends:
            body += [len(e), *e]
        nbytes = 2 * (3 + len(body))
        longest = max(longest, nbytes)
        stream += [65535, nbytes, i, *body]
    header = np.zeros(256, dtype="<i4")
    header[:4] = [20240522, 1, len(examples), longest]
    return header.tobytes() + np.array(stream, dtype="<u2").tobytes()


def test_hellaswag_eval_file_is_llmcs(tmp_path):
    write_jsonl(tmp_path / "hellaswag_val.jsonl", HELLASWAG)
    path, n = build_hellaswag(tmp_path / "out", [str(tmp_path / "hellaswag_val.jsonl")])
    assert (path.name, n) == ("hellaswag_val.bin", 3)
    assert path.read_bytes() == llmc_eval_bytes(HELLASWAG)
    tok = get_tokenizer()
    ex = read_eval(path)[0]
    assert ex["label"] == 3 and tok.decode(ex["ctx"]) == HELLASWAG[0]["ctx"]
    assert tok.decode(ex["endings"][3]) == " starts pulling up roofing on a roof."
    # --limit, and the Hugging Face parquet copy (labels as strings) gives the same file
    path, n = build_hellaswag(tmp_path / "lim", [str(tmp_path / "hellaswag_val.jsonl")],
                              limit=2)
    assert n == 2 and path.read_bytes() == llmc_eval_bytes(HELLASWAG[:2])
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    rows = [{**ex, "label": str(ex["label"]), "ind": str(ex["ind"])} for ex in HELLASWAG]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "val.parquet")
    path, _ = build_hellaswag(tmp_path / "pq", [str(tmp_path / "val.parquet")])
    assert path.read_bytes() == llmc_eval_bytes(HELLASWAG)


def test_hellaswag_bad_input(tmp_path, capsys):
    write_jsonl(tmp_path / "test.jsonl", [{**HELLASWAG[0], "label": ""}])
    with pytest.raises(LlmpyError, match="test split is unlabeled"):
        build_hellaswag(tmp_path, [str(tmp_path / "test.jsonl")])
    write_jsonl(tmp_path / "three.jsonl", [{**HELLASWAG[0], "endings": ["a", "b", "c"]}])
    assert llmpy_cli.main(["data", "hellaswag", "--input", str(tmp_path / "three.jsonl"),
                           "--out", str(tmp_path)]) == 2
    assert "4 text `endings`" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------
# MMLU

MMLU = [  # cais/mmlu records
    {"question": "Find the degree for the given field extension Q(sqrt(2)) over Q.",
     "subject": "abstract_algebra", "choices": ["0", "4", "2", "6"], "answer": 2},
    {"question": "Which of these is a mammal?", "subject": "biology",
     "choices": ["Shark", "Whale", "Trout", "Eel, or 1.50"], "answer": 1},
]


def test_mmlu_jsonl_csv_parquet_agree(tmp_path, capsys):
    write_jsonl(tmp_path / "mmlu.jsonl", MMLU)
    path, n = build_mmlu(tmp_path / "a", [str(tmp_path / "mmlu.jsonl")])
    assert (path.name, n) == ("mmlu_test.bin", 2)
    tok = get_tokenizer()
    exs = read_eval(path)
    for ex, rec in zip(exs, MMLU):
        assert ex["label"] == rec["answer"]
        assert ex["ctx"] == tok.encode(f"Question: {rec['question']}\n\nAnswer:")
        assert ex["endings"] == [tok.encode(" " + c) for c in rec["choices"]]
    # hendrycks' csv (no header, answer letter), which llm.c reads
    with open(tmp_path / "abstract_algebra_test.csv", "w", newline="") as f:
        w = csv.writer(f)
        for rec in MMLU:
            w.writerow([rec["question"], *rec["choices"], "ABCD"[rec["answer"]]])
    assert cli.main(["mmlu", "--input", str(tmp_path / "*.csv"), "--out",
                     str(tmp_path / "b")]) == 0
    assert "2 examples" in capsys.readouterr().out
    assert (tmp_path / "b" / "mmlu_test.bin").read_bytes() == path.read_bytes()
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(MMLU), tmp_path / "test-00000-of-00001.parquet")
    p2, _ = build_mmlu(tmp_path / "c", [str(tmp_path / "test-*.parquet")])
    assert p2.read_bytes() == path.read_bytes()


def test_workers_exit_with_the_build(fineweb_input, tmp_path):
    """The pool's processes are gone when a build returns, limited or not."""
    import multiprocessing
    inp, _ = fineweb_input
    build(inp, tmp_path, workers=2, limit_docs=5)
    assert not multiprocessing.active_children()


# ----------------------------------------------------------------------------------------
# the network paths, with the hub and GitHub faked (the code around them runs for real)

class FakeStream:
    """What datasets.load_dataset(..., streaming=True) returns: iterable, with skip(n)."""

    def __init__(self, rows, calls):
        self.rows, self.calls = rows, calls

    def skip(self, n):
        self.calls.append(("skip", n))
        return FakeStream(self.rows[n:], self.calls)

    def __iter__(self):
        return iter(self.rows)


def test_fineweb_from_the_hub_streams_and_resumes(fineweb_built, monkeypatch, tmp_path):
    import types
    out, _, _ = fineweb_built
    calls = []

    def load_dataset(repo, name=None, split=None, streaming=False):
        calls.append((repo, name, split, streaming))
        return FakeStream(fineweb_docs(), calls)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    kw = dict(shard_size=SHARD, workers=0, progress=False)
    res = build_fineweb("fineweb", "10B", tmp_path, None, limit_tokens=4500, **kw)
    assert not res["complete"] and calls == [("HuggingFaceFW/fineweb", "sample-10BT", "train",
                                              True)]
    res = build_fineweb("fineweb", "10B", tmp_path, None, **kw)
    assert res["complete"] and read_all(tmp_path) == read_all(out)
    state = read_progress(tmp_path / "fineweb_progress.json")
    assert calls[-1] == ("skip", state["shards"][3]["docs"])  # resumed after shard 3
    assert state["settings"]["input"] == "hf:HuggingFaceFW/fineweb/sample-10BT"
    calls.clear()
    build_fineweb("edu_fineweb", "100B", tmp_path / "edu", None, limit_docs=2, **kw)
    assert calls[0][:2] == ("HuggingFaceFW/fineweb-edu", "sample-100BT")


def test_tinystories_download_and_unpack(tmp_path, monkeypatch):
    import tarfile
    import types
    src = tmp_path / "src"
    stories = tinystories_files(src)

    def hf_hub_download(repo, filename, repo_type=None, local_dir=None):
        assert (repo, filename, repo_type) == ("roneneldan/TinyStories",
                                               "TinyStories_all_data.tar.gz", "dataset")
        path = os.path.join(local_dir, filename)
        with tarfile.open(path, "w:gz") as tar:
            for f in sorted(src.iterdir()):
                tar.add(f, arcname=f.name)
        return path

    monkeypatch.setitem(sys.modules, "huggingface_hub",
                        types.SimpleNamespace(hf_hub_download=hf_hub_download))
    res = build_tinystories(tmp_path / "ts", None, workers=0, progress=False)
    val, train = tinystories_reference(stories)
    assert sorted(p.name for p in (tmp_path / "ts" / "TinyStories_all_data").iterdir()) == \
        ["data00.json", "data01.json", "data02.json"]
    np.testing.assert_array_equal(open_shard(res["shards"][0][0]), val)
    np.testing.assert_array_equal(open_shard(res["shards"][1][0]), train)


def test_hellaswag_download_and_mmlu_hub(tmp_path, monkeypatch):
    import io
    import types
    import urllib.request
    body = "".join(json.dumps(r) + "\n" for r in HELLASWAG).encode()
    urls = []

    def urlopen(url, timeout=None):
        urls.append(url)
        return io.BytesIO(body)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    path, n = build_hellaswag(tmp_path, None)
    assert urls == ["https://raw.githubusercontent.com/rowanz/hellaswag/master/data/"
                    "hellaswag_val.jsonl"]
    assert (tmp_path / "hellaswag_val.jsonl").read_bytes() == body
    assert n == 3 and path.read_bytes() == llmc_eval_bytes(HELLASWAG)
    build_hellaswag(tmp_path, None)
    assert len(urls) == 1  # the jsonl is downloaded once

    def load_dataset(repo, config, split=None):
        assert (repo, config, split) == ("cais/mmlu", "all", "test")
        return MMLU

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    path, n = build_mmlu(tmp_path, None)
    assert n == 2 and [e["label"] for e in read_eval(path)] == [2, 1]


def test_build_never_deletes_shards_it_did_not_write(fineweb_input, tmp_path):
    """llm.c-named shards without a progress file (copied in, llm.c's own) stop the build;
    `llmpy data fineweb --out DIR` as typed exits 2 in one line and the files are intact."""
    inp, _ = fineweb_input
    build(inp, tmp_path)
    (tmp_path / "fineweb_progress.json").unlink()  # now nothing records who wrote them
    before = {p.name: p.read_bytes() for p in shard_files(tmp_path)}
    with pytest.raises(LlmpyError, match="no progress file there records"):
        build(inp, tmp_path)
    with pytest.raises(LlmpyError, match="no progress file there records"):
        build(inp, tmp_path, fresh=True)
    r = subprocess.run([sys.executable, "-m", "llmpy", "data", "fineweb", "--input",
                        str(inp / "part_*.jsonl"), "--out", str(tmp_path), "--shard-size",
                        str(SHARD), "--workers", "0", "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert {p.name: p.read_bytes() for p in shard_files(tmp_path)} == before


def test_fineweb_too_little_text_for_a_train_shard(tmp_path):
    """Issue 18: an input that fills only shard 0 (val) says there is no train shard."""
    import subprocess
    import sys
    (tmp_path / "small.jsonl").write_text('{"text": "Hello there, a tiny corpus."}\n')
    r = subprocess.run([sys.executable, "-m", "llmpy", "data", "fineweb", "--input",
                        str(tmp_path / "small.jsonl"), "--out", str(tmp_path / "o"), "-w", "0",
                        "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout
    assert len(r.stderr.strip().splitlines()) == 1
    assert "fill only the val shard fineweb_val_000000.bin" in r.stderr
    assert "no train shard" in r.stderr and "--shard-size" in r.stderr


def test_code_shards_as_typed(tmp_path):
    """bench/code_shards.py: every .py file under --root (site-packages left out) in the two
    shards, each once, whole, and followed by <|endoftext|>; the val shard first in the
    shuffled order; an OUT_DIR that already has the shards is refused (exit 2, one line,
    nothing rewritten)."""
    root = tmp_path / "src"
    texts = {}
    for i, name in enumerate(["a.py", "pkg/b.py", "pkg/c.py", "d.py"]):
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        texts[name] = f"def f{i}(x):\n    return x * {i}  # naïve 東京\n" * (i + 1)
        p.write_text(texts[name], encoding="utf-8")
    (root / "site-packages").mkdir()
    (root / "site-packages" / "skip.py").write_text("import nothing\n")
    (root / "notes.txt").write_text("not python\n")
    out = tmp_path / "out"
    script = os.path.join(os.path.dirname(__file__), "..", "bench", "code_shards.py")
    cmd = [sys.executable, script, str(out), "--root", str(root), "--val-tokens", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    tok = get_tokenizer()
    val, train = (list(open_shard(out / f"code_{s}.bin")) for s in ("val", "train"))
    docs = []
    for ids in (val, train):
        assert ids and ids[-1] == EOT
        doc = []
        for t in ids:
            if t == EOT:
                docs.append(tok.decode(doc))
                doc = []
            else:
                doc.append(t)
    assert len(docs) == 4 and sorted(docs) == sorted(texts.values())
    assert val.count(EOT) == 1  # one whole file reaches --val-tokens 1
    before = (out / "code_val.bin").read_bytes()
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "code_train.bin exists" in r.stderr
    assert (out / "code_val.bin").read_bytes() == before
    r = subprocess.run(cmd[:2] + [str(tmp_path / "o2"), "--root", str(tmp_path / "none")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--root" in r.stderr and not (tmp_path / "o2").exists()
    for bad in (["--max-tokens", "0"], ["--val-tokens", "-1"]):
        r = subprocess.run(cmd[:2] + [str(tmp_path / "o3"), "--root", str(root)] + bad,
                           capture_output=True, text=True)
        assert r.returncode == 2 and bad[0] in r.stderr and not (tmp_path / "o3").exists()
    r = subprocess.run(cmd[:2] + [str(root / "a.py"), "--root", str(root)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "is a file" in r.stderr
    assert (root / "a.py").read_text(encoding="utf-8") == texts["a.py"]
    # --max-tokens keeps whole files only: the train shard still ends each file with EOT
    small = tmp_path / "small"
    r = subprocess.run(cmd[:2] + [str(small), "--root", str(root), "--val-tokens", "1",
                                  "--max-tokens", "60"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    train = list(open_shard(small / "code_train.bin"))
    assert 0 < len(train) <= 60 and train[-1] == EOT
