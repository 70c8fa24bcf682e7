"""The console: library output (Python prints, C-level writes to fd 2, library loggers, child
processes) goes to <run>/console.log; the terminal gets the first line naming it, one line per
stage, codiemb's warnings and errors. CODIEMB_VERBOSE=1 leaves everything on the terminal.

Each case runs in a fresh interpreter, so the file descriptors it redirects are its own."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PLATFORM = str(Path(__file__).resolve().parents[2] / "platform")

SCRIPT = textwrap.dedent("""
    import logging, os, subprocess, sys, warnings
    from codiemb import console
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print("before routing")
    with console.routed(sys.argv[1], "demo") as log_path:
        print("tune trial table")                       # a library's print
        os.write(2, b"raylet C-level line\\n")           # below Python
        subprocess.run([sys.executable, "-c", "print('worker process output')"], check=True)
        logging.getLogger("ray.tune").info("tune info line")
        logging.getLogger("transformers").warning("library warning line")
        warnings.warn("a python warning")
        logging.getLogger("codiemb.demo").warning("codiemb warning line")
        logging.getLogger("mlflow").error("library error line")
        with console.stage("train demo", unit="step") as bar:
            bar.reset(total=4)  # as the train line does when the loop reports its total
            for _ in range(4):
                bar.update(1)
        console.note("note line")
    print("after routing", log_path)
