"""The sweep, declared once as data. Each case has a readable id."""
from __future__ import annotations

from dataclasses import asdict, dataclass

BACKENDS = ("sdpa", "math", "l2")
EPSILONS = (0.0, 1e-6, 1e-4, 1e-2)
DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class Case:
    backend: str = "sdpa"
    bias_epsilon: float = 0.0
    dtype: str = "float32"          # float32 native; bfloat16 under autocast (fp32 master weights)
    n: int = 128                    # points per sample
    batch: int = 2
    fusion: bool = True             # early fusion of dim_feat features
    impl: str = "vnt"               # "vnt" | "original" (the VN-transformer 0.1.0 package)
    dim: int = 64
    depth: int = 2
    heads: int = 8
    dim_head: int = 64
    dim_feat: int = 64

    @property
    def id(self) -> str:
        parts = [self.impl, self.backend, f"eps{self.bias_epsilon:g}", self.dtype, f"n{self.n}", f"b{self.batch}",
                 "fusion" if self.fusion else "nofusion"]
        return "-".join(parts)

    def to_dict(self) -> dict:
        return {**asdict(self), "case_id": self.id}


def quick_cases() -> list[Case]:
    """~10 minutes on a 2-core CPU: the README configuration (dim 64, depth 2, 8 x 64 heads,
    dim_feat 64, batch 2) at n = 128 for every backend x epsilon x dtype, a length sweep per
    backend, fusion off, and the original package as a baseline when installed."""
    cases = [Case(backend=b, bias_epsilon=e, dtype=d) for b in BACKENDS for e in EPSILONS for d in DTYPES]
    small = dict(dim=32, heads=4, dim_head=16, dim_feat=16, batch=1)
    cases += [Case(backend=b, n=n, **small) for b in BACKENDS for n in (128, 256, 512, 1024)]
    cases += [Case(backend=b, fusion=False) for b in BACKENDS]
    cases += [Case(backend=b, impl="original") for b in BACKENDS]
    return cases


def full_cases() -> list[Case]:
    cases = quick_cases()
    small = dict(dim=32, heads=4, dim_head=16, dim_feat=16, batch=1)
    cases += [Case(backend=b, n=n, dtype=d, **small) for b in BACKENDS for n in (2048, 4096) for d in DTYPES]
    cases += [Case(backend=b, n=n, dtype="bfloat16", **small) for b in BACKENDS for n in (128, 256, 512, 1024)]
    return cases


def cuda_cases() -> list[Case]:
    """Sizes that fill a GPU."""
    cases = [Case(backend=b, bias_epsilon=e, dtype=d, batch=8, n=512) for b in BACKENDS for e in EPSILONS for d in DTYPES]
    cases += [Case(backend=b, n=n, dtype=d, batch=4, fusion=False) for b in BACKENDS for n in (1024, 4096, 8192)
              for d in DTYPES]
    return cases
