"""vnt.config: one config, and a DeepSpeed JSON read into it without silent overrides."""
import json

import pytest

from vnt.config import TrainConfig


def with_json(tmp_path, content: dict, explicit=frozenset(), **run):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    return TrainConfig().replace("run", ds_config=str(path), **run).with_ds_config(explicit)


def test_json_values_become_the_config_that_runs(tmp_path):
    cfg = with_json(tmp_path, {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2,
                               "gradient_clipping": 0.5, "zero_optimization": {"stage": 2, "overlap_comm": True},
                               "bf16": {"enabled": True}, "train_batch_size": "auto"})
    assert (cfg.data.batch_size, cfg.optim.grad_accum, cfg.optim.grad_clip) == (3, 2, 0.5)
    assert (cfg.run.zero_stage, cfg.run.bf16) == (2, True)
    ds = cfg.deepspeed_config(world_size=4)
    assert ds["train_batch_size"] == 3 * 2 * 4
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}  # the file's tuning passes through
    assert ds["optimizer"]["params"]["lr"] == cfg.optim.lr


def test_auto_leaves_the_config_alone(tmp_path):
    cfg = with_json(tmp_path, {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 1}})
    assert cfg.data.batch_size == TrainConfig().data.batch_size and cfg.run.zero_stage == 1


def test_a_json_value_that_contradicts_an_explicit_option_names_both(tmp_path):
    with pytest.raises(ValueError, match=r"ds.json sets zero_optimization.stage=0 but --run-zero-stage 2 was given"):
        with_json(tmp_path, {"zero_optimization": {"stage": 0}}, explicit={("run", "zero_stage")}, zero_stage=2)
    with pytest.raises(ValueError, match=r"sets gradient_clipping=1.0 but --optim-grad-clip 0.3"):
        path = tmp_path / "clip.json"
        path.write_text(json.dumps({"gradient_clipping": 1.0}))
        TrainConfig().replace("run", ds_config=str(path)).replace("optim", grad_clip=0.3).with_ds_config(
            {("optim", "grad_clip")})
    # an explicit option that agrees with the file is fine
    cfg = with_json(tmp_path, {"zero_optimization": {"stage": 3}}, explicit={("run", "zero_stage")}, zero_stage=3)
    assert cfg.run.zero_stage == 3


@pytest.mark.parametrize("content, message", [
    ({"optimizer": {"type": "Adam"}}, "vnt builds the optimizer from the --optim-"),
    ({"scheduler": {"type": "WarmupLR"}}, "vnt builds the scheduler"),
    ({"fp16": {"enabled": True}}, "fp16 is not supported"),
])
def test_what_vnt_owns_cannot_come_from_the_json(tmp_path, content, message):
    with pytest.raises(ValueError, match=message):
        with_json(tmp_path, content)


def test_a_fixed_global_batch_must_match_the_world_size(tmp_path):
    cfg = with_json(tmp_path, {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2})
    assert cfg.deepspeed_config(world_size=4)["train_batch_size"] == 8
    with pytest.raises(ValueError, match=r"train_batch_size=8 but micro batch 2 x accumulation 1 x 2 processes = 4"):
        cfg.deepspeed_config(world_size=2)


def test_unreadable_json_is_a_value_error(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{")
    with pytest.raises(ValueError, match="not a readable JSON file"):
        TrainConfig().replace("run", ds_config=str(path)).with_ds_config()
