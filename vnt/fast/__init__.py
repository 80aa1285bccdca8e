"""vnt's speed layer: every fast path of the model, behind one interface. Imports nothing of vnt
outside this package (the dependency runs one way: ``vnt.layers`` and ``vnt.model`` call in here).

Each entry computes the same function as the reference formula it replaces; tests compare values
and gradients (``tests/test_fast.py``, ``tests/test_attend.py``, ``tests/test_model.py``).

=============================  ===================================================================
``Attend``                     softmax attention, every backend (math, sdpa, l2, l2_math); owns the
                               SDPA kernel choice and the key-term augmentation
``Attend.tied_l2(q, v)``       L2 attention whose keys are the queries (scores q q^T)
``folded_attention``           VNAttention with its projections folded into the queries and the
                               output map; on a low-rank input (``embed=``) it runs on the factor
``folds`` / ``folds_low_rank`` whether the plan folds a layer
``ones_column_linear``         F.linear with the bias as a ones column of the GEMM
``head_linear``                every head's map of one input, head-major, no layout copy
``vn_relu``                    VN-ReLU on projected [q | k], hand-written backward, fused kernels
``rms_norm_residual``          residual + RMS VN layer norm as fused CPU kernels (or None)
``configure`` / ``current``    the kernel plan: every threshold and switch (``vnt.fast.plan``)
``planned(module, **plan)``    a module whose forwards run under a plan
=============================  ===================================================================
"""
from vnt.fast import kernels, plan
from vnt.fast.attend import BACKENDS, Attend, Backend, resolve_backend
from vnt.fast.folded import folded_attention, folds, folds_low_rank
from vnt.fast.ops import head_linear, ones_column_linear, rms_norm_residual, vn_relu
from vnt.fast.plan import KernelPlan, configure, current, planned

__all__ = ["Attend", "BACKENDS", "Backend", "KernelPlan", "configure", "current", "folded_attention", "folds",
           "folds_low_rank", "head_linear", "kernels", "ones_column_linear", "plan", "planned", "resolve_backend",
           "rms_norm_residual", "vn_relu"]
