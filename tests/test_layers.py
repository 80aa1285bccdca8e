"""vnt.layers: the fast channels-last blocks (b, n, c, d): VN-ReLU, layer norm, invariants,
attention (folded and projected, with and without epsilon bias), initialisation, layout errors."""
import os
import subprocess
import sys
import warnings

import pytest
import torch
from einops import rearrange

from models import BACKENDS, folded_calls, rotate
from vnt import fast, layers
from vnt.fast import kernels, ops
from vnt.model import VNTransformerConfig, VNTransformerEncoder
from vnt.rotations import random_rotations


def test_vn_relu_projects_onto_plane_orthogonal_to_k():
    relu = layers.VNReLU(4, k_norm_floor=0.0).double()
    x = torch.randn(50, 3, 4, dtype=torch.float64)
    qk = torch.nn.functional.linear(x, relu.weight)
    q, k = qk.chunk(2, dim=-1)
    out = relu(x)
    neg = (q * k).sum(-2) < 0
    assert neg.any() and (~neg).any()
    # where <q, k> < 0 the output is orthogonal to k (the original multiplied by k, not k/|k|)
    dot = (out * k).sum(-2)
    assert dot[neg].abs().max() < 1e-10
    torch.testing.assert_close(out.transpose(-1, -2)[~neg], q.transpose(-1, -2)[~neg])
    # leaky variant: alpha q + (1 - alpha) relu
    leaky = layers.VNReLU(4, negative_slope=0.2, k_norm_floor=0.0).double()
    leaky.load_state_dict(relu.state_dict())
    torch.testing.assert_close(leaky(x), 0.2 * q + 0.8 * out)


def test_vn_relu_k_norm_floor_is_exact_above_it_and_continuous_at_zero():
    """Default k_norm_floor 0.2: a k at least 0.2 x its point's RMS k norm gets the exact projection
    (orthogonal to k); a shorter one projects as if it had that length, so as k -> 0 the output
    goes to q continuously (the exact map jumps to q's projection on a plane set by rounding)."""
    torch.manual_seed(0)
    relu = layers.VNReLU(8).double()
    assert relu.k_norm_floor == 0.2
    q = torch.randn(200, 3, 8, dtype=torch.float64)
    k = torch.randn(200, 3, 8, dtype=torch.float64)
    k[:, :, 0] *= torch.logspace(-8, 0, 200, dtype=torch.float64)[:, None]  # channel 0: k from ~0 to full
    out = relu.activate(torch.cat((q, k), dim=-1))
    k_sq, dot = (k * k).sum(-2), (q * k).sum(-2)
    floor_sq = 0.04 * k_sq.mean(-1, keepdim=True)
    neg, long_k = dot < 0, k_sq >= floor_sq
    assert (neg & long_k).sum() > 100 and (neg & ~long_k).sum() > 10
    assert (out * k).sum(-2)[neg & long_k].abs().max() < 1e-10             # exact where k is long enough
    expect = q - (dot.clamp(max=0) / torch.maximum(k_sq, floor_sq)).unsqueeze(-2) * k
    torch.testing.assert_close(out, expect)
    # continuity at k = 0: the shortest k (1e-8 x) leaves q unchanged to ~1e-8; the exact map does not
    exact = layers.VNReLU(8, k_norm_floor=0.0).double().activate(torch.cat((q, k), dim=-1))
    rows = neg[:, 0] & (k_sq[:, 0] < 1e-12)
    assert rows.any()
    assert (out[rows, :, 0] - q[rows, :, 0]).abs().max() < 1e-6
    assert (exact[rows, :, 0] - q[rows, :, 0]).abs().max() > 0.1
    with pytest.raises(ValueError, match="k_norm_floor"):
        layers.VNReLU(8, k_norm_floor=1.0)


# every (slope, floor) eagerly; the fused kernels (each new constant compiles anew, ~5 s) at two
RELU_CASES = [(slope, floor, False) for slope in (0.0, 0.2) for floor in (0.0, 0.2, 0.9)]
RELU_CASES += [(0.0, 0.2, True), (0.2, 0.0, True)]


@pytest.mark.parametrize("slope, floor, fused", RELU_CASES,
                         ids=[f"slope{a}-floor{b}-{'fused' if f else 'eager'}" for a, b, f in RELU_CASES])
