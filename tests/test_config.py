"""Model descriptors and parameter counts match llm.c exactly."""

import pytest

from llmpy.config import ModelConfig, from_descriptor, is_descriptor, pad_vocab
from llmpy.errors import LlmpyError


@pytest.mark.parametrize("desc,count", [
    ("d12", 124_475_904), ("d24", 354_871_296), ("d36", 774_090_240), ("d48", 1_557_686_400),
    ("gpt3:c768", 125_262_336),
])
def test_param_counts(desc, count):
    assert from_descriptor(desc).num_params == count


def test_shapes():
    c = from_descriptor("d12")
    assert (c.padded_vocab_size, c.channels, c.num_heads, c.head_size) == (50304, 768, 12, 64)
    assert list(c.param_shapes())[:3] == ["wte", "wpe", "ln1w"]
    assert c.param_shapes()["fcprojw"] == (12, 768, 3072)
    assert from_descriptor("d48").num_heads == 25
    g = from_descriptor("gpt3:c2560")
    assert (g.num_layers, g.head_size, g.max_seq_len) == (32, 80, 2048)
    assert from_descriptor("gpt3:c1536").head_size == 96
    offs = c.param_offsets()
    assert offs["wte"] == (0, 50304 * 768) and offs["lnfb"][1] == c.num_params


def test_custom_and_errors():
    c = from_descriptor("L=2,C=64,NH=4,T=128,V=1000")
    assert (c.num_layers, c.channels, c.num_heads, c.max_seq_len, c.padded_vocab_size) == \
        (2, 64, 4, 128, 1024)
    assert pad_vocab(50257) == 50304
    for bad in ["d13", "gpt3:c999", "L=2,C=64", "L=2,C=65,NH=4", "x", "L=a,C=1,NH=1"]:
        with pytest.raises(LlmpyError):
            from_descriptor(bad)
    assert is_descriptor("d6") and not is_descriptor("model.bin")
    with pytest.raises(LlmpyError):
        ModelConfig(16, 100, 0, 1, 8)
