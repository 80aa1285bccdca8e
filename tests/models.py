"""Small models and inputs shared by the model tests."""
import torch

from vnt import VNTransformer, VNTransformerConfig

BACKENDS = ["math", "sdpa", "l2", "l2_math"]
FUSION = {"fusion_off": None, "fusion_on": 8}


def backend_kw(backend) -> dict:
    """VNTransformer options for a test backend name: a backend, or "l2_fused", l2 on the fused kernels
    at every size (a budget of 0 written-out scores; within the default budget, l2 on a CPU runs
    written out with tied keys)."""
    if backend == "l2_fused":
        return {"attn_backend": "l2", "l2_written_out_max_scores": 0}
    return {"attn_backend": backend}


def small_model(backend, dim_feat=None, dtype=torch.float64, **kw):
    kw = {"dim": 16, "depth": 2, "dim_head": 8, "heads": 2, **backend_kw(backend), **kw}
    return VNTransformer(dim_feat=dim_feat, **kw).to(dtype)


def block_cfg(dim, **kw) -> VNTransformerConfig:
    """The config vnt.layers' composite blocks take (depth is the encoder's, unused by a block)."""
    return VNTransformerConfig(dim=dim, depth=1, **kw)


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
