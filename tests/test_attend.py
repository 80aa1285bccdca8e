"""vnt.fast.Attend: every backend against the written-out reference, key terms on the fused
kernels, shared keys, the L2 formula, kernel choice."""
import pytest
import torch

from models import BACKENDS
from vnt import fast
from vnt.fast import Attend
from vnt.fast.attend import _SelfGram, _SumHeads


@pytest.fixture(autouse=True)
def sdpa_on_its_kernels():
    """"sdpa" on the SDPA kernels in every test here: a CPU runs it written out within a budget
    (test_sdpa_runs_written_out_only_within_the_budget_on_a_cpu)."""
    with fast.configure(sdpa_written_out_max_scores=0):
        yield


def qkv(b=2, h=3, n=10, e=16, shared=False):
    q = torch.randn(b, h, n, e, dtype=torch.float64)
    k = torch.randn(b, 1 if shared else h, n, e, dtype=torch.float64)
    v = torch.randn(b, 1 if shared else h, n, e, dtype=torch.float64)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, 6:] = False
    return q, k, v, mask


def reference(q, k, v, mask, scale, *, l2=False, key_bias=None):
    """softmax over j of scale * (q.k + key_bias_j) or -scale |q_i - k_j|^2 (+ key_bias), written with
    cdist for L2, on per-head copies of shared keys."""
    k, v = (t.expand(q.shape[0], q.shape[1], *t.shape[2:]) for t in (k, v))
    sim = -torch.cdist(q, k).square() if l2 else q @ k.transpose(-1, -2)
    if key_bias is not None:
        sim = sim + key_bias.expand(q.shape[0], q.shape[1], -1)[:, :, None, :]
    sim = (scale * sim).masked_fill(~mask[:, None, None, :], float("-inf"))
    return sim.softmax(-1) @ v


