"""Using a trained denoiser: vnt.load_denoiser (any ZeRO stage, or an exported file), python -m
vnt.evaluate (reproduces summary.json), python -m vnt.denoise (a structure file in, a structure
file out; rotation-equivariant; bad input is one line and writes nothing)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from launching import ROOT, output
from vnt import denoise as denoise_cli
from vnt import evaluate as evaluate_cli
from vnt.denoiser import BackboneDenoiser, default_model_config, export_denoiser, load_denoiser

pytest.importorskip("deepspeed")
prody = pytest.importorskip("prody")

DS_CONFIGS = ROOT / "launch/ds_config"
RUNS = {"zero0-fp32": ["--run-ds-config", DS_CONFIGS / "zero0.json"],
        "zero3-fp32": ["--run-ds-config", DS_CONFIGS / "zero3.json"],
        "zero0-bf16": ["--run-zero-stage", 0, "--run-bf16", "true"],
        "zero1-bf16": ["--run-zero-stage", 1, "--run-bf16", "true"]}  # the matrix's runs (test_train.py)


def a_small_structure() -> Path:
    """A real structure ProDy ships: ubiquitin (76 residues) with its crystal water."""
    folder = Path(prody.__file__).parent / "tests" / "datafiles"
    return folder / "pdb1ubi.pdb" if (folder / "pdb1ubi.pdb").exists() else sorted(folder.glob("*.pdb"))[0]


def test_load_denoiser_consolidates_every_stage_to_the_same_weights(trained):
    """ZeRO-0 holds the model whole (bf16: the float32 masters from the optimizer state); ZeRO >= 1 runs
    are consolidated by DeepSpeed's zero_to_fp32. The float32 runs computed the same function, so their
    weights agree, and the bf16 runs' masters nearly."""
    models = {name: load_denoiser(trained(name, args)) for name, args in RUNS.items()}
    ref = models["zero0-fp32"].state_dict()
    for name, model in models.items():
        assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())
        for key, value in model.state_dict().items():
            tol = 5e-3 if "bf16" in name else 1e-5
            torch.testing.assert_close(value, ref[key], rtol=tol, atol=tol, msg=f"{name} {key}")
    step1 = load_denoiser(trained("zero0-fp32", RUNS["zero0-fp32"]), step=1)
    assert any((a - b).abs().max() > 0 for a, b in zip(step1.state_dict().values(), ref.values()))


@pytest.mark.parametrize("name", list(RUNS))
def test_evaluate_reproduces_the_summary(name, trained, capsys):
    run_dir = trained(name, RUNS[name])
    assert evaluate_cli.main(["--run-dir", str(run_dir)]) == 0
    result = json.loads(capsys.readouterr().out)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert result["val_rmsd_denoised"] == pytest.approx(summary["val_rmsd_denoised"], rel=1e-6)
    assert result["val_rmsd_noisy"] == pytest.approx(summary["val_rmsd_noisy"], rel=1e-9)
    assert result["val_atoms"] == summary["val_atoms"] and result["rel_diff_to_summary"] < 1e-6
    # as a user meets it: the ratio at 0.25 .. 2 A, and the bond geometry of clean, noisy and denoised
    by_sigma = {r["sigma_A"]: r for r in result["by_sigma"]}
    assert list(by_sigma) == [0.25, 0.5, 1.0, 2.0]
    assert by_sigma[1.0]["val_rmsd_denoised"] == pytest.approx(result["val_rmsd_denoised"], rel=1e-9)
    for sigma, r in by_sigma.items():
        assert r["val_rmsd_noisy"] == pytest.approx(sigma * 3 ** 0.5, rel=0.1)  # per-axis sigma: sqrt(3) sigma
        assert r["bond_rmsd_A_clean"] < 0.05 and r["angle_rmsd_deg_clean"] < 5  # deposited structures
        assert r["bond_rmsd_A_noisy"] > 0.5 * sigma and r["angle_rmsd_deg_noisy"] > r["angle_rmsd_deg_clean"]
        assert r["bonds"] > 0 and r["bond_rmsd_A_denoised"] > 0


