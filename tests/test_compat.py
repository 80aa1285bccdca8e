"""Drop-in compatibility with the original VN-transformer 0.1.0, written from its public API and
README: every exported name, in the original's (..., channels, coordinate axis) layout, called the
way the original's README and tests call it, with only the import changed. Where the original
package is installed (the bench extra brings it), outputs are compared in float64 with the same
weights (``vnt.from_original_state_dict``): equal where the math is the same; where vnt fixed a bug,
equivariant and of the same shape, and equal once the test puts the original's formula back."""
import pytest
import torch

from vnt import (PAPER_NORMS, VNAttention, VNFeedForward, VNInvariant, VNLayerNorm, VNLinear, VNReLU, VNTransformer,
                 VNTransformerConfig, VNTransformerEncoder, VNWeightedPool, from_original_state_dict, layers, model)
from vnt.rotations import rot


def rotate_last(x, r):
    """Features in the original's layout (..., d, c) rotated: x @ R."""
    return x @ r


# ------------------------------------------------------------------------------------------------
# the original's public usage, import changed only


def test_readme_usage_of_the_original():
    model = VNTransformer(dim=64, depth=2, dim_head=64, heads=8, dim_feat=64, bias_epsilon=1e-6)
    coors = torch.randn(1, 32, 3)
    feats = torch.randn(1, 32, 64)
    mask = torch.ones(1, 32).bool()
    coors_out, feats_out = model(coors, feats=feats, mask=mask)
    assert coors_out.shape == (1, 32, 3) and feats_out.shape == (1, 32, 64)


@pytest.mark.parametrize("flags", [{}, {"l2_dist_attn": True}, {"flash_attn": True}], ids=["default", "l2", "flash"])
def test_vn_transformer_rotations_with_rot(flags):
    model = VNTransformer(dim=64, depth=2, dim_head=64, heads=8, **flags)
    coors = torch.randn(1, 32, 3)
    mask = torch.ones(1, 32).bool()
    r = rot(*torch.randn(3))
    out1 = model(coors @ r, mask=mask)
    out2 = model(coors, mask=mask) @ r
    assert torch.allclose(out1, out2, atol=1e-5)


def test_vn_transformer_early_fusion_and_se3():
    model = VNTransformer(dim=64, depth=2, dim_head=64, heads=8, dim_feat=64, translation_equivariance=True)
    coors, feats = torch.randn(1, 32, 3), torch.randn(1, 32, 64)
    r, t = rot(*torch.randn(3)), torch.randn(1, 1, 3)
    out1, feats1 = model(coors @ r + t, feats=feats)
    out2, feats2 = model(coors, feats=feats)
    assert torch.allclose(out1, out2 @ r + t, atol=1e-4) and torch.allclose(feats1, feats2, atol=1e-4)
    cat = model(coors, feats=feats, return_concatted_coors_and_feats=True)
    assert cat.shape == (1, 32, 67)


def test_vn_invariant_with_rot():
    layer = VNInvariant(64)
    coors = torch.randn(1, 32, 64, 3)
    r = rot(*torch.randn(3))
    out1, out2 = layer(coors), layer(coors @ r)
    assert torch.allclose(out1, out2, atol=1e-5)
    assert out1.shape == (1, 32, 64, 3)  # per channel (difference 3); out1.sum(dim=-2) is the original's


def test_vn_attention_perceiver_latents():
    layer = VNAttention(dim=64, dim_head=64, heads=8, num_latents=2)
    x = torch.randn(1, 32, 64, 3)
    mask = torch.ones(1, 32).bool()
    out = layer(x, mask=mask)
    assert out.shape == (1, 2, 64, 3)
    r = rot(*torch.randn(3))
    assert torch.allclose(layer(x @ r, mask=mask), out @ r, atol=1e-5)


