"""The Triton gated RMSNorm (kernels/gated_norm/triton.py) against its PyTorch twin `gated_rms_norm_ref`
run in fp64 on the same (rounded) inputs: the output and the gradients of y, z and weight with random
upstream gradients, over one and several groups, z a strided slice of a packed projection, and without
a gate (z = None: the blocks' plain RMSNorm); dispatch; CUDA-graph capture.

Unmarked tests run at tiny shapes on the CPU under TRITON_INTERPRET=1 (as CI runs them) or on a GPU:
row counts that are not a multiple of the interpreter's blocks (4 rows, backward chunks of 8) and
group sizes that are not a power of two. Tests marked `gpu` run at the workbench's shapes. Error is
‖out − ref‖ / ‖ref‖: fp32 1e-5 (dweight, a sum over rows, 1e-4 on the GPU), bf16 1e-2 (y, z, out, dy
and dz rounded to bf16).
"""

from dataclasses import dataclass

import pytest
import torch

from kernels.gated_norm import gated_rms_norm
from kernels.gated_norm.reference import gated_rms_norm_ref
from tests.conftest import (
    INTERPRET, assert_graph_replays_eager, assert_matches_fp64_reference, fill_cuda_allocator_with_nan,
    skip_module_without_triton,
)

skip_module_without_triton()

from kernels.gated_norm.triton import gated_rms_norm_triton  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
TOL_SUMMED = {torch.float32: 1e-5 if INTERPRET else 1e-4, torch.bfloat16: 1e-2}
EPS = 1e-5


@dataclass(frozen=True)
class Case:
    lead: tuple[int, ...]  # the leading dimensions: (batch, seqlen) as in Mamba-2, or (rows,)
    d: int
    ngroups: int
    dtype: torch.dtype = torch.float32
    packed: bool = True  # z a slice of a wider tensor, as in_proj's output; else contiguous
    gated: bool = True  # False: no z (the plain RMSNorm)

    def __str__(self):
        dims = "x".join(map(str, self.lead)) + f"-d{self.d}-g{self.ngroups}"
        flags = ["packed"] * (self.packed and self.gated) + ["ungated"] * (not self.gated)
        return "-".join([dims, str(self.dtype).removeprefix("torch."), *flags])


def make_inputs(case: Case, seed: int = 0) -> dict[str, torch.Tensor]:
    """y (the SSD output, contiguous) and z (a view into a packed tensor when case.packed) in case.dtype,
    weight fp32 around 1. z is a non-leaf view when packed, left out when not gated; all require grad."""
    gen = torch.Generator().manual_seed(seed)
    width = 2 * case.d + 13 if case.packed else case.d  # z first, as in [z, x, B, C, dt]; odd row stride
    packed = torch.randn(*case.lead, width, generator=gen).to(DEVICE, case.dtype).requires_grad_()
    inputs = dict(
        y=torch.randn(*case.lead, case.d, generator=gen).to(DEVICE, case.dtype).requires_grad_(),
        z=packed[..., : case.d] if case.packed else packed,
        weight=(1 + 0.3 * torch.randn(case.d, generator=gen)).to(DEVICE).requires_grad_(),
    )
    return inputs if case.gated else {k: v for k, v in inputs.items() if k != "z"}


def check_against_ref(case: Case, inputs: dict, norm=gated_rms_norm_triton):
    group_size = case.d // case.ngroups
    out = assert_matches_fp64_reference(str(case), lambda z=None, **t: norm(z=z, **t, group_size=group_size, eps=EPS),
                                        lambda z=None, **t: gated_rms_norm_ref(z=z, **t, group_size=group_size,
                                                                               eps=EPS), inputs,
                                        TOL[case.dtype], {"weight": TOL_SUMMED[case.dtype]})
    assert out.dtype == case.dtype and out.shape == (*case.lead, case.d)


