"""Generation at scale (fewstep.generate): the same samples whatever the number of workers
(torchrun, gloo), resumable after kill -9, another run refused, damaged shards regenerated."""

from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fewstep
from fewstep.generate import MANIFEST, shard_path

BIN = Path(sys.executable).parent
RUN = ["generate", "--oracle", "gmm-d2", "--nfe", "10", "--seed", "3", "--batch", "8"]


def _cli(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(BIN / "fewstep"), *args], capture_output=True, text=True, env=env, timeout=300, **kw)


def _torchrun(args, n=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={n}", "-m", "fewstep", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def _same_folders(a: Path, b: Path) -> bool:
    shards = sorted(p.name for p in a.glob("shard-*.safetensors"))
    return shards == sorted(p.name for p in b.glob("shard-*.safetensors")) and all(filecmp.cmp(a / f, b / f, shallow=False) for f in shards)


def test_generated_samples_are_the_samples_of_their_indices(tmp_path):
    oracle = fewstep.bundled_oracle("gmm-d2")
    model = oracle.as_model(fewstep.DiscreteVP.linear())
    model.sample_shape = (oracle.dim,)
    info = fewstep.generate(model, num=21, out=tmp_path / "g", solver="dpmpp_2m_sde", nfe=8, seed=5, batch_size=8, progress=False)
    assert (info.shards, info.generated, info.reused) == (3, 3, 0)
    x = fewstep.load_samples(tmp_path / "g")
    idx = list(range(16, 21))  # the last shard, sampled directly
    x_T = fewstep.initial_noise(model.schedule, (5, 2), 5, indices=idx)
    assert x.shape == (21, 2) and torch.equal(x[16:], fewstep.sample(model, x_T, "dpmpp_2m_sde", nfe=8, seed=5, sample_indices=idx))
    man = json.loads((tmp_path / "g" / MANIFEST).read_text())
    assert (man["num"], man["seed"], man["nfe"], man["shard_size"]) == (21, 5, 8, 8)
    again = fewstep.generate(model, num=21, out=tmp_path / "g", solver="dpmpp_2m_sde", nfe=8, seed=5, batch_size=8, progress=False)
    assert (again.generated, again.reused) == (0, 3)  # the same command again: nothing to do


@pytest.mark.parametrize("solver", ["unipc", "dpmpp_2m_sde"])
def test_two_workers_under_torchrun_give_bitwise_the_samples_of_one(tmp_path, solver):
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = _cli([*RUN, "--solver", solver, "--num-samples", "45", "--out", str(one)])
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = _torchrun([*RUN, "--solver", solver, "--num-samples", "45", "--out", str(two)])
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert "2 worker(s)" in r2.stdout and _same_folders(one, two)
    assert torch.equal(fewstep.load_samples(one), fewstep.load_samples(two))


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = [*RUN, "--solver", "dpmpp_2m_sde", "--num-samples", "6000"]
    assert _cli([*args, "--out", str(full)]).returncode == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(BIN / "fewstep"), *args, "--out", str(cut)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while len(list(cut.glob("shard-*.safetensors"))) < 20 and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(cut.glob("shard-*.safetensors")))
    assert 0 < done < 750, done  # killed part-way
    r = _cli([*args, "--out", str(cut)])
    assert r.returncode == 0 and f"{done} already complete" in r.stdout, r.stdout
    assert _same_folders(full, cut)


def test_another_run_on_the_folder_is_refused_and_damaged_shards_are_regenerated(tmp_path):
    out = tmp_path / "g"
    args = [*RUN, "--solver", "unipc", "--num-samples", "30", "--out", str(out)]
    assert _cli(args).returncode == 0
    before = fewstep.load_samples(out)
    r = _cli([*RUN[:-4], "--seed", "4", "--batch", "8", "--solver", "unipc", "--num-samples", "30", "--out", str(out)])
    assert r.returncode == 2 and "holds another run" in r.stderr and "seed" in r.stderr
    damaged = shard_path(out, 1)
    data = bytearray(damaged.read_bytes())
    data[-3] ^= 0xFF  # a flipped bit in the samples
    damaged.write_bytes(bytes(data))
    with pytest.raises(fewstep.FewstepError, match="shard-000001"):
        fewstep.load_samples(out)
    r = _cli(args)
    assert r.returncode == 0 and "1 damaged and regenerated" in r.stdout
    assert torch.equal(fewstep.load_samples(out), before)


