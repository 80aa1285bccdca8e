"""The training league, declared once as data: the main job (launch/train.sh, embedded data) at a
fixed budget of optimizer steps, one case per setting a user chooses between, every case with the
same seeds, data order, crops, noise and optimizer.

Axes: attention backend; bias epsilon; float32 vs bf16; 1 vs 2 processes (same global batch: one
process accumulates two micro batches); peer networks trained by the same loop (vnt.peers): the
original VN-transformer 0.1.0, En-Transformer and Equiformer; flush-to-zero off (PyTorch's default) and on for
vnt and the peers, so that their throughput compares with denormals controlled. ``pytest --benchmark-only --bench-profile train``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

SEEDS = (0, 1)
PEERS = ("vn-transformer-0.1.0", "en-transformer", "equiformer")  # vnt.peers
# model sizes other than the main job's default (vnt.denoiser.default_model_config)
SIZES = {"large": ["--model-dim", "64", "--model-depth", "3", "--model-heads", "4", "--model-dim-head", "64",
                   "--model-dim-feat", "32"]}


@dataclass(frozen=True)
class TrainCase:
    network: str = "vnt"            # vnt | vn-transformer-0.1.0 | en-transformer | equiformer
    backend: str = "sdpa"           # vnt's attention backend (the original: sdpa = flash_attn, l2 = l2_dist_attn)
    bias_epsilon: float = 0.0
    bf16: bool = False
    world: int = 2                  # processes; 1 accumulates 2 micro batches (the same global batch)
    seed: int = 0
    steps: int = 400
    group: str = "backend"          # the question the row answers: backend | epsilon | bf16 | world | peer
    time_budget_s: float = 0.0      # train for this long instead (the horizon fitted after 20 steps); 0: steps
    points: str = "residue"         # vnt: a point per residue (its 4 atoms as 4 vector channels, the default), or per atom
    size: str = "default"           # the model: default (the main job's), or large (SIZES)
    ftz: bool = False               # flush denormals to zero in every rank (--run-flush-denormal true)

    @property
    def setting(self) -> str:
        """The case without its seed: rows of one setting are averaged over seeds."""
        parts = [self.network + ("-atom" if self.network == "vnt" and self.points == "atom" else "")
                 + ("" if self.size == "default" else f"-{self.size}"), self.backend,
                 f"eps{self.bias_epsilon:g}", "bf16" if self.bf16 else "fp32", f"w{self.world}"]
        parts.append(f"{self.time_budget_s:g}s" if self.time_budget_s else f"{self.steps}steps")
        if self.ftz:
            parts.append("ftz")
        return "-".join(parts)

    @property
    def id(self) -> str:
        return f"{self.setting}-seed{self.seed}"

    def to_dict(self) -> dict:
        return {**asdict(self), "case_id": self.id, "setting": self.setting}

    def trainer_args(self) -> list[str]:
        points = self.points if self.network == "vnt" else "atom"  # the peers take one point per atom
        args = ["--task-network", self.network, "--task-points", points, "--model-attn-backend", self.backend,
                "--model-bias-epsilon", str(self.bias_epsilon), "--run-bf16", str(self.bf16).lower(),
                "--run-seed", str(self.seed), "--data-seed", str(self.seed), "--max-steps", str(self.steps),
                "--run-val-every", str(max(1, self.steps // 4)), "--run-log-every", "10",
                "--run-ckpt-every", str(self.steps), "--run-progress", "false"]
        if self.time_budget_s:
            args += ["--run-time-budget-s", str(self.time_budget_s)]
        args += SIZES.get(self.size, [])
        if self.ftz:
            args += ["--run-flush-denormal", "true"]
        if self.world == 1:
            args += ["--optim-grad-accum", "2"]
        return args


def train_cases(steps: int = 400, seeds=SEEDS) -> list[TrainCase]:
    """The quick league: 400 steps to fit 30 min on 2 CPU cores (500 steps took 33 min 44 s, 13 of
    them En-Transformer's, whose per-atom steps are 20x slower than vnt's per-residue ones)."""
    settings = [TrainCase(backend=b, group="backend") for b in ("sdpa", "math", "l2")]
    settings += [TrainCase(bias_epsilon=e, group="epsilon") for e in (1e-6, 1e-4, 1e-2)]
    settings += [TrainCase(bf16=True, group="bf16"), TrainCase(world=1, group="world")]
    settings += [TrainCase(network=n, group="peer") for n in PEERS]
    # the throughput comparison with the peers, with denormals flushed to zero in every package too
    settings += [TrainCase(network=n, ftz=True, group="ftz") for n in ("vnt", "vn-transformer-0.1.0", "en-transformer")]
    return [TrainCase(**{**asdict(c), "seed": s, "steps": steps}) for c in settings for s in seeds]


def quality_cases(budget_s: float = 150.0, steps: int = 150, seeds=SEEDS) -> list[TrainCase]:
    """Denoiser quality: vnt (the main job's network) against the original and the peers the
    original's README names, En-Transformer and Equiformer, each at the main job's width and depth
    (dim 32, depth 2; the peers attend to 32 neighbours, Equiformer has degrees 0-1 at widths 32 / 16),
    at an equal wall-clock budget of training (group ``quality``) and at an equal number of optimizer
    steps (group ``steps``) (``pytest --benchmark-only --bench-profile quality``, ~40 min)."""
    networks = [TrainCase(), *(TrainCase(network=n) for n in PEERS)]
    timed = [TrainCase(**{**asdict(c), "group": "quality", "seed": s, "steps": 100000, "time_budget_s": budget_s})
             for c in networks for s in seeds]
    stepped = [TrainCase(**{**asdict(c), "group": "steps", "seed": s, "steps": steps}) for c in networks for s in seeds]
    return timed + stepped


def tiny_train_cases() -> list[TrainCase]:
    """A few steps of one case, with flush-to-zero on (the flag's path): what the test suite runs to
    check the harness."""
    return [TrainCase(steps=4, seed=0, group="ftz", ftz=True)]
