"""Multi-process correctness of fewstep.generate on gloo, mirroring what NCCL allows: the group gets
one backend per device and every collective runs on tensors of a device the backend serves (NCCL
serves only CUDA tensors); when one worker refuses the folder, every worker exits at once with the
message (no worker left waiting in a collective)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fewstep
from fewstep.generate import evaluate_folder

BIN = Path(sys.executable).parent
GEN = ["generate", "--oracle", "gmm-d2", "--solver", "ddim", "--nfe", "4", "--batch", "8", "--num-samples", "40"]

# One worker of a two-process run on a machine made to look like a GPU node: CUDA and NCCL
# "available", so generate asks for its GPU backend. gloo stands in for whatever backend is asked
# for (this machine has no NCCL); every tensor handed to a collective is recorded with its device,
# the inner collectives of the *_object helpers included, and checked by the test against the
# device types the *requested* backend serves.
_WORKER = r"""
import json, os, sys
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
import fewstep

out, log = sys.argv[1], sys.argv[2]
torch.cuda.is_available = lambda: True
dist.is_nccl_available = lambda: True
requested, seen = [], []
_init = dist.init_process_group


def init(backend=None, *args, **kw):
    requested.append(backend)
    _init("gloo", *args, **kw)


dist.init_process_group = init


def recording(name):
    real = getattr(c10d, name)

    def call(*args, **kw):
        for a in (*args, *kw.values()):
            for t in (a if isinstance(a, (list, tuple)) else [a]):
                if isinstance(t, torch.Tensor):
                    seen.append([name, t.device.type])
        return real(*args, **kw)
    return call


for name in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce", "gather", "scatter", "reduce_scatter",
             "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv"):
    if hasattr(c10d, name):
        fn = recording(name)
        setattr(c10d, name, fn)
        setattr(dist, name, fn)

oracle = fewstep.bundled_oracle("gmm-d2")
model = oracle.as_model(fewstep.DiscreteVP.linear())
model.sample_shape = (oracle.dim,)
info = fewstep.generate(model, num=40, out=out, solver="ddim", nfe=4, batch_size=8, device="cpu", progress=False)
Path = __import__("pathlib").Path
Path(log).write_text(json.dumps({"requested": requested, "seen": seen, "generated": info.generated, "world": info.world_size,
                                 "initialized_after": dist.is_initialized()}))
