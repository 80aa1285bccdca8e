import re
from pathlib import Path

import pytest
import torch
from einops import rearrange

from vnt import (PAPER_NORMS, VNAttention, VNFeedForward, VNInvariant, VNLayerNorm, VNLinear, VNReLU, VNTransformer,
                 VNTransformerConfig, VNTransformerEncoder, VNWeightedPool, equivariance_error, rounding_floor)
from vnt.equivariance import DTYPE_TOLERANCES
from vnt.rotations import euler_rotation, random_rotations

BACKENDS = ["math", "sdpa", "l2", "l2_math"]
FUSION = {"fusion_off": None, "fusion_on": 8}


def small_model(backend, dim_feat=None, dtype=torch.float64, **kw):
    kw = {"dim": 16, "depth": 2, "dim_head": 8, "heads": 2, **kw}
    return VNTransformer(dim_feat=dim_feat, attn_backend=backend, **kw).to(dtype)


def inputs(b=3, n=20, dim_feat=None, dtype=torch.float64, pad=True):
    coors = torch.randn(b, n, 3, dtype=dtype)
    feats = torch.randn(b, n, dim_feat, dtype=dtype) if dim_feat else None
    mask = torch.ones(b, n, dtype=torch.bool)
    if pad:
        mask[1, n // 2:] = False
        mask[2, n - 3:] = False
        coors = coors.masked_fill(~mask[..., None], 1e3)  # garbage in the padding
        coors[1, -1] = float("nan")
    return coors, feats, mask


@pytest.mark.parametrize("fold", [False, True], ids=["projected", "folded"])
@pytest.mark.parametrize("fusion", FUSION.values(), ids=FUSION.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_so3_equivariance_float64(backend, fusion, fold):
    model = small_model(backend, fusion, attn_fold=fold)
    coors, feats, mask = inputs(dim_feat=fusion)
    err = equivariance_error(model, coors, feats=feats, mask=mask, num_rotations=4)
    assert err.rel < DTYPE_TOLERANCES[torch.float64], err


@pytest.mark.parametrize("backend", BACKENDS)
def test_se3_equivariance_per_sample_translation(backend):
    model = small_model(backend, 8, translation_equivariance=True)
    coors, feats, mask = inputs(dim_feat=8)
    err = equivariance_error(model, coors, feats=feats, mask=mask, translate=True, translation_scale=50.0)
    assert err.rel < DTYPE_TOLERANCES[torch.float64], err


def test_translation_invariant_output_does_not_move():
    model = small_model("math", translation_invariant=True)
    coors, _, mask = inputs()
    err = equivariance_error(model, coors, mask=mask, translate=True)
    assert err.rel < DTYPE_TOLERANCES[torch.float64], err
    # and the expectation is really "does not move": claiming it translates must fail
    err_wrong = equivariance_error(model, coors, mask=mask, translate=True, output_translates=True)
    assert err_wrong.rel > 1e-2


def test_centering_uses_each_samples_own_valid_points():
    """The original took one mean over the batch and padding; shifting sample 0 moved sample 1."""
    model = small_model("math", translation_equivariance=True)
    coors, _, mask = inputs()
    out = model(coors, mask=mask)
    moved = coors.clone()
    moved[0] += 100.0
    moved[1, ~mask[1]] = -7.0  # different garbage in the padding
    out2 = model(moved, mask=mask)
    torch.testing.assert_close(out2[1][mask[1]], out[1][mask[1]])
    torch.testing.assert_close(out2[2][mask[2]], out[2][mask[2]])
    torch.testing.assert_close(out2[0], out[0] + 100.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_never_changes_valid_outputs(backend):
    model = small_model(backend, 8)
    coors, feats, _ = inputs(b=2, n=12, dim_feat=8, pad=False)
    ref_c, ref_f = model(coors, feats=feats)
    extra = 7
    padded_c = torch.cat((coors, torch.randn(2, extra, 3) * 1e4), dim=1)
    padded_f = torch.cat((feats, torch.randn(2, extra, 8) * 1e4), dim=1)
    mask = torch.ones(2, 12 + extra, dtype=torch.bool)
    mask[:, 12:] = False
    out_c, out_f = model(padded_c, feats=padded_f, mask=mask)
    torch.testing.assert_close(out_c[:, :12], ref_c, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out_f[:, :12], ref_f, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("pair", [("sdpa", "math"), ("l2", "l2_math")], ids=["sdpa_vs_math", "l2_vs_l2_math"])
def test_backends_agree_with_math_path(pair, dtype):
    """Outputs and input gradients of a fused backend match its written-out reference."""
    fast, ref = pair
    m_fast = small_model(fast, 8, dtype=dtype)
    m_ref = small_model(ref, 8, dtype=dtype)
    m_ref.load_state_dict(m_fast.state_dict())
    coors, feats, mask = inputs(dim_feat=8, dtype=dtype)

    def run(model):
        c = coors.clone().requires_grad_(True)
        out = model(c, feats=feats, mask=mask)[0]
        grad, = torch.autograd.grad(out[mask].sum(), c)
        return out[mask].double(), grad.double()

    (o_fast, g_fast), (o_ref, g_ref) = run(m_fast), run(m_ref)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(o_fast, o_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(g_fast, g_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("fusion", FUSION.values(), ids=FUSION.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_folded_attention_is_the_same_function(backend, fusion):
    """Folded (multi-query) attention equals the projected form, outputs and every gradient."""
    m_proj = small_model(backend, fusion, attn_fold=False)
    m_fold = small_model(backend, fusion, attn_fold=True)
    m_fold.load_state_dict(m_proj.state_dict())
    assert [layer[0].fold for layer in m_fold.encoder.layers] == [True, True]
    assert [layer[0].fold for layer in m_proj.encoder.layers] == [False, False]
    coors, feats, mask = inputs(dim_feat=fusion)
    results = []
    for model in (m_proj, m_fold):
        out = model(coors, feats=feats, mask=mask)
        out = torch.cat(out, dim=-1) if isinstance(out, tuple) else out
        grads = torch.autograd.grad(out[mask].pow(2).sum(), list(model.parameters()), allow_unused=True)
        results.append((out[mask], grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-9, atol=1e-10)
    for g_proj, g_fold in zip(results[0][1], results[1][1]):
        assert (g_proj is None) == (g_fold is None)
        if g_proj is not None:
            scale = g_proj.abs().max().clamp(min=1.0)
            assert (g_proj - g_fold).abs().max() <= 1e-8 * scale


@pytest.mark.parametrize("heads", [2, 5], ids=["heads<=dim", "heads>dim"])
def test_folded_l2_on_sdpa_matches_projected(heads):
    """The folded L2 path on SDPA carries its augmentation in extra coordinate rows when heads <= dim
    and falls back to Attend's augmented copies otherwise; both equal the projected form."""
    x = torch.randn(2, 12, 3, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, 7:] = False
    outs = []
    for fold in (False, True):
        torch.manual_seed(0)
        attn = VNAttention(4, dim_head=4, heads=heads, attn_backend="l2", fold=fold).double()
        out = attn(x, mask=mask)
        outs.append((out, *torch.autograd.grad(out.pow(2).sum(), [x, attn.to_qkv.weight])))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)


def test_fold_is_chosen_by_cost_and_refuses_bias():
    assert VNTransformer(dim=16, depth=1, dim_head=16, heads=2).encoder.layers[0][0].fold
    assert not VNTransformer(dim=32, depth=1, dim_head=16, heads=2).encoder.layers[0][0].fold
    assert not VNTransformer(dim=16, depth=1, dim_head=16, heads=2, bias_epsilon=0.1).encoder.layers[0][0].fold
    with pytest.raises(ValueError, match="bias_epsilon"):
        VNTransformer(dim=16, depth=1, dim_head=16, heads=2, bias_epsilon=0.1, attn_fold=True)
    with pytest.raises(ValueError, match="num_latents"):
        VNAttention(16, dim_head=16, heads=2, num_latents=2, fold=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attend_shared_keys_equal_per_head_copies(backend):
    """k, v with one head (multi-query form) give what their per-head copies give, with and
    without per-head squared key norms (the L2 backends' k_sq)."""
    from vnt.attend import Attend
    b, h, n, e = 2, 3, 10, 16
    q = torch.randn(b, h, n, e, dtype=torch.float64)
    kv = torch.randn(b, 1, n, e, dtype=torch.float64)
    k_sq = torch.rand(b, h, n, dtype=torch.float64) * 4
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, 6:] = False
    attend, ref = Attend(backend=backend), Attend(backend="l2_math" if backend.startswith("l2") else "math")
    expanded = kv.expand(b, h, n, e).contiguous()
    for sq in (None, k_sq) if backend.startswith("l2") else (None,):
        out = attend(q, kv, kv, mask=mask, scale=0.3, k_sq=sq)
        torch.testing.assert_close(out, ref(q, expanded, expanded, mask=mask, scale=0.3, k_sq=sq))
    if backend.startswith("l2"):  # k_sq is what enters the softmax: -|q - k|^2 uses it, not |k|^2
        sim = 2 * q @ expanded.transpose(-1, -2) - k_sq[:, :, None, :]
        sim = (0.3 * sim).masked_fill(~mask[:, None, None, :], float("-inf"))
        torch.testing.assert_close(attend(q, kv, kv, mask=mask, scale=0.3, k_sq=k_sq), sim.softmax(-1) @ expanded)


def test_l2_attention_is_the_scaled_l2_distance():
    """'l2' (augmented SDPA) and 'l2_math' equal softmax(-|q - k|^2 / sqrt(e)) written with cdist.
    Difference 8: 0.1.0 scaled only the 2 q.k term, softmax(2 q.k / sqrt(e) - |q|^2 - |k|^2), which
    at VN head dims (e = coordinate axis x dim_head, ~10^2 - 10^3) ranks keys by their norms more
    than by their distance to q."""
    from vnt.attend import Attend
    e = 3 * 16
    q = torch.randn(2, 3, 10, e, dtype=torch.float64)
    v = torch.randn(2, 3, 10, e, dtype=torch.float64)
    scale = e ** -0.5
    sq = q.pow(2).sum(-1)
    original = (2 * scale * q @ q.transpose(-1, -2) - sq[..., :, None] - sq[..., None, :]).softmax(-1) @ v
    l2 = (-scale * torch.cdist(q, q) ** 2).softmax(-1) @ v
    for backend in ("l2", "l2_math"):
        ours = Attend(backend=backend)(q, q, v)
        torch.testing.assert_close(ours, l2)
        assert (ours - original).abs().max() > 0.1
    try:
        from VN_transformer.attend import Attend as OriginalAttend
    except ImportError:  # the bench extra brings it; the formula above stands in for it
        return
    torch.testing.assert_close(OriginalAttend(l2_dist=True)(q, q, v), original)


def test_bias_epsilon_breaks_equivariance_growing_with_epsilon():
    coors, feats, mask = inputs(dim_feat=8)
    errs = []
    for eps in (0.0, 1e-6, 1e-4, 1e-2):
        torch.manual_seed(1)
        model = small_model("math", 8, bias_epsilon=eps)
        errs.append(equivariance_error(model, coors, feats=feats, mask=mask,
                                       generator=torch.Generator().manual_seed(0)).rel)
    assert errs[0] < 1e-10
    assert all(b > a * 10 for a, b in zip(errs, errs[1:])), errs


DEEP = dict(dim=32, depth=4, dim_head=16, heads=4)  # the float32 check: depth 4, n = 256


def deep_case(backend, fusion, fold=None):
    model = VNTransformer(**DEEP, dim_feat=fusion, attn_backend=backend, attn_fold=fold)
    coors = torch.randn(2, 256, 3)
    feats = torch.randn(2, 256, fusion) if fusion else None
    return model, coors, feats


def padded(coors):
    """A mask padding the second sample's last 100 points, with garbage (1e3, NaN) there."""
    mask = torch.ones(coors.shape[:2], dtype=torch.bool)
    mask[1, -100:] = False
    coors = coors.masked_fill(~mask[..., None], 1e3)
    coors[1, -1] = float("nan")
    return coors, mask


def rotations(seed=0):
    return {"num_rotations": 2, "generator": torch.Generator().manual_seed(seed)}


@pytest.mark.parametrize("fusion", [None, 16], ids=["fusion_off", "fusion_on"])
@pytest.mark.parametrize("backend, fold", [("math", False), ("math", True), ("sdpa", False), ("sdpa", True),
                                           ("l2", None)])
def test_float32_deep_long_equivariance(backend, fold, fusion):
    """The issue's float32 target: relative error <= 1e-5 at depth 4, n = 256, every backend and
    attention form, fusion on and off, garbage in the padding (measured 1.4e-6 - 5.8e-6 over 3
    seeds). Also asserted: the float32 error stays within 25x of ``rounding_floor`` with every VN
    block's output rounded to float32 (exact arithmetic inside the blocks; measured 2.8x - 8.4x), so
    a sloppy low-precision op fails here even while the absolute level still passes."""
    model, coors, feats = deep_case(backend, fusion, fold)
    coors, mask = padded(coors)
    err = equivariance_error(model, coors, feats=feats, mask=mask, **rotations()).rel
    floor = rounding_floor(model, coors, feats=feats, mask=mask, activations=True, **rotations()).rel
    assert err <= 1e-5, err
    assert err <= 25 * floor, (err, floor)


def test_paper_norms_put_even_exact_float32_arithmetic_above_the_target():
    """Why vnt's defaults differ from the paper's VN-LayerNorm and VN-ReLU (README difference 10):
    with the paper's, the same weights computed exactly (float64) from float32-rounded inputs already
    miss 1e-5 at depth 4 / n = 256 without fusion (1.2e-5 - 5.3e-5 over 6 seeds), so no float32
    implementation of that function meets the target; with the defaults that floor is ~1e-7."""
    model, coors, _ = deep_case("math", None)
    paper = VNTransformer(**DEEP, attn_backend="math", **PAPER_NORMS)
    paper.load_state_dict(model.state_dict())  # same parameters, only the two maps differ
    assert rounding_floor(paper, coors, **rotations()).rel > 1e-5
    assert rounding_floor(model, coors, **rotations()).rel < 1e-6
    assert rounding_floor(paper, coors, dtype=torch.float64, **rotations()).rel < 1e-10


def test_paper_norms_are_equivariant_in_float64():
    model = small_model("math", 8, **PAPER_NORMS)
    coors, feats, mask = inputs(dim_feat=8)
    assert equivariance_error(model, coors, feats=feats, mask=mask).rel < 1e-10


def test_rounding_floor_rounds_only_what_it_says():
    model = small_model("math", 8, dtype=torch.float32)
    coors, feats, mask = inputs(dim_feat=8, dtype=torch.float32)
    kw = dict(feats=feats, mask=mask, **rotations())
    exact = rounding_floor(model, coors, dtype=torch.float64, activations=True, **kw).rel
    f32_in = rounding_floor(model, coors, **kw).rel
    f32_act = rounding_floor(model, coors, activations=True, **kw).rel
    bf16_act = rounding_floor(model, coors, dtype=torch.bfloat16, activations=True, **kw).rel
    assert exact < 1e-12
    assert 1e-9 < f32_in < f32_act < 1e-4
    assert bf16_act > 1e3 * f32_act
    # the model itself is left as it was: float32, no hooks
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


def test_vn_relu_projects_onto_plane_orthogonal_to_k():
    relu = VNReLU(4, k_norm_floor=0.0).double()
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
    leaky = VNReLU(4, negative_slope=0.2, k_norm_floor=0.0).double()
    leaky.load_state_dict(relu.state_dict())
    torch.testing.assert_close(leaky(x), 0.2 * q + 0.8 * out)


def test_vn_relu_k_norm_floor_is_exact_above_it_and_continuous_at_zero():
    """Default k_norm_floor 0.2: a k at least 0.2 x its point's RMS k norm gets the exact projection
    (orthogonal to k); a shorter one projects as if it had that length, so as k -> 0 the output
    goes to q continuously (the exact map jumps to q's projection on a plane set by rounding)."""
    torch.manual_seed(0)
    relu = VNReLU(8).double()
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
    exact = VNReLU(8, k_norm_floor=0.0).double().activate(torch.cat((q, k), dim=-1))
    rows = neg[:, 0] & (k_sq[:, 0] < 1e-12)
    assert rows.any()
    assert (out[rows, :, 0] - q[rows, :, 0]).abs().max() < 1e-6
    assert (exact[rows, :, 0] - q[rows, :, 0]).abs().max() > 0.1
    with pytest.raises(ValueError, match="k_norm_floor"):
        VNReLU(8, k_norm_floor=1.0)


def test_vn_layer_norm_is_continuous_and_paper_mode_is_the_layer_norm_of_norms():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, dtype=torch.float64)
    norm = VNLayerNorm(16).double()
    paper = VNLayerNorm(16, subtract_mean=True).double()
    with torch.no_grad():
        norm.gamma.uniform_(0.5, 1.5)
        paper.gamma.copy_(norm.gamma)
    lengths = x.norm(dim=-2, keepdim=True)
    # default: x_d gamma_d / sqrt(mean_d |x_d|^2)
    torch.testing.assert_close(norm(x), x * norm.gamma / lengths.pow(2).mean(-1, keepdim=True).sqrt())
    # paper (subtract_mean=True): direction x_d / |x_d| times the layer norm of the norms
    ln = torch.nn.functional.layer_norm(lengths, (16,), paper.gamma, None, eps=paper.eps)
    torch.testing.assert_close(paper(x), x / lengths * ln)
    # both are invariant to the scale of a point's features (up to their eps)
    torch.testing.assert_close(norm(7 * x), norm(x))
    torch.testing.assert_close(paper(7 * x), paper(x), rtol=1e-5, atol=1e-5)
    # a channel vector shrinking to zero (1e-4 x, still above eps): its output shrinks with it by default,
    # and stays unit-order, along a direction that is rounding noise in float32, in the paper's
    tiny = x.clone()
    tiny[..., 0] *= 1e-4
    assert norm(tiny)[..., 0].norm(dim=-2).max() < 1e-3
    assert paper(tiny)[..., 0].norm(dim=-2).min() > 0.1


def test_vn_invariant_is_per_channel_and_invariant():
    inv = VNInvariant(6).double()
    x = torch.randn(2, 5, 3, 6, dtype=torch.float64)
    rot = random_rotations(1)[0]
    out = inv(x)
    assert out.shape == (2, 5, 6, 3)
    rotated = torch.einsum("b n c d, e c -> b n e d", x, rot)
    torch.testing.assert_close(inv(rotated), out)


def test_vn_attention_latents_shape_and_equivariance():
    attn = VNAttention(8, dim_head=4, heads=2, num_latents=3, attn_backend="sdpa").double()
    x = torch.randn(2, 10, 3, 8, dtype=torch.float64)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 6:] = False
    out = attn(x, mask=mask)
    assert out.shape == (2, 3, 3, 8)
    rot = random_rotations(1)[0]
    rotated = torch.einsum("b n c d, e c -> b n e d", x, rot)
    torch.testing.assert_close(attn(rotated, mask=mask), torch.einsum("b n c d, e c -> b n e d", out, rot))


def test_init_is_fan_in_scaled():
    lin = VNLinear(256, 256)
    x = torch.randn(64, 3, 256)
    ratio = lin(x).std() / x.std()
    assert 0.8 < ratio < 1.2, ratio  # the original's randn weights gave ~16


@pytest.mark.parametrize("fusion", FUSION.values(), ids=FUSION.keys())
@pytest.mark.parametrize("backend", ["math", "l2"])
def test_softmax_is_not_saturated_at_init(backend, fusion):
    """The original's randn weights put ~all weight on one key; L2 attention at fan-in scale put
    most weight on the query point itself (its distance to itself is 0): mean max probability
    0.58 without fusion and 1.00 with fusion here."""
    torch.manual_seed(0)
    model = VNTransformer(dim=64, depth=1, dim_head=64, heads=8, dim_feat=fusion, attn_backend=backend)
    c = model.config.dim_coor_total
    x = model.proj_in(torch.randn(2, 128, c, 1))
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
    attn = VNAttention(64, dim_head=64, heads=8, dim_coor=dim_coor, attn_backend="l2")
    with torch.no_grad():
        q, _ = attn.to_qkv.split(torch.randn(2, 128, dim_coor, 64), 2)
        q = rearrange(q, "b n c (h d) -> b h n (c d)", h=8)
        margin = torch.cdist(q, q).square().sum(-1).mean() / 127 * q.shape[-1] ** -0.5
    assert 0.8 < margin < 1.25, margin


@pytest.mark.parametrize("fold", [False, True], ids=["projected", "folded"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_false_mask_gives_finite_outputs_and_grads(backend, fold):
    model = small_model(backend, 8, dtype=torch.float32, translation_equivariance=True, attn_fold=fold)
    coors, feats, mask = inputs(dim_feat=8, dtype=torch.float32)
    mask[0] = False
    feats.requires_grad_(True)
    c, f = model(coors, feats=feats, mask=mask)
    assert torch.isfinite(c).all() and torch.isfinite(f).all()
    (c.sum() + f.sum()).backward()
    assert torch.isfinite(feats.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_token_features():
    model = VNTransformer(dim=16, depth=1, dim_head=8, heads=2, num_tokens=21, dim_feat=8)
    coors = torch.randn(2, 10, 3)
    tokens = torch.randint(0, 21, (2, 10))
    c, f = model(coors, feats=tokens)
    assert c.shape == (2, 10, 3) and f.shape == (2, 10, 8)
    cat = model(coors, feats=tokens, return_concatted_coors_and_feats=True)
    assert cat.shape == (2, 10, 11)


def test_reduce_dim_out_false_keeps_original_layout():
    model = VNTransformer(dim=16, depth=1, dim_head=8, heads=2, reduce_dim_out=False)
    assert model(torch.randn(2, 10, 3)).shape == (2, 10, 16, 3)


BAD_INPUTS = {
    "coor_width": (dict(), lambda: (torch.randn(2, 5, 4), {}), r"\(batch, points, 3\)"),
    "coor_ndim": (dict(), lambda: (torch.randn(5, 3), {}), r"\(batch, points, 3\)"),
    "feat_width": (dict(dim_feat=8), lambda: (torch.randn(2, 5, 3), {"feats": torch.randn(2, 5, 7)}), r"\(2, 5, 8\)"),
    "feats_missing": (dict(dim_feat=8), lambda: (torch.randn(2, 5, 3), {}), r"dim_feat=8"),
    "mask_shape": (dict(), lambda: (torch.randn(2, 5, 3), {"mask": torch.ones(2, 6, dtype=torch.bool)}), r"\(2, 5\)"),
    "mask_dtype": (dict(), lambda: (torch.randn(2, 5, 3), {"mask": torch.ones(2, 5)}), r"bool"),
    "tokens_without_num_tokens": (dict(dim_feat=8), lambda: (torch.randn(2, 5, 3), {"feats": torch.zeros(2, 5, dtype=torch.long)}), r"num_tokens"),
    "int_coors": (dict(), lambda: (torch.zeros(2, 5, 3, dtype=torch.long), {}), r"floating point"),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises_value_error(case):
    kw, make, pattern = case
    model = VNTransformer(dim=8, depth=1, dim_head=4, heads=2, **kw)
    coors, extra = make()
    with pytest.raises(ValueError, match=pattern):
        model(coors, **extra)


@pytest.mark.parametrize("kw, pattern", [
    (dict(flash_attn=True, l2_dist_attn=True), "incompatible"),
    (dict(attn_backend="math", flash_attn=True), "contradicts"),
    (dict(attn_backend="fast"), "one of"),
    (dict(translation_equivariance=True, translation_invariant=True), "mutually exclusive"),
    (dict(sdpa_kernels=("warp",)), "sdpa_kernels"),
    (dict(bias_epsilon=-1.0), "bias_epsilon"),
    (dict(relu_k_norm_floor=1.0), "k_norm_floor"),
    (dict(typo_option=1), "typo_option"),
])
def test_bad_options_fail_at_construction(kw, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        VNTransformer(dim=8, depth=1, **kw)


def test_flags_map_to_backends_and_kernel_is_reported():
    assert VNTransformer(dim=8, depth=1, flash_attn=True).config.attn_backend == "sdpa"
    assert VNTransformer(dim=8, depth=1, l2_dist_attn=True).config.attn_backend == "l2"
    model = VNTransformer(dim=8, depth=2, dim_head=4, heads=2, flash_attn=True)
    model(torch.randn(1, 6, 3))
    assert all(k in ("flash", "efficient", "math") for k in model.encoder.attention_kernels())
    only_math = VNTransformer(dim=8, depth=1, dim_head=4, heads=2, flash_attn=True, sdpa_kernels=("math",))
    only_math(torch.randn(1, 6, 3))
    assert only_math.encoder.attention_kernels() == ["math"]
    # a kernel that cannot serve the inputs (no memory-efficient kernel on CPU) falls back, and says so;
    # a remembered kernel that stops serving them is tried first, then the others
    fallback = VNTransformer(dim=8, depth=1, dim_head=4, heads=2, flash_attn=True, sdpa_kernels=("efficient", "math"))
    fallback(torch.randn(1, 6, 3))
    if not torch.cuda.is_available():
        assert fallback.encoder.attention_kernels() == ["math"]
        attend = fallback.encoder.layers[0][0].attend
        attend._kernel_cache = {key: "efficient" for key in attend._kernel_cache}
        fallback(torch.randn(1, 6, 3))
        assert fallback.encoder.attention_kernels() == ["math"]


@pytest.mark.parametrize("block", [
    lambda: VNLinear(8, 4), lambda: VNReLU(8), lambda: VNLayerNorm(8), lambda: VNFeedForward(8),
    lambda: VNAttention(8, dim_head=4, heads=2), lambda: VNWeightedPool(8), lambda: VNInvariant(8),
], ids=["linear", "relu", "layer_norm", "feed_forward", "attention", "pool", "invariant"])
def test_building_blocks_reject_the_original_layout(block):
    """Features in the original's (b, n, channels, coordinates) layout raise ValueError naming ours."""
    module = block()
    ours = torch.randn(2, 5, 3, 8)
    out = module(ours)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"coordinate axis, 8\) with the channels last.*\(2, 5, 8, 3\)"):
        module(rearrange(ours, "b n c d -> b n d c"))


def test_building_blocks_take_the_original_keywords():
    """VNAttention and VNTransformerEncoder accept the original's dim_coor / l2_dist_attn / flash(_attn)."""
    assert VNAttention(8, dim_coor=5, l2_dist_attn=True).attend.backend == "l2"
    assert VNAttention(8, flash=True).attend.backend == "sdpa"
    assert VNAttention(8).attend.backend == "math"
    with pytest.raises(ValueError, match="incompatible"):
        VNAttention(8, flash=True, l2_dist_attn=True)
    enc = VNTransformerEncoder(8, depth=1, dim_head=4, heads=2, dim_coor=5, l2_dist_attn=True)
    assert [layer[0].attend.backend for layer in enc.layers] == ["l2"]
    assert enc(torch.randn(2, 6, 5, 8)).shape == (2, 6, 5, 8)
    with pytest.raises(ValueError, match=r"\(batch, points, 5, 8\)"):
        enc(torch.randn(2, 6, 3, 8))  # the coordinate axis is not dim_coor wide
    with pytest.raises(ValueError, match="contradicts"):
        VNTransformerEncoder(8, depth=1, attn_backend="math", flash_attn=True)


@pytest.mark.parametrize("backend, fold", [("math", False), ("sdpa", False), ("sdpa", True), ("l2", True),
                                           ("l2_math", False)])
def test_forward_and_backward_trace_whole_under_torch_compile(backend, fold):
    """No host synchronisation and no data-dependent Python branch in forward: torch.compile with
    fullgraph=True raises on any graph break (.item(), a branch on a tensor value, kernel probing).
    Traced cold, so the SDPA backends take the no-probe path; outputs and gradients equal eager."""
    model = small_model(backend, 4, dtype=torch.float32, attn_fold=fold, translation_equivariance=True,
                        dim_head=16)
    coors, feats, mask = inputs(dim_feat=4, dtype=torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    grads = []
    for fn in (compiled, model):
        model.zero_grad()
        out = fn(coors, feats=feats, mask=mask)[0]
        out[mask].square().sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (out_c, grad_c), (out_e, grad_e) = grads
    torch.testing.assert_close(out_c, out_e)
    for a, b in zip(grad_c, grad_e):
        torch.testing.assert_close(a, b)


def test_config_round_trip():
    model = VNTransformer(dim=8, depth=1, dim_feat=4, bias_epsilon=1e-4, attn_backend="sdpa")
    cfg = VNTransformerConfig.from_dict(model.config.to_dict())
    assert cfg == model.config
    assert VNTransformer.from_config(cfg).config == model.config
    with pytest.raises(ValueError, match="unknown"):
        VNTransformerConfig.from_dict({**cfg.to_dict(), "dmi": 3})


def test_rotations_are_haar_orthonormal_and_euler_matches_axes():
    rots = random_rotations(2000, generator=torch.Generator().manual_seed(0))
    eye = torch.eye(3, dtype=torch.float64).expand(2000, 3, 3)
    torch.testing.assert_close(rots @ rots.transpose(-1, -2), eye)
    torch.testing.assert_close(torch.linalg.det(rots), torch.ones(2000, dtype=torch.float64))
    # Haar: E[R] = 0 and E[trace R] = 0
    assert rots.mean(0).abs().max() < 0.05
    rz = euler_rotation(torch.pi / 2, 0.0, 0.0)
    torch.testing.assert_close(rz @ torch.tensor([1.0, 0, 0], dtype=torch.float64),
                               torch.tensor([0.0, 1, 0], dtype=torch.float64))


def test_readme_example_runs():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        if "# readme-test: skip" in block:
            continue
        exec(compile(block, "README.md", "exec"), {})
