"""The operator's command line: `python -m routstr <subcommand>` as real processes.

Every subcommand runs as ``sys.executable -m routstr ...`` in a temporary working directory,
against databases made by a real node (tests/support/node.py) where the answer matters.
"""

from __future__ import annotations

import pytest

from routstr.config import load_config

# ---- boolean settings are switches -----------------------------------------------------------


def test_boolean_settings_are_switches() -> None:
    assert load_config(["--webhooks-allow-private"], {}).webhooks_allow_private is True
    assert load_config([], {}).webhooks_allow_private is False
    # --no-x turns off what the environment turned on: the flag wins
    env = {"LNURL_ALLOW_PRIVATE": "true", "PROVIDERS_ALLOW_PRIVATE": "1"}
    c = load_config(["--no-lnurl-allow-private"], env)
    assert c.lnurl_allow_private is False and c.providers_allow_private is True


@pytest.mark.parametrize(("raw", "value"), [("true", True), ("1", True), ("yes", True),
                                            ("false", False), ("0", False), ("", False)])
def test_boolean_environment_forms_still_work(raw: str, value: bool) -> None:
    assert load_config([], {"WEBHOOKS_ALLOW_PRIVATE": raw}).webhooks_allow_private is value


def test_a_switch_takes_no_value() -> None:
    with pytest.raises(SystemExit):  # argparse: "unrecognized arguments: true"
        load_config(["--webhooks-allow-private", "true"], {})
