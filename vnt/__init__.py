"""vnt: a correct, fast VN-Transformer. Importing vnt never imports deepspeed or sidechainnet."""
from vnt.attend import Attend
from vnt.equivariance import EquivarianceError, equivariance_error, rounding_floor
from vnt.layers import VNAttention, VNFeedForward, VNInvariant, VNLayerNorm, VNLinear, VNReLU, VNWeightedPool
from vnt.model import PAPER_NORMS, VNTransformer, VNTransformerConfig, VNTransformerEncoder
from vnt import rotations

__version__ = "0.1.0"

__all__ = [
    "Attend", "EquivarianceError", "PAPER_NORMS", "equivariance_error", "rotations", "VNAttention", "VNFeedForward",
    "VNInvariant", "VNLayerNorm", "VNLinear", "VNReLU", "VNTransformer", "VNTransformerConfig",
    "VNTransformerEncoder", "VNWeightedPool", "rounding_floor", "__version__",
]