def test_evaluate_sigmas_option_picks_the_noise_levels(trained, capsys):
    run_dir = trained("zero0-fp32", RUNS["zero0-fp32"])
    assert evaluate_cli.main(["--run-dir", str(run_dir), "--sigmas", "0.5,3"]) == 0
    assert [r["sigma_A"] for r in json.loads(capsys.readouterr().out)["by_sigma"]] == [0.5, 3.0]


def test_denoise_cli_writes_the_same_residues_and_atoms(trained, tmp_path):
    run_dir = trained("zero0-fp32", RUNS["zero0-fp32"])
    src, out = a_small_structure(), tmp_path / "out.pdb"
    proc = subprocess.run([sys.executable, "-m", "vnt.denoise", "--run-dir", str(run_dir), "--input", str(src),
                           "--add-noise", "1.0", "--seed", "3", "--output", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, output(proc)
    result = json.loads(proc.stdout)
    assert 1.5 < result["rmsd_noisy_A"] < 2.0 and result["rmsd_denoised_A"] > 0  # sigma 1 per axis: sqrt(3) A
    assert "backbone RMSD to the input: noisy" in proc.stderr
    before, after = prody.parsePDB(str(src), model=1), prody.parsePDB(str(out))
    assert after.numAtoms() == before.numAtoms()
    assert list(after.getNames()) == list(before.getNames()) and list(after.getChids()) == list(before.getChids())
    assert list(after.getResnums()) == list(before.getResnums())
    backbone = before.select("protein and name N CA C O").getIndices()
    others = np.setdiff1d(np.arange(before.numAtoms()), backbone)
    assert np.abs(after.getCoords()[backbone] - before.getCoords()[backbone]).max() > 0.1   # moved
    np.testing.assert_allclose(after.getCoords()[others], before.getCoords()[others], atol=1e-3)  # kept
    # --backbone-only drops the rest; --chain takes one chain
    only = tmp_path / "backbone.pdb"
    chain = before.select("protein").getChids()[0]
    assert denoise_cli.main(["--run-dir", str(run_dir), "--input", str(src), "--output", str(only), "--chain", chain,
                             "--backbone-only", "true"]) == 0
    atoms = prody.parsePDB(str(only))
    assert set(atoms.getNames()) <= {"N", "CA", "C", "O"} and set(atoms.getChids()) <= {chain}


def test_denoise_cli_is_rotation_equivariant(tmp_path):
    """Rotating the input file rotates the output (float32), with a model whose displacements are
    far from zero (random weights, output projection included), through an exported file."""
    torch.manual_seed(0)
    model = BackboneDenoiser(default_model_config())  # per residue, the default
    torch.nn.init.normal_(model.residues.proj_out.weight, std=0.5)
    model.task = {"coord_scale": 1.0, "max_length": 32, "sigma": 1.0}
    export_denoiser(model, tmp_path / "model.pt")
    structure = prody.parsePDB(str(a_small_structure()), model=1)
    r = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0].numpy()
    r *= np.sign(np.linalg.det(r))
    rotated = structure.copy()
    rotated.setCoords(structure.getCoords() @ r.T + np.array([5.0, -3.0, 12.0]))
    prody.writePDB(str(tmp_path / "a.pdb"), structure)
    prody.writePDB(str(tmp_path / "b.pdb"), rotated)
    for name in ("a", "b"):
        assert denoise_cli.main(["--model", str(tmp_path / "model.pt"), "--input", str(tmp_path / f"{name}.pdb"),
                                 "--output", str(tmp_path / f"{name}_out.pdb"), "--backbone-only", "true"]) == 0
    out_a = prody.parsePDB(str(tmp_path / "a_out.pdb")).getCoords()
    out_b = prody.parsePDB(str(tmp_path / "b_out.pdb")).getCoords()
    moved = np.abs(out_a - structure.select("protein and name N CA C O").getCoords()).max()
    assert moved > 0.5, moved  # the model really moves atoms
    np.testing.assert_allclose(out_b, out_a @ r.T + np.array([5.0, -3.0, 12.0]), atol=2e-3)  # PDB: 3 decimals


def test_exported_model_loads_without_deepspeed(trained, tmp_path):
    run_dir = trained("zero3-fp32", RUNS["zero3-fp32"])
    path = tmp_path / "model.pt"
    assert denoise_cli.main(["--run-dir", str(run_dir), "--export", str(path)]) == 0
    code = (f"import sys, torch; from vnt.denoiser import load_denoiser; m = load_denoiser({str(path)!r}); "
            "assert 'deepspeed' not in sys.modules; print(sum(p.numel() for p in m.parameters()))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, output(proc)
    exported = load_denoiser(path)
    for a, b in zip(exported.state_dict().values(), load_denoiser(run_dir).state_dict().values()):
        torch.testing.assert_close(a, b)


def test_importing_the_task_and_the_commands_does_not_import_deepspeed():
    code = ("import sys, vnt.denoiser, vnt.denoise, vnt.evaluate, vnt.cli; "
            "assert 'deepspeed' not in sys.modules and 'vnt.train' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.fixture
def no_protein(tmp_path):
    path = tmp_path / "water.pdb"
    path.write_text("HETATM    1  O   HOH A   1       1.000   2.000   3.000  1.00  0.00           O\nEND\n")
    return path


def test_bad_input_is_one_line_and_writes_nothing(trained, tmp_path, no_protein, capsys):
    run_dir = trained("zero0-fp32", RUNS["zero0-fp32"])
    empty_run = tmp_path / "empty-run"
    empty_run.mkdir()
    (empty_run / "config.json").write_text((run_dir / "config.json").read_text())
    out = tmp_path / "out.pdb"
    src = str(a_small_structure())
    cases = [
        (["--run-dir", str(run_dir), "--input", str(tmp_path / "missing.pdb")], "missing.pdb: no such file"),
        (["--run-dir", str(run_dir), "--input", str(no_protein)], "has no protein chain"),
        (["--run-dir", str(run_dir), "--input", src, "--chain", "Q"], "no protein chain 'Q'; its chains:"),
        (["--run-dir", str(empty_run), "--input", src], "holds no checkpoint"),
        (["--run-dir", str(tmp_path), "--input", src], "not a run directory"),
        (["--input", src], "give --run-dir"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_:
            denoise_cli.main([*argv, "--output", str(out)])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert not out.exists()
    with pytest.raises(SystemExit) as exit_:
        evaluate_cli.main(["--run-dir", str(tmp_path / "nope")])
    assert exit_.value.code == 2 and "not a run directory" in capsys.readouterr().err


def test_whole_chain_run_trains_validates_and_denoises_the_longest_chain_whole(embedded, cache_dir, tmp_path):
    """--data-max-length 0 --data-max-tokens N: training and validation on whole chains batched by a
    token budget, with activation checkpointing; vnt.denoise then takes the longest embedded chain
    (758 residues) in one window."""
    from launching import launch, metrics
    run_dir = tmp_path / "whole"
    out = launch(["--data-max-length", 0, "--data-max-tokens", 800, "--data-batch-size", 4, "--run-dir", run_dir,
                  "--max-steps", 2, "--run-activation-checkpointing", "true"], cache_dir, NUM_GPUS=2)
    assert out.returncode == 0, output(out)
    assert sorted(metrics(run_dir)) == [1, 2]
    saved = json.loads((run_dir / "config.json").read_text())["config"]["data"]
    assert (saved["max_length"], saved["max_tokens"]) == (0, 800)
    longest = max(embedded.examples, key=len)
    assert len(longest) == 758
    src = Path(prody.__file__).parent / "tests" / "datafiles" / longest.name.split(":")[0]
    result = denoise_cli.run(denoise_cli.DenoiseConfig(run_dir=str(run_dir), input=str(src), output=str(tmp_path / "o.pdb"),
                                                       chain="A", add_noise=1.0))
    (chain,) = result["chains"]
    assert (chain["residues"], chain["windows"]) == (758, 1) and result["rmsd_denoised_A"] > 0
    # the same run's model in windows when asked
    windowed = denoise_cli.run(denoise_cli.DenoiseConfig(run_dir=str(run_dir), input=str(src), max_length=100,
                                                         output=str(tmp_path / "w.pdb"), chain="A", add_noise=1.0))
    assert windowed["chains"][0]["windows"] == 8
