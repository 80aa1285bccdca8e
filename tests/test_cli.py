"""vnt.cli: command lines from the config dataclasses. Typed values, help from the field comments,
no abbreviations, and every bad value a one-line usage error (exit 2, no traceback)."""
import pickle

import pytest

from vnt import train
from vnt.data import __main__ as data_cli


def usage_error(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_values_are_typed_by_the_annotations():
    cfg, _ = train.config_from_args(["--model-ff-mult", "2.5", "--optim-betas", "0.8,0.9", "--run-bf16", "true",
                                     "--model-dim-feat", "none", "--model-num-tokens", "none"])
    assert cfg.model.ff_mult == 2.5 and cfg.optim.betas == (0.8, 0.9) and cfg.run.bf16 is True
    assert cfg.model.dim_feat is None
    cfg, _ = train.config_from_args(["--run-dir", "x", "--max-steps", "7"])  # shortcuts
    assert cfg.run.run_dir == "x" and cfg.run.max_steps == 7
    cfg, _ = train.config_from_args(["--run-run-dir", "y"])  # the flag's earlier name still works
    assert cfg.run.run_dir == "y"


@pytest.mark.parametrize("argv, message", [
    (["--run-bf16", "yes"], "argument --run-bf16: expected true or false, got 'yes'"),
    (["--model-ff-mult", "two"], "argument --model-ff-mult: expected float, got 'two'"),
    (["--run-max", "5"], "unrecognized arguments: --run-max 5"),  # no prefix matching
    (["--model-attn-backend", "fast"], "'fast' is not one of math, sdpa, l2, l2_math"),
    (["--run-zero-stage", "4"], "'4' is not one of 0, 1, 2, 3"),
    (["--optim-betas", "0.9"], "expected 2 comma-separated values"),
    (["--model-flash-attn", "true"], "--model-flash-attn was replaced: use --model-attn-backend sdpa"),
    (["--model-l2-dist-attn", "true"], "use --model-attn-backend l2"),
    # the kernel plan is not a model option (a checkpoint records the function, not the kernels)
    (["--model-l2-written-out-max-scores", "0"], "use VNT_KERNELS=l2_written_out_max_scores=N in the environment"),
    (["--model-attn-fold", "false"], "use VNT_KERNELS=fold=false in the environment"),
    (["--optim-lr", "0"], "lr must be > 0"),
    (["--check", "--model-dim-feat", "15"], "the denoiser needs an even model dim_feat, got 15"),
    (["--check", "--model-translation-invariant", "false"], "set model translation_invariant=True"),
    (["--check", "--model-heads", "0"], "heads must be a positive integer"),
])
def test_bad_values_are_one_line_usage_errors(argv, message, capsys):
    assert message in usage_error(train.main, argv, capsys)


def test_check_builds_large_models_on_the_meta_device_and_still_catches_their_errors(capsys):
    """--check builds the model as the ranks will: a billion-parameter one on the meta device (no
    memory, no init), the default on the CPU (faster than the meta device's first op)."""
    from vnt.config import TrainConfig
    big = TrainConfig().replace("model", dim=2048, depth=24, heads=16, dim_head=128, dim_feat=64)
    assert train.check_model(big).type == "meta"
    assert train.check_model(TrainConfig()).type == "cpu"
    large = ["--model-dim", "2048", "--model-depth", "24", "--model-heads", "16", "--model-dim-head", "128"]
    assert "the denoiser needs an even model dim_feat, got 15" in usage_error(
        train.main, ["--check", *large, "--model-dim-feat", "15"], capsys)


def test_help_has_descriptions_defaults_and_choices(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # the help is wrapped to the terminal
    assert "--model-dim N channels of every VN feature (default: 32)" in out
    assert "one of math, sdpa, l2, l2_math" in out and "one of 0, 1, 2, 3" in out
    assert "--run-dir" in out and "--run-run-dir" in out
    assert "V (default" not in out


@pytest.fixture
def bad_pickles(tmp_path):
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"\x80\x04not a pickle at all")
    wrong = tmp_path / "wrong.pkl"
    wrong.write_bytes(pickle.dumps({"train": {"seq": ["AAA"]}}))  # no crd, msk, ids
    return {"missing": (str(tmp_path / "missing.pkl"), "no such file"),
            "corrupt": (str(garbage), "is not a readable pickle"),
            "wrong_shape": (str(wrong), "not a SidechainNet pickle")}


@pytest.mark.parametrize("kind", ["missing", "corrupt", "wrong_shape"])
def test_a_bad_sidechainnet_file_is_one_line_naming_it(kind, bad_pickles, capsys):
    path, message = bad_pickles[kind]
    for main, argv in ((data_cli.main, ["summary", "--source", "scn-pickle", "--path", path]),
                       (train.main, ["--check", "--data-source", "scn-pickle", "--data-path", path])):
        err = usage_error(main, argv, capsys)
        assert path in err and message in err and "SidechainNet pickle" in err, err


def test_data_cli_takes_every_data_option(embedded, cache_dir, capsys):
    assert data_cli.main(["summary", "--json", "--cache-dir", str(cache_dir), "--max-length", "48",
                          "--bucket", "false"]) == 0
    assert '"max_length": 48' in capsys.readouterr().out
    assert "unrecognized arguments: --max-len" in usage_error(data_cli.main, ["summary", "--max-len", "4"], capsys)
