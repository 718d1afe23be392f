"""Hugging Face import/export (llmpy.hf), offline: transformers is the judge.

A small random GPT2LMHeadModel (every tensor perturbed, so biases and LayerNorm weights are
not their trivial init and a wrong transpose or name shows) is saved locally; load_hf must
give our torch engine the same logits, export_hf must give transformers the same logits with
none of our code, and an llm.c model file must survive read -> export -> import -> write
byte for byte.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmpy.config import ModelConfig
from llmpy.errors import LlmpyError
from llmpy.formats import write_model
from llmpy.hf import export_hf, load_hf, read_safetensors
from llmpy.init import init_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

L, C, NH, MAXT, V = 2, 64, 4, 64, 50257
CONFIG = ModelConfig(MAXT, V, L, NH, C)
# fp32 on both sides, different kernels (Conv1D's addmm vs linear, attention): the logits
# (max |x| ~ 4) agree to ~2e-6 (measured); the bound leaves room for other BLAS builds.
LOGITS_TOL = 1e-4


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=L, n_embd=C, n_head=NH, n_positions=MAXT,
                                  vocab_size=V, activation_function="gelu_new")
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0
            p.copy_(base + 0.1 * torch.randn_like(p))
    d = tmp_path_factory.mktemp("hf_random")
    model.save_pretrained(d)
    return d, model


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, V, size=(2, MAXT))


def hf_logits(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).logits.numpy()


def our_logits(config, params, x):
    from llmpy.engines.torch import TorchEngine
    e = TorchEngine(config, device="cpu")
    e.set_params(params)
    return e.logits(x)


def test_import_gives_transformers_logits(hf_dir, tokens):
    d, model = hf_dir
    config, params = load_hf(d)
    assert config == CONFIG and params.dtype == np.float32
    wte = params[:config.padded_vocab_size * C].reshape(config.padded_vocab_size, C)
    assert not wte[V:].any(), "padded rows of wte must be zero"
    assert np.abs(our_logits(config, params, tokens) - hf_logits(model, tokens)).max() < LOGITS_TOL


def test_export_loads_in_transformers_alone(hf_dir, tokens, tmp_path):
    d, model = hf_dir
    config, params = load_hf(d)
    out = export_hf((config, params), tmp_path / "export")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt",
            "tokenizer_config.json"} <= names
    reloaded, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert set(info["missing_keys"]) <= {"lm_head.weight"}  # tied to wte
    reloaded.eval()
    ref = hf_logits(model, tokens)
    assert np.abs(hf_logits(reloaded, tokens) - ref).max() < LOGITS_TOL
    assert np.abs(our_logits(config, params, tokens) - ref).max() < LOGITS_TOL
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.encode("Hello world") == [15496, 995] and tok.eos_token_id == 50256


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_llmc_model_file_round_trips_byte_for_byte(tmp_path, dtype):
    # Vp = 50304 here: the padded rows (zero in llm.c's files) must come back as zeros.
    config = ModelConfig(MAXT, V, 1, NH, C)
    params = init_params(config, 5) + 0.01          # biases and LayerNorms not trivial
    params[V * C:config.padded_vocab_size * C] = 0.0
    src, dst = tmp_path / "a.bin", tmp_path / "b.bin"
    write_model(src, config, params, dtype=dtype)
    export_hf(src, tmp_path / "hf")
    write_model(dst, *load_hf(tmp_path / "hf"), dtype=dtype)
    assert src.read_bytes() == dst.read_bytes()


def test_hub_layout_and_pytorch_bin(hf_dir, tmp_path, tokens):
    """Hub GPT-2 checkpoints have no "transformer." prefix and carry attn.bias mask buffers;
    older ones are pytorch_model.bin. Both load to the same parameters."""
    d, model = hf_dir
    _, ref = load_hf(d)
    sd = {k.removeprefix("transformer."): v for k, v in model.state_dict().items()}
    sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    for layer in range(L):
        sd[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(1, 1, MAXT, MAXT))
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "config.json").write_text((d / "config.json").read_text())
    torch.save(sd, hub / "pytorch_model.bin")
    np.testing.assert_array_equal(load_hf(hub)[1], ref)


def test_read_safetensors_bf16(tmp_path):
    from safetensors.torch import save_file
    t = torch.randn(3, 5).to(torch.bfloat16)
    save_file({"x": t}, str(tmp_path / "m.safetensors"))
    np.testing.assert_array_equal(read_safetensors(tmp_path / "m.safetensors")["x"], t.float().numpy())


def test_bad_input_is_an_llmpy_error(hf_dir, tmp_path, monkeypatch):
    d, _ = hf_dir
    with pytest.raises(LlmpyError, match="not a directory"):
        load_hf(tmp_path / "nope")
    bad = tmp_path / "relu"
    bad.mkdir()
    cfg = json.loads((d / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "activation_function": "relu"}))
    with pytest.raises(LlmpyError, match="activation_function"):
        load_hf(bad)
    # no network: the hub download fails with a clear message (simulated, never attempted)
    import huggingface_hub

    def offline(**kw):
        raise OSError("We couldn't connect to 'https://huggingface.co'")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(LlmpyError, match="network"):
        load_hf("gpt2")


def test_export_hf_cli(tmp_path):
    from llmpy.cli import main
    write_model(tmp_path / "m.bin", CONFIG, init_params(CONFIG, 1))
    assert main(["export", "hf", str(tmp_path / "m.bin"), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert main(["export", "hf", str(tmp_path / "missing.bin"), str(tmp_path / "x")]) == 2


def test_training_reads_only_the_config_to_check_flags(hf_dir, tmp_path):
    """`-e HF_DIR`: the flag checks before allocation read config.json, not the weights."""
    import shutil
    from llmpy.hf import load_hf
    from llmpy.models import peek_config
    d = tmp_path / "config_only"
    d.mkdir()
    shutil.copy(hf_dir[0] / "config.json", d / "config.json")
    assert peek_config(str(d)) == load_hf(hf_dir[0])[0]


def _damaged(tmp_path, d, how):
    """A copy of the HF dir `d` with one thing broken (safetensors bytes or config.json)."""
    import shutil
    import struct
    out = tmp_path / how
    shutil.copytree(d, out)
    st = out / "model.safetensors"
    raw = st.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__")

    def with_header(h):
        blob = json.dumps(h).encode()
        st.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    cfg = json.loads((out / "config.json").read_text())
    if how == "truncated":
        st.write_bytes(raw[:len(raw) // 2])
    elif how == "offsets_past_end":
        header[name]["data_offsets"][1] = len(raw) * 2
        with_header(header)
    elif how == "shape_mismatch":
        header[name]["shape"] = [s + 1 for s in header[name]["shape"]]
        with_header(header)
    elif how == "header_not_object":
        with_header([1, 2, 3])
    elif how in ("header_len_2_40", "header_len_2_63"):
        st.write_bytes(struct.pack("<Q", 2 ** (40 if how.endswith("40") else 63)) + raw[8:])
    elif how == "config_wrong_type":
        (out / "config.json").write_text(json.dumps({**cfg, "n_embd": "64"}))
    elif how == "config_n_layer_1e7":
        (out / "config.json").write_text(json.dumps({**cfg, "n_layer": 10 ** 7}))
    elif how == "index_outside_dir":
        st.unlink()
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {name: "../../etc/passwd"}}))
    return out


@pytest.mark.parametrize("how", ["truncated", "offsets_past_end", "shape_mismatch",
                                 "header_not_object", "header_len_2_40", "header_len_2_63",
                                 "config_wrong_type", "config_n_layer_1e7",
                                 "index_outside_dir"])
def test_damaged_hf_dir_is_one_line(hf_dir, tmp_path, how):
    """Each damage is an LlmpyError naming the file, before any big allocation; and through
    the CLI as a user types it, one line and exit 2."""
    import subprocess
    import sys
    d, _ = hf_dir
    bad = _damaged(tmp_path, d, how)
    with pytest.raises(LlmpyError, match=str(bad)):
        load_hf(bad)
    if how in ("truncated", "config_n_layer_1e7"):
        r = subprocess.run([sys.executable, "-m", "llmpy", "sample", str(bad), "-g", "2"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_export_hf_files_have_one_mode(tmp_path):
    """Issue 18: model.safetensors gets the same mode as config.json (the umask's), not the
    0600 that safetensors creates; through the command as typed."""
    import os
    import subprocess
    import sys
    write_model(tmp_path / "m.bin", CONFIG, init_params(CONFIG, 1))
    r = subprocess.run([sys.executable, "-m", "llmpy", "export", "hf", str(tmp_path / "m.bin"),
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"read {tmp_path / 'm.bin'}" in r.stdout
    modes = {p.name: os.stat(p).st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert modes["model.safetensors"] == modes["config.json"] == 0o666 & ~umask, modes
