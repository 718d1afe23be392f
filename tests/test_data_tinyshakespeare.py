"""Embedded tinyshakespeare (llmpy/data/tinyshakespeare.py) and `llmpy data tinyshakespeare`."""

import gzip
from importlib import resources

import numpy as np
import pytest

from llmpy.data import cli, tinyshakespeare as ts
from llmpy.data.tinyshakespeare import ensure_tinyshakespeare
from llmpy.errors import LlmpyError
from llmpy.formats import open_shard, shard_num_tokens
from llmpy.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("tinyshakespeare")
    return ensure_tinyshakespeare(d)


def test_embedded_text_is_reproducible_gzip():
    raw = (resources.files("llmpy.data") / "tinyshakespeare.txt.gz").read_bytes()
    assert raw[:3] == b"\x1f\x8b\x08"
    assert raw[3] == 0 and raw[4:8] == b"\0\0\0\0"  # no file name, mtime 0 (gzip -n)
    text = ts.load_text()
    assert len(text) == 1_115_394 and text.startswith("First Citizen:\n")
    assert gzip.decompress(raw).decode() == text


def test_counts_and_headers(built):
    train, val = built
    assert train.name == "tiny_shakespeare_train.bin" and val.name == "tiny_shakespeare_val.bin"
    assert shard_num_tokens(val) == 32_768 and shard_num_tokens(train) == 305_260
    for path, n in ((val, 32_768), (train, 305_260)):
        header = np.fromfile(path, dtype="<i4", count=256)
        assert list(header[:3]) == [20240520, 1, n] and not header[3:].any()
        assert path.stat().st_size == 1024 + 2 * n


def test_tokens_follow_llmc(built):
    train, val = built
    tokens = np.concatenate([open_shard(val), open_shard(train)])
    assert list(tokens[:5]) == [50256, 5962, 22307, 25, 198]  # EOT "First Citizen:\n"
    # decoding gives the text back, with "<|endoftext|>" in front of every section
    text = ts.load_text()
    sections = text.split("\n\n")
    assert (tokens == 50256).sum() == len(sections)
    expected = "".join("<|endoftext|>" + s + "\n\n" for s in sections[:-1])
    expected += "<|endoftext|>" + sections[-1]
    assert get_tokenizer().decode(tokens.tolist()) == expected


def test_rerun_is_a_noop(built):
    train, val = built
    before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in (train, val)]
    assert ensure_tinyshakespeare(train.parent) == (train, val)
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in (train, val)] == before


def test_bad_shard_is_rebuilt(tmp_path):
    train, val = ensure_tinyshakespeare(tmp_path)
    good = val.read_bytes()
    val.write_bytes(good[:-2])  # truncated
    train.unlink()
    assert ensure_tinyshakespeare(tmp_path) == (train, val)
    assert val.read_bytes() == good and shard_num_tokens(train) == 305_260


def test_cache_dir_and_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMPY_CACHE", str(tmp_path / "cache"))
    train, val = ensure_tinyshakespeare()
    assert train.parent == tmp_path / "cache" / "tinyshakespeare"
    assert cli.main(["tinyshakespeare", "--out", str(tmp_path / "out")]) == 0
    assert "305,260" in capsys.readouterr().out
    assert (tmp_path / "out" / "tiny_shakespeare_val.bin").read_bytes() == val.read_bytes()
    # issue 13: argparse errors are an LlmpyError (one line, exit 2 through llmpy.cli)
    with pytest.raises(LlmpyError, match="invalid choice: 'no-such-dataset'"):
        cli.main(["no-such-dataset"])
    from llmpy.cli import main as llmpy_main
    assert llmpy_main(["data", "no-such-dataset"]) == 2