def test_evaluate_a_digits_generation_folder(tmp_path):
    out = tmp_path / "d"
    assert _cli(["generate", "--model", "digits-vp-eps", "--solver", "ddim", "--nfe", "4", "--num-samples", "20", "--batch", "16",
                 "--out", str(out)]).returncode == 0
    r = _cli(["evaluate", str(out), "--model", "digits-vp-eps"])
    assert r.returncode == 0, r.stderr[-1000:]
    res = json.loads(r.stdout)
    assert res["samples"] == 20 and res["fd_features"] > 0 and 0 < res["confidence"] <= 1


def test_streaming_evaluation_equals_the_whole_set(tmp_path):
    """evaluate_folder streams the shards; its Fréchet distances equal those of all samples at once,
    with the digits classifier or with a user's feature extractor."""
    from fewstep.generate import evaluate_folder
    from fewstep.zoo.evaluate import DigitsEvaluator

    model = fewstep.zoo.load("digits-vp-eps")
    fewstep.generate(model, num=40, out=tmp_path / "d", solver="ddim", nfe=4, batch_size=16, progress=False)
    x = fewstep.load_samples(tmp_path / "d")
    whole = DigitsEvaluator().evaluate(x)
    streamed = evaluate_folder(tmp_path / "d")
    for key in ("fd_features", "fd_pixels", "confidence"):
        assert abs(streamed[key] - whole[key]) <= 1e-6 * max(1.0, abs(whole[key])), key
    ref = torch.randn(200, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    feats = lambda s: s.reshape(s.shape[0], -1)[:, :3].double()  # noqa: E731  (a user's feature extractor)
    got = evaluate_folder(tmp_path / "d", features=feats, reference=ref)
    assert got["samples"] == 40 and abs(got["fd"] - fewstep.frechet_distance(feats(x), ref)) < 1e-8


def test_memory_mapped_loading_serves_the_samples_from_the_files(tmp_path):
    """load_samples(mmap=True): views of the shard files (nothing copied up front) that index,
    slice across shard borders and iterate exactly like the loaded tensor; a damaged shard is still
    caught (verify) and a truncated one even without it."""
    from fewstep.sample_folder import MappedSamples

    oracle = fewstep.bundled_oracle("gmm-d2")
    model = oracle.as_model(fewstep.DiscreteVP.linear())
    model.sample_shape = (oracle.dim,)
    fewstep.generate(model, num=21, out=tmp_path / "g", solver="ddim", nfe=4, seed=2, batch_size=8, progress=False)
    full = fewstep.load_samples(tmp_path / "g")
    m = fewstep.load_samples(tmp_path / "g", mmap=True)
    assert isinstance(m, MappedSamples) and len(m) == 21 and m.shape == full.shape and m.dtype == full.dtype
    sizes = [shard_path(tmp_path / "g", s).stat().st_size for s in range(3)]
    assert [x.untyped_storage().nbytes() for x in m.shards] == sizes  # each shard: a view of its whole file's map
    assert torch.equal(m[5], full[5]) and torch.equal(m[-1], full[-1]) and torch.equal(m[3:19], full[3:19])
    assert torch.equal(m[::4], full[::4]) and torch.equal(m[[20, 0, 8]], full[[20, 0, 8]]) and torch.equal(m[7:7], full[7:7])
    assert torch.equal(torch.cat(list(m.batches(6))), full)
    with pytest.raises(IndexError):
        m[21]
    damaged = shard_path(tmp_path / "g", 2)
    data = bytearray(damaged.read_bytes())
    data[-2] ^= 0x01
    damaged.write_bytes(bytes(data))
    with pytest.raises(fewstep.FewstepError, match="shard-000002"):
        fewstep.load_samples(tmp_path / "g", mmap=True)
    assert not torch.equal(fewstep.load_samples(tmp_path / "g", mmap=True, verify=False)[16:], full[16:])
    damaged.write_bytes(bytes(data[:-4]))  # cut short: no valid safetensors file
    with pytest.raises(fewstep.FewstepError, match="shard-000002"):
        fewstep.load_samples(tmp_path / "g", verify=False)


def test_rank_0_progress_counts_every_workers_shards_on_disk(tmp_path):
    """The bar counts the samples in finished shard files, whoever wrote them (temporary files of
    writes in flight and other files are not counted); under torchrun it reaches the total."""
    from fewstep.generate import _FolderProgress

    oracle = fewstep.bundled_oracle("gmm-d2")
    model = oracle.as_model(fewstep.DiscreteVP.linear())
    model.sample_shape = (oracle.dim,)
    out = tmp_path / "g"
    fewstep.generate(model, num=21, out=out, solver="ddim", nfe=4, batch_size=8, progress=False)
    shard_path(out, 0).unlink()
    (out / ".shard-000000.safetensors.x1y2.tmp").write_bytes(b"in flight")
    bar = _FolderProgress(out, 21, 8, "test", enabled=True)
    assert bar.on_disk() == 8 + 5 and bar.bar.n == 13
    bar.close()
    r = _torchrun([*RUN, "--solver", "ddim", "--num-samples", "45", "--out", str(tmp_path / "t")])
    assert r.returncode == 0 and "45/45" in r.stderr, r.stderr[-2000:]


def test_schedule_files_and_parallel_mode_compose_with_sharding(tmp_path):
    """A schedule file gives the folder its preset gives; parallel-in-time generation matches the
    sequential folder within its tolerance, and is bitwise the same for 1 or 2 torchrun workers."""
    plan_file = fewstep.preset("dpmpp_2m", 10, fewstep.DiscreteVP.linear()).save(tmp_path / "plan.json")
    assert _cli([*RUN, "--solver", "dpmpp_2m", "--num-samples", "20", "--out", str(tmp_path / "preset")]).returncode == 0
    r = _cli([*RUN, "--solver", str(plan_file), "--num-samples", "20", "--out", str(tmp_path / "file")])
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.equal(fewstep.load_samples(tmp_path / "preset"), fewstep.load_samples(tmp_path / "file"))
    seq = ["generate", "--oracle", "gmm-d2", "--nfe", "40", "--seed", "3", "--batch", "8", "--solver", "ddim", "--num-samples", "20"]
    assert _cli([*seq, "--out", str(tmp_path / "seq")]).returncode == 0
    assert _cli([*seq, "--parallel", "--out", str(tmp_path / "p1")]).returncode == 0
    r2 = _torchrun([*seq, "--parallel", "--out", str(tmp_path / "p2")])
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert _same_folders(tmp_path / "p1", tmp_path / "p2")
    diff = fewstep.load_samples(tmp_path / "p1") - fewstep.load_samples(tmp_path / "seq")
    assert 0 < float(diff.abs().max()) < 1e-2 and fewstep.rmse(fewstep.load_samples(tmp_path / "p1"), fewstep.load_samples(tmp_path / "seq")) < 1e-3


def test_the_manifest_records_the_parallel_settings_and_a_mismatching_resume_is_refused(tmp_path):
    """The manifest records sequential (``parallel: null``) or the parallel options that change
    samples; resuming with other settings is refused instead of mixing shards; a manifest written
    before the entry existed counts as sequential."""
    oracle = fewstep.bundled_oracle("gmm-d2")
    model = oracle.as_model(fewstep.DiscreteVP.linear())
    model.sample_shape = (oracle.dim,)
    run = dict(num=16, solver="ddim", nfe=8, batch_size=8, progress=False)
    seq, par = tmp_path / "seq", tmp_path / "par"
    fewstep.generate(model, out=seq, **run)
    assert json.loads((seq / MANIFEST).read_text())["parallel"] is None
    with pytest.raises(fewstep.ArgumentError, match="differs in parallel"):
        fewstep.generate(model, out=seq, parallel=True, **run)
    options = fewstep.ParallelOptions(window=4, tol=1e-4)
    fewstep.generate(model, out=par, parallel=options, **run)
    recorded = json.loads((par / MANIFEST).read_text())["parallel"]
    assert recorded["window"] == 4 and recorded["tol"] == 1e-4 and recorded["accelerate"] == options.accelerate and "record" not in recorded
    for other in (False, True, fewstep.ParallelOptions(window=8, tol=1e-4)):
        with pytest.raises(fewstep.ArgumentError, match="differs in parallel"):
            fewstep.generate(model, out=par, parallel=other, **run)
    again = fewstep.generate(model, out=par, parallel=fewstep.ParallelOptions(window=4, tol=1e-4, record=True), **run)
    assert (again.generated, again.reused) == (0, 2)  # record= changes no sample
    legacy = json.loads((seq / MANIFEST).read_text())
    del legacy["parallel"]
    (seq / MANIFEST).write_text(json.dumps(legacy))
    assert fewstep.generate(model, out=seq, **run).reused == 2
    with pytest.raises(fewstep.ArgumentError, match="differs in parallel"):
        fewstep.generate(model, out=seq, parallel=True, **run)
