"""Configuration: TOML plus environment, unknown keys rejected, errors with file and key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgevl.commands.check import check
from edgevl.config import load_config
from edgevl.errors import ConfigError
from tests.harness import ROOT
from tests.harness.broker import free_port


def test_shipped_examples_pass_check_where_their_folders_and_model_are(tmp_path: Path,
                                                                       test_model_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEVL_")}
    # As they are, on a machine without the appliance's folders and model: check names exactly those.
    proc = subprocess.run([sys.executable, "-m", "edgevl", "check", "-c", str(ROOT / "etc/edgevl/edgevl.toml")],
                          capture_output=True, text=True, check=False, env=env)
    assert proc.returncode == 2
    lines = proc.stderr.removeprefix("edgevl: ").strip().splitlines()
    assert len(lines) == 3, proc.stderr
    assert 'rule "weld-seam": the watched folder /srv/edgevl/inbox/weld-seam does not exist' in lines[0]
    assert 'rule "documents": the watched folder /srv/edgevl/inbox/scans does not exist' in lines[1]
    assert lines[2].startswith("model Qwen/Qwen3-VL-2B-Instruct is not in the local Hugging Face cache")

    # The same files where the folders and the model are: ok.
    root = tmp_path / "appliance"
    (root / "etc").mkdir(parents=True)
    for name in ("edgevl.toml", "rules.toml"):
        text = (ROOT / "etc/edgevl" / name).read_text()
        (root / "etc" / name).write_text(text.replace("/srv/edgevl", str(root / "srv")).replace(
            "/var/lib/edgevl", str(root / "var")))
    for folder in ("weld-seam", "scans"):
        (root / "srv" / "inbox" / folder).mkdir(parents=True)
    env |= {"EDGEVL_MODEL__ID": str(test_model_dir), "EDGEVL_HTTP__LISTEN": f"127.0.0.1:{free_port()}"}
    proc = subprocess.run([sys.executable, "-m", "edgevl", "check", "-c", str(root / "etc" / "edgevl.toml")],
                          capture_output=True, text=True, check=False, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "2 rules" in proc.stdout


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "edgevl.toml"
    path.write_text('rules = "r.toml"\n[model]\nprecision = "float32"\nmemory_limit = "4GiB"\n'
                    '[folders]\narchive = ""\n')
    monkeypatch.setenv("EDGEVL_MODEL__PRECISION", "int8")
    config = load_config(path)
    assert config.model.precision == "int8"
    assert config.model.memory_limit == 4 << 30
    assert config.folders.archive is None
    assert config.rules == tmp_path / "r.toml"


@pytest.mark.parametrize(("text", "expected"), [
    ("[model]\nprecison = 'int8'\n", 'edgevl.toml:2: model: unknown key "precison" — did you mean "precision"?'),
    ("[folders]\nsettle_ms = -1\n", "edgevl.toml:2: folders.settle_ms: must be at least 0"),
    ("bogus = 1\n", 'edgevl.toml:1: unknown key "bogus" (keys: device_id, rules, state_dir, model,'),
    ("[model]\nmemory_limit = 'lots'\n", 'model.memory_limit: must be a size such as "10GiB"'),
    ("[model]\nprecision = 'int3'\n", "model.precision: must be one of: float32, bfloat16, int8 or int4"),
    ("[model\n", "not valid TOML"),
])
def test_errors_name_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "edgevl.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in err.value.message
    assert expected in err.value.message


def test_check_command_reports_rules_errors_and_fails(tmp_path: Path) -> None:
    (tmp_path / "edgevl.toml").write_text('rules = "rules.toml"\n')
    (tmp_path / "rules.toml").write_text(
        "[[rule]]\nname = 'a'\n[[rule.question]]\nid = 'x'\nask = 'y'\ntype = 'nope'\n")
    proc = subprocess.run([sys.executable, "-m", "edgevl", "check", "-c", str(tmp_path / "edgevl.toml")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert (f"{tmp_path / 'rules.toml'}:6: rule \"a\", question \"x\", type: must be one of: text, yes_no, choice, "
            "number or json") in proc.stderr
    with pytest.raises(ConfigError, match="cannot read the configuration"):
        check(tmp_path / "absent.toml")


def _layout(tmp_path: Path, folder: str, recursive: bool, patterns: str,
            outputs: str) -> subprocess.CompletedProcess[str]:
    Path(folder).mkdir(parents=True, exist_ok=True)
    # A model directory is all check looks for: a config.json in it.
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "edgevl.toml").write_text(f'rules = "rules.toml"\nstate_dir = "{tmp_path}/state"\n'
                                          f'[model]\nid = "{tmp_path}/model"\n'
                                          f"[http]\nlisten = \"\"\n[folders]\n{outputs}\n")
    (tmp_path / "rules.toml").write_text(
        f'[[rule]]\nname = "cam"\nfolders = ["{folder}"]\nrecursive = {str(recursive).lower()}\n'
        f'patterns = [{patterns}]\n[[rule.question]]\nid = "q"\nask = "?"\n')
    return subprocess.run([sys.executable, "-m", "edgevl", "check", "-c", str(tmp_path / "edgevl.toml")],
                          capture_output=True, text=True, check=False)


@pytest.mark.parametrize(("folder", "recursive", "patterns", "outputs", "problem"), [
    ("in", True, '"*.jpg"', 'results = "{t}/in/results"', "folders.results {t}/in/results is inside the watched "
                                                             "folder {t}/in of rule cam, which is recursive"),
    ("in", False, '"*"', 'failed = "{t}/in/failed"', "folders.failed {t}/in/failed is inside the watched folder "
                                                      "{t}/in of rule cam, whose patterns match 'failed'"),
    ("archive/cam", False, '"*.jpg"', 'archive = "{t}/archive"', "the watched folder {t}/archive/cam of rule cam is "
                                                                 "inside folders.archive {t}/archive"),
    ("in", False, '"*.jpg"', 'results = "{t}/in/results"', None),  # not read: no pattern takes "results"
    ("in", True, '"*"', 'archive = "{t}/in/.archive"', None),  # hidden folders are never read
])
def test_outputs_inside_inputs_are_refused_with_both_names(tmp_path: Path, folder: str, recursive: bool,
                                                           patterns: str, outputs: str, problem: str | None) -> None:
    proc = _layout(tmp_path, str(tmp_path / folder), recursive, patterns, outputs.format(t=tmp_path))
    if problem is None:
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode == 2
        assert problem.format(t=tmp_path) in proc.stderr
        assert "edgevl would take its own output as input" in proc.stderr


def test_run_refuses_such_a_layout_before_anything_starts(tmp_path: Path) -> None:
    _layout(tmp_path, str(tmp_path / "in"), True, '"*"', f'results = "{tmp_path}/in/r"')
    proc = subprocess.run([sys.executable, "-m", "edgevl", "run", "-c", str(tmp_path / "edgevl.toml")],
                          capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 2
    assert f"folders.results {tmp_path}/in/r is inside the watched folder" in proc.stderr


def test_a_value_from_the_environment_is_named_by_its_variable(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "edgevl.toml"
    path.write_text("[model]\nthreads = 2\n")
    monkeypatch.setenv("EDGEVL_MODEL__PRECISION", "int3")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.message == ("EDGEVL_MODEL__PRECISION (environment variable): must be one of: float32, "
                                 "bfloat16, int8 or int4")