TINY = [
    Case((2, 13), 48, 1),
    Case((2, 13), 48, 2),
    Case((2, 13), 60, 3),  # groups of 20 channels: masked tiles of 32
    Case((27,), 40, 1, packed=False),
    Case((1, 3), 24, 2),  # fewer rows than a block
    Case((2, 11), 48, 2, torch.bfloat16),
    Case((2, 13), 40, 1, gated=False),
    Case((2, 11), 48, 1, torch.bfloat16, gated=False),
]


@pytest.mark.parametrize("case", TINY, ids=str)
def test_matches_reference(case):
    check_against_ref(case, make_inputs(case))


def test_dispatch():
    """backend="triton" runs the kernels; "auto" on CPU tensors and "torch" run the reference."""
    case = Case((2, 5), 32, 2)
    check_against_ref(case, make_inputs(case, seed=2), norm=lambda **kw: gated_rms_norm(**kw, backend="triton"))
    t = {k: v.detach() for k, v in make_inputs(case, seed=2).items()}
    ref = gated_rms_norm_ref(**t, group_size=16)
    assert torch.equal(gated_rms_norm(**t, group_size=16, backend="torch"), ref)
    if not t["y"].is_cuda:
        assert torch.equal(gated_rms_norm(**t, group_size=16), ref)


def test_reference_is_the_models_norm():
    """The reference in fp32 is the formula of models/norm.py's GatedRMSNorm before the kernels."""
    y, z, w = torch.randn(3, 8), torch.randn(3, 8), torch.arange(1.0, 9.0)
    g = (y * torch.nn.functional.silu(z)).view(3, 2, 4)
    expected = (g / g.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()).view(3, 8) * w
    torch.testing.assert_close(gated_rms_norm_ref(y, z, w, 4), expected)
    # ungated, over the whole row: torch's RMSNorm, which models/norm.py's RMSNorm replaced
    torch.testing.assert_close(gated_rms_norm_ref(y, None, w, 8), torch.nn.functional.rms_norm(y, (8,), w, 1e-5))


def test_strided_equals_contiguous():
    case = Case((2, 9), 48, 2)
    t = {k: v.detach() for k, v in make_inputs(case, seed=3).items()}
    assert not t["z"].is_contiguous()
    out = gated_rms_norm_triton(**t, group_size=24)
    assert torch.equal(out, gated_rms_norm_triton(**(t | dict(z=t["z"].contiguous())), group_size=24))
    assert out.is_contiguous()


def test_bad_inputs_are_errors():
    t = {k: v.detach() for k, v in make_inputs(Case((1, 4), 48, 1)).items()}
    with pytest.raises(ValueError, match=r"^group_size=20: must be a positive integer dividing d=48$"):
        gated_rms_norm_triton(**t, group_size=20)
    with pytest.raises(ValueError, match=r"^y\(1, 4, 48\), z\(1, 4, 40\), weight\(48,\): must be"):
        gated_rms_norm_triton(t["y"], t["z"][..., :40], t["weight"], group_size=48)


GPU_CASES = [Case((128, 256), d, 1, torch.bfloat16) for d in (256, 320, 640)] + [
    Case((128, 256), 512, 2, torch.bfloat16),
    Case((64, 256), 384, 1, torch.float32),
    Case((3, 1000), 1280, 4, torch.bfloat16, packed=False),
    Case((128, 256), 128, 1, torch.float32, gated=False),  # the LM's norms at d_model 128
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_matches_reference_gpu(case):
    fill_cuda_allocator_with_nan()
    check_against_ref(case, make_inputs(case))


@pytest.mark.gpu
def test_forward_backward_capture_in_cuda_graph():
    """No host syncs: forward and backward replay from a CUDA graph with fresh inputs."""
    case = Case((128, 256), 320, 1, torch.bfloat16)
    static = make_inputs(case)
    assert_graph_replays_eager(lambda **t: gated_rms_norm_triton(**t, group_size=case.d), static,
                               make_inputs(case, seed=7), list(static))