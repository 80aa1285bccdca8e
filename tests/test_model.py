"""vnt.model.VNTransformer: the public model. Masks, centring, backends against their references,
folded against projected attention, bad input and options, the config, torch.compile, the README."""
import re
from pathlib import Path

import pytest
import torch

from models import BACKENDS, FUSION, folded_calls, inputs, plan_kw, small_model
from vnt import VNTransformer, VNTransformerConfig, fast


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
@pytest.mark.parametrize("pair", [("sdpa", "math"), ("l2_fused", "l2_math"), ("l2", "l2_math")],
                         ids=["sdpa_vs_math", "l2_fused_vs_l2_math", "l2_vs_l2_math"])
def test_backends_agree_with_math_path(pair, dtype):
    """Outputs and input gradients of a fused backend match its written-out reference (l2_fused: l2 on
    the fused kernels; l2 at this size runs written out with tied keys)."""
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


@pytest.mark.parametrize("eps", [0.0, 1e-6, 1e-2], ids=["eps0", "eps1e-6", "eps1e-2"])
@pytest.mark.parametrize("fusion", FUSION.values(), ids=FUSION.keys())
@pytest.mark.parametrize("backend", [*BACKENDS, "l2_fused"])
def test_folded_attention_is_the_same_function(backend, fusion, eps):
    """Folded (multi-query) attention equals the projected form, outputs and every gradient, also
    with the epsilon bias (README difference 9). l2 at this size runs written out with tied keys;
    l2_fused is l2 on the fused kernels (a budget of 0 written-out scores)."""
    m_proj = small_model(backend, fusion, fold=False, bias_epsilon=eps)
    m_fold = small_model(backend, fusion, fold=True, bias_epsilon=eps)
    m_fold.load_state_dict(m_proj.state_dict())
    coors, feats, mask = inputs(dim_feat=fusion)
    results = []
    for model in (m_proj, m_fold):
        with folded_calls() as calls:
            out = model(coors, feats=feats, mask=mask)
        # folded, every layer runs folded, and the first one on the input embedding's rank-1 factor
        assert calls == ([1, 16] if model is m_fold else [])
        out = torch.cat(out, dim=-1) if isinstance(out, tuple) else out
        grads = torch.autograd.grad(out[mask].pow(2).sum(), list(model.parameters()), allow_unused=True)
        results.append((out[mask], grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-9, atol=1e-10)
    for g_proj, g_fold in zip(results[0][1], results[1][1]):
        assert (g_proj is None) == (g_fold is None)
        if g_proj is not None:
            scale = g_proj.abs().max().clamp(min=1.0)
            assert (g_proj - g_fold).abs().max() <= 1e-8 * scale


@pytest.mark.parametrize("fold", [False, True], ids=["projected", "folded"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_false_mask_gives_finite_outputs_and_grads(backend, fold):
    model = small_model(backend, 8, dtype=torch.float32, translation_equivariance=True, fold=fold)
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
    (dict(bias_epsilon=-1.0), "bias_epsilon"),
    (dict(relu_k_norm_floor=1.0), "k_norm_floor"),
    (dict(attn_fold=True), "attn_fold"),
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
    # a CPU runs sdpa written out within the plan's budget (its flash kernel is slower there), a GPU on SDPA
    expected = ("flash", "efficient", "math", "cudnn") if torch.cuda.is_available() else ("einsum",)
    assert all(k in expected for k in model.encoder.attention_kernels())
    with fast.configure(sdpa_written_out_max_scores=0):
        model(torch.randn(1, 6, 3))
    assert all(k in ("flash", "efficient", "math") for k in model.encoder.attention_kernels())
    only_math = VNTransformer(dim=8, depth=1, dim_head=4, heads=2, flash_attn=True)
    with fast.configure(sdpa_kernels=("math",), sdpa_written_out_max_scores=0):
        only_math(torch.randn(1, 6, 3))
    assert only_math.encoder.attention_kernels() == ["math"]
    # a kernel that cannot serve the inputs (no memory-efficient kernel on CPU) falls back, and says so;
    # a remembered kernel that stops serving them is tried first, then the others
    fallback = VNTransformer(dim=8, depth=1, dim_head=4, heads=2, flash_attn=True)
    with fast.configure(sdpa_kernels=("efficient", "math"), fold=False, sdpa_written_out_max_scores=0):
        fallback(torch.randn(1, 6, 3))
        if not torch.cuda.is_available():
            assert fallback.encoder.attention_kernels() == ["math"]
            attend = fallback.encoder.layers[0][0].attend
            attend._kernel_cache = {key: "efficient" for key in attend._kernel_cache}
            fallback(torch.randn(1, 6, 3))
            assert fallback.encoder.attention_kernels() == ["math"]


@pytest.mark.parametrize("eps", [0.0, 1e-4], ids=["eps0", "eps1e-4"])
@pytest.mark.parametrize("backend, fold", [("math", False), ("sdpa", False), ("sdpa", True), ("l2", True),
                                           ("l2_math", False), ("l2_fused", True)])
def test_forward_and_backward_trace_whole_under_torch_compile(backend, fold, eps):
    """No host synchronisation and no data-dependent Python branch in forward: torch.compile with
    fullgraph=True raises on any graph break (.item(), a branch on a tensor value, kernel probing).
    Traced cold, so the SDPA backends take the no-probe path; outputs and gradients equal eager."""
    model = small_model(backend, 4, dtype=torch.float32, translation_equivariance=True, dim_head=16, bias_epsilon=eps)
    coors, feats, mask = inputs(dim_feat=4, dtype=torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    grads = []
    with fast.configure(**plan_kw(backend, fold)):  # the plan is read while tracing
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
    # configs written before the original's flags were resolved into attn_backend still load
    legacy = {**cfg.to_dict(), "attn_backend": None, "flash_attn": True, "l2_dist_attn": False}
    assert VNTransformerConfig.from_dict(legacy) == cfg
    # configs saved while the kernel plan was part of the model config: those fields are dropped
    planned_cfg = {**cfg.to_dict(), "sdpa_kernels": ["math"], "l2_written_out_max_scores": 0, "attn_fold": False}
    assert VNTransformerConfig.from_dict(planned_cfg) == cfg
    with pytest.raises(ValueError, match="contradicts"):
        VNTransformerConfig.from_dict({**cfg.to_dict(), "l2_dist_attn": True})


def test_state_dicts_from_before_the_encoder_owned_proj_in_load():
    """Checkpoints saved with ``proj_in.*`` at the model's top level load into ``encoder.proj_in.*``."""
    model = VNTransformer(dim=8, depth=1, dim_head=4, heads=2, bias_epsilon=1e-3)
    old = {("proj_in." + k[len("encoder.proj_in."):] if k.startswith("encoder.proj_in.") else k): v.clone() + 1
           for k, v in model.state_dict().items()}
    assert "proj_in.weight" in old and "encoder.proj_in.weight" not in old
    fresh = VNTransformer(dim=8, depth=1, dim_head=4, heads=2, bias_epsilon=1e-3)
    fresh.load_state_dict(old)
    torch.testing.assert_close(fresh.encoder.proj_in.weight, old["proj_in.weight"])


def test_readme_example_runs():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        if "# readme-test: skip" in block:
            continue
        exec(compile(block, "README.md", "exec"), {})


def test_readme_names_only_tests_that_exist():
    """Every test the README cites (`test_x.py::test_y`, or `::test_y` after a named file) is there."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    cited = []
    for file, name in re.findall(r"`(?:(test_\w+\.py))?::(test_\w+)", readme):
        current = file or current  # noqa: F821 - a bare ::name follows a named file
        cited.append((current, name))
    assert len(cited) > 10
    for file, name in cited:
        source = (Path(__file__).parent / file).read_text()
        assert re.search(rf"^def {name}\(", source, re.M), f"README cites {file}::{name}, which does not exist"


def _saved_bytes(fn) -> int:
    """Bytes autograd keeps for the backward pass of ``fn()`` (every saved tensor, packed once)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[id(t)] = t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fold", [None, False], ids=["plan_default", "unfolded"])
@pytest.mark.parametrize("layers", [None, [1]], ids=["every_layer", "layer_1"])
def test_activation_checkpointing_same_gradients_less_saved(backend, fold, layers):
    """Checkpointed layers give the same outputs and gradients (fused kernels and folded forms
    included) and autograd keeps less for the backward pass."""
    torch.manual_seed(0)
    model = small_model(backend, dim_feat=4, fold=fold, depth=3)
    coors, feats, mask = inputs(dim_feat=4, n=24)
    coors.requires_grad_(True)

    def loss():
        out, _ = model(coors, feats=feats, mask=mask)
        return (out.masked_fill(~mask[..., None], 0.0) ** 2).sum()

    def grads():
        model.zero_grad()
        coors.grad = None
        value, saved = _saved_bytes(loss)
        value.backward()
        return value.detach(), [p.grad.clone() for p in model.parameters()] + [coors.grad.clone()], saved

    ref_loss, ref_grads, ref_saved = grads()
    model.encoder.checkpoint_layers(layers)
    ck_loss, ck_grads, ck_saved = grads()
    torch.testing.assert_close(ck_loss, ref_loss, rtol=1e-12, atol=0)
    for a, b in zip(ck_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert ck_saved < ref_saved * (0.6 if layers is None else 0.9), (ck_saved, ref_saved)
    model.encoder.checkpoint_layers([])
    assert _saved_bytes(loss)[1] == ref_saved


def test_activation_checkpointing_rejects_layers_outside_the_encoder():
    model = small_model("math", depth=2)
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        model.encoder.checkpoint_layers([2])
