"""vnt.checkpoint: manifests, `latest`, verification and the fallback rule (no launches here; the
launched versions are in test_train.py)."""
import json

import pytest

from vnt import checkpoint
from vnt.checkpoint import CheckpointError


def fake_save(ckpt_dir, step, *, commit=True, keep_last=0):
    """What the trainer's save leaves: DeepSpeed's files of a tag, then (after every rank) the commit."""
    tag = checkpoint.tag_for(step)
    folder = ckpt_dir / tag
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(bytes(range(256)) * (step + 1))
    (folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"o" * 100 * step)
    if commit:
        checkpoint.commit(ckpt_dir, tag, {"step": step, "consumed": 2 * step, "world_size": 2}, keep_last=keep_last)
    return folder


def test_commit_writes_a_manifest_then_latest(tmp_path):
    folder = fake_save(tmp_path, 3)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["step"] == 3 and manifest["tag"] == "step3"
    assert set(manifest["files"]) == {"mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    assert manifest["files"]["mp_rank_00_model_states.pt"]["size"] == 256 * 4
    assert (tmp_path / "latest").read_text() == "step3"
    assert checkpoint.verify(tmp_path, "step3") == manifest
    assert checkpoint.choose(tmp_path)["step"] == 3


def test_damage_of_any_kind_is_detected(tmp_path):
    folder = fake_save(tmp_path, 2)
    model = folder / "mp_rank_00_model_states.pt"
    good = model.read_bytes()
    model.write_bytes(good[:-1])
    with pytest.raises(CheckpointError, match="has 767 bytes, its manifest says 768"):
        checkpoint.verify(tmp_path, "step2")
    model.write_bytes(good[:-1] + b"x")  # same size, other bytes
    with pytest.raises(CheckpointError, match="does not match its manifest's sha256"):
        checkpoint.verify(tmp_path, "step2")
    model.unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        checkpoint.verify(tmp_path, "step2")
    (folder / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="its save never completed"):
        checkpoint.verify(tmp_path, "step2")


def test_bad_latest_falls_back_to_the_newest_good_checkpoint_with_a_warning(tmp_path):
    fake_save(tmp_path, 2)
    fake_save(tmp_path, 4)
    fake_save(tmp_path, 6, commit=False)  # a save killed before its commit: latest still names step4
    assert checkpoint.choose(tmp_path)["step"] == 4
    (tmp_path / "step4/zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"truncated")
    with pytest.warns(RuntimeWarning, match=r"resuming from step2, skipping: .*step4.*has 9 bytes.*step6.*never completed"):
        assert checkpoint.choose(tmp_path)["step"] == 2
    with pytest.raises(CheckpointError, match="--run-resume-from step4: .*has 9 bytes"):
        checkpoint.choose(tmp_path, resume_from="step4")
    assert checkpoint.choose(tmp_path, resume_from="step2")["step"] == 2
    (tmp_path / "step2/manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="no checkpoint .* is intact"):
        checkpoint.choose(tmp_path)


def test_no_latest_means_a_fresh_start(tmp_path):
    assert checkpoint.choose(tmp_path / "nothing-here") is None
    fake_save(tmp_path, 1, commit=False)
    assert checkpoint.choose(tmp_path) is None


def test_keep_last_prunes_old_checkpoints_and_their_conversions(tmp_path):
    for step in (1, 2):
        fake_save(tmp_path, step, keep_last=2)
    (tmp_path / "step1_universal_from2").mkdir()
    fake_save(tmp_path, 3, keep_last=2)
    assert checkpoint.tags(tmp_path) == ["step2", "step3"]
    assert not (tmp_path / "step1_universal_from2").exists()
    assert (tmp_path / "latest").read_text() == "step3"
