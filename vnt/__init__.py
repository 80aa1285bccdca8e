"""vnt: a correct, fast VN-Transformer. Importing vnt never imports deepspeed or sidechainnet.

The names the original ``VN-transformer`` package exports are here with its layout and keywords
(``vnt.compat``); vnt's channels-last blocks, which ``VNTransformer`` uses inside, are in
``vnt.layers``; its speed layer (every fast path and the kernel plan) is ``vnt.fast``.
"""
from vnt import fast, layers, rotations
from vnt.fast import Attend
from vnt.compat import (VNAttention, VNFeedForward, VNInvariant, VNLayerNorm, VNLinear, VNReLU, VNTransformerEncoder,
                        VNWeightedPool, from_original_state_dict)
from vnt.equivariance import EquivarianceError, equivariance_error, rounding_floor
from vnt.malloc import MALLOC_TUNABLES
from vnt.model import PAPER_NORMS, VNTransformer, VNTransformerConfig

__version__ = "0.1.0"


__all__ = [
    "Attend", "EquivarianceError", "fast", "MALLOC_TUNABLES", "PAPER_NORMS", "VNAttention", "VNFeedForward", "VNInvariant", "VNLayerNorm",
    "VNLinear", "VNReLU", "VNTransformer", "VNTransformerConfig", "VNTransformerEncoder", "VNWeightedPool",
    "equivariance_error", "from_original_state_dict", "layers", "rotations", "rounding_floor", "__version__",
]
