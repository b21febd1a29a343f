import json

import numpy as np

from fewstep.cli import main


def test_demo_writes_report_table_and_plot(tmp_path, capsys):
    assert main(["demo", "--batch", "16", "--oracle", "gmm-d2", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "| ddim | 5 |" in report and "| ddim | 50 |" in report and "| unipc | 10 |" in report
    png = (tmp_path / "error_vs_nfe.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    errs = [r[2] for r in rows if r[0] == "ddim"]
    assert errs == sorted(errs, reverse=True)  # error falls as NFE grows
    assert "RMSE vs reference" in capsys.readouterr().out


def test_sample_writes_npy_and_schedule(tmp_path):
    out, sched = tmp_path / "x.npy", tmp_path / "s.json"
    assert main(["sample", "--batch", "3", "--nfe", "4", "--out", str(out), "--save-schedule", str(sched)]) == 0
    assert np.load(out).shape == (3, 64)
    # the saved schedule file is accepted back as a solver
    assert main(["sample", "--batch", "2", "--solver", str(sched), "--out", str(out)]) == 0


def test_cli_reports_bad_input_cleanly(tmp_path, capsys):
    assert main(["sample", "--solver", "warp_drive", "--out", str(tmp_path / "x.npy")]) == 2
    assert "warp_drive" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["sample", "--solver", str(bad), "--out", str(tmp_path / "x.npy")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_bench_takes_presets_with_options_and_schedule_files(tmp_path, capsys):
    import fewstep

    plan = fewstep.preset("unipc", 6, fewstep.DiscreteVP.linear())
    f = plan.save(tmp_path / "mine.json")
    out = tmp_path / "b"
    assert main(["bench", "--oracle", "gmm-d2", "--batch", "8", "--nfe", "5", "8", "--solvers", "ddim", "dpmpp_3m:weights=\"published\"", str(f), "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    labels = {(r[0], r[1]) for r in rows}
    assert labels == {("ddim", 5), ("ddim", 8), ("dpmpp_3m:weights=published", 5), ("dpmpp_3m:weights=published", 8), ("unipc", 6)}
    assert (out / "error_vs_nfe.png").exists()


def test_stochastic_sampling_from_the_command_line(tmp_path, capsys):
    """``--seed`` keys the Brownian noise (sample k is the same at any --batch), ``--eta`` sets the
    noise parameter of a preset that has one and is refused for solvers that have none."""
    out = tmp_path / "x.npy"
    run = ["sample", "--oracle", "gmm-d2", "--solver", "dpmpp_2m_sde", "--nfe", "8", "--out", str(out)]
    assert main(run + ["--batch", "5", "--seed", "3", "--eta", "0.5"]) == 0
    five = np.load(out)
    assert main(run + ["--batch", "2", "--seed", "3", "--eta", "0.5"]) == 0
    assert np.array_equal(np.load(out), five[:2])
    assert main(run + ["--batch", "2", "--seed", "3", "--eta", "1.0"]) == 0
    assert not np.allclose(np.load(out), five[:2])
    capsys.readouterr()
    assert main(["sample", "--oracle", "gmm-d2", "--solver", "unipc", "--eta", "0.5", "--out", str(out)]) == 2
    assert "--eta applies to presets with an eta option" in capsys.readouterr().err
    bench = tmp_path / "b"
    assert main(["bench", "--oracle", "gmm-d2", "--batch", "8", "--nfe", "6", "--solvers", "ddpm", "unipc", "--eta", "0.7", "--out", str(bench)]) == 0
    rows = {r[0]: r for r in json.loads((bench / "results.json").read_text())["rows"]}
    assert set(rows) == {"ddpm:eta=0.7", "unipc"}
    assert rows["ddpm:eta=0.7"][2] == "stochastic" and isinstance(rows["unipc"][2], float)


def test_parallel_sampling_and_bench_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "x.npy"
    base = ["sample", "--oracle", "gmm-d2", "--solver", "ddim", "--nfe", "30", "--batch", "4"]
    assert main(base + ["--out", str(out)]) == 0
    seq = np.load(out)
    assert main(base + ["--parallel", "--tol", "0", "--out", str(out)]) == 0
    assert np.allclose(np.load(out), seq, rtol=0, atol=1e-5) and "rounds of batched model calls" in capsys.readouterr().out
    assert main(base + ["--window", "4", "--out", str(out)]) == 2
    assert "apply with --parallel" in capsys.readouterr().err
    assert main(["bench", "--oracle", "gmm-d2", "--batch", "8", "--nfe", "5", "--tol", "0.1", "--out", str(tmp_path / "b0")]) == 2
    assert "apply with --parallel" in capsys.readouterr().err
    bench = tmp_path / "p"
    assert main(["bench", "--oracle", "gmm-d2", "--batch", "8", "--nfe", "40", "--solvers", "ddim", "ddpm", "--parallel", "--out", str(bench)]) == 0
    res = json.loads((bench / "results.json").read_text())
    rows = {r[0]: dict(zip(res["headers"], r)) for r in res["rows"]}
    assert set(rows) == {"ddim", "ddpm"} and res["options"]["tol"] == 1e-3
    for r in rows.values():
        assert r["sequential rounds (model calls)"] == 40 and r["Anderson rounds"] <= 41 and r["secant rounds"] <= 41 and r["Picard RMS diff"] < 1e-2
