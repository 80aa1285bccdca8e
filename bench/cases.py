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
    group: str = "grid"             # which question the row answers: grid | readme | length | fusion_off | ...
    attn_fold: bool | None = None   # the kernel plan's fold for vnt's attention; None: the plan's default (dim <= dim_head)
    norms: str = "vnt"              # vnt's VN-LayerNorm / VN-ReLU, or "paper": the paper's (vnt.PAPER_NORMS)
    compile: bool = False           # torch.compile(model) (inductor), timed after its compilation
    dim: int = 64
    depth: int = 2
    heads: int = 8
    dim_head: int = 64
    dim_feat: int = 64

    @property
    def id(self) -> str:
        parts = [self.impl, self.backend, f"eps{self.bias_epsilon:g}", self.dtype, f"d{self.dim}", f"n{self.n}",
                 f"b{self.batch}", "fusion" if self.fusion else "nofusion"]
        if self.attn_fold is not None:
            parts.append("folded" if self.attn_fold else "projected")
        if self.norms != "vnt":
            parts.append(f"{self.norms}norms")
        if self.compile:
            parts.append("compiled")
        return "-".join(parts)

    def to_dict(self) -> dict:
        return {**asdict(self), "case_id": self.id}


SMALL = dict(dim=32, heads=4, dim_head=16, dim_feat=16, batch=1)   # small enough for bf16 on a CPU without AMX
ATTN_MEMORY = dict(dim=8, depth=1, heads=8, dim_head=4, fusion=False, batch=1)  # attention-dominated memory
# the original package's README example: dim 64, depth 2, 8 heads x 64, dim_feat 64, bias_epsilon 1e-6
README = dict(dim=64, depth=2, heads=8, dim_head=64, dim_feat=64, batch=2, n=128, bias_epsilon=1e-6)
README_EPS0 = {**README, "bias_epsilon": 0.0}
# the headline speed-ups over the original: (label, config); each is timed paired, per backend
# depth6: the README example three times as deep. vnt's first attention layer runs on proj_in's rank-1
# factor (the encoder's first layer), nearly free, so a depth-2 model gains more from it than a deeper one
PAIRED = {"readme": README, "readme-eps0": README_EPS0, "n512": {**README, "n": 512, "batch": 1},
          "depth6": {**README, "depth": 6}}
LONG_PAIRED = ("n512", "depth6", "protein-n512")  # the original's step takes seconds there: the profile's long_rounds


# the protein profile: the original's README model at depth 8, and the main job's model
# (vnt.denoiser.default_model_config: dim 32, depth 2, 4 heads x 16, dim_feat 16) scaled to depth 8,
# dim 128 and 8 heads x 16, batch 1, at protein lengths in points (4 backbone atoms per residue)
PROTEIN_README = {**README, "depth": 8, "batch": 1}
PROTEIN_MAIN = dict(dim=128, depth=8, heads=8, dim_head=16, dim_feat=16, batch=1, bias_epsilon=1e-6)
PROTEIN_LENGTHS = (256, 512, 1024, 2048)
PROTEIN_PAIRED = {"protein-n512": {**PROTEIN_README, "n": 512}}

TINY = dict(dim=8, depth=1, heads=2, dim_head=4, dim_feat=4, n=16, batch=1, bias_epsilon=1e-6)  # harness tests
PAIRED_TINY = {"tiny": TINY}


def tiny_cases() -> list[Case]:
    """One tiny row per kind of step measurement: what the test suite runs to check the harness."""
    cases = [Case(backend=b, group="grid", **TINY) for b in BACKENDS]
    cases += [Case(backend="sdpa", impl=impl, group="readme", **{**TINY, "n": 24}) for impl in ("vnt", "original")]
    cases += [Case(backend="math", group="compile", compile=True, **TINY)]
    cases += [Case(backend="sdpa", group="protein_main", **{**TINY, "depth": 2})]  # the protein report's section
    return cases