""")


def _run(tmp_path, **env):
    e = {**os.environ, "PYTHONPATH": PLATFORM, "CODIEMB_PROGRESS_INTERVAL": "0", **env}
    e.pop("CODIEMB_NO_PROGRESS", None)
    e.pop("CODIEMB_VERBOSE", None)
    e.update(env)
    return subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "run")], capture_output=True, text=True,
                          env=e, timeout=120)


LIBRARY = ["tune trial table", "raylet C-level line", "worker process output", "tune info line",
           "library warning line", "a python warning"]


def test_library_output_goes_to_the_log_file(tmp_path):
    r = _run(tmp_path)
    assert r.returncode == 0, r.stderr
    terminal = r.stdout + r.stderr
    log = (tmp_path / "run" / "console.log").read_text()
    first = r.stderr.splitlines()[0]
    assert first.startswith("codiemb demo: full output in ") and str(tmp_path / "run" / "console.log") in first
    for line in LIBRARY:
        assert line in log and line not in terminal, line
    # ours on the terminal: warnings, everyone's errors, the stage line (whole lines: not a TTY), notes
    assert "codiemb warning line" in r.stderr and "library error line" in r.stderr
    stage_lines = [l for l in r.stderr.splitlines() if l.startswith("train demo")]
    assert stage_lines and "4/4" in stage_lines[-1] and "step" in stage_lines[-1]
    assert "\r" not in r.stderr  # readable as a log (ray job logs, a pipe)
    assert "note line" in r.stderr and "note line" in log
    assert "codiemb warning line" in log and "library error line" in log
    # the terminal is back after the block
    assert r.stdout.splitlines() == ["before routing", f"after routing {tmp_path / 'run' / 'console.log'}"]


def test_verbose_keeps_todays_output(tmp_path):
    r = _run(tmp_path, CODIEMB_VERBOSE="1")
    assert r.returncode == 0, r.stderr
    terminal = r.stdout + r.stderr
    for line in LIBRARY:
        assert line in terminal, line
    assert not (tmp_path / "run" / "console.log").exists()
    assert "after routing None" in r.stdout


def test_no_progress_keeps_routing_and_drops_the_bars(tmp_path):
    r = _run(tmp_path, CODIEMB_NO_PROGRESS="1")
    assert r.returncode == 0, r.stderr
    assert "tune trial table" in (tmp_path / "run" / "console.log").read_text()
    assert "train demo" not in r.stderr and "codiemb warning line" in r.stderr


def test_stage_outside_routing_is_a_silent_bar(capsys):
    from codiemb import console

    assert not console.active()
    with console.stage("evaluate dev", total=3) as bar:
        bar.update(3)
        bar.set_postfix_str("x")
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_an_error_is_logged_and_the_terminal_restored(tmp_path):
    script = textwrap.dedent("""
        import sys
        from codiemb import console
        try:
            with console.routed(sys.argv[1], "demo"):
                raise RuntimeError("boom inside")
        except RuntimeError:
            print("caught on the terminal")
    """)
    e = {**os.environ, "PYTHONPATH": PLATFORM}
    e.pop("CODIEMB_VERBOSE", None)
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], capture_output=True, text=True,
                       env=e, timeout=60)
    assert r.returncode == 0 and "caught on the terminal" in r.stdout
    log = (tmp_path / "run" / "console.log").read_text()
    assert "RuntimeError: boom inside" in log and "Traceback" in log


@pytest.mark.parametrize("suite", ["default", "stsb", "scifact"])
def test_the_gate_refuses_test_suites(suite):
    from codiemb.errors import UserError
    from codiemb.tracking.registry import check_gate_suite, promote

    with pytest.raises(UserError, match="holds test data"):
        check_gate_suite(suite)
    with pytest.raises(UserError, match="chosen on dev"):  # before any MLflow call
        promote("any-model", "1", suite=suite, tracking_uri="http://127.0.0.1:9")


def test_the_gate_defaults_to_the_dev_suite():
    import inspect

    from codiemb.config import Config, GateConfig, load_config
    from codiemb.tracking.registry import check_gate_suite, promote

    assert GateConfig().suite == "dev" and inspect.signature(promote).parameters["suite"].default == "dev"
    for suite in ("dev", "stsb-dev", "scifact-dev"):
        check_gate_suite(suite)
    from codiemb.cli import build_parser, quickstart_config_path

    assert build_parser().parse_args(["promote", "m"]).suite == "dev"
    cfg = load_config(quickstart_config_path())
    assert isinstance(cfg, Config) and cfg.registry.gate.suite == "dev"
    assert cfg.evaluate["suite"] == "default"  # reported after the decision


def test_pipeline_text_puts_the_decision_before_the_test_report():
    from codiemb.cli import pipeline_text
    from codiemb.config import load_config
    from codiemb.cli import quickstart_config_path
    from codiemb.pipeline import PipelineResult

    evaluation = {"model": "m", "suite": "default",
                  "results": {"stsb": {"split": "test", "spearman": 84.2, "n": 1379}},
                  "summary": {"stsb_spearman": 84.2, "mean": 84.2}}
    result = PipelineResult(model_dir="runs/x", evaluation=evaluation,
                            registered={"name": "n", "version": "1", "uri": "models:/n/1"},
                            gate={"decision": "promoted", "reason": "no champion yet", "suite": "dev", "promoted": True})
    lines = pipeline_text(result, load_config(quickstart_config_path())).splitlines()
    gate = next(i for i, l in enumerate(lines) if l.startswith("gate:"))
    test = next(i for i, l in enumerate(lines) if "| stsb | test |" in l)
    assert "suite `dev`" in lines[gate] and gate < test
    assert any("after the decision" in l for l in lines[gate:test])


def test_a_terminal_without_a_width_still_gets_the_bar(tmp_path):
    """On a TTY the stage is a redrawn tqdm bar; a pty that reports 0 columns gets a fixed width."""
    import pty

    master, slave = pty.openpty()  # made without a size: 0 x 0
    script = textwrap.dedent("""
        import sys
        from codiemb import console
        with console.routed(sys.argv[1], "demo"):
            with console.stage("train demo", total=3, unit="step") as bar:
                bar.update(3)
            print("library noise")
    """)
    e = {**os.environ, "PYTHONPATH": PLATFORM}
    e.pop("CODIEMB_VERBOSE", None)
    e.pop("CODIEMB_NO_PROGRESS", None)
    p = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "run")], stdout=slave, stderr=slave, env=e)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    assert p.wait(timeout=60) == 0
    os.close(master)
    text = out.decode("utf-8", "replace")
    assert "train demo" in text and "3/3" in text and "library noise" not in text
    assert "library noise" in (tmp_path / "run" / "console.log").read_text()
