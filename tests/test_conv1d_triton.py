"""The Triton causal conv1d (kernels/conv1d/triton.py) against its PyTorch twin `causal_conv1d_ref` run
in fp64 on the same (rounded) inputs: the output and the gradients of x, weight and bias with random
upstream gradients, over widths 2-4, with and without bias and SiLU, x a strided slice of a packed
projection; dispatch; CUDA-graph capture; and the Mamba blocks, which give the same outputs and
parameter gradients with the conv and the gated norm in Triton as with their references.

Unmarked tests run at tiny shapes on the CPU under TRITON_INTERPRET=1 (as CI runs them) or on a GPU:
seqlen 37 and 40 channels span several of the interpreter's blocks (8 rows, 16 channels, backward
chunks of 16 rows) and end inside one. Tests marked `gpu` run at the workbench's shapes. Error is
‖out − ref‖ / ‖ref‖: fp32 1e-5 (no matrix products: the GPU's fp32 is exact fp32 too; dweight and
dbias, sums over batch·seqlen terms, 1e-4 on the GPU), bf16 1e-2 (x, out and dx rounded to bf16).
"""

from dataclasses import dataclass

import pytest
import torch

from kernels.conv1d import causal_conv1d
from kernels.conv1d.reference import causal_conv1d_ref
from tests.conftest import (
    INTERPRET, assert_graph_replays_eager, assert_matches_fp64_reference, fill_cuda_allocator_with_nan, rel_err,
    skip_module_without_triton,
)

skip_module_without_triton()

from kernels.conv1d.triton import causal_conv1d_triton  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
TOL_SUMMED = {torch.float32: 1e-5 if INTERPRET else 1e-4, torch.bfloat16: 1e-2}


@dataclass(frozen=True)
class Case:
    b: int
    l: int
    c: int
    width: int
    dtype: torch.dtype = torch.float32
    bias: bool = True
    silu: bool = True
    packed: bool = True  # x a slice of a wider (b, l, ·) tensor, as in_proj's output; else contiguous

    def __str__(self):
        flags = [name for name in ("bias", "silu", "packed") if getattr(self, name)]
        dims = f"b{self.b}-l{self.l}-c{self.c}-w{self.width}"
        return "-".join([dims, str(self.dtype).removeprefix("torch."), *flags])