def quick_cases() -> list[Case]:
    """~10 minutes on a 2-core CPU.

    grid:        every backend x epsilon x dtype at the small config, n = 128 (error vs epsilon, dtype)
    readme:      the original's README example (eps 1e-6), float32, every backend, vnt and the original
    readme_eps0: the same at eps 0
    length:      float32 length sweep per backend at the small config (speed and memory vs n)
    fusion_off:  the small config without early fusion
    fold_off:    the README configuration with vnt's attention in projected form (the plan's fold=False)
    compile:     the README configuration under torch.compile (inductor), every backend
    bf16:        the README configuration under bfloat16 autocast, every backend
    attn_memory: a tiny model whose step memory is dominated by attention (math: n^2; sdpa: n)
    """
    cases = [Case(backend=b, bias_epsilon=e, dtype=d, n=128, **SMALL) for b in BACKENDS for e in EPSILONS for d in DTYPES]
    cases += [Case(backend=b, impl=impl, group="readme", **README) for impl in ("vnt", "original") for b in BACKENDS]
    cases += [Case(backend=b, impl=impl, group="readme_eps0", **README_EPS0) for impl in ("vnt", "original")
              for b in BACKENDS]
    cases += [Case(backend=b, n=n, group="length", **SMALL) for b in BACKENDS for n in (256, 512, 1024)]
    cases += [Case(backend=b, group="fold_off", attn_fold=False, **README) for b in BACKENDS]
    cases += [Case(backend=b, group="compile", compile=True, **README) for b in BACKENDS]
    cases += [Case(backend=b, group="bf16", dtype="bfloat16", **README) for b in BACKENDS]
    cases += [Case(backend=b, fusion=False, group="fusion_off", **SMALL) for b in BACKENDS]
    cases += [Case(backend=b, n=n, group="attn_memory", **ATTN_MEMORY) for b in BACKENDS for n in (512, 1024, 2048)]
    return cases


def full_cases() -> list[Case]:
    cases = quick_cases()
    cases += [Case(backend=b, n=n, group="length", **SMALL) for b in BACKENDS for n in (2048, 4096)]
    cases += [Case(backend=b, n=n, dtype="bfloat16", group="length", **SMALL) for b in BACKENDS for n in (256, 512)]
    return cases


def protein_cases() -> list[Case]:
    """The `protein` profile (``pytest --benchmark-only --bench-profile protein``): sizes proteins
    train at. Its paired rows (bench.cases.PROTEIN_PAIRED) time vnt against the original at depth 8,
    n 512, flush-to-zero on for both.

    protein_readme: the original's README model at depth 8, batch 1, every backend x dtype x length
    protein_main:   the main job's model at depth 8 / dim 128, batch 1, the same grid
    """
    return [Case(backend=b, dtype=d, group=group, **{**sizes, "n": n})
            for group, sizes in (("protein_readme", PROTEIN_README), ("protein_main", PROTEIN_MAIN))
            for d in DTYPES for n in PROTEIN_LENGTHS for b in BACKENDS]


def cuda_cases() -> list[Case]:
    """The `cuda` profile (``pytest --benchmark-only --bench-profile cuda`` on a GPU machine), sizes that
    fill a GPU first, then the CPU profile's README rows at the same sizes for comparison.

    grid:        every backend x epsilon x dtype at the README model with batch 8, n = 512
    length:      float32 length sweep per backend at the small config, batch 4, to 8192 points
    readme:      the original's README example (eps 1e-6) and the same at eps 0, vnt and the original
    bf16:        the README example under bfloat16 autocast, every backend
    compile:     the grid size (eps 1e-6, float32) under torch.compile, every backend (last: slowest)
    """
    cases = gpu_sized_cases()
    cases += [Case(backend=b, impl=impl, group=group, **config) for group, config in
              (("readme", README), ("readme_eps0", README_EPS0)) for impl in ("vnt", "original") for b in BACKENDS]
    cases += [Case(backend=b, group="bf16", dtype="bfloat16", **README) for b in BACKENDS]
    cases += [Case(backend=b, group="compile", compile=True, **GPU_GRID) for b in BACKENDS]
    return cases


GPU_GRID = {**README, "batch": 8, "n": 512}


def gpu_sized_cases() -> list[Case]:
    """The grid and length rows of the cuda profile; the quick and full profiles run them first on a GPU."""
    cases = [Case(backend=b, dtype=d, group="grid", **{**GPU_GRID, "bias_epsilon": e})
             for b in BACKENDS for e in EPSILONS for d in DTYPES]
    cases += [Case(backend=b, n=n, dtype="float32", group="length", **{**SMALL, "batch": 4}) for b in BACKENDS
              for n in (1024, 4096, 8192)]
    return cases
