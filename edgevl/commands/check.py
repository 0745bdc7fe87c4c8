"""``edgevl check`` (and the daemon at every start): the configuration as a whole, every problem named.

What ``run`` needs is checked here, so that a configuration that passes does not
then fail or sit idle: the configuration and rules files are valid; the folders
the rules watch exist (or the rule creates or waits for them), can be written and
are not folders edgevl writes to; no two rules compete for the same files; the
secrets and certificates can be read (a secret other users may read is refused);
the model is there (and, for int4, a C compiler to build its kernel); the HTTP address is free. The unit runs this as
``ExecStartPre=``; every problem is listed, not only the first.
"""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Callable
from pathlib import Path

from edgevl.config import Config, HttpSettings, load_config
from edgevl.engine.compiler import c_compiler
from edgevl.engine.model_files import resolve_model_path
from edgevl.errors import ConfigError, EdgevlError
from edgevl.folders.layout import folder_problems, layout_problems
from edgevl.folders.overlap import overlap_problems
from edgevl.mqtt.link import read_password, tls_context
from edgevl.rules import RulesFile, load_daemon_rules


def check_rules(config: Config, config_path: Path) -> RulesFile:
    """The rules file, valid, with usable watched folders that edgevl does not write to and no two rules
    competing for files (``check``, ``run`` and a reload)."""
    rules = load_daemon_rules(config.rules)
    problems = [f"{config_path}: {line}" for line in layout_problems(config, rules)]
    problems += [f"{config.rules}: {line}" for line in folder_problems(rules) + overlap_problems(rules.rules)]
    if problems:
        raise ConfigError("\n".join(problems))
    return rules


def _port_problem(http: HttpSettings, starting: bool) -> str | None:
    """Why the HTTP address cannot be taken, or None. For ``check`` an edgevl already serving there is no
    problem (restarting the service frees it); for a daemon starting, it is."""
    host, port = http.address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
            return None
        except OSError as exc:
            reason = exc.strerror or str(exc)
    if _edgevl_serves(host, port):
        return f"[http] listen {http.listen}: another edgevl serves there" if starting else None
    return f"[http] listen {http.listen}: {reason} (another program holds it; change listen or stop that program)"


def _edgevl_serves(host: str, port: int) -> bool:
    url = f"http://[{host}]:{port}/healthz" if ":" in host else f"http://{host}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return "worker" in json.loads(resp.read(4096))
    except Exception:  # anything but edgevl's health answer: not edgevl
        return False


def check(path: Path, starting: bool = False) -> tuple[Config, RulesFile]:
    """The configuration and rules, or ``ConfigError`` listing every problem found; ``starting``: for the
    daemon about to start, not for a look at the files."""
    config = load_config(path)
    problems: list[str] = []
    rules: RulesFile | None = None

    def attempt(step: Callable[[], object]) -> None:
        try:
            step()
        except EdgevlError as exc:
            problems.append(exc.message)

    def take_rules() -> None:
        nonlocal rules
        rules = check_rules(config, path)

    attempt(take_rules)
    if config.mqtt.enabled:
        attempt(lambda: read_password(config.mqtt))
        if config.mqtt.tls:
            attempt(lambda: tls_context(config.mqtt))
    if config.http.listen:
        attempt(config.http.token)
        problem = _port_problem(config.http, starting)
        if problem:
            problems.append(problem)
    attempt(lambda: resolve_model_path(config.model.id))
    if config.model.precision == "int4" and c_compiler() is None:
        problems.append(f"{path}: [model] precision int4 builds its kernel with a C compiler at the worker's first"
                        " start, and there is none (cc, gcc or $CC): install gcc, or use precision int8")
    if problems:
        raise ConfigError("\n".join(problems))
    assert rules is not None
    return config, rules
