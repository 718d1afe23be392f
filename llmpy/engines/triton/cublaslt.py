"""cuBLASLt matmuls with GELU epilogues, called through ctypes (llm.c's -ge, matmul_cublaslt in
llmc/matmul.cuh).

torch exposes cuBLASLt's plain GELU epilogue (torch._addmm_activation) but not the variants
training needs, so this module calls libcublasLt itself, the copy torch already loaded:

    linear(x, w, out, bias, aux)      out = gelu(x @ w.T + bias), aux = x @ w.T + bias
                                      (CUBLASLT_EPILOGUE_GELU_AUX_BIAS: the fc matmul's
                                      forward writes GELU's input and output in one pass)
    mm_dgelu(x, w, aux, out)          out = (x @ w) * gelu'(aux)
                                      (CUBLASLT_EPILOGUE_DGELU: the fcproj input gradient
                                      times GELU's derivative; with dbias, DGELU_BGRAD also
                                      writes fcb's gradient, measured 1.9x slower than DGELU
                                      plus the engine's own column sums, so unused there)

GELU is the tanh approximation in both, as in GPT-2. All tensors are bf16 on one CUDA device,
row-major with unit column stride; cuBLAS accumulates in fp32 and rounds once at the end.

cuBLASLt is column-major: a row-major (r, c) matrix with row stride ld is, to cuBLAS, the
column-major (c, r) matrix with leading dimension ld, i.e. its transpose. So the row-major
out (M, N) = x (M, K) @ w.T, with w (N, K), is computed as the column-major
D (N x M) = op(A) B with A = w seen as (K x N) and op = transpose, B = x seen as (K x M).

Plans (descriptors and the algorithm cuBLASLt's heuristic picks) are cached per shape, strides
and pointer alignment; the pointers are set at every call. The heuristic sees the bias and
aux pointers (they are in the descriptor) but not the matrices' alignment, so every operand
must be 16-byte aligned (checked) and leading dimensions multiples of 8 (`shapes_ok`; the
engine checks C, which makes its per-layer views 16-byte aligned). Not passed to the heuristic
as a minimum alignment preference: that path has not run on a GPU. Where cuBLASLt is missing (the CPU, Triton's interpreter) `available()` is
False and the engine runs the unfused kernels. A cuBLASLt failure is an LlmpyError naming
-ge 0, the way around it.
"""

from __future__ import annotations

import ctypes
import threading

import torch

from ...errors import LlmpyError

# cublasLt.h / library_types.h / cublas_api.h enums used here
CUDA_R_32F, CUDA_R_16BF = 0, 14
CUBLAS_COMPUTE_32F = 68
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
DESC_TRANSA, DESC_TRANSB, DESC_EPILOGUE, DESC_BIAS_POINTER = 3, 4, 7, 8
DESC_AUX_POINTER, DESC_AUX_LD = 11, 12
PREF_MAX_WORKSPACE_BYTES = 1
EPILOGUE_DEFAULT, EPILOGUE_BIAS = 1, 4
EPILOGUE_GELU_AUX_BIAS, EPILOGUE_DGELU, EPILOGUE_DGELU_BGRAD = 164, 192, 208
WORKSPACE_BYTES = 32 * 2**20  # llm.c's cublaslt_workspace_size


class _HeuristicResult(ctypes.Structure):
    """cublasLtMatmulHeuristicResult_t."""
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspaceSize", ctypes.c_size_t),
                ("state", ctypes.c_int), ("wavesCount", ctypes.c_float),
                ("reserved", ctypes.c_int * 4)]


_lock = threading.Lock()
_state = {}  # "lib", "handle", "workspace" (per device), "plans"