def make_inputs(case: Case, seed: int = 0) -> dict[str, torch.Tensor]:
    """x in case.dtype (a view into a packed tensor when case.packed), weight and bias fp32 as the model
    keeps them under autocast. Returns x (a non-leaf view when packed), weight, bias, all requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    width = case.c + 13 if case.packed else case.c  # an odd row stride: no alignment beyond the dtype's
    packed = torch.randn(case.b, case.l, width, generator=gen).to(DEVICE, case.dtype).requires_grad_()
    t = dict(x=packed[..., 5 : 5 + case.c] if case.packed else packed,
             weight=(torch.randn(case.c, case.width, generator=gen) / case.width**0.5).to(DEVICE).requires_grad_())
    if case.bias:
        t["bias"] = (0.5 * torch.randn(case.c, generator=gen)).to(DEVICE).requires_grad_()
    return t


def check_against_ref(case: Case, inputs: dict, conv=causal_conv1d_triton):
    activation = "silu" if case.silu else None
    out = assert_matches_fp64_reference(str(case), lambda **t: conv(**t, activation=activation),
                                        lambda **t: causal_conv1d_ref(**t, activation=activation), inputs,
                                        TOL[case.dtype], {k: TOL_SUMMED[case.dtype] for k in ("weight", "bias")})
    assert out.dtype == case.dtype and out.shape == (case.b, case.l, case.c)


TINY = [Case(2, 37, 40, width, bias=bias, silu=silu) for width in (2, 3, 4) for bias in (True, False)
        for silu in (True, False)]
TINY += [
    Case(2, 37, 40, 4, packed=False),
    Case(1, 5, 24, 4),  # shorter than a block, and barely longer than the conv
    Case(2, 29, 40, 4, torch.bfloat16),
    Case(2, 29, 40, 3, torch.bfloat16, bias=False),
]


@pytest.mark.parametrize("case", TINY, ids=str)
def test_matches_reference(case):
    check_against_ref(case, make_inputs(case))


def test_dispatch():
    """backend="triton" runs the kernels; "auto" on CPU tensors and "torch" run the reference; a state
    runs the reference whatever the backend."""
    case = Case(1, 11, 24, 4)
    t = {k: v.detach() for k, v in make_inputs(case, seed=2).items()}
    check_against_ref(case, make_inputs(case, seed=2), conv=lambda **kw: causal_conv1d(**kw, backend="triton"))
    ref = causal_conv1d_ref(**t, activation="silu")
    assert torch.equal(causal_conv1d(**t, activation="silu", backend="torch"), ref)
    if not t["x"].is_cuda:
        assert torch.equal(causal_conv1d(**t, activation="silu"), ref)
    state = torch.zeros(1, 24, 3, device=DEVICE)
    out = causal_conv1d(**t, activation="silu", state=state, backend="triton")
    assert torch.equal(out, ref) and torch.equal(state, t["x"][:, -3:].transpose(1, 2))


def test_reference_is_mamba_ssm_causal_conv1d():
    """mamba_ssm's definition (causal_conv1d_ref): conv1d padded by width − 1 on both sides, first seqlen
    outputs kept, on x (b, c, l)."""
    x, w, b = torch.randn(2, 9, 6), torch.randn(6, 3), torch.randn(6)
    expected = torch.nn.functional.conv1d(x.transpose(1, 2), w[:, None], b, padding=2, groups=6)[..., :9]
    torch.testing.assert_close(causal_conv1d_ref(x, w, b), expected.transpose(1, 2))
    torch.testing.assert_close(causal_conv1d_ref(x, w, b, "silu"), torch.nn.functional.silu(expected).transpose(1, 2))


def test_strided_equals_contiguous():
    case = Case(2, 19, 40, 4)
    t = {k: v.detach() for k, v in make_inputs(case, seed=3).items()}
    assert not t["x"].is_contiguous()
    out = causal_conv1d_triton(**t, activation="silu")
    assert torch.equal(out, causal_conv1d_triton(**(t | dict(x=t["x"].contiguous())), activation="silu"))
    assert out.is_contiguous()


def test_bad_inputs_are_errors():
    t = {k: v.detach() for k, v in make_inputs(Case(1, 8, 16, 4)).items()}
    with pytest.raises(ValueError, match=r"^width=5: the Triton causal conv1d takes widths 2 to 4$"):
        causal_conv1d_triton(t["x"], torch.randn(16, 5, device=DEVICE))
    with pytest.raises(ValueError, match=r"^activation='relu': must be None, 'silu' or 'swish'$"):
        causal_conv1d_triton(**t, activation="relu")
    with pytest.raises(ValueError, match=r"^x\(1, 8, 16\), weight\(15, 4\): must be \(b, l, c\) and \(c, width\)$"):
        causal_conv1d_triton(t["x"], torch.randn(15, 4, device=DEVICE))


def force_backend(monkeypatch, backend: str):
    """Make every causal_conv1d and gated_rms_norm call take `backend`, as "auto" does on a GPU for
    "triton": the models call them with the default backend."""
    import importlib

    import kernels.conv1d
    import kernels.gated_norm

    pick = (lambda module, _, x: importlib.import_module(module)) if backend == "triton" else (lambda *_: None)
    monkeypatch.setattr(kernels.conv1d, "load_backend", pick)
    monkeypatch.setattr(kernels.gated_norm, "load_backend", pick)


def test_auto_falls_back_to_the_reference_for_widths_the_kernels_do_not_take(monkeypatch):
    force_backend(monkeypatch, "triton")
    x, weight = torch.randn(1, 8, 16, device=DEVICE), torch.randn(16, 5, device=DEVICE)
    with pytest.warns(UserWarning, match=r"^width=5: .*; backend='auto' uses the PyTorch reference$"):
        out = causal_conv1d(x, weight, activation="silu")
    assert torch.equal(out, causal_conv1d_ref(x, weight, activation="silu"))


def check_blocks_equal(block, u, monkeypatch, tol_out, tol_grad):
    """A Mamba block's output and every parameter's gradient are the same with the conv (and Mamba-2's
    norm) in Triton as in PyTorch: the kernels are wired in without transposes and with the right taps."""
    results = {}
    for backend in ("torch", "triton"):
        force_backend(monkeypatch, backend)
        out = block(u)
        grads = torch.autograd.grad(out.square().sum(), list(block.parameters()))
        results[backend] = (out, grads)
    (out, grads), (out_ref, grads_ref) = results["triton"], results["torch"]
    assert rel_err(out, out_ref) < tol_out
    for (name, _), g, g_ref in zip(block.named_parameters(), grads, grads_ref):
        assert rel_err(g, g_ref) < tol_grad, name


def make_block(mixer: str, d_model: int, **mamba2):
    from models.mixers.mamba1 import Mamba1
    from models.mixers.mamba2 import Mamba2

    torch.manual_seed(0)
    block = Mamba1(d_model, d_state=4 if d_model < 64 else 16) if mixer == "mamba1" else Mamba2(d_model, **mamba2)
    return block.to(DEVICE)


@pytest.mark.parametrize("mixer", ["mamba1", "mamba2"])
def test_mamba_blocks_equal_with_either_backend(mixer, monkeypatch):
    block = make_block(mixer, 16, d_state=8, headdim=8, ngroups=2, chunk_size=8)
    check_blocks_equal(block, torch.randn(2, 13, 16, device=DEVICE), monkeypatch, 1e-5, 1e-4)


GPU_CASES = [Case(128, 256, c, 4, torch.bfloat16) for c in (256, 320, 640)] + [
    Case(128, 256, 384, 4, torch.float32),
    Case(4, 1000, 200, 3, torch.bfloat16, bias=False),
    Case(2, 777, 136, 2, torch.bfloat16, silu=False, packed=False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_matches_reference_gpu(case):
    fill_cuda_allocator_with_nan()
    check_against_ref(case, make_inputs(case))


@pytest.mark.gpu
def test_forward_backward_capture_in_cuda_graph():
    """No host syncs: forward and backward replay from a CUDA graph with fresh inputs."""
    case = Case(128, 256, 320, 4, torch.bfloat16)
    static = make_inputs(case)
    assert_graph_replays_eager(lambda **t: causal_conv1d_triton(**t, activation="silu"), static,
                               make_inputs(case, seed=7), list(static))


@pytest.mark.gpu
@pytest.mark.parametrize("mixer", ["mamba1", "mamba2"])
def test_mamba_blocks_equal_with_either_backend_gpu(mixer, monkeypatch):
    """fp32, where only the conv and the norm change between the runs. The scans run their Triton kernels
    in both, and their tf32 products amplify the conv's last-bit differences: a Mamba-2 block's dt_bias
    gradient differed by 1.3e-3 between two such runs of an earlier conv kernel (H200)."""
    block = make_block(mixer, 128, d_state=64, headdim=64, ngroups=1, chunk_size=256)
    check_blocks_equal(block, torch.randn(4, 300, 128, device=DEVICE), monkeypatch, 5e-3, 5e-3)
