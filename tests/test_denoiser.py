"""vnt.denoiser, the main job's task: the denoiser in each form is SE(3)-equivariant (float64), the
noise is per example, and the peers (vnt.peers) plug into the same task."""
import pytest
import torch

from vnt.data import NUM_ATOMS
from vnt.denoiser import (BackboneDenoiser, TaskConfig, default_model_config, displacement_call, model_inputs,
                          validation_seeds)
from vnt.equivariance import equivariance_error


def inputs(b=2, residues=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = residues * NUM_ATOMS
    coors = torch.randn(b, n, 3, dtype=torch.float64, generator=g) * 8
    tokens = torch.randint(0, 84, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[-1, 6 * NUM_ATOMS:] = False      # a shorter chain
    mask[0, 5] = False                    # a missing atom
    return coors, tokens, mask


@pytest.mark.parametrize("task", [TaskConfig(), TaskConfig(points="residue")], ids=["atom", "residue"])
def test_vnt_denoiser_is_se3_equivariant(task):
    model = BackboneDenoiser(default_model_config(), task).double()
    out_proj = model.residues.proj_out if task.points == "residue" else model.vnt.proj_out
    torch.nn.init.normal_(out_proj.weight, std=0.3)  # not the identity it starts as
    coors, tokens, mask = inputs()
    assert model(coors, tokens=tokens, mask=mask)[mask].abs().max() > 0.1
    err = equivariance_error(model, coors, feats=tokens, mask=mask, translate=True, output_translates=False,
                             call=displacement_call)
    assert err.rel < 1e-10, err


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("points", ["residue", "atom"])
def test_vnt_denoiser_float32_error_is_within_the_float32_bound(points, seed):
    """The float32 bound the model meets (1e-5, tests/test_equivariance.py) holds for the denoiser per
    residue (the default) and per atom: 2 chains of 64 residues, a perturbed output map."""
    torch.manual_seed(seed)
    model = BackboneDenoiser(default_model_config(), TaskConfig(points=points))
    out_proj = model.residues.proj_out if points == "residue" else model.vnt.proj_out
    torch.nn.init.normal_(out_proj.weight, std=0.3)
    coors, tokens, mask = inputs(b=2, residues=64, seed=seed)
    err = equivariance_error(model, coors.float(), feats=tokens, mask=mask, translate=True, output_translates=False,
                             call=displacement_call)
    assert err.rel < 1e-5, err


@pytest.mark.parametrize("network, module", [("en-transformer", "en_transformer"),
                                             ("vn-transformer-0.1.0", "VN_transformer"),
                                             ("equiformer", "equiformer_pytorch")])
def test_peers_train_in_the_same_task(network, module):
    pytest.importorskip(module)
    torch.manual_seed(0)
    model = BackboneDenoiser(default_model_config(), TaskConfig(network=network)).double()  # points: the default
    coors, tokens, mask = inputs(b=1)  # one sample: 0.1.0 centres on the whole batch (difference 2)
    out = model(coors, tokens=tokens, mask=mask)
    assert out.shape == coors.shape and torch.isfinite(out).all()
    err = equivariance_error(model, coors, feats=tokens, mask=mask, translate=True, output_translates=False,
                             call=displacement_call)
    assert err.rel < 1e-6, err
    assert not hasattr(model, "residues")  # task.points is vnt's: a peer takes one point per atom


def test_validation_noise_belongs_to_the_example_not_the_batch():
    from vnt.data import collate
    from vnt.data.core import ProteinExample
    import numpy as np
    ex = [ProteinExample(f"c{i}", "A" * L, np.zeros((L, 4, 3), np.float32), np.ones((L, 4), bool))
          for i, L in enumerate((5, 9))]
    alone = collate([ex[0]], [(0, 5)])
    together = collate(ex, [(0, 5), (0, 9)])
    a = model_inputs(alone, sigma=1.0, seeds=validation_seeds(alone, 0))[0]
    b = model_inputs(together, sigma=1.0, seeds=validation_seeds(together, 0))[0]
    torch.testing.assert_close(a[0, :20], b[0, :20])
    assert validation_seeds(together, 0) != validation_seeds(together, 1)