def _find_library():
    """The libcublasLt torch loaded (its path from /proc/self/maps), else the soname."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(None, 1)[-1]
                if "libcublasLt.so" in path:
                    return ctypes.CDLL(path)
    except OSError:
        pass
    for name in ("libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def _declare(lib) -> None:
    """Argument types of the functions used (all return a cublasStatus_t, 0 = success)."""
    P, I32, U32, U64, I64, SZ = (ctypes.c_void_p, ctypes.c_int32, ctypes.c_uint32,
                                 ctypes.c_uint64, ctypes.c_int64, ctypes.c_size_t)
    signatures = {
        "cublasLtCreate": [P],
        "cublasLtMatmulDescCreate": [P, I32, I32],
        "cublasLtMatmulDescSetAttribute": [P, U32, P, SZ],
        "cublasLtMatrixLayoutCreate": [P, I32, U64, U64, I64],
        "cublasLtMatmulPreferenceCreate": [P],
        "cublasLtMatmulPreferenceSetAttribute": [P, U32, P, SZ],
        "cublasLtMatmulPreferenceDestroy": [P],
        "cublasLtMatmulAlgoGetHeuristic": [P, P, P, P, P, P, P, I32, P, P],
        "cublasLtMatmul": [P, P, P, P, P, P, P, P, P, P, P, P, P, P, SZ, P],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int


def _lib():
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                lib, handle = None, ctypes.c_void_p()
                if torch.cuda.is_available():
                    # make sure torch has loaded cuBLAS (and so cuBLASLt) into the process
                    torch.cuda.current_blas_handle()
                    lib = _find_library()
                if lib is not None:
                    _declare(lib)
                    if lib.cublasLtCreate(ctypes.byref(handle)) != 0:
                        lib = None
                _state.update(handle=handle, plans={})
                _state["lib"] = lib  # last: other threads read it without the lock
    return _state["lib"]


def shapes_ok(*dims: int) -> bool:
    """cuBLASLt's epilogues want every leading dimension (and the GELU aux's) a multiple of
    8 bf16 elements: True when all of `dims` are."""
    return all(d % 8 == 0 for d in dims)


def available() -> bool:
    """True when cuBLASLt can be called here (CUDA and the library found)."""
    try:
        return _lib() is not None
    except Exception:  # no CUDA driver, a library without the symbols
        return False


def _check(status: int, what: str) -> None:
    if status != 0:
        raise LlmpyError(f"cuBLASLt {what} failed with status {status}; run with -ge 0 (the "
                         f"unfused GELU kernels)")


def _set(lib, desc, attr: int, value) -> None:
    _check(lib.cublasLtMatmulDescSetAttribute(desc, attr, ctypes.byref(value),
                                              ctypes.sizeof(value)), f"set attribute {attr}")


def _alignment(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    p = t.data_ptr()
    return min(256, p & -p) if p else 256


def _layout(lib, rows: int, cols: int, ld: int):
    layout = ctypes.c_void_p()
    _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), CUDA_R_16BF,
                                          ctypes.c_uint64(rows), ctypes.c_uint64(cols),
                                          ctypes.c_int64(ld)), "matrix layout")
    return layout


def _plan(key, m, n, k, transa, lda, ldb, ldd, epilogue, bias, aux, ldaux):
    """Descriptors and algorithm for D (m x n) = op(A) (m x k) B (k x n), column-major."""
    plans = _state["plans"]
    if key in plans:
        return plans[key]
    lib, handle = _state["lib"], _state["handle"]
    desc = ctypes.c_void_p()
    _check(lib.cublasLtMatmulDescCreate(ctypes.byref(desc), CUBLAS_COMPUTE_32F, CUDA_R_32F),
           "matmul descriptor")
    _set(lib, desc, DESC_TRANSA, ctypes.c_int32(transa))
    _set(lib, desc, DESC_TRANSB, ctypes.c_int32(CUBLAS_OP_N))
    _set(lib, desc, DESC_EPILOGUE, ctypes.c_uint32(epilogue))
    if bias is not None:  # bias and aux take D's type (bf16) by default
        _set(lib, desc, DESC_BIAS_POINTER, ctypes.c_void_p(bias.data_ptr()))
    if aux is not None:
        _set(lib, desc, DESC_AUX_POINTER, ctypes.c_void_p(aux.data_ptr()))
        _set(lib, desc, DESC_AUX_LD, ctypes.c_int64(ldaux))
    a_rows, a_cols = (k, m) if transa == CUBLAS_OP_T else (m, k)
    A, B, D = _layout(lib, a_rows, a_cols, lda), _layout(lib, k, n, ldb), _layout(lib, m, n, ldd)
    pref = ctypes.c_void_p()
    _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "preference")
    ws = ctypes.c_size_t(WORKSPACE_BYTES)
    _check(lib.cublasLtMatmulPreferenceSetAttribute(pref, PREF_MAX_WORKSPACE_BYTES,
                                                    ctypes.byref(ws), ctypes.sizeof(ws)),
           "workspace preference")
    result, count = _HeuristicResult(), ctypes.c_int(0)
    status = lib.cublasLtMatmulAlgoGetHeuristic(handle, desc, A, B, D, D, pref, 1,
                                                ctypes.byref(result), ctypes.byref(count))
    lib.cublasLtMatmulPreferenceDestroy(pref)
    if status != 0 or count.value == 0:
        raise LlmpyError(f"cuBLASLt has no algorithm for {m}x{n}x{k} with epilogue "
                         f"{epilogue} (status {status}); run with -ge 0")
    plans[key] = (desc, A, B, D, result)
    return plans[key]


def _workspace(device) -> torch.Tensor:
    ws = _state.setdefault("workspace", {})
    if device not in ws:
        ws[device] = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    return ws[device]


def _run(a_mat, transa, b_mat, out, m, n, k, epilogue, bias=None, aux=None, beta=0.0):
    for t in (a_mat, b_mat, out, bias, aux):
        if t is not None and (t.dtype != torch.bfloat16 or t.device != out.device or
                              (t.dim() == 2 and t.stride(1) != 1)):
            raise ValueError("cublaslt: bf16 tensors on one device, unit column stride")
    lda, ldb, ldd = a_mat.stride(0), b_mat.stride(0), out.stride(0)
    ldaux = aux.stride(0) if aux is not None else 0
    align = [_alignment(t) for t in (a_mat, b_mat, out, bias, aux)]
    if any(0 < a < 16 for a in align):
        raise LlmpyError("cublaslt: every operand must be 16-byte aligned (a bf16 view at a "
                         "multiple of 8 elements); run with -ge 0")
    key = (out.device, m, n, k, transa, lda, ldb, ldd, ldaux, epilogue, beta != 0.0, *align)
    lib = _lib()
    if lib is None:
        raise LlmpyError("cublaslt: cuBLASLt is not available here (needs CUDA); use -ge 0")
    with _lock:
        desc, A, B, D, result = _plan(key, m, n, k, transa, lda, ldb, ldd, epilogue, bias,
                                      aux, ldaux)
        if bias is not None:
            _set(lib, desc, DESC_BIAS_POINTER, ctypes.c_void_p(bias.data_ptr()))
        if aux is not None:
            _set(lib, desc, DESC_AUX_POINTER, ctypes.c_void_p(aux.data_ptr()))
        alpha, beta_ = ctypes.c_float(1.0), ctypes.c_float(beta)
        ws = _workspace(out.device)
        stream = ctypes.c_void_p(torch.cuda.current_stream(out.device).cuda_stream)
        _check(lib.cublasLtMatmul(_state["handle"], desc, ctypes.byref(alpha),
                                  ctypes.c_void_p(a_mat.data_ptr()), A,
                                  ctypes.c_void_p(b_mat.data_ptr()), B, ctypes.byref(beta_),
                                  ctypes.c_void_p(out.data_ptr()), D,
                                  ctypes.c_void_p(out.data_ptr()), D, ctypes.byref(result.algo),
                                  ctypes.c_void_p(ws.data_ptr()), ctypes.c_size_t(WORKSPACE_BYTES),
                                  stream), "matmul")


def linear(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, bias: torch.Tensor,
           aux: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ w.T (w (N, K)) + bias (N,) -> out (M, N); with aux (M, N): out gets
    gelu of the sum and aux the sum itself (GELU_AUX_BIAS); without, the bias only."""
    M, K = x.shape
    N = w.shape[0]
    if w.shape[1] != K or out.shape != (M, N) or bias.shape != (N,) or \
            (aux is not None and aux.shape != (M, N)):
        raise ValueError(f"cublaslt.linear: shapes x {tuple(x.shape)} w {tuple(w.shape)} "
                         f"out {tuple(out.shape)} bias {tuple(bias.shape)}")
    epilogue = EPILOGUE_GELU_AUX_BIAS if aux is not None else EPILOGUE_BIAS
    _run(w, CUBLAS_OP_T, x, out, N, M, K, epilogue, bias=bias, aux=aux)
    return out


def mm_dgelu(x: torch.Tensor, w: torch.Tensor, aux: torch.Tensor, out: torch.Tensor,
             dbias: torch.Tensor | None = None) -> torch.Tensor:
    """(x (M, K) @ w (K, N)) * gelu'(aux (M, N)) -> out (M, N) (DGELU); with dbias (N,) it
    also gets out's column sums (DGELU_BGRAD), written, not added."""
    M, K = x.shape
    N = w.shape[1]
    if w.shape[0] != K or out.shape != (M, N) or aux.shape != (M, N) or \
            (dbias is not None and dbias.shape != (N,)):
        raise ValueError(f"cublaslt.mm_dgelu: shapes x {tuple(x.shape)} w {tuple(w.shape)} "
                         f"aux {tuple(aux.shape)} out {tuple(out.shape)}")
    epilogue = EPILOGUE_DGELU_BGRAD if dbias is not None else EPILOGUE_DGELU
    _run(w, CUBLAS_OP_N, x, out, N, M, K, epilogue, bias=dbias, aux=aux)
    return out
