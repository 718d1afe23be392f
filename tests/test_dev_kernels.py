"""dev/kernels: the harness validates every op and every version at tiny odd shapes
(`--check-only`). Without CUDA the kernels run in Triton's CPU interpreter; the harness runs
in a subprocess with TRITON_INTERPRET=1, and this process never imports triton: importing it
here before another test module sets TRITON_INTERPRET=1 would break that module's kernels.

Tolerances are the ops' own (declared next to each OP in dev/kernels/<op>.py); this file
only asks that every row of the harness's table passes.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")  # torch alone does not import triton
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
OPS = ("encoder_forward", "encoder_backward", "layernorm_forward", "layernorm_backward",
       "residual_layernorm_forward", "gelu_forward", "gelu_backward", "softmax_forward",
       "attention_forward", "fused_classifier", "adamw", "global_norm", "matmul_forward",
       "quantize_e4m3", "transpose_bytes")
# ops whose layer the NumPy engine has: their torch reference is checked against it
NUMPY_LAYERS = {"encoder_forward", "encoder_backward", "layernorm_forward",
                "layernorm_backward", "residual_layernorm_forward", "gelu_forward",
                "gelu_backward", "attention_forward", "fused_classifier", "matmul_forward"}


def _env():
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    return env


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    """(completed process, CSV rows) of one `--check-only` run over all ops."""
    out = tmp_path_factory.mktemp("dev_kernels") / "check.csv"
    proc = _run("-m", "dev.kernels.harness", "--check-only", "--csv", str(out))
    rows = list(csv.DictReader(out.open())) if out.exists() else []
    return proc, rows


def test_harness_lists_the_same_ops():
    proc = _run("-c", "from dev.kernels.harness import OPS; print(','.join(OPS))")
    assert proc.returncode == 0, proc.stderr
    assert tuple(proc.stdout.strip().split(",")) == OPS


def test_check_only_passes(check):
    proc, rows = check
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert rows and "ok in" in proc.stdout.splitlines()[-1]
    assert all(r["time_us"] == "" for r in rows), "--check-only must not time anything"


@pytest.mark.parametrize("op", OPS)
def test_every_version_of_op_is_valid(check, op):
    proc, rows = check
    mine = [r for r in rows if r["op"] == op]
    assert mine, f"{op} missing from the table:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    bad = [f"v{r['version']} {r['status']}: {r['errors']}" for r in mine if r["status"] != "ok"]
    assert not bad, f"{op}: " + "; ".join(bad)
    kinds = [r["kind"] for r in mine]
    assert kinds.count("triton") + kinds.count("production") >= 2, "at least two Triton versions"
    assert kinds.count("unit") == 1, "one torch/cuBLAS unit"
    assert ("law" in kinds) == (op in NUMPY_LAYERS), "reference checked against numpy_layers"
    assert all(r["summary"] for r in mine), "every version says what it is"
    numbers = [int(r["version"]) for r in mine if r["kind"] in ("triton", "production")]
    assert numbers == list(range(1, len(numbers) + 1)), "versions numbered 1, 2, ... in order"


def test_every_version_says_why_it_is_faster():
    code = (
        "import importlib\n"
        "from dev.kernels.harness import OPS\n"
        "for name in OPS:\n"
        "    op = importlib.import_module('dev.kernels.' + name).OP\n"
        "    mod = importlib.import_module('dev.kernels.' + name)\n"
        "    assert mod.__doc__ and 'llm.c' in mod.__doc__, name\n"
        "    for v in op.versions:\n"
        "        doc = (v.fn.__doc__ or '').strip()\n"
        "        if v.kind != 'unit':\n"
        "            assert len(doc.split('\\n\\n')) >= 2, (name, v.name, 'needs a why paragraph')\n"
        "print('ok')\n")
    proc = _run("-c", code)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


def test_unknown_op_is_a_usage_error():
    proc = _run("-m", "dev.kernels.harness", "--ops", "layernorm_forward,nope", "--check-only")
    assert proc.returncode == 2
    assert "unknown op(s) nope" in proc.stderr
