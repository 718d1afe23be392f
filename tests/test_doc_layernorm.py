"""doc/layernorm.md cannot rot: its NumPy code is the engine's code, passes a finite-difference
check, and its Triton kernels match it (TRITON_INTERPRET=1 on the CPU)."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from llmpy.engines import numpy_layers as nl

DOC = Path(__file__).resolve().parents[1] / "doc" / "layernorm.md"
TRITON_HEADING = "## The Triton version"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def doc_parts() -> tuple[str, str]:
    """(the NumPy part's python code, the Triton part's python code)."""
    text = DOC.read_text()
    assert TRITON_HEADING in text
    before, after = text.split(TRITON_HEADING, 1)
    numpy_code, triton_code = python_blocks(before), python_blocks(after)
    assert len(numpy_code) >= 2 and len(triton_code) >= 2, "python blocks went missing"
    return "\n\n".join(numpy_code), "\n\n".join(triton_code)


def test_numpy_quote_is_the_engine_code():
    numpy_code, _ = doc_parts()
    for fn in (nl.layernorm_forward, nl.layernorm_backward):
        assert inspect.getsource(fn) in numpy_code, (
            f"doc/layernorm.md quotes {fn.__name__} from llmpy/engines/numpy_layers.py: "
            f"update the quote")
    assert re.search(r"^LN_EPS = 1e-5$", numpy_code, flags=re.M) and nl.LN_EPS == 1e-5


def test_numpy_blocks_pass_finite_differences(capsys):
    numpy_code, _ = doc_parts()
    ns: dict = {}
    exec(compile(numpy_code, str(DOC), "exec"), ns)
    assert "layernorm backward vs finite differences" in capsys.readouterr().out
    # the doc's own check, and one of ours on other sizes, independent of its code
    assert ns["check_layernorm_numpy"]() < 1e-7
    assert ns["check_layernorm_numpy"](B=1, T=2, C=7, seed=3) < 1e-7
    rng = np.random.default_rng(1)
    x, w, b = rng.normal(3.0, 2.0, size=(2, 11)), rng.normal(size=11), rng.normal(size=11)
    dout = rng.normal(size=(2, 11))
    dx, dw, db = ns["layernorm_backward"](dout, ns["layernorm_forward"](x, w, b)[1])
    h, i = 1e-6, (1, 4)
    xp, xm = x.copy(), x.copy()
    xp[i] += h
    xm[i] -= h
    f = lambda a: np.sum(ns["layernorm_forward"](a, w, b)[0] * dout)  # noqa: E731
    assert abs((f(xp) - f(xm)) / (2 * h) - dx[i]) < 1e-7 * np.abs(dx).max()
    assert abs(dx.sum(axis=-1)).max() < 1e-12                  # the shift direction
    np.testing.assert_allclose(db, dout.sum(axis=0), rtol=1e-12)


def test_triton_blocks_match_numpy_in_the_interpreter(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    numpy_code, triton_code = doc_parts()
    checks = textwrap.dedent("""
        # -- the test's own checks, beyond the doc's
        err = check_layernorm_triton()
        assert err < 1e-5, err
        for B, T, C, P in ((1, 1, 7, 1), (2, 9, 33, 5), (4, 3, 128, 16)):
            err = check_layernorm_triton(B, T, C, P, seed=B + C)
            assert err < 1e-5, (B, T, C, P, err)
        # deterministic: partial sums, no atomics
        x = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
        w, b, d = torch.randn(40), torch.randn(40), torch.randn(6, 40)
        r1 = triton_layernorm_backward(d, triton_layernorm_forward(x, w, b)[1], 3)
        r2 = triton_layernorm_backward(d, triton_layernorm_forward(x, w, b)[1], 3)
        assert all(torch.equal(a, c) for a, c in zip(r1, r2))
        # against torch autograd, with a bf16 input (fp32 accumulation inside)
        xb = x.to(torch.bfloat16)
        out, cache = triton_layernorm_forward(xb, w, b)
        assert out.dtype == torch.bfloat16
        xr = xb.float().requires_grad_()
        ref = torch.nn.functional.layer_norm(xr, (40,), w, b, eps=1e-5)
        assert (out.float() - ref).abs().max() < 0.05
        ref.backward(d)
        dx, dw, db = triton_layernorm_backward(d.to(torch.bfloat16), cache, 2)
        assert (dx.float() - xr.grad).abs().max() < 0.05 * xr.grad.abs().max()
        print("TRITON DOC OK")
    """)
    script = tmp_path / "doc_layernorm_triton.py"
    script.write_text(numpy_code + "\n\n" + triton_code + "\n" + checks)
    env = {**os.environ, "TRITON_INTERPRET": "1"}     # must be set before triton is imported
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "TRITON DOC OK" in r.stdout
    assert "triton layernorm vs numpy" in r.stdout