@pytest.mark.parametrize("make, shape_in, shape_out", [
    (lambda: VNLinear(64, 128), (2, 10, 64, 3), (2, 10, 128, 3)),
    (lambda: VNLinear(64, 128, 1e-4), (2, 10, 64, 3), (2, 10, 128, 3)),
    (lambda: VNReLU(64), (2, 10, 64, 3), (2, 10, 64, 3)),
    (lambda: VNLayerNorm(64), (2, 10, 64, 3), (2, 10, 64, 3)),
    (lambda: VNFeedForward(64, 2), (2, 10, 64, 3), (2, 10, 64, 3)),
    (lambda: VNFeedForward(dim=64, mult=4, bias_epsilon=1e-4), (2, 10, 64, 3), (2, 10, 64, 3)),
    (lambda: VNAttention(64, 32, 4), (2, 10, 64, 3), (2, 10, 64, 3)),
    (lambda: VNAttention(dim=64, dim_head=32, heads=4, dim_coor=5, flash=True), (2, 10, 64, 5), (2, 10, 64, 5)),
    (lambda: VNWeightedPool(64), (2, 10, 64, 3), (2, 64, 3)),
    (lambda: VNWeightedPool(64, dim_out=32, num_pooled_tokens=4, squeeze_out_pooled_dim=False), (2, 10, 64, 3),
     (2, 4, 32, 3)),
    (lambda: VNTransformerEncoder(64, depth=2, dim_head=32, heads=4, dim_coor=3), (2, 10, 64, 3), (2, 10, 64, 3)),
    (lambda: VNTransformerEncoder(dim=64, depth=1, dim_coor=67, l2_dist_attn=True), (2, 10, 64, 67), (2, 10, 64, 67)),
    (lambda: VNInvariant(64, dim_coor=3), (2, 10, 64, 3), (2, 10, 64, 3)),
], ids=["linear", "linear_bias", "relu", "layer_norm", "ff", "ff_kw", "attention", "attention_flash_coor5", "pool",
        "pool_tokens", "encoder", "encoder_l2_fusion", "invariant"])
def test_every_exported_block_takes_the_original_layout(make, shape_in, shape_out):
    block = make()
    x = torch.randn(*shape_in)
    out = block(x)
    assert out.shape == shape_out
    r = rot(*torch.randn(3))
    if shape_in[-1] == 3 and not isinstance(block, VNInvariant):  # equivariant on the coordinate axis
        torch.testing.assert_close(block(x @ r), out @ r, rtol=1e-4, atol=1e-4)


def test_the_channels_last_layout_is_refused_with_the_expected_shape():
    with pytest.raises(ValueError, match=r"\(batch, points, 64, coordinate axis\).*got \(2, 10, 3, 64\)"):
        VNAttention(64, 32, 4)(torch.randn(2, 10, 3, 64))
    with pytest.raises(ValueError, match=r"\(batch, points, dim, dim_coor\) = \(batch, points, 64, 3\)"):
        VNTransformerEncoder(64, depth=1)(torch.randn(2, 10, 3, 64))


def test_the_fast_blocks_are_the_compatible_blocks_with_the_axes_swapped():
    """vnt.layers (channels last, what VNTransformer uses inside) and the public blocks are one
    implementation: the same weights give the same numbers, one transpose apart."""
    compat = VNTransformerEncoder(16, depth=2, dim_head=16, heads=2, dim_coor=5).double()
    fast = model.VNTransformerEncoder(VNTransformerConfig(dim=16, depth=2, dim_head=16, heads=2, dim_coor=5)).double()
    fast.load_state_dict(compat.state_dict())
    x = torch.randn(2, 7, 16, 5, dtype=torch.float64)
    torch.testing.assert_close(compat(x), fast(x.transpose(-1, -2)).transpose(-1, -2))


# ------------------------------------------------------------------------------------------------
# against the original package, same weights

original = pytest.importorskip("VN_transformer", reason="the original package (VN-transformer 0.1.0) is not installed")
from VN_transformer import VN_transformer as O  # noqa: E402


