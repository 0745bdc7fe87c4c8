"""``edgevl check`` catches what would break or silently idle ``edgevl run``, and run refuses the same."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.broker import free_port
from tests.harness.daemon import QUESTIONS, DaemonProcess, _without_file_permission_override


def _setup(tmp_path: Path, model: Path, rules: str, http: str = "") -> Path:
    config = tmp_path / "edgevl.toml"
    config.write_text(f'rules = "rules.toml"\nstate_dir = "{tmp_path}/state"\n[model]\nid = "{model}"\n'
                      f'threads = 1\n[folders]\nresults = "{tmp_path}/results"\narchive = "{tmp_path}/archive"\n'
                      f'failed = "{tmp_path}/failed"\n[http]\nlisten = "{http}"\n')
    (tmp_path / "rules.toml").write_text(rules)
    return config


def _run(command: str, config: Path, drop_override: bool = False,
         env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEVL_")} | (env_extra or {})
    return subprocess.run([sys.executable, "-m", "edgevl", command, "-c", str(config)], capture_output=True,
                          text=True, timeout=120, check=False, env=env,
                          preexec_fn=_without_file_permission_override if drop_override else None)


def _rule(name: str, folder: Path, extra: str = "") -> str:
    return f'[[rule]]\nname = "{name}"\nfolders = ["{folder}"]\n{extra}\n{QUESTIONS}'


def test_a_missing_folder_is_refused_created_or_waited_for(tmp_path: Path, test_model_dir: Path) -> None:
    inbox = tmp_path / "inbox"
    config = _setup(tmp_path, test_model_dir, _rule("cam", inbox))
    proc = _run("check", config)
    assert proc.returncode == 2
    expected = f'rule "cam": the watched folder {inbox} does not exist'
    assert expected in proc.stderr
    started = _run("run", config)
    assert started.returncode == 2
    assert expected in started.stderr, "run refuses with the same message"

    (tmp_path / "rules.toml").write_text(_rule("cam", inbox, 'missing_folders = "wait"'))
    assert _run("check", config).returncode == 0, "a share mounted later"
    (tmp_path / "rules.toml").write_text(_rule("cam", inbox, 'missing_folders = "create"'))
    assert _run("check", config).returncode == 0
    d = DaemonProcess(tmp_path / "d", test_model_dir)
    d.config = config
    d.start()
    try:
        d.wait_notify("READY=1")
        assert inbox.is_dir(), "run made it"
    finally:
        assert d.stop() == 0


def test_a_folder_this_user_may_not_write_is_refused(tmp_path: Path, test_model_dir: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir(mode=0o555)
    config = _setup(tmp_path, test_model_dir, _rule("cam", inbox))
    proc = _run("check", config, drop_override=True)
    assert proc.returncode == 2
    assert f"the watched folder {inbox} cannot be read and written by this user" in proc.stderr


def test_rules_competing_for_the_same_files_are_refused(tmp_path: Path, test_model_dir: Path) -> None:
    inbox = tmp_path / "share" / "inbox"
    inbox.mkdir(parents=True)
    rules = (_rule("jpegs", inbox, 'patterns = ["*.jpg"]') + _rule("all", tmp_path / "share", 'patterns = ["*.JPG"]\n'
                                                                                              "recursive = true")
             + _rule("pngs", inbox, 'patterns = ["*.png"]'))
    config = _setup(tmp_path, test_model_dir, rules)
    proc = _run("check", config)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "rules \"jpegs\" and \"all\" both take files like '*.jpg' / '*.JPG'" in lines[0]
    assert "only 'jpegs' would ever answer them" in lines[0]


def test_the_model_absent_and_every_problem_listed(tmp_path: Path) -> None:
    config = _setup(tmp_path, tmp_path / "no-model", _rule("cam", tmp_path / "absent"))
    proc = _run("check", config)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr
    assert f"model directory {tmp_path / 'no-model'} does not exist" in proc.stderr, "not only the first problem"


def test_int4_without_a_c_compiler_is_named_before_a_worker_starts(tmp_path: Path, test_model_dir: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = _setup(tmp_path, test_model_dir, _rule("cam", inbox))
    config.write_text(config.read_text().replace("threads = 1\n", 'threads = 1\nprecision = "int4"\n'))
    assert _run("check", config).returncode == 0  # this machine has a compiler
    # A PATH with the interpreter alone: no cc, no gcc.
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python").symlink_to(sys.executable)
    proc = _run("check", config, env_extra={"PATH": str(bare), "CC": ""})
    assert proc.returncode == 2
    assert (f"{config}: [model] precision int4 builds its kernel with a C compiler at the worker's first start, and"
            " there is none (cc, gcc or $CC): install gcc, or use precision int8") in proc.stderr


def test_a_schema_the_grammar_library_cannot_compile_is_named_by_rule_and_question(tmp_path: Path,
                                                                                 test_model_dir: Path) -> None:
    (tmp_path / "inbox").mkdir()
    question = ('  [[rule.question]]\n  id = "fields"\n  ask = "Extract."\n  type = "json"\n'
                '  schema = { type = "object", required = ["n"], properties = { n = { type = "integer", minimum = 9, '
                'maximum = 1 } } }\n')
    config = _setup(tmp_path, test_model_dir, _rule("scans", tmp_path / "inbox") + question)
    for command in ("check", "run"):
        proc = _run(command, config)
        assert proc.returncode == 2, proc.stderr
        assert 'rule "scans", question "fields"' in proc.stderr
        assert "the schema cannot be compiled" in proc.stderr


def test_the_http_address_taken(tmp_path: Path, test_model_dir: Path) -> None:
    (tmp_path / "inbox").mkdir()
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        config = _setup(tmp_path, test_model_dir, _rule("cam", tmp_path / "inbox"), http=f"127.0.0.1:{port}")
        proc = _run("check", config)
    assert proc.returncode == 2
    assert f"[http] listen 127.0.0.1:{port}: Address already in use (another program holds it" in proc.stderr


def test_an_edgevl_serving_the_address_passes_check_but_stops_a_second_run(tmp_path: Path,
                                                                           test_model_dir: Path) -> None:
    port = free_port()
    d = DaemonProcess(tmp_path / "first", test_model_dir, http=f"127.0.0.1:{port}")
    d.start()
    try:
        d.wait_notify("READY=1")
        (tmp_path / "inbox").mkdir()
        config = _setup(tmp_path, test_model_dir, _rule("cam", tmp_path / "inbox"), http=f"127.0.0.1:{port}")
        assert _run("check", config).returncode == 0, "restarting the service frees it"
        second = _run("run", config)
        assert second.returncode == 2
        assert f"[http] listen 127.0.0.1:{port}: another edgevl serves there" in second.stderr
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize("unit", ["edgevl.service"])
def test_the_unit_does_not_restart_on_a_configuration_error(unit: str) -> None:
    from tests.harness import ROOT

    text = (ROOT / "systemd" / unit).read_text()
    assert "RestartPreventExitStatus=2" in text.splitlines()


@pytest.mark.parametrize("broken", ["missing folder", "rules competing", "model absent", "port taken",
                                    "output inside input"])
def test_run_refuses_each_broken_configuration_with_checks_message(tmp_path: Path, test_model_dir: Path,
                                                                   broken: str) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    rules, model, http = _rule("cam", inbox), test_model_dir, ""
    if broken == "missing folder":
        rules = _rule("cam", tmp_path / "absent")
    elif broken == "rules competing":
        rules += _rule("again", inbox)
    elif broken == "model absent":
        model = tmp_path / "no-model"
    elif broken == "output inside input":
        rules = _rule("cam", tmp_path, 'recursive = true')
    holder = socket.socket()
    if broken == "port taken":
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        http = f"127.0.0.1:{holder.getsockname()[1]}"
    try:
        config = _setup(tmp_path, model, rules, http=http)
        checked, started = _run("check", config), _run("run", config)
    finally:
        holder.close()
    assert (checked.returncode, started.returncode) == (2, 2)
    message = checked.stderr.strip()
    assert message
    assert message in started.stderr, f"run says what check says:\n{started.stderr}"