def test_vn_relu_hand_written_backward_is_autograds(slope, floor, fused, monkeypatch):
    """VNReLU's activation has its own backward (for memory traffic), eager and as the compiled fused
    kernels (vnt.kernels): the same values and gradients as autograd through the written-out
    formula, and torch.autograd.gradcheck passes."""
    use_plan(monkeypatch, fused_kernels=fused, fused_min_numel=0)  # these inputs are smaller than the default threshold

    def written_out(qk):
        q, k = qk.chunk(2, dim=-1)
        dot, k_sq = (q * k).sum(-2, keepdim=True), (k * k).sum(-2, keepdim=True)
        if floor > 0:
            k_sq = torch.maximum(k_sq, k_sq.mean(-1, keepdim=True) * floor ** 2)
        return q - dot.clamp(max=0) / k_sq.clamp(min=1e-12) * (1 - slope) * k

    relu = layers.VNReLU(8, negative_slope=slope, k_norm_floor=floor)
    qk = torch.randn(3, 5, 3, 16, dtype=torch.float64)
    qk[..., 8:] *= torch.logspace(-3, 0, 8, dtype=torch.float64)  # short k too: the floor's branch
    qk.requires_grad_(True)
    g = torch.randn(3, 5, 3, 8, dtype=torch.float64)
    ours, ref = relu.activate(qk), written_out(qk)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, qk, g)[0], torch.autograd.grad(ref, qk, g)[0])
    assert torch.autograd.gradcheck(relu.activate, (qk,))
    if fused:  # the kernels ran: compiled, not fallen back to the eager code
        assert ops._relu_forward_fused.compiled is not None and ops._relu_forward_fused.error is None
        assert ops._relu_backward_fused.compiled is not None and ops._relu_backward_fused.error is None


def use_plan(monkeypatch, **changes) -> None:
    """The kernel plan with ``changes`` for this test (monkeypatch restores it)."""
    monkeypatch.setattr(fast.plan, "_plan", fast.KernelPlan(**{**fast.current().__dict__, **changes}))


