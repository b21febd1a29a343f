import json

import numpy as np
import pytest

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


# ---- what a new user tripped on (issue 27) ---------------------------------------------------------


def _no_model_calls(monkeypatch):
    """Any model call (or the comparison / search that would make one) fails the test."""
    import fewstep

    def called(*args, **kwargs):
        raise AssertionError("a model was called")

    monkeypatch.setattr(fewstep.Model, "__call__", called)
    for name in ("sample", "compare", "compare_parallel", "_search_model"):
        monkeypatch.setattr(f"fewstep.cli.{name}", called)


def test_atomic_writes_respect_the_umask(tmp_path):
    """Schedule files, search states, shards and manifests go through write_atomic: a new file gets
    0o666 & ~umask like open(), a replaced file keeps its mode."""
    import os
    import stat

    import fewstep
    from fewstep.atomic import write_atomic

    old = os.umask(0o022)
    try:
        assert stat.S_IMODE(os.stat(write_atomic(tmp_path / "a.json", "{}")).st_mode) == 0o644
        plan = fewstep.preset("ddim", 4, fewstep.DiscreteVP.linear()).save(tmp_path / "plan.json")
        assert stat.S_IMODE(os.stat(plan).st_mode) == 0o644
        os.umask(0o027)
        assert stat.S_IMODE(os.stat(write_atomic(tmp_path / "b.bin", b"x")).st_mode) == 0o640
        os.chmod(tmp_path / "a.json", 0o664)
        write_atomic(tmp_path / "a.json", "[]")
        assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o664 and (tmp_path / "a.json").read_text() == "[]"
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin", "plan.json"]  # no temporary file left


def test_generation_folder_files_respect_the_umask(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        assert main(["generate", "--oracle", "gmm-d2", "--nfe", "2", "--solver", "ddim", "--num-samples", "3", "--out", str(tmp_path / "g")]) == 0
    finally:
        os.umask(old)
    assert {stat.S_IMODE(os.stat(p).st_mode) for p in (tmp_path / "g").iterdir()} == {0o644}


def test_bench_checks_every_solver_before_any_model_call(tmp_path, capsys, monkeypatch):
    _no_model_calls(monkeypatch)
    base = ["bench", "--oracle", "gmm-d2", "--batch", "8", "--nfe", "5", "--out", str(tmp_path / "b")]
    for bad, named in (["unipc", "foo"], "'foo'"), (["unipc:order=9"], "unipc:order=9"), (["ddim", "unipc:colour=1"], "colour"):
        assert main([*base, "--solvers", *bad]) == 2
        err = capsys.readouterr().err
        assert named in err, err
    assert main(["demo", "--oracle", "gmm-d2", "--solvers", "ddim", "warp", "--out", str(tmp_path / "d")]) == 2
    assert "'warp'" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "d").exists()


