"""The Triton SSD (`kernels/ssd/triton.py`) against its PyTorch twin `ssd_scan_ref` run in fp64 on the
same (rounded) inputs: outputs, final states and every gradient, over shapes with l % Q ≠ 0, g > 1
and each input dtype; the decode step; strided inputs; CUDA-graph capture.

Unmarked tests run at tiny shapes on the CPU under TRITON_INTERPRET=1 (as CI runs them) or on a GPU;
tests marked `gpu` run at real shapes. Error is ‖out − ref‖ / ‖ref‖. Bounds per input dtype:
fp32 2e-3 on the GPU (its fp32 dots run in tf32, ~1e-3) and 1e-5 in the interpreter, bf16 2e-2
(operands of every matrix product rounded to bf16, as the tensor cores take them), fp16 5e-3. The
gradients of A, dt_bias and D are sums over batch and time of terms of both signs, so their relative
error grows with the cancellation: 5e-2 for bf16, 1e-2 for fp16, and 5e-3 for fp32 on the GPU (tf32
operands keep fp16's 10-bit mantissa; d dt_bias read 2.0e-3 at (2, 40, 2, 64, 16) on an H200).
"""

import re
from dataclasses import dataclass

import pytest
import torch

from kernels.ssd import ssd_scan
from kernels.ssd.reference import ssd_scan_ref, ssd_step_ref
from tests.conftest import INTERPRET, SSDCase, assert_graph_replays_eager, rel_err, skip_module_without_triton

skip_module_without_triton()

import kernels.ssd.triton as ssd_triton  # noqa: E402
from kernels import next_pow2  # noqa: E402
from kernels.ssd import common, fused  # noqa: E402
from kernels.ssd.triton import ssd_scan_triton, ssd_step_triton  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
FP32_TOL = 1e-5 if INTERPRET else 2e-3  # the interpreter's fp32 dots are exact fp32, the GPU's tf32
TOL = {torch.float32: FP32_TOL, torch.bfloat16: 2e-2, torch.float16: 5e-3}
TOL_SUMMED = {torch.float32: 1e-5 if INTERPRET else 5e-3, torch.bfloat16: 5e-2, torch.float16: 1e-2}
PER_TOKEN = ("x", "dt", "B", "C", "z")  # in the input dtype; A, D, dt_bias and states stay fp32


@dataclass(frozen=True)
class Case(SSDCase):
    dtype: torch.dtype = torch.float32  # keeps its place: the eighth positional field


