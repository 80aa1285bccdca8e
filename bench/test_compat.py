"""The cost of the original's layout: vnt's public VNTransformerEncoder ((b, n, dim, c), one
transpose in and one out) against the channels-last encoder it wraps (vnt.model), same weights.

Steps of the two alternate in one process; the row reports the median and quartiles of the
per-pair time ratios (public / channels-last) with a 95% bootstrap interval at the README configuration.
"""
import statistics

import pytest
import torch

from bench.cases import BACKENDS, Case
from bench.measure import check_paired, time_fn
from bench.stats import summarize


@pytest.mark.parametrize("backend", BACKENDS)
def test_compat_layout_overhead(backend, benchmark, profile, rows):
    from bench.conftest import device
    from vnt import VNTransformerConfig, VNTransformerEncoder
    from vnt.model import VNTransformerEncoder as ChannelsLastEncoder

    dev = device()
    case = Case(backend=backend, group="compat", **profile["readme"])
    c = 3 + case.dim_feat
    torch.manual_seed(0)
    public = VNTransformerEncoder(case.dim, depth=case.depth, dim_head=case.dim_head, heads=case.heads, dim_coor=c,
                                  attn_backend=backend).to(dev)
    fast = ChannelsLastEncoder(VNTransformerConfig(dim=case.dim, depth=case.depth, dim_head=case.dim_head,
                                                           heads=case.heads, dim_coor=c, attn_backend=backend)).to(dev)
    fast.load_state_dict(public.state_dict())
    x = torch.randn(case.batch, case.n, case.dim, c, device=dev)

    def step(model, inputs):
        def fn():
            model(inputs).square().mean().backward()
            model.zero_grad(set_to_none=True)
        return fn

    step_public, step_fast = step(public, x), step(fast, x.transpose(-1, -2).contiguous())
    with torch.no_grad():  # correct before fast: one function, one transpose apart
        diff = (public(x) - fast(x.transpose(-1, -2)).transpose(-1, -2)).abs().max().item()
    assert diff < 1e-3, diff
    for _ in range(profile["warmup"]):
        step_public()
        step_fast()
    pairs: list[tuple[float, float]] = []

    def measure_one_pair():
        pairs.append((time_fn(step_public, rounds=1, warmup=0, device=dev)[0],
                      time_fn(step_fast, rounds=1, warmup=0, device=dev)[0]))

    benchmark.pedantic(measure_one_pair, rounds=profile["readme_rounds"], iterations=1)
    ratios = [p / f for p, f in pairs]
    rows.append({**case.to_dict(), "kind": "compat", "case_id": f"compat-{backend}", "impl": "vnt-public/vnt-layers",
                 "device": dev, "status": "ok", "rounds": len(pairs), "warmup": profile["warmup"],
                 "fwd_bwd_ms": statistics.median(p for p, _ in pairs) * 1e3,
                 "layers_fwd_bwd_ms": statistics.median(f for _, f in pairs) * 1e3,
                 **summarize(ratios, "overhead_paired"),
                 "max_abs_diff_vs_math": diff})
    benchmark.extra_info.update(rows[-1])
    check_paired(ratios, rows[-1], rows, "overhead_paired")
