"""Peer networks for the training league (bench/train_cases.py): the same denoising task, data,
loop and budget with another equivariant network in place of vnt's VNTransformer.

Each peer is wrapped to vnt's network interface, ``net(coors (b, n, 3), feats (b, n, f), mask)
-> displacement (b, n, 3)``, so ``BackboneDenoiser`` trains it unchanged. The packages come from the
package registry and are imported only when used; a missing one raises ImportError naming it.

- ``vn-transformer-0.1.0``: the original ``VN-transformer`` package's ``VNTransformer`` with early
  fusion and ``translation_invariant=True`` (its coordinate output is the displacement).
- ``en-transformer``: E(n)-Transformer (``en-transformer``): ``EnTransformer`` updates coordinates;
  the displacement is its output minus its input, and it attends to ``neighbors`` nearest points
  (dim and depth from the model config, its own 8 heads x 64).
- ``equiformer``: Equiformer (``equiformer-pytorch``), SE(3)-equivariant attention on spherical
  tensors of degrees 0 and 1 (``num_degrees=2``): invariant features in as degree 0, its reduced
  degree-1 output is the displacement; widths (dim, dim / 2) per degree, the model config's depth,
  heads and dim_head, attending to ``neighbors`` nearest points.
"""
from __future__ import annotations

from torch import Tensor, nn

NETWORKS = ("vnt", "vn-transformer-0.1.0", "en-transformer", "equiformer")


class OriginalVNTransformer(nn.Module):
    def __init__(self, *, dim: int, depth: int, dim_head: int, heads: int, dim_feat: int, bias_epsilon: float,
                 attn_backend: str):
        super().__init__()
        try:
            from VN_transformer import VNTransformer
        except ImportError as err:
            raise ImportError("the vn-transformer-0.1.0 peer needs pip install VN-transformer==0.1.0") from err
        self.net = VNTransformer(dim=dim, depth=depth, dim_head=dim_head, heads=heads, dim_feat=dim_feat,
                                 bias_epsilon=bias_epsilon, translation_invariant=True,
                                 flash_attn=attn_backend == "sdpa", l2_dist_attn=attn_backend in ("l2", "l2_math"))

    def forward(self, coors: Tensor, *, feats: Tensor, mask: Tensor) -> Tensor:
        return self.net(coors, feats=feats, mask=mask)[0]


class EnTransformer(nn.Module):
    """dim and depth from the model config; heads and dim_head are En-Transformer's defaults (8 x 64:
    its rotary embeddings want dim_head >= 32)."""

    def __init__(self, *, dim: int, depth: int, dim_feat: int, neighbors: int, **_):
        super().__init__()
        try:
            from en_transformer import EnTransformer as Peer
        except ImportError as err:
            raise ImportError("the en-transformer peer needs pip install en-transformer einx "
                              "taylor-series-linear-attention") from err
        self.proj_in = nn.Linear(dim_feat, dim)
        self.net = Peer(dim=dim, depth=depth, neighbors=neighbors)

    def forward(self, coors: Tensor, *, feats: Tensor, mask: Tensor) -> Tensor:
        _, out = self.net(self.proj_in(feats), coors, mask=mask)
        return out - coors


class Equiformer(nn.Module):
    """Degrees 0-1 (``num_degrees=2``) at widths (dim, dim // 2), the model config's depth, heads and
    dim_head; ``neighbors`` nearest points; ``reduce_dim_out`` turns its degree-1 channels into one
    vector per point, the displacement (relative positions only: translation invariant)."""

    def __init__(self, *, dim: int, depth: int, dim_head: int, heads: int, dim_feat: int, neighbors: int, **_):
        super().__init__()
        try:
            from equiformer_pytorch import Equiformer as Peer
        except ImportError as err:
            raise ImportError("the equiformer peer needs pip install equiformer-pytorch==0.5.4") from err
        self.proj_in = nn.Linear(dim_feat, dim)
        self.net = Peer(dim=(dim, max(1, dim // 2)), num_degrees=2, depth=depth, heads=heads, dim_head=dim_head,
                        num_neighbors=neighbors, reduce_dim_out=True)

    def forward(self, coors: Tensor, *, feats: Tensor, mask: Tensor) -> Tensor:
        return self.net(self.proj_in(feats), coors, mask=mask).type1
