"""Small models and inputs shared by the model tests."""
import contextlib

import torch

from vnt import VNTransformer, fast

BACKENDS = ["math", "sdpa", "l2", "l2_math"]
FUSION = {"fusion_off": None, "fusion_on": 8}


def backend_kw(backend) -> dict:
    """VNTransformer options for a test backend name: a backend, or "l2_fused" (l2; see plan_kw)."""
    return {"attn_backend": "l2" if backend == "l2_fused" else backend}


def plan_kw(backend, fold=None) -> dict:
    """Kernel-plan changes for a test backend name and fold choice: "l2_fused" is l2 on the fused
    kernels at every size (a budget of 0 written-out scores; within the default budget, l2 on a CPU
    runs written out with tied keys); fold True / False forces folded / projected attention."""
    changes = {"l2_written_out_max_scores": 0} if backend == "l2_fused" else {}
    if backend == "sdpa":  # the SDPA kernels at every size (a CPU runs sdpa written out within a budget)
        changes["sdpa_written_out_max_scores"] = 0
    if fold is not None:
        changes["fold"] = fold
    return changes


def small_model(backend, dim_feat=None, dtype=torch.float64, fold=None, **kw):
    kw = {"dim": 16, "depth": 2, "dim_head": 8, "heads": 2, **backend_kw(backend), **kw}
    return fast.planned(VNTransformer(dim_feat=dim_feat, **kw).to(dtype), **plan_kw(backend, fold))


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


def rotate(x, rot):
    """VN features (b, n, c, d) rotated on their coordinate axis."""
    return torch.einsum("b n c d, e c -> b n e d", x, rot)


@contextlib.contextmanager
def folded_calls():
    """The channel width of the input of every ``vnt.fast.folded_attention`` call in the block (1 for
    the first layer folded on the input embedding's rank-1 factor, dim for a later folded layer)."""
    calls: list[int] = []
    original = fast.folded_attention

    def spy(x, **kw):
        calls.append(x.shape[-1])
        return original(x, **kw)

    fast.folded_attention = spy
    try:
        yield calls
    finally:
        fast.folded_attention = original