def original_relu_formula(self, qk):
    """0.1.0's VN-ReLU, q - <q, k/|k|> k where <q, k> < 0 (difference 1: the fix divides by |k| again),
    on vnt's channels-last [q | k]."""
    q, k = qk.chunk(2, dim=-1)
    dot = (q * k).sum(-2, keepdim=True)
    k_norm = k.norm(dim=-2, keepdim=True).clamp(min=self.eps)
    return torch.where(dot >= 0, q, q - (q * (k / k_norm)).sum(-2, keepdim=True) * k)


def pair(make_original, make_ours, seed=0):
    """(original, vnt) in float64, vnt loaded with the original's weights through the documented mapping."""
    torch.manual_seed(seed)
    theirs = make_original().double()
    ours = make_ours().double()
    ours.load_state_dict(from_original_state_dict(theirs.state_dict()))  # strict: every key maps
    return theirs, ours


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def features(b=2, n=12, d=16, c=3):
    x = torch.randn(b, n, d, c, dtype=torch.float64)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, 8:] = False
    return x, mask


@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_same_math_linear(eps):
    theirs, ours = pair(lambda: O.VNLinear(16, 24, bias_epsilon=eps), lambda: VNLinear(16, 24, bias_epsilon=eps))
    x, _ = features()
    close(ours(x), theirs(x))


def test_same_math_layer_norm_with_the_papers_map():
    theirs, ours = pair(lambda: O.VNLayerNorm(16), lambda: VNLayerNorm(16, subtract_mean=True))
    with torch.no_grad():
        theirs.ln.gamma.uniform_(0.5, 1.5)
    ours.load_state_dict(from_original_state_dict(theirs.state_dict()))
    x, _ = features()
    close(ours(x), theirs(x))


def test_same_math_weighted_pool():
    theirs, ours = pair(lambda: O.VNWeightedPool(16, dim_out=8, num_pooled_tokens=3, squeeze_out_pooled_dim=False),
                        lambda: VNWeightedPool(16, dim_out=8, num_pooled_tokens=3, squeeze_out_pooled_dim=False))
    x, mask = features()
    close(ours(x, mask=mask), theirs(x, mask=mask))
    close(ours(x), theirs(x))


@pytest.mark.parametrize("kw", [dict(), dict(flash=True), dict(num_latents=3), dict(bias_epsilon=1e-3)],
                         ids=["math", "flash", "latents", "bias"])
def test_same_math_attention(kw):
    theirs, ours = pair(lambda: O.VNAttention(16, dim_head=8, heads=2, **kw),
                        lambda: VNAttention(16, dim_head=8, heads=2, **kw))
    x, mask = features()
    out_t, out_o = theirs(x, mask=mask), ours(x, mask=mask)
    rows = slice(None) if "num_latents" in kw else mask  # latents attend to the valid points
    close(out_o[rows], out_t[rows])


def test_l2_attention_differs_by_difference_8_and_is_equivariant():
    """0.1.0 scaled only the 2 q.k term of -|q - k|^2 (difference 8): same shape, other numbers."""
    theirs, ours = pair(lambda: O.VNAttention(16, dim_head=8, heads=2, l2_dist_attn=True),
                        lambda: VNAttention(16, dim_head=8, heads=2, l2_dist_attn=True))
    x, mask = features()
    out_t, out_o = theirs(x, mask=mask), ours(x, mask=mask)
    assert out_o.shape == out_t.shape and (out_o - out_t)[mask].abs().max() > 1e-3
    r = rot(*torch.randn(3, dtype=torch.float64))
    close(ours(x @ r, mask=mask)[mask], (out_o @ r)[mask])


def test_feed_forward_and_relu_differ_only_by_the_relu_fix(monkeypatch):
    theirs, ours = pair(lambda: O.VNFeedForward(16, mult=2, bias_epsilon=1e-3),
                        lambda: VNFeedForward(16, mult=2, bias_epsilon=1e-3, relu_k_norm_floor=0.0))
    x, _ = features()
    fixed = ours(x)
    assert fixed.shape == theirs(x).shape and (fixed - theirs(x)).abs().max() > 1e-3
    unbiased = VNFeedForward(16, mult=2).double()
    r = rot(*torch.randn(3, dtype=torch.float64))
    close(unbiased(x @ r), unbiased(x) @ r)
    monkeypatch.setattr(layers.VNReLU, "activate", original_relu_formula)
    close(ours(x), theirs(x))
    theirs_relu, ours_relu = pair(lambda: O.VNReLU(16), lambda: VNReLU(16, k_norm_floor=0.0))
    close(ours_relu(x), theirs_relu(x))


