"""vnt.equivariance and vnt.rotations: equivariance as a measured number, on every backend and
attention form, in float64 and float32; the rounding floor; the epsilon bias; rotations."""
import pytest
import torch

from models import BACKENDS, FUSION, backend_kw, inputs, plan_kw, small_model
from vnt import PAPER_NORMS, VNTransformer, equivariance_error, fast, layers, rounding_floor
from vnt.equivariance import DTYPE_TOLERANCES
from vnt.rotations import euler_rotation, random_rotations, rot


@pytest.mark.parametrize("fold", [False, True], ids=["projected", "folded"])
@pytest.mark.parametrize("fusion", FUSION.values(), ids=FUSION.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_so3_equivariance_float64(backend, fusion, fold):
    model = small_model(backend, fusion, fold=fold)
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


@pytest.mark.parametrize("fold", [False, True], ids=["projected", "folded"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_epsilon_breaks_equivariance_growing_with_epsilon(backend, fold):
    """The paper's epsilon-approximate equivariance: the error grows with epsilon, folded or not."""
    coors, feats, mask = inputs(dim_feat=8)
    errs = []
    for eps in (0.0, 1e-6, 1e-4, 1e-2):
        torch.manual_seed(1)
        model = small_model(backend, 8, bias_epsilon=eps, dim_head=16, fold=fold)
        errs.append(equivariance_error(model, coors, feats=feats, mask=mask,
                                       generator=torch.Generator().manual_seed(0)).rel)
    assert errs[0] < 1e-10
    assert all(b > a * 10 for a, b in zip(errs, errs[1:])), errs


def test_call_adapter_runs_a_model_with_other_keywords():
    model = small_model("math", 8)

    class Renamed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, xyz, *, features, valid):
            return self.inner(xyz, feats=features, mask=valid)

    coors, feats, mask = inputs(dim_feat=8)
    direct = equivariance_error(model, coors, feats=feats, mask=mask, generator=torch.Generator().manual_seed(0))
    adapted = equivariance_error(Renamed(), coors, feats=feats, mask=mask, generator=torch.Generator().manual_seed(0),
                                 call=lambda m, c, f, k: m(c, features=f, valid=k))
    assert adapted == direct


DEEP = dict(dim=32, depth=4, dim_head=16, heads=4)  # the float32 check of issue 2: depth 4, n = 256


def deep_case(backend, fusion, fold=None):
    """backend: a backend or "l2_fused" (models.backend_kw; at this size l2 on a CPU runs written out)."""
    model = fast.planned(VNTransformer(**DEEP, dim_feat=fusion, **backend_kw(backend)), **plan_kw(backend, fold))
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
                                           ("l2", None), ("l2_fused", None)])
def test_float32_deep_long_equivariance(backend, fold, fusion):
    """Relative error <= 1e-5 at depth 4, n = 256, every backend and attention form, fusion on and
    off, garbage in the padding (measured 1.4e-6 - 5.8e-6 over 3 seeds). Also asserted: the float32
    error stays within 25x of ``rounding_floor`` with every VN block's output rounded to float32
    (exact arithmetic inside the blocks; measured 2.8x - 8.4x), so a sloppy low-precision op fails
    here even while the absolute level still passes."""
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
    # a layer norm's residual sum is not rounded, only the norm (the block's own output)
    from vnt.equivariance import _rounding_hook
    norm = layers.VNLayerNorm(8).double()
    a, r = torch.randn(2, 5, 3, 8, dtype=torch.float64), torch.randn(2, 5, 3, 8, dtype=torch.float64)
    norm.register_forward_hook(_rounding_hook(torch.bfloat16), with_kwargs=True)
    torch.testing.assert_close(norm(a, residual=r), norm(a).to(torch.bfloat16).double() + r, rtol=0, atol=1e-15)
    # the model itself is left as it was: float32, no hooks
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


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


def test_rot_is_the_originals_zyz_in_the_angles_dtype():
    angles = torch.randn(3)
    r = rot(*angles)
    assert r.dtype == torch.float32 and r.shape == (3, 3)
    torch.testing.assert_close(r, euler_rotation(*angles.double()).float())
    assert rot(0.1, 0.2, 0.3).dtype == torch.get_default_dtype()
    assert rot(*angles.double()).dtype == torch.float64
    try:
        from VN_transformer.rotations import rot as original_rot
    except ImportError:
        return
    for dtype in (torch.float32, torch.float64):
        a = torch.randn(3, dtype=dtype)
        torch.testing.assert_close(rot(*a), original_rot(*a))


@pytest.fixture
def flush_denormals():
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    yield
    torch.set_flush_denormal(False)


@pytest.mark.parametrize("backend, fold", [("math", False), ("sdpa", True), ("l2", None)])
def test_float32_equivariance_with_flush_to_zero(backend, fold, flush_denormals):
    """The same float32 bound (1e-5 at depth 4, n = 256, fusion on, garbage in the padding) with
    denormals flushed to zero (``torch.set_flush_denormal(True)``, what the benchmarks' ftz-on rows run)."""
    model, coors, feats = deep_case(backend, 16, fold)
    coors, mask = padded(coors)
    err = equivariance_error(model, coors, feats=feats, mask=mask, **rotations()).rel
    assert err <= 1e-5, err