def make_inputs(case: Case, seed: int = 0, dt_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Leaf tensors on DEVICE; Δ ≈ 0.13 (softplus of −2 + noise) or uniform in (0.01, 0.3), times dt_scale."""
    gen = torch.Generator().manual_seed(seed)
    b, l, h, p, n, g = case.b, case.l, case.h, case.p, case.n, case.g

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    t = dict(
        x=randn(b, l, h, p),
        dt=(randn(b, l, h) - 2) if case.softplus else 0.01 + 0.29 * torch.rand(b, l, h, generator=gen),
        A=-(0.1 + 1.9 * torch.rand(h, generator=gen)),
        B=randn(b, l, g, n),
        C=randn(b, l, g, n),
    )
    t["dt"] = t["dt"] * dt_scale
    if case.D:
        t["D"] = randn(h) if case.D == "h" else randn(h, p)
    if case.z:
        t["z"] = randn(b, l, h, p)
    if case.bias:
        t["dt_bias"] = 0.5 * randn(h)
    if case.h0:
        t["initial_states"] = randn(b, h, p, n)
    return {k: v.to(DEVICE, case.dtype if k in PER_TOKEN else torch.float32).requires_grad_() for k, v in t.items()}


def check_against_ref(case: Case, inputs: dict, scan=ssd_scan_triton, tol: float | None = None, path: str = "auto"):
    """Triton vs fp64 reference: y and final state, then the gradient of every input."""
    kwargs = dict(chunk_size=case.Q, dt_softplus=case.softplus, return_final_states=True)
    y, final = scan(**inputs, **kwargs, path=path)
    inputs64 = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    y_ref, final_ref = ssd_scan_ref(**inputs64, **kwargs)
    assert y.dtype == case.dtype and final.dtype == torch.float32
    tol = tol or TOL[case.dtype]
    assert y.isfinite().all() and rel_err(y, y_ref) < tol
    assert rel_err(final, final_ref) < tol

    gen = torch.Generator().manual_seed(1)
    dy = torch.randn(y.shape, generator=gen).to(DEVICE)
    dfinal = torch.randn(final.shape, generator=gen).to(DEVICE)
    names = list(inputs)
    grads = torch.autograd.grad((y, final), [inputs[k] for k in names], (dy.to(y.dtype), dfinal))
    grads_ref = torch.autograd.grad((y_ref, final_ref), [inputs64[k] for k in names], (dy.double(), dfinal.double()))
    errors = {"y": rel_err(y, y_ref), "final": rel_err(final, final_ref)}
    errors |= {f"d{name}": rel_err(grad, grad_ref) for name, grad, grad_ref in zip(names, grads, grads_ref)}
    print(case, " ".join(f"{k}={v:.1e}" for k, v in errors.items()))  # shown by pytest -s or on failure
    for name, grad in zip(names, grads):
        assert grad.dtype == inputs[name].dtype and grad.shape == inputs[name].shape, name
        assert grad.isfinite().all(), name
        bound = max(tol, TOL_SUMMED[case.dtype]) if name in ("A", "dt_bias", "D") else tol
        assert errors[f"d{name}"] < bound, name


TINY = [
    Case(2, 40, 4, 16, 16, 2, 16, z=True, D="h", bias=True, softplus=True, h0=True),
    Case(1, 32, 3, 16, 16, 1, 16),
    Case(2, 24, 4, 16, 16, 1, 16, torch.bfloat16, z=True, D="hp", bias=True, softplus=True, h0=True),
    Case(1, 20, 2, 16, 32, 2, 32, torch.float16, z=True, D="h", softplus=True, h0=True),
]


@pytest.fixture(params=["fused", "chunked"])
def path(request):
    """Both Triton paths: one program per (b, h) over the whole sequence, or chunk-parallel kernels."""
    return request.param


@pytest.mark.parametrize("case", TINY, ids=str)
def test_matches_reference(case, path):
    check_against_ref(case, make_inputs(case), path=path)


def test_auto_path_fills_the_gpu_with_fused_programs():
    """Forward alone, "auto" takes the fused path once its b·h programs fill the multiprocessors. When a
    backward follows, once its programs, with P slices and sequence segments, fill 3/4 of them: a long
    sequence split into segments brings a few heads onto it."""
    sms, dev = common._num_sms(torch.device(DEVICE)), torch.device(DEVICE)
    assert ssd_triton._use_fused((sms, 16, 1, 16), dev, False)
    assert not ssd_triton._use_fused((1, 16, sms - 1, 16), dev, False)
    low, t = sms * 3 // 4, fused._FUSED_T
    assert ssd_triton._use_fused((1, t, low, 16), dev, True)  # P = 16: no slices; one block: no segments
    assert not ssd_triton._use_fused((1, t, low - 1, 16), dev, True)
    long = t * fused._MIN_SEGMENT * low  # enough blocks for `low` segments
    assert ssd_triton._use_fused((1, long, 1, 16), dev, True)
    assert not ssd_triton._use_fused((1, long, 1, 16), dev, False)


def test_fused_path_only_where_its_kernels_fit(monkeypatch):
    """On a GPU, states too large for the fused kernels' shared memory take the chunked path, even when the
    fused one is asked for: fp32 from (P, N) = (64, 128), bf16 and fp16 beyond (64, 256) or (128, 128)."""
    monkeypatch.setattr(ssd_triton, "INTERPRET", False)
    states = ((32, 64), (64, 64), (64, 128), (128, 128), (64, 256), (128, 256))
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    fits = [(dtype, p, n) for dtype in dtypes for p, n in states
            if ssd_triton._fused_fits(torch.empty(1, 1, 1, p, dtype=dtype), n)]
    half = [(p, n) for p, n in states if p * n <= 128 * 128]
    assert fits == [(torch.float32, 32, 64), (torch.float32, 64, 64),
                    *((dtype, p, n) for dtype in dtypes[1:] for p, n in half)]


def test_states_no_path_fits_are_refused_with_the_limit(monkeypatch):
    """On a GPU the chunked kernels take fp32 states up to 8,192 entries and 2-byte ones up to 32,768; beyond,
    ssd_scan_triton raises one line naming the sizes, the dtype and the limit, before launching anything."""
    monkeypatch.setattr(ssd_triton, "INTERPRET", False)
    unsupported = ssd_triton.unsupported
    assert unsupported(torch.empty(1, 1, 1, 64, dtype=torch.float32), 128) is None
    assert unsupported(torch.empty(1, 1, 1, 128, dtype=torch.float32), 64) is None
    assert unsupported(torch.empty(1, 1, 1, 64, dtype=torch.bfloat16), 512) is None
    assert unsupported(torch.empty(1, 1, 1, 128, dtype=torch.float16), 256) is None
    assert unsupported(torch.empty(1, 1, 1, 128, dtype=torch.bfloat16), 512) is not None
    t = make_inputs(Case(1, 8, 2, 64, 256, 1, 16))
    message = ("headdim=64, d_state=256 in torch.float32: the Triton SSD holds the (headdim, d_state) state in shared "
               "memory, up to 8,192 entries (each size rounded up to a power of two) for this dtype; use bf16 or fp16 "
               "inputs, a smaller state, or backend='torch'")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        ssd_scan_triton(chunk_size=16, **t)


def test_auto_path_follows_grad(monkeypatch):
    """Which path the forward takes depends on whether a backward will follow."""
    sms = common._num_sms(torch.device(DEVICE))
    case = Case(1, 20, sms * 3 // 4, 16, 16, 1, 16)  # b·h: 3/4 of the multiprocessors
    taken = []
    real = ssd_triton._use_fused
    monkeypatch.setattr(ssd_triton, "_use_fused", lambda *a: taken.append(real(*a)) or taken[-1])
    x = make_inputs(case)
    with torch.no_grad():
        ssd_scan(**x, chunk_size=case.Q, backend="triton")
    ssd_scan(**x, chunk_size=case.Q, backend="triton")
    assert taken == [False, True]


def test_fused_p_slices_fill_the_gpu():
    """The sequential fused kernels take a slice of P a program when b·h programs leave multiprocessors
    idle, halving it until they are busy or it reaches the smallest slice."""
    dev = torch.device(DEVICE)
    sms, full = common._num_sms(dev), common._pow2(64)
    assert fused._fused_block_p(sms, 64, dev) == full
    assert fused._fused_block_p(sms // 2, 64, dev) == full // 2
    assert fused._fused_block_p(1, 64, dev) == max(fused._MIN_SLICE, full // next_pow2(sms))


def force_p_slices(monkeypatch, slices: int):
    """P = 64 split into `slices` slices on the fused path, whatever b·h is."""
    monkeypatch.setattr(fused, "_fused_block_p", lambda bh, headdim, device: 64 // slices)


@pytest.mark.parametrize("segments,slices", [(2, 1), (3, 1), (3, 2)])
def test_fused_segments_match_reference(segments, slices, monkeypatch):
    """The fused forward split into segments (each from a zero state, then corrected) computes the same
    function: outputs, final state and every gradient, with and without a backward to follow."""
    force_p_slices(monkeypatch, slices)
    monkeypatch.setattr(fused, "_fused_segments", lambda programs, nblocks, device: segments)
    case = Case(2, 40, 2, 64, 16, 1, 16, z=True, D="hp", bias=True, softplus=True, h0=True)  # 3 blocks of 16
    inputs = make_inputs(case)
    check_against_ref(case, inputs, path="fused")
    kwargs = dict(chunk_size=case.Q, dt_softplus=True, return_final_states=True)
    with torch.no_grad():
        y, final = ssd_scan_triton(**inputs, **kwargs, path="fused")
        y_ref, final_ref = ssd_scan_ref(**{k: v.double() for k, v in inputs.items()}, **kwargs)
    assert rel_err(y, y_ref) < TOL[case.dtype] and rel_err(final, final_ref) < TOL[case.dtype]


@pytest.mark.parametrize("slices", [1, 2, 4])
def test_fused_p_slices_match_reference(slices, monkeypatch):
    """Each slice count computes the same function: outputs, final state and every gradient."""
    if 64 // slices < fused._MIN_SLICE:
        pytest.skip(f"P slices of {64 // slices} are below the GPU's smallest ({fused._MIN_SLICE})")
    force_p_slices(monkeypatch, slices)
    case = Case(2, 40, 2, 64, 16, 1, 16, z=True, D="hp", bias=True, softplus=True, h0=True)
    check_against_ref(case, make_inputs(case), path="fused")


def test_dispatch_reaches_triton():
    case = TINY[1]
    check_against_ref(case, make_inputs(case, seed=3), scan=lambda **kw: ssd_scan(**kw, backend="triton"))


def test_large_dt_is_finite_and_accurate(path):
    """Δ of tens with A down to −2: log-decays near −40 a token, far below exp's fp32 range over a
    chunk. The decay between two tokens is exp(cs_t − cs_s), a difference of cumulative sums of
    order 10³, which keeps only ~1e-4 of absolute precision in fp32: hence the looser bound."""
    case = Case(1, 96, 2, 16, 16, 1, 32, z=True, D="h", bias=True, softplus=True, h0=True)
    check_against_ref(case, make_inputs(case, dt_scale=-10.0), tol=5e-3, path=path)  # softplus(−10·(noise − 2)) ≈ 20


def test_strided_inputs_equal_contiguous(path):
    """x, B, C, dt as views into one packed projection, as the Mamba-2 block makes them."""
    b, l, h, p, g, n = 2, 24, 2, 16, 1, 16
    gen = torch.Generator().manual_seed(4)
    packed = torch.randn(b, l, h * p + 2 * g * n + h, generator=gen).to(DEVICE)
    x, B, C, dt = packed.split([h * p, g * n, g * n, h], dim=-1)
    x, B, C = x.unflatten(-1, (h, p)), B.unflatten(-1, (g, n)), C.unflatten(-1, (g, n))
    A = -torch.rand(h, generator=gen).to(DEVICE) - 0.5
    args = dict(chunk_size=16, dt_bias=torch.zeros(h, device=DEVICE), dt_softplus=True)
    y = ssd_scan_triton(x, dt, A, B, C, **args, path=path)
    y_contiguous = ssd_scan_triton(*(t.contiguous() for t in (x, dt, A, B, C)), **args, path=path)
    assert torch.equal(y, y_contiguous)


def test_step_by_step_equals_scan(path):
    """Decoding token by token from the initial state gives the chunked forward's outputs and final
    state, and each step agrees with the reference step."""
    case = Case(2, 12, 4, 16, 16, 2, 16, z=True, D="h", bias=True, softplus=True, h0=True)
    t = {k: v.detach() for k, v in make_inputs(case).items()}
    y, final = ssd_scan_triton(chunk_size=case.Q, dt_softplus=True, return_final_states=True, **t, path=path)
    state = t.pop("initial_states").clone()
    state_ref = state.clone()
    constant = {k: t[k] for k in ("A", "D", "dt_bias")}
    ys = []
    for i in range(case.l):
        token = {k: t[k][:, i] for k in PER_TOKEN}
        ys.append(ssd_step_triton(state, **token, **constant, dt_softplus=True))
        y_ref = ssd_step_ref(state_ref, **token, **constant, dt_softplus=True)
        assert rel_err(ys[-1], y_ref) < 1e-5
    assert rel_err(state, state_ref) < 1e-5
    assert rel_err(torch.stack(ys, dim=1), y) < TOL[case.dtype]
    assert rel_err(state, final) < TOL[case.dtype]


def test_bad_sizes_are_errors():
    t = {k: v.detach() for k, v in make_inputs(Case(1, 8, 2, 16, 16, 1, 16)).items()}
    with pytest.raises(ValueError, match=r"^chunk_size=0: must be a positive integer$"):
        ssd_scan_triton(chunk_size=0, **t)
    with pytest.raises(ValueError, match=r"^ngroups=3: must divide nheads=2$"):
        ssd_scan_triton(chunk_size=16, **(t | dict(B=t["B"].expand(1, 8, 3, 16), C=t["C"].expand(1, 8, 3, 16))))
    with pytest.raises(ValueError, match=r"^dt: shape \(1, 8, 3\), expected \(1, 8, 2\)$"):
        ssd_scan_triton(chunk_size=16, **(t | dict(dt=torch.rand(1, 8, 3))))


GPU_CASES = [
    Case(2, 1024, 4, 64, 64, 1, 256, torch.bfloat16, z=True, D="h", bias=True, softplus=True, h0=True),
    Case(2, 1024, 4, 64, 64, 1, 256, torch.float32, z=True, D="h", bias=True, softplus=True, h0=True),
    Case(1, 777, 8, 32, 128, 2, 128, torch.float16, z=True, D="hp", bias=True, softplus=True, h0=True),
    Case(2, 500, 6, 64, 64, 3, 64, torch.bfloat16, D="h", bias=True, softplus=True),
    Case(3, 300, 16, 64, 128, 1, 256, torch.bfloat16, z=True, D="h", bias=True, softplus=True),
    # States too large for the fused kernels' shared memory in fp32 (the chunked path takes both `path`s),
    # and the largest N they take in bf16.
    Case(2, 300, 4, 64, 128, 1, 128, torch.float32, z=True, D="hp", bias=True, softplus=True, h0=True),
    Case(1, 200, 4, 64, 256, 1, 64, torch.bfloat16, z=True, D="h", bias=True, softplus=True, h0=True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_matches_reference_gpu(case, path):
    check_against_ref(case, make_inputs(case), path=path)


@pytest.mark.gpu
@pytest.mark.parametrize("slices", [1, 2])
def test_fused_p_slices_match_reference_gpu(slices, monkeypatch):
    force_p_slices(monkeypatch, slices)
    case = Case(2, 1000, 4, 64, 128, 1, 256, torch.bfloat16, z=True, D="hp", bias=True, softplus=True, h0=True)
    check_against_ref(case, make_inputs(case), path="fused")


@pytest.mark.gpu
@pytest.mark.parametrize("segments,slices", [(2, 2), (4, 1)])
def test_fused_segments_match_reference_gpu(segments, slices, monkeypatch):
    force_p_slices(monkeypatch, slices)
    monkeypatch.setattr(fused, "_fused_segments", lambda programs, nblocks, device: segments)
    case = Case(2, 1000, 4, 64, 128, 1, 256, torch.bfloat16, z=True, D="hp", bias=True, softplus=True, h0=True)
    check_against_ref(case, make_inputs(case), path="fused")


@pytest.mark.gpu
def test_long_sequence_large_dt_gpu(path):
    case = Case(1, 8192, 2, 64, 128, 1, 256, torch.bfloat16, D="h", bias=True, softplus=True, h0=True)
    check_against_ref(case, make_inputs(case, dt_scale=-5.0), tol=5e-2, path=path)  # softplus(−5·(noise − 2)) ≈ 10


@pytest.mark.gpu
def test_step_by_step_equals_scan_gpu(path):
    case = Case(2, 64, 8, 64, 128, 2, 32, z=True, D="hp", bias=True, softplus=True, h0=True)
    t = {k: v.detach() for k, v in make_inputs(case).items()}
    y, final = ssd_scan_triton(chunk_size=case.Q, dt_softplus=True, return_final_states=True, **t, path=path)
    state = t.pop("initial_states").clone()
    constant = {k: t[k] for k in ("A", "D", "dt_bias")}
    ys = [ssd_step_triton(state, **{k: t[k][:, i] for k in PER_TOKEN}, **constant, dt_softplus=True)
          for i in range(case.l)]
    assert rel_err(torch.stack(ys, dim=1), y) < TOL[case.dtype]
    assert rel_err(state, final) < TOL[case.dtype]


@pytest.mark.gpu
def test_forward_backward_capture_in_cuda_graph(path):
    """No host syncs: forward and backward replay from a CUDA graph with fresh inputs."""
    case = Case(2, 300, 4, 64, 64, 1, 128, torch.bfloat16, z=True, D="h", bias=True, softplus=True, h0=True)
    static = make_inputs(case)
    assert_graph_replays_eager(lambda **t: ssd_scan_triton(**t, chunk_size=case.Q, dt_softplus=True, path=path), static,
                               make_inputs(case, seed=7), list(static))