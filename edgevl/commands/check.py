"""``edgevl check`` (and the daemon at every start): the configuration as a whole, every problem named.

The configuration and rules files are valid, the folders the rules watch are not
folders edgevl writes to, and the secrets and certificates can be read (a secret
other users may read is refused). The unit runs this as ``ExecStartPre=``.
"""

from __future__ import annotations

from pathlib import Path

from edgevl.config import Config, load_config
from edgevl.errors import ConfigError
from edgevl.folders.layout import layout_problems
from edgevl.mqtt.link import read_password, tls_context
from edgevl.rules import RulesFile, load_daemon_rules


def check_rules(config: Config, config_path: Path) -> RulesFile:
    """The rules file, valid and with no watched folder that edgevl writes to (``check``, and a reload)."""
    rules = load_daemon_rules(config.rules)
    problems = layout_problems(config, rules)
    if problems:
        raise ConfigError("\n".join(f"{config_path}: {line}" for line in problems))
    return rules


def check(path: Path) -> tuple[Config, RulesFile]:
    config = load_config(path)
    rules = check_rules(config, path)
    if config.mqtt.enabled:
        read_password(config.mqtt)
        if config.mqtt.tls:
            tls_context(config.mqtt)
    if config.http.listen:
        config.http.token()
    return config, rules