def test_non_positive_counts_are_usage_errors(tmp_path, capsys, monkeypatch):
    _no_model_calls(monkeypatch)
    out = str(tmp_path / "x.npy")
    for argv, flag in ((["sample", "--batch", "0", "--out", out], "--batch"), (["sample", "--nfe", "0", "--out", out], "--nfe"),
                       (["sample", "--nfe", "-3", "--out", out], "--nfe"), (["bench", "--nfe", "5", "0"], "--nfe"),
                       (["bench", "--batch", "1"], "--batch"),
                       (["generate", "--num-samples", "0", "--out", str(tmp_path / "g")], "--num-samples"),
                       (["generate", "--num-samples", "4", "--batch", "0", "--out", str(tmp_path / "g")], "--batch"),
                       (["search", "--nfe", "0", "--out", str(tmp_path / "s.json")], "--nfe"),
                       (["search", "--nfe", "5", "--calibration", "1", "--out", str(tmp_path / "s.json")], "--calibration")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"argument {flag}" in err and "must be an integer >=" in err, err
    assert not list(tmp_path.iterdir())


def test_search_settings_are_checked_first_and_name_the_flags(tmp_path, capsys, monkeypatch):
    _no_model_calls(monkeypatch)
    run = ["search", "--oracle", "gmm-d2", "--nfe", "5", "--out", str(tmp_path / "s.json")]
    assert main([*run, "--population", "1"]) == 2
    err = capsys.readouterr().err
    assert "--population must be an integer >= 2, got 1" in err and "search" not in err.split("error:")[0][-30:]
    assert main([*run, "--budget", "none", "--generations", "3", "--refine-generations", "3"]) == 2
    assert "--refine-generations (3) must be below --generations (3)" in capsys.readouterr().err
    assert main([*run, "--refine-generations", "3"]) == 2  # a budgeted search refines with the end of its budget
    assert "--refine-generations applies to the long search (--budget none)" in capsys.readouterr().err
    assert main([*run, "--budget", "500"]) == 2  # too small for the references: said before any model call
    assert "a search budget of 500 sample-evaluations is too small at NFE 5" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


TINY_SEARCH = ["search", "--budget", "none", "--oracle", "gmm-d2", "--nfe", "5", "--calibration", "16", "--heldout", "16", "--generations", "3",
               "--refine-generations", "1", "--population", "3", "--offspring", "8", "--reference-nfe", "20"]


def test_ctrl_c_in_search_saves_the_state_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
    from fewstep import schedule_search

    real = schedule_search.search

    def interrupted(*args, on_generation=None, **kwargs):
        def hook(g, entry):
            on_generation(g, entry)
            if g == 1:
                raise KeyboardInterrupt

        return real(*args, on_generation=hook, **kwargs)

    out, state = tmp_path / "s.json", tmp_path / "s.json.state.json"
    run = [*TINY_SEARCH, "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    monkeypatch.setattr(schedule_search, "search", interrupted)
    try:
        status = main(run)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the command (a traceback, not a message)")
    assert status == 130
    err = capsys.readouterr().err
    assert f"state saved in {state}; run the same command to resume" in err and "Traceback" not in err
    assert state.is_file() and not out.exists()
    monkeypatch.setattr(schedule_search, "search", real)
    assert main(run) == 0
    assert "(resumed at generation 2)" in capsys.readouterr().out and out.is_file()


def _subparsers(parser):
    import argparse

    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def test_every_flag_has_help_and_each_command_lists_only_what_it_uses():
    import argparse

    from fewstep.cli import build_parser

    parser = build_parser()
    commands = _subparsers(parser)
    assert set(commands) == {"demo", "bench", "sample", "generate", "evaluate", "search"}
    for name, sp in [("fewstep", parser), *commands.items()]:
        for action in sp._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help and action.help != argparse.SUPPRESS, f"{name} {action.option_strings or action.dest} has no help"
    flags = {name: {o for a in sp._actions for o in a.option_strings} for name, sp in commands.items()}
    assert not flags["search"] & {"--batch", "--spacing", "--schedule", "--solver", "--solvers"}
    assert not flags["evaluate"] & {"--batch", "--seed", "--spacing", "--schedule", "--oracle", "--nfe"}
    generate_batch = next(a for a in commands["generate"]._actions if "--batch" in a.option_strings)
    assert "shard" in generate_batch.help and not generate_batch.help.startswith("number of samples")


def test_the_docs_name_every_command():
    from pathlib import Path

    import fewstep.cli
    from fewstep.cli import build_parser

    commands = " | ".join(_subparsers(build_parser()))
    assert commands == "demo | bench | sample | generate | evaluate | search"
    assert commands in fewstep.cli.__doc__
    root = Path(__file__).resolve().parent.parent
    assert f"fewstep {commands}" in (root / "docs" / "cli.md").read_text()


def test_bench_draws_one_default_row_and_line_with_plain_ticks(tmp_path, monkeypatch):
    """The default runs a searched schedule at NFE 5 and 6 (another name each): the sample grid still
    has one 'default' row with horizontal labels inside the figure, and the error plot one connected
    'default' line with tick labels 5 and 6."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.lines import Line2D

    from fewstep import report

    figures = []
    real_save = report._save

    def keep(fig, path):
        fig.tight_layout()  # as _save lays it out, then drawn to measure the labels
        fig.canvas.draw()
        figures.append((Path(path).name, fig, fig.canvas.get_renderer()))
        return real_save(fig, path)

    from pathlib import Path

    monkeypatch.setattr(report, "_save", keep)
    out = tmp_path / "b"
    assert main(["bench", "--model", "digits-vp-eps", "--batch", "4", "--nfe", "5", "6", "--solvers", "default", "dpmpp_3m:weights=\"published\"",
                 "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len({r[0] for r in rows if r[0].startswith("default")}) == 2  # the table names what ran at each NFE
    figs = {name: fig for name, fig, _ in figures}
    grid, renderer = next((fig, r) for name, fig, r in figures if name == "samples.png")
    labels = [ax.yaxis.label for ax in grid.axes if ax.get_ylabel()]
    assert [t.get_text().replace("\n", "") for t in labels] == ["default", "dpmpp_3m:weights=published"]
    for t in labels:
        assert t.get_rotation() == 0
        box = t.get_window_extent(renderer)
        assert box.x0 >= 0 and box.x1 <= grid.bbox.x1, t.get_text()
    [ax] = figs["error_vs_nfe.png"].axes
    lines = {ln.get_label(): ln for ln in ax.get_lines() if isinstance(ln, Line2D)}
    assert list(lines["default"].get_xdata()) == [5, 6] and lines["default"].get_linestyle() == "-"
    shown = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert shown == ["5", "6"]
    assert not [t.get_text() for t in ax.get_xticklabels(minor=True) if t.get_text()]


def test_version_is_set_in_one_place_and_has_a_changelog_entry(capsys):
    from pathlib import Path

    import fewstep

    root = Path(__file__).resolve().parent.parent
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fewstep {fewstep.__version__}"
    pyproject = (root / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'version = {attr = "fewstep._version.__version__"}' in pyproject
    assert "\nversion =" not in pyproject.split("[project]")[1].split("\n[")[0]
    changelog = (root / "CHANGELOG.md").read_text()
    assert f"## {fewstep.__version__}" in changelog or f"## [{fewstep.__version__}]" in changelog


def test_generate_runs_a_schedule_file_checked_against_the_model(tmp_path, capsys):
    import fewstep

    plan = fewstep.preset("unipc", 5, fewstep.DiscreteVP.linear()).save(tmp_path / "u5.json")
    out = tmp_path / "g"
    assert main(["generate", "--oracle", "gmm-d2", "--schedule", str(plan), "--num-samples", "4", "--out", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["nfe"] == 5
    assert main(["generate", "--oracle", "gmm-d2", "--noise-schedule", "edm", "--schedule", str(plan), "--num-samples", "4",
                 "--out", str(tmp_path / "edm")]) == 2
    assert "was made for noise schedule" in capsys.readouterr().err and not (tmp_path / "edm").exists()