def fused_then_eager(monkeypatch, run, *, min_numel: int) -> tuple[list, list]:
    """``run(batch)`` at batch 2 and 1 (the points are flattened, so batch size does not recompile) with
    vnt's fused kernels on from ``min_numel`` elements, then off, the same seed each time: (fused, eager)."""
    results = []
    for fused in (True, False):
        use_plan(monkeypatch, fused_kernels=fused, fused_min_numel=min_numel)
        torch.manual_seed(0)
        results.append([run(b) for b in (2, 1)])
    return results[0], results[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_vn_relu_is_the_eager_one_on_model_sized_inputs(dtype, monkeypatch):
    """The fused kernels against the eager passes at a feed-forward's shape (batch 1 and 2: the
    points are flattened, so batch size does not recompile), values and gradients to rounding."""
    relu = layers.VNReLU(64).to(dtype)

    def run(b):
        qk = torch.randn(b, 40, 11, 128, dtype=dtype, requires_grad=True)
        g = torch.randn(b, 40, 11, 64, dtype=dtype)
        out = relu.activate(qk)
        return out.detach(), torch.autograd.grad(out, qk, g)[0]

    # MIN_NUMEL below both batch sizes (56k and 113k elements): fused
    fused, eager = fused_then_eager(monkeypatch, run, min_numel=50_000)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    for (out_f, grad_f), (out_e, grad_e) in zip(fused, eager):
        torch.testing.assert_close(out_f, out_e, rtol=tol, atol=tol)
        torch.testing.assert_close(grad_f, grad_e, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_layer_norm_residual_is_the_eager_one(dtype, monkeypatch):
    """VNLayerNorm(x, residual=r) fused (the RMS norm on a CPU) against the eager norm + r: values and the
    gradients of x, r and gamma, at batch 2 and 1 (no recompile), to rounding; with the paper's norm
    or a mismatched residual it is the eager sum or a ValueError."""
    norm = layers.VNLayerNorm(64).to(dtype)
    with torch.no_grad():
        norm.gamma.uniform_(0.5, 1.5)

    def run(b):
        x = torch.randn(b, 40, 11, 64, dtype=dtype, requires_grad=True)
        r = torch.randn(b, 40, 11, 64, dtype=dtype, requires_grad=True)
        g = torch.randn(b, 40, 11, 64, dtype=dtype)
        out = norm(x, residual=r)
        return out.detach(), *torch.autograd.grad(out, (x, r, norm.gamma), g)

    # MIN_NUMEL below both batch sizes (28k and 56k elements): fused
    fused, eager = fused_then_eager(monkeypatch, run, min_numel=20_000)
    for kernel in (ops._rms_norm_residual_fused, ops._rms_norm_backward_fused):
        assert kernel.compiled is not None and kernel.error is None
    tol = {torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    for fused_row, eager_row in zip(fused, eager):
        for got, want in zip(fused_row, eager_row):
            torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
    use_plan(monkeypatch, fused_kernels=True)
    x = torch.randn(1, 40, 11, 64, dtype=dtype)
    torch.testing.assert_close(norm(x, residual=x), norm(x) + x, rtol=tol, atol=tol)
    paper = layers.VNLayerNorm(64, subtract_mean=True).to(dtype)
    torch.testing.assert_close(paper(x, residual=x), paper(x) + x)
    with pytest.raises(ValueError, match="residual must have the shape of x"):
        norm(x, residual=x[:, :3])


def test_fused_kernel_falls_back_to_eager_with_one_warning(monkeypatch):
    """A compiler that fails (no C++ toolchain, say): one warning naming the error, then the eager
    function, with the same result; disabled kernels are never compiled."""
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    fn = kernels.Fused(lambda x: x * 2, "test")
    x = torch.randn(3)
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        torch.testing.assert_close(fn(x), x * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(fn(x), x * 2)  # no second warning, no second attempt
    assert fn.compiled is None and "RuntimeError" in fn.error
    assert kernels.usable(x, min_numel=3) and not kernels.usable(x, min_numel=4)  # the size threshold
    use_plan(monkeypatch, fused_kernels=False)
    assert not kernels.usable(x, min_numel=0)


def test_kernel_plan_comes_from_the_environment():
    """VNT_FUSED_KERNELS=0 and VNT_KERNELS="key=value,..." set the plan's defaults; a bad entry names
    the variable and the settings."""
    code = ("from vnt import fast; import torch; p = fast.current(); "
            "print(p.fused_kernels, fast.kernels.usable(torch.ones(1), min_numel=1), p.fold, p.l2_written_out_max_scores)")
    env = {k: v for k, v in os.environ.items() if k not in (fast.plan.ENV, fast.plan.FUSED_ENV)}
    for extra, expect in (({fast.plan.FUSED_ENV: "0"}, "False False None 2097152"),
                          ({fast.plan.FUSED_ENV: "1"}, "True True None 2097152"),
                          ({fast.plan.ENV: "fold=false,l2_written_out_max_scores=0"}, "True True False 0")):
        out = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, check=True,
                             capture_output=True, text=True).stdout.split()
        assert " ".join(out) == expect
    bad = subprocess.run([sys.executable, "-c", code], env={**env, fast.plan.ENV: "speed=11"},
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "VNT_KERNELS: unknown setting 'speed'" in bad.stderr


def test_configure_changes_the_plan_for_a_block_or_the_process():
    before = fast.current()
    with fast.configure(fold=False) as p:
        assert p.fold is False and fast.current().fold is False
    assert fast.current() == before
    with pytest.raises(ValueError, match="sdpa_kernels"):
        fast.configure(sdpa_kernels=("warp",))
    assert fast.current() == before


def test_vn_layer_norm_is_continuous_and_paper_mode_is_the_layer_norm_of_norms():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, dtype=torch.float64)
    norm = layers.VNLayerNorm(16).double()
    paper = layers.VNLayerNorm(16, subtract_mean=True).double()
    with torch.no_grad():
        norm.gamma.uniform_(0.5, 1.5)
        paper.gamma.copy_(norm.gamma)
    lengths = x.norm(dim=-2, keepdim=True)
    # default: x_d gamma_d / sqrt(mean_d |x_d|^2)
    torch.testing.assert_close(norm(x), x * norm.gamma / lengths.pow(2).mean(-1, keepdim=True).sqrt())
    # paper (subtract_mean=True): direction x_d / |x_d| times the layer norm of the norms (F.layer_norm's eps)
    ln = torch.nn.functional.layer_norm(lengths, (16,), paper.gamma, None)
    torch.testing.assert_close(paper(x), x / lengths * ln)
    # both are invariant to the scale of a point's features (up to their eps)
    torch.testing.assert_close(norm(7 * x), norm(x))
    torch.testing.assert_close(paper(7 * x), paper(x), rtol=1e-4, atol=1e-4)  # F.layer_norm eps 1e-5
    # a channel vector shrinking to zero (1e-4 x, still above eps): its output shrinks with it by default,
    # and stays unit-order, along a direction that is rounding noise in float32, in the paper's
    tiny = x.clone()
    tiny[..., 0] *= 1e-4
    assert norm(tiny)[..., 0].norm(dim=-2).max() < 1e-3
    assert paper(tiny)[..., 0].norm(dim=-2).min() > 0.1


def test_vn_invariant_is_per_channel_and_invariant():
    inv = layers.VNInvariant(6).double()
    x = torch.randn(2, 5, 3, 6, dtype=torch.float64)
    rot = random_rotations(1)[0]
    out = inv(x)
    assert out.shape == (2, 5, 6, 3)
    torch.testing.assert_close(inv(rotate(x, rot)), out)


def test_vn_attention_latents_shape_and_equivariance():
    attn = layers.VNAttention(8, dim_head=4, heads=2, backend="sdpa", num_latents=3).double()
    x = torch.randn(2, 10, 3, 8, dtype=torch.float64)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 6:] = False
    out = attn(x, mask=mask)
    assert out.shape == (2, 3, 3, 8)
    rot = random_rotations(1)[0]
    torch.testing.assert_close(attn(rotate(x, rot), mask=mask), rotate(out, rot))


@pytest.mark.parametrize("eps", [0.0, 1e-2], ids=["eps0", "eps1e-2"])
@pytest.mark.parametrize("heads", [1, 2, 5], ids=["1head", "heads<=dim", "heads>dim"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_folded_attention_is_the_projected_function(backend, heads, eps):
    """Folded attention (with the epsilon bias as Attend's key term and a constant) equals the
    projected form: outputs and gradients of the input and every weight, in float64."""
    x = torch.randn(2, 12, 5, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, 7:] = False
    outs = []
    for fold in (False, True):
        torch.manual_seed(0)
        attn = fast.planned(layers.VNAttention(4, dim_coor=5, dim_head=4, heads=heads, backend=backend,
                                          bias_epsilon=eps).double(), fold=fold)
        out = attn(x, mask=mask)
        outs.append((out, *torch.autograd.grad(out.pow(2).sum(), [x, *attn.parameters()])))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)


def test_fold_is_chosen_by_cost_and_the_plan():
    """By default self attention folds where dim <= dim_head; the plan forces it either way; cross
    attention (latents) never folds; the first layer folds on a low-rank input unless the plan says no."""
    assert fast.folds(dim=16, dim_head=16) and not fast.folds(dim=32, dim_head=16)
    with fast.configure(fold=True):
        assert fast.folds(dim=32, dim_head=16)
        x = torch.randn(1, 4, 3, 16)
        latents = layers.VNAttention(16, dim_head=16, heads=2, num_latents=2)
        with folded_calls() as calls:
            latents(x)
        assert calls == []
    with fast.configure(fold=False):
        assert not fast.folds(dim=16, dim_head=16) and not fast.folds_low_rank(rank=1, dim_head=16)
    assert fast.folds_low_rank(rank=4, dim_head=16) and not fast.folds_low_rank(rank=32, dim_head=16)


def test_init_is_fan_in_scaled():
    lin = layers.VNLinear(256, 256)
    x = torch.randn(64, 3, 256)
    ratio = lin(x).std() / x.std()
    assert 0.8 < ratio < 1.2, ratio  # the original's randn weights gave ~16


@pytest.mark.parametrize("fusion", [None, 8], ids=["fusion_off", "fusion_on"])
@pytest.mark.parametrize("backend", ["math", "l2"])
def test_softmax_is_not_saturated_at_init(backend, fusion):
    """The original's randn weights put ~all weight on one key; L2 attention at fan-in scale put
    most weight on the query point itself (its distance to itself is 0): mean max probability
    0.58 without fusion and 1.00 with fusion here."""
    from vnt import VNTransformer
    torch.manual_seed(0)
    model = VNTransformer(dim=64, depth=1, dim_head=64, heads=8, dim_feat=fusion, attn_backend=backend)
    c = model.config.dim_coor_total
    x = model.encoder.proj_in(torch.randn(2, 128, c, 1))
    attn = model.encoder.layers[0][0]
    heads = "b n c (h d) -> b h n (c d)"
    with torch.no_grad():
        if backend == "l2":
            q, _ = attn.to_qkv.split(x, 2)
            q = rearrange(q, heads, h=8)
            sim = -torch.cdist(q, q).square()
        else:
            q, k, _ = (rearrange(t, heads, h=8) for t in attn.to_qkv.split(x, 3))
            sim = q @ k.transpose(-1, -2)
        probs = (sim * q.shape[-1] ** -0.5).softmax(-1)
    assert probs.max(-1).values.mean() < 0.5
    if backend == "l2":  # the point itself is not what the softmax picks
        assert probs.diagonal(dim1=-2, dim2=-1).mean() < 0.1


@pytest.mark.parametrize("dim_coor", [3, 67])
def test_l2_init_gives_the_point_itself_a_one_nat_margin(dim_coor):
    """VNAttention's docstring: on unit-variance features the tied map's initial scale makes
    scale * mean_j |q_i - q_j|^2 (the point's own logit advantage) about 1, whatever dim_coor."""
    torch.manual_seed(0)
    attn = layers.VNAttention(64, dim_head=64, heads=8, dim_coor=dim_coor, backend="l2")
    with torch.no_grad():
        q, _ = attn.to_qkv.split(torch.randn(2, 128, dim_coor, 64), 2)
        q = rearrange(q, "b n c (h d) -> b h n (c d)", h=8)
        margin = torch.cdist(q, q).square().sum(-1).mean() / 127 * q.shape[-1] ** -0.5
    assert 0.8 < margin < 1.25, margin


@pytest.mark.parametrize("block", [
    lambda: layers.VNLinear(8, 4), lambda: layers.VNReLU(8), lambda: layers.VNLayerNorm(8),
    lambda: layers.VNFeedForward(8), lambda: layers.VNAttention(8, dim_head=4, heads=2),
    lambda: layers.VNWeightedPool(8), lambda: layers.VNInvariant(8),
], ids=["linear", "relu", "layer_norm", "feed_forward", "attention", "pool", "invariant"])
def test_blocks_reject_the_original_layout(block):
    """Features in the original's (b, n, channels, coordinates) layout raise ValueError naming ours
    (vnt.compat's blocks take that layout)."""
    module = block()
    ours = torch.randn(2, 5, 3, 8)
    assert torch.isfinite(module(ours)).all()
    with pytest.raises(ValueError, match=r"coordinate axis, 8\) with the channels last.*\(2, 5, 8, 3\)"):
        module(rearrange(ours, "b n c d -> b n d c"))


def test_encoder_checks_the_coordinate_axis():
    enc = VNTransformerEncoder(VNTransformerConfig(dim=8, depth=1, dim_head=4, heads=2, dim_coor=5, attn_backend="l2"))
    assert [layer[0].attend.backend for layer in enc.layers] == ["l2"]
    assert enc(torch.randn(2, 6, 5, 8)).shape == (2, 6, 5, 8)
    with pytest.raises(ValueError, match=r"\(batch, points, 5, 8\)"):
        enc(torch.randn(2, 6, 3, 8))


def test_head_linear_writes_every_heads_map_head_major_with_its_gradients():
    """head_linear(x, w)[b, h] = x[b] @ w[h]: values and both gradients (gradcheck, float64); under
    bf16 autocast it computes in bfloat16 (one GEMM over every head's columns, then the head-major copy)
    and returns float32 gradients; bad shapes are a ValueError."""
    x = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(fast.head_linear(x, w), torch.einsum("b m d, h d e -> b h m e", x, w))
    assert torch.autograd.gradcheck(fast.head_linear, (x, w))
    xf, wf = x.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast.head_linear(xf, wf)
    out.float().square().sum().backward()
    ref = torch.einsum("b m d, h d e -> b h m e", x, w)
    gx, gw = torch.autograd.grad(ref.square().sum(), [x, w])
    assert out.dtype == torch.bfloat16 and xf.grad.dtype == wf.grad.dtype == torch.float32
    assert (out.double() - ref).abs().max() <= 0.02 * ref.abs().max()
    assert (xf.grad.double() - gx).abs().max() <= 0.05 * gx.abs().max()
    assert (wf.grad.double() - gw).abs().max() <= 0.05 * gw.abs().max()
    with pytest.raises(ValueError, match=r"x \(batch, rows, d\) and weight \(heads, d, e\)"):
        fast.head_linear(x, w.transpose(1, 2))


@pytest.mark.parametrize("bias", [True, False])
def test_ones_column_linear_is_f_linear_with_its_gradients(bias):
    """ones_column_linear (the feed-forward's first GEMM: the bias as a ones column of x, dw as (x^T g)^T)
    is F.linear: values and every gradient (gradcheck, float64), on (..., k) inputs; under autocast it
    is F.linear itself."""
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True) if bias else None
    torch.testing.assert_close(fast.ones_column_linear(x, w, b), torch.nn.functional.linear(x, w, b))
    assert torch.autograd.gradcheck(fast.ones_column_linear, (x, w, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast.ones_column_linear(x.float(), w.float(), None if b is None else b.float())
    assert out.dtype == torch.bfloat16
