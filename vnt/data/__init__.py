"""Protein backbone data: SidechainNet, an embedded offline default, synthetic backbones."""
from vnt.data.batching import (ProteinBatches, ShardedBatchSampler, collate, crop_window, over_budget, padding_fraction,
                               token_batches, validation_batches)
from vnt.data.core import (ALPHABET, BACKBONE_ATOMS, NUM_ATOMS, NUM_RESIDUE_TOKENS, DataConfig, ProteinExample,
                           ProteinSet, SkipCounter)
from vnt.data.sources import (DataError, DownloadUnavailable, export_sidechainnet, from_scn_dict, load_proteins,
                              read_scn_pickle, synthetic_backbone)

__all__ = [
    "ALPHABET", "BACKBONE_ATOMS", "NUM_ATOMS", "NUM_RESIDUE_TOKENS", "DataConfig", "DataError", "DownloadUnavailable",
    "ProteinBatches", "ProteinExample", "ProteinSet", "ShardedBatchSampler", "SkipCounter", "collate",
    "crop_window", "export_sidechainnet", "from_scn_dict", "load_proteins", "over_budget", "padding_fraction",
    "read_scn_pickle", "synthetic_backbone", "token_batches", "validation_batches",
]