def test_invariant_is_the_originals_summed_over_channels_up_to_the_relu_fix(monkeypatch):
    theirs, ours = pair(lambda: O.VNInvariant(16), lambda: VNInvariant(16))
    monkeypatch.setattr(layers.VNReLU, "activate", original_relu_formula)
    x, _ = features()
    per_channel = ours(x)
    assert per_channel.shape == (2, 12, 16, 3) and theirs(x).shape == (2, 12, 3)
    close(per_channel.sum(dim=-2), theirs(x))


@pytest.mark.parametrize("flags", [{}, {"flash_attn": True}], ids=["math", "flash"])
def test_encoder_with_the_papers_norms_differs_only_by_the_relu_fix(flags, monkeypatch):
    theirs, ours = pair(lambda: O.VNTransformerEncoder(16, depth=2, dim_head=8, heads=2, final_norm=True, **flags),
                        lambda: VNTransformerEncoder(16, depth=2, dim_head=8, heads=2, final_norm=True, **flags,
                                                     **PAPER_NORMS))
    x, mask = features()
    fixed = ours(x, mask=mask)
    assert (fixed - theirs(x, mask=mask))[mask].abs().max() > 1e-3
    monkeypatch.setattr(layers.VNReLU, "activate", original_relu_formula)
    close(ours(x, mask=mask)[mask], theirs(x, mask=mask)[mask])


@pytest.mark.parametrize("kw", [dict(), dict(dim_feat=16, translation_equivariance=True), dict(bias_epsilon=1e-4),
                                dict(num_tokens=5, dim_feat=16), dict(reduce_dim_out=False)],
                         ids=["plain", "fusion_se3", "bias", "tokens", "no_reduce"])
def test_whole_model_loads_original_weights_and_differs_only_by_the_relu_fix(kw, monkeypatch):
    """With the same weights, the paper's norms (vnt.PAPER_NORMS) and the original's VN-ReLU formula
    put back, vnt's VNTransformer gives the original's numbers: the VN-ReLU fix (difference 1) is
    what separates them. (One sample, no mask: 0.1.0 centred on the whole batch, difference 2.)"""
    theirs, ours = pair(lambda: original.VNTransformer(dim=16, depth=2, dim_head=8, heads=2, **kw),
                        lambda: VNTransformer(dim=16, depth=2, dim_head=8, heads=2, **kw, **PAPER_NORMS))
    coors = torch.randn(1, 12, 3, dtype=torch.float64)
    feats = None
    if kw.get("num_tokens"):
        feats = torch.randint(0, 5, (1, 12))
    elif kw.get("dim_feat"):
        feats = torch.randn(1, 12, 16, dtype=torch.float64)

    def run(model):
        out = model(coors, feats=feats)
        return torch.cat(out, dim=-1) if isinstance(out, tuple) else out

    assert run(ours).shape == run(theirs).shape
    assert (run(ours) - run(theirs)).abs().max() > 1e-4
    monkeypatch.setattr(layers.VNReLU, "activate", original_relu_formula)
    close(run(ours), run(theirs))


def test_tied_l2_weights_map_onto_vnts_fused_projection():
    theirs = original.VNTransformer(dim=16, depth=1, dim_head=8, heads=2, l2_dist_attn=True)
    mapped = from_original_state_dict(theirs.state_dict())
    assert mapped["encoder.layers.0.0.to_qkv.weight"].shape == (2 * 16, 16)  # [q; v], k tied to q
    VNTransformer(dim=16, depth=1, dim_head=8, heads=2, l2_dist_attn=True).load_state_dict(mapped)