"""

#: what each backend serves, written out here (not read from fewstep): NCCL serves CUDA tensors only
SERVES = {"nccl": {"cuda"}, "gloo": {"cpu", "cuda"}}


def _served(requested: str) -> set[str]:
    if ":" not in requested:
        return SERVES[requested]
    return {dev for dev, _name in (part.split(":") for part in requested.split(","))}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(argv_of_rank, n: int = 2, timeout: float = 120) -> list[tuple[int | None, str, str]]:
    """Start ``n`` workers the way a launcher without supervision does (RANK, WORLD_SIZE, MASTER_*:
    srun, mpirun, a hand-written script): ``(returncode, stdout, stderr)`` per rank, returncode
    ``None`` for a worker still running after ``timeout`` seconds (then killed)."""
    port = _free_port()
    procs = []
    for r in range(n):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(n),
               "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(argv_of_rank(r), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=timeout)
            results.append((p.returncode, o, e))
        except subprocess.TimeoutExpired:
            p.kill()
            o, e = p.communicate()
            results.append((None, o, e))
    return results


def test_backend_map_and_the_device_of_the_collectives():
    from fewstep.generate import backend_map, collective_device

    assert backend_map("cpu:gloo,cuda:nccl") == {"cpu": "gloo", "cuda": "nccl"}
    assert backend_map("nccl") == {"cuda": "nccl"} and backend_map("gloo") == {"cpu": "gloo", "cuda": "gloo"}
    assert backend_map("cpu:gloo,cuda:gloo") == {"cpu": "gloo", "cuda": "gloo"}  # what dist.get_backend_config() says for gloo
    assert collective_device("cpu:gloo,cuda:nccl", "cuda:3") == torch.device("cpu")
    assert collective_device("gloo", "cuda:1") == torch.device("cpu")
    assert collective_device("nccl", "cuda:1") == torch.device("cuda", 1)  # a group a caller started with NCCL alone
    assert collective_device("xpu:xccl", "xpu:0") == torch.device("xpu", 0)


def test_two_workers_use_collectives_only_on_tensors_their_backend_serves(tmp_path):
    """Two processes on a machine that looks like a GPU node: the group is asked for one backend per
    device, and every tensor a collective sees lies on a device type that backend serves (with the
    NCCL-only group of before, the CPU counters failed here: NCCL serves CUDA tensors only)."""
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    out = tmp_path / "g"
    res = _launch(lambda r: [sys.executable, str(script), str(out), str(tmp_path / f"log{r}.json")])
    for r, (code, _o, err) in enumerate(res):
        assert code == 0, f"rank {r}: {code}\n{err[-3000:]}"
    for r in range(2):
        log = json.loads((tmp_path / f"log{r}.json").read_text())
        assert len(log["requested"]) == 1 and log["seen"], "no group started or no collective recorded"
        served = _served(log["requested"][0])
        bad = [(name, dev) for name, dev in log["seen"] if dev not in served]
        assert not bad, f"rank {r}: collectives on devices {log['requested'][0]!r} does not serve: {bad}"
        assert log["requested"] == ["cpu:gloo,cuda:nccl"] and log["world"] == 2 and log["generated"] == 5
        assert not log["initialized_after"]  # the group generate started, it closed
    assert fewstep.load_samples(out).shape == (40, 2)


def test_every_worker_exits_with_the_message_when_rank_0_refuses_the_folder(tmp_path):
    """Rank 0 refuses a folder holding another run: every worker exits (exit 2) with the message,
    within the timeout, whatever launched them (before: rank 0 raised before the barrier and the
    other workers waited in it)."""
    out = tmp_path / "g"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run([str(BIN / "fewstep"), *GEN, "--seed", "1", "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    res = _launch(lambda r: [str(BIN / "fewstep"), *GEN, "--seed", "2", "--out", str(out)], timeout=90)
    for r, (code, _o, err) in enumerate(res):
        assert code is not None, f"rank {r} still waiting after 90 s:\n{err[-2000:]}"
        assert code == 2 and "holds another run" in err and "seed" in err, f"rank {r}: exit {code}\n{err[-2000:]}"
    assert "worker 0 of 2 stopped the run" in res[1][2]


@pytest.mark.parametrize("manifest", ['{"name": "another program", "files": []}', "[1, 2, 3]", '{"format": "fewstep.samples", "num": "many"}'])
def test_a_foreign_manifest_is_a_clear_error(tmp_path, manifest):
    """A folder whose manifest.json is another program's (another JSON shape): generate and the
    readers say it is not a generation folder (before: a raw KeyError when reading)."""
    out = tmp_path / "g"
    out.mkdir()
    (out / "manifest.json").write_text(manifest)
    oracle = fewstep.bundled_oracle("gmm-d2")
    model = oracle.as_model(fewstep.DiscreteVP.linear())
    model.sample_shape = (oracle.dim,)
    with pytest.raises(fewstep.FewstepError, match="not a fewstep generation folder|malformed"):
        fewstep.load_samples(out)
    with pytest.raises(fewstep.FewstepError, match="not a fewstep generation folder|malformed"):
        evaluate_folder(out, features=lambda x: x, reference=torch.zeros(4, 2))
    if '"num": "many"' not in manifest:
        with pytest.raises(fewstep.FewstepError, match="not a fewstep generation folder"):
            fewstep.generate(model, num=8, out=out, solver="ddim", nfe=4, batch_size=8, progress=False)
