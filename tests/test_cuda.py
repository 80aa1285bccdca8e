"""The CUDA paths: SDPA kernel selection (flash, memory-efficient), CPU/CUDA agreement on every
backend, float32 equivariance at depth 4 / n = 256 on the GPU, and a bf16-autocast training step.

Skipped without a GPU (CI has none); run on a CUDA machine with ``pytest tests/test_cuda.py``.
On a GPU the L2 backend always runs on the SDPA kernels (its written-out tied form is CPU-only), so
these tests are the only ones that exercise l2's augmented SDPA path at the sizes users train at.
"""
import pytest
import torch

from models import inputs, small_model
from test_equivariance import deep_case, padded, rotations
from vnt import VNTransformer, equivariance_error, rounding_floor

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA_BACKENDS = ["math", "sdpa", "l2", "l2_math"]


def _forward_backward(model, coors, feats, mask):
    model.zero_grad(set_to_none=True)
    out = model(coors, feats=feats, mask=mask)
    out = out if isinstance(out, tuple) else (out,)
    loss = sum(o[mask].float().square().sum() for o in out)
    loss.backward()
    return [o.detach() for o in out], {n: p.grad.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("eps", [0.0, 1e-6], ids=["eps0", "eps1e-6"])
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_matches_cpu_outputs_and_gradients(backend, eps):
    """Same weights, same padded inputs (garbage in the padding): CUDA float32 equals CPU float64 in
    outputs and every parameter's gradient. On the GPU l2 runs the augmented SDPA kernels; on the CPU
    at this size it runs written out with tied keys: two computations that share no kernel."""
    torch.manual_seed(0)
    cpu = small_model(backend, 8, dtype=torch.float64, bias_epsilon=eps)
    gpu = small_model(backend, 8, dtype=torch.float32, bias_epsilon=eps).cuda()
    gpu.load_state_dict(cpu.state_dict())
    coors, feats, mask = inputs(dim_feat=8)
    ref_out, ref_grad = _forward_backward(cpu, coors, feats, mask)
    out, grad = _forward_backward(gpu, coors.float().cuda(), feats.float().cuda(), mask.cuda())
    for a, b in zip(out, ref_out):
        assert _rel(a.cpu()[mask.cpu()], b[mask]) < 1e-5
    scale = max(g.abs().max().item() for g in ref_grad.values())  # some exact gradients are 0 (e.g. l2's key bias)
    for name, g in grad.items():
        assert _rel(g.cpu(), ref_grad[name], scale) < 1e-4, name


def _rel(a, ref, scale=None):
    """max abs difference relative to the reference's largest magnitude (float32 rounding, accumulated)."""
    return ((a.double() - ref).abs().max() / (ref.abs().max() if scale is None else scale)).item()


@pytest.mark.parametrize("backend", ["sdpa", "l2"])
def test_flash_kernel_runs_under_bf16_autocast(backend):
    """What runs is what was asked for: without a mask, under bf16 autocast, both SDPA backends get
    the flash kernel (the l2 key term rides in an augmented feature slot, widths padded to 8); in
    float32 flash cannot run (it takes half precision only), and the memory-efficient kernel does,
    never the O(n^2) math fallback; with a key-padding mask, which flash does not take, efficient."""
    model = VNTransformer(dim=16, depth=2, dim_head=16, heads=4, dim_feat=8, attn_backend=backend).cuda()
    coors, feats = torch.randn(2, 64, 3, device="cuda"), torch.randn(2, 64, 8, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(coors, feats=feats)
    assert model.encoder.attention_kernels() == ["flash", "flash"]
    model(coors, feats=feats)
    assert model.encoder.attention_kernels() == ["efficient", "efficient"]
    mask = torch.ones(2, 64, dtype=torch.bool, device="cuda")
    mask[1, 40:] = False
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(coors, feats=feats, mask=mask)
    assert model.encoder.attention_kernels() == ["efficient", "efficient"]


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_float32_deep_long_equivariance_on_cuda(backend):
    """The float32 target (<= 1e-5 at depth 4, n = 256, fusion on, padding with garbage) on the GPU's
    kernels, and within 25x of the float32 rounding floor, as tests/test_equivariance.py asks on CPU."""
    torch.manual_seed(0)
    model, coors, feats = deep_case(backend, 16)
    coors, mask = padded(coors)
    model, coors, feats, mask = model.cuda(), coors.cuda(), feats.cuda(), mask.cuda()
    err = equivariance_error(model, coors, feats=feats, mask=mask, **rotations()).rel
    floor = rounding_floor(model, coors, feats=feats, mask=mask, activations=True, **rotations()).rel
    assert err <= 1e-5, err
    assert err <= 25 * floor, (err, floor)


@pytest.mark.parametrize("backend", ["sdpa", "l2"])
def test_bf16_autocast_training_step_on_cuda(backend):
    """A bf16-autocast step (float32 master weights) on the flash kernel: finite loss and gradients,
    gradients that point the way float32's do, and an equivariance error within 8x of the bf16
    rounding floor (what bf16 storage of each block's output forces on the same weights)."""
    torch.manual_seed(0)
    model = VNTransformer(dim=32, depth=2, dim_head=16, heads=4, dim_feat=8, attn_backend=backend).cuda()
    coors, feats = torch.randn(2, 128, 3, device="cuda"), torch.randn(2, 128, 8, device="cuda")
    mask = torch.ones(2, 128, dtype=torch.bool, device="cuda")
    _, g32 = _forward_backward(model, coors, feats, mask)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, g16 = _forward_backward(model, coors, feats, mask)
    assert model.encoder.attention_kernels() == ["flash", "flash"]
    flat32 = torch.cat([g.flatten() for g in g32.values()])
    flat16 = torch.cat([g16[n].float().flatten() for n in g32])
    assert torch.isfinite(flat16).all()
    assert torch.nn.functional.cosine_similarity(flat16, flat32, dim=0) > 0.99
    kw = dict(feats=feats, **rotations())
    err = equivariance_error(model, coors, autocast_dtype=torch.bfloat16, **kw).rel
    floor = rounding_floor(model, coors, dtype=torch.bfloat16, activations=True, **kw).rel
    assert err <= 8 * floor, (err, floor)