@pytest.mark.parametrize("shared", [False, True], ids=["per_head_keys", "shared_keys"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_is_its_formula(backend, shared):
    q, k, v, mask = qkv(shared=shared)
    out = Attend(backend=backend)(q, k, v, mask=mask, scale=0.3)
    torch.testing.assert_close(out, reference(q, k, v, mask, 0.3, l2=backend.startswith("l2")))


@pytest.mark.parametrize("q_spare", [0, 2, 8], ids=["copy", "spare_too_few_for_shared", "spare"])
@pytest.mark.parametrize("shared", [False, True], ids=["per_head_keys", "shared_keys"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_key_term_rides_on_every_kernel(backend, shared, q_spare):
    """key_bias (per head, also on shared keys: one slot per head) enters the softmax exactly; with
    q_spare the augmentation slots are written into q's reserved zero features instead of a copy."""
    q, k, v, mask = qkv(shared=shared)
    key_bias = torch.randn(2, 3, 10, dtype=torch.float64)
    padded = torch.nn.functional.pad(q, (0, q_spare))
    out = Attend(backend=backend)(padded, k, k if shared else v, mask=mask, scale=0.3, key_bias=key_bias,
                                  q_spare=q_spare)
    expect = reference(q, k, k if shared else v, mask, 0.3, l2=backend.startswith("l2"), key_bias=key_bias)
    if shared and backend in ("sdpa", "l2"):  # values are the keys: the output keeps q's spare width
        assert out.shape[-1] == 16 + q_spare
        out = out[..., :16]
    torch.testing.assert_close(out, expect)


def test_k_sq_is_what_enters_the_l2_softmax():
    """For a bilinear q.k that k alone does not determine (VNAttention's folded form), the caller's
    per-head |k_j|^2 is used: -|q - k|^2 up to a term constant along j."""
    q, kv, _, mask = qkv(shared=True)
    k_sq = torch.rand(2, 3, 10, dtype=torch.float64) * 4
    sim = 2 * q @ kv.transpose(-1, -2) - k_sq[:, :, None, :]
    expect = (0.3 * sim).masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1) @ kv
    for backend in ("l2", "l2_math"):
        torch.testing.assert_close(Attend(backend=backend)(q, kv, kv, mask=mask, scale=0.3, k_sq=k_sq), expect)


def test_l2_attention_is_the_scaled_l2_distance():
    """'l2' (augmented SDPA) and 'l2_math' equal softmax(-|q - k|^2 / sqrt(e)) written with cdist.
    Difference 8: 0.1.0 scaled only the 2 q.k term, softmax(2 q.k / sqrt(e) - |q|^2 - |k|^2), which
    at VN head dims (e = coordinate axis x dim_head, ~10^2 - 10^3) ranks keys by their norms more
    than by their distance to q."""
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


def test_augment_slots_only_where_a_term_rides_on_sdpa():
    assert Attend(backend="l2").augment_slots(heads=4, key_term=False) == 4
    assert Attend(backend="sdpa").augment_slots(heads=4, key_term=True) == 4
    assert Attend(backend="sdpa").augment_slots(heads=4, key_term=False) == 0
    assert Attend(backend="math").augment_slots(heads=4, key_term=True) == 0
    assert Attend(backend="l2_math").augment_slots(heads=4, key_term=False) == 0


def test_bad_backend_or_kernels_fail_at_construction():
    with pytest.raises(ValueError, match="backend must be one of"):
        Attend(backend="fast")
    with pytest.raises(ValueError, match="sdpa_kernels"):
        Attend(backend="sdpa", sdpa_kernels=("warp",))


@pytest.mark.parametrize("key_bias", [False, True], ids=["no_key_bias", "key_bias"])
@pytest.mark.parametrize("shared_v", [False, True], ids=["per_head_values", "shared_values"])
def test_tied_l2_written_out_is_the_l2_formula_and_its_gradient(shared_v, key_bias):
    """``tied_l2(q, v)`` (keys that are the queries) on a CPU within the budget: scores q q^T with a
    one-GEMM backward and -|k_j|^2 from their diagonal. Outputs and gradients of q and v equal the
    cdist formula (float64), the same as the fused kernels' path (budget 0), for l2 and l2_math; the
    generic call with k = q and a key term is the formula too."""
    q, _, v, mask = qkv(shared=shared_v)
    bias = torch.randn(2, 3, 10, dtype=torch.float64) if key_bias else None
    results = {}
    for name, attend in {"l2": Attend(backend="l2"), "l2_math": Attend(backend="l2_math"),
                         "l2_fused": Attend(backend="l2")}.items():
        leaves = [t.clone().requires_grad_(True) for t in (q, v) + ((bias,) if key_bias else ())]
        with fast.configure(l2_written_out_max_scores=0 if name == "l2_fused" else 2 ** 21):
            if key_bias:
                out = attend(leaves[0], leaves[0], leaves[1], mask=mask, scale=0.3, key_bias=leaves[2])
            else:
                out = attend.tied_l2(leaves[0], leaves[1], mask=mask, scale=0.3)
        grads = torch.autograd.grad(out.square().sum(), leaves)
        results[name] = (out, grads, attend.last_kernel)
    leaves = [t.clone().requires_grad_(True) for t in (q, v) + ((bias,) if key_bias else ())]
    expect = reference(leaves[0], leaves[0], leaves[1], mask, 0.3, l2=True, key_bias=leaves[2] if key_bias else None)
    expect_grads = torch.autograd.grad(expect.square().sum(), leaves)
    assert results["l2_math"][2] == "einsum" and results["l2_fused"][2] != "einsum"
    assert results["l2"][2] == ("einsum" if not key_bias else results["l2_fused"][2])
    for out, grads, _ in results.values():
        torch.testing.assert_close(out, expect)
        for g, e in zip(grads, expect_grads):
            torch.testing.assert_close(g, e)


def test_self_gram_backward_is_the_gradient_of_q_q_transposed():
    q = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SelfGram.apply, (q,))


@pytest.mark.parametrize("rows", [256, 257, 301], ids=lambda r: f"rows{r}")
def test_self_gram_upper_blocks_are_the_whole_product(rows):
    """From the plan's symmetric_gram_min_rows on a CPU, only the blocks on and above the diagonal are
    multiplied and the rest copied from their transposes: every entry equals q q^T (float64; row counts
    that do and do not split evenly into the blocks), and gradcheck passes."""
    assert rows >= fast.current().symmetric_gram_min_rows
    q = torch.randn(2, 1, rows, 3, dtype=torch.float64)
    out = _SelfGram.apply(q)
    torch.testing.assert_close(out, q @ q.transpose(-1, -2), rtol=1e-12, atol=1e-12)
    if rows == 257:
        leaf = q[:1, :, :, :2].clone().requires_grad_(True)
        assert torch.autograd.gradcheck(_SelfGram.apply, (leaf,), fast_mode=True)


def test_sum_heads_backward_is_the_gradient_of_the_head_sum():
    """_SumHeads (sum_h attn_h v_h as one GEMM; dv per head on a shared output gradient): gradcheck in
    float64 for both inputs, over two samples so the per-sample loop of its backward is covered."""
    attn = torch.rand(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, 6, 4, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(_SumHeads.apply(attn, v), (attn @ v).sum(dim=1))
    assert torch.autograd.gradcheck(_SumHeads.apply, (attn, v))


def test_tied_l2_runs_written_out_only_within_the_budget_on_a_cpu():
    """l2: written out while batch x heads x i x j <= the budget, on the fused kernels beyond it (their
    memory is O(n)); l2_math always written out; a negative budget is a ValueError; tied_l2 needs an
    L2 backend."""
    attend = Attend(backend="l2")
    q, _, v, _ = qkv()
    with fast.configure(l2_written_out_max_scores=2 * 3 * 10 * 10):
        attend.tied_l2(q, v)
        assert attend.last_kernel == "einsum"
        q11 = torch.randn(2, 3, 11, 16, dtype=torch.float64)
        attend.tied_l2(q11, torch.randn(2, 3, 11, 16, dtype=torch.float64))
        assert attend.last_kernel != "einsum"
    cpu = torch.device("cpu")
    with fast.configure(l2_written_out_max_scores=0):
        assert Attend(backend="l2_math").tied_written_out(scores=10 ** 9, device=cpu)
    assert not Attend(backend="l2").tied_written_out(scores=2 ** 21 + 1, device=cpu)
    assert Attend(backend="l2").tied_written_out(scores=2 ** 21, device=cpu)
    assert not Attend(backend="l2").tied_written_out(scores=1, device=torch.device("meta"))
    assert not Attend(backend="sdpa").tied_written_out(scores=1, device=cpu)
    with pytest.raises(ValueError, match="l2_written_out_max_scores"):
        fast.configure(l2_written_out_max_scores=-1)
    with pytest.raises(ValueError, match="needs an L2 backend"):
        Attend(backend="sdpa").tied_l2(q, v)


def test_tied_l2_written_out_under_bf16_autocast_with_float32_queries():
    """Autocast runs the score GEMM in bfloat16 on float32 queries: the hand-written backward takes
    the bfloat16 score gradient and returns a finite float32 gradient close to float32 autograd's."""
    q = torch.randn(2, 3, 10, 16, requires_grad=True)
    v = torch.randn(2, 1, 10, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = Attend(backend="l2").tied_l2(q, v)
    grad, = torch.autograd.grad(out.float().square().sum(), q)
    ref = reference(q, q, v, torch.ones(2, 10, dtype=torch.bool), 16 ** -0.5, l2=True)
    ref_grad, = torch.autograd.grad(ref.square().sum(), q)
    assert out.dtype == torch.bfloat16 and grad.dtype == torch.float32
    assert (grad - ref_grad).abs().max() <= 0.05 * ref_grad.abs().max()  # bfloat16 has 8 significant bits


@pytest.mark.parametrize("backend", ["l2", "l2_math", "l2_fused"])
def test_sum_heads_is_the_sum_of_the_heads_outputs(backend):
    """tied_l2(sum_heads=True) (values per head, already mapped to the output) returns sum_h attn_h v_h:
    written out one GEMM over (head, key) pairs, on SDPA the heads' outputs summed; gradients too."""
    q, _, v, mask = qkv()
    attend = Attend(backend="l2" if backend == "l2_fused" else backend)
    results = []
    with fast.configure(l2_written_out_max_scores=0 if backend == "l2_fused" else 2 ** 21):
        for sum_heads in (True, False):
            leaves = [t.clone().requires_grad_(True) for t in (q, v)]
            out = attend.tied_l2(leaves[0], leaves[1], mask=mask, scale=0.3, sum_heads=sum_heads)
            out = out if sum_heads else out.sum(dim=1)
            results.append((out, *torch.autograd.grad(out.square().sum(), leaves)))
        with pytest.raises(ValueError, match="values per head"):
            attend.tied_l2(q, v[:, :1], sum_heads=True)
    assert results[0][0].shape == (2, 10, 16)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_sdpa_runs_written_out_only_within_the_budget_on_a_cpu():
    """sdpa on a CPU: written out (the math backend's path, "einsum") while batch x heads x i x j <= the
    budget or the keys number at most q's width, the SDPA kernels beyond both, the same outputs either
    way; a key term and shared keys take the same route; only "sdpa" is routed by this budget; a budget
    of 0 is always SDPA, a negative one a ValueError."""
    q, k, v, mask = qkv(shared=True, e=8)  # 10 keys > 8 features
    bias = torch.randn(2, 3, 10, dtype=torch.float64)
    attend = Attend(backend="sdpa")
    with fast.configure(sdpa_written_out_max_scores=2 * 3 * 10 * 10):
        written = attend(q, k, v, mask=mask, scale=0.3, key_bias=bias)
        assert attend.last_kernel == "einsum"
        assert attend.augment_slots(heads=3, key_term=True, scores=2 * 3 * 10 * 10, device=q.device) == 0
        assert attend.augment_slots(heads=3, key_term=True, scores=2 * 3 * 10 * 10 + 1, device=q.device) == 3
    with fast.configure(sdpa_written_out_max_scores=2 * 3 * 10 * 10 - 1):
        fused = attend(q, k, v, mask=mask, scale=0.3, key_bias=bias)
        assert attend.last_kernel in ("flash", "efficient", "math")
    torch.testing.assert_close(written, fused)
    torch.testing.assert_close(written, reference(q, k, v, mask, 0.3, key_bias=bias))
    wide = qkv(shared=True, e=16)  # 10 keys <= 16 features: written out beyond the budget
    with fast.configure(sdpa_written_out_max_scores=1):
        attend(*wide[:3], mask=wide[3], scale=0.3)
        assert attend.last_kernel == "einsum"
    cpu = torch.device("cpu")
    assert not Attend(backend="sdpa").dot_written_out(scores=1, device=cpu, keys=1, width=8)  # budget 0 here
    with fast.configure(sdpa_written_out_max_scores=2 ** 21):  # the default
        assert Attend(backend="sdpa").dot_written_out(scores=2 ** 30, device=cpu, keys=4096, width=4288)
        assert not Attend(backend="sdpa").dot_written_out(scores=2 ** 30, device=cpu, keys=4096, width=304)
        assert Attend(backend="sdpa").dot_written_out(scores=2 ** 21, device=cpu)
        assert not Attend(backend="sdpa").dot_written_out(scores=2 ** 21 + 1, device=cpu)
        assert not Attend(backend="sdpa").dot_written_out(scores=1, device=torch.device("meta"))
        assert not Attend(backend="l2").dot_written_out(scores=1, device=cpu)
        assert Attend(backend="math").dot_written_out(scores=10 ** 9, device=cpu)
    assert fast.plan.KernelPlan().sdpa_written_out_max_scores == 2 ** 21
    with pytest.raises(ValueError, match="sdpa_written_out_max_scores"):
        fast.configure(sdpa_written_out_max_scores=-1)
