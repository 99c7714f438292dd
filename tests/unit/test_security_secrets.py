"""Secrets stay out of what gets logged: a broker password typed into the URL by mistake is
refused without being repeated in the error (which goes to the journal, read more widely than
the 0640 configuration file)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.config import load_controller_config
from linesight.config_file import ConfigError
from linesight.mqtt import parse_broker_url

pytestmark = pytest.mark.unit

SECRET = "s3cret-Pw"  # noqa: S105 - a made-up password the errors must not repeat


@pytest.mark.parametrize("url", [
    f"mqtts://press-01:{SECRET}@line-server:8883",
    f"mqtt://{SECRET}@line-server",  # a token given as the user name
    f"tcp://press-01:{SECRET}@line-server:1883",  # a wrong scheme as well
    f"mqtt://press-01:{SECRET}@line-server:99999",
    f"mqtt://press-01:{SECRET}@line-server:1883/linesight",
    f" mqtts://press-01:{SECRET}@line-server ",
])
def test_a_url_with_credentials_is_refused_without_repeating_them(url: str) -> None:
    with pytest.raises(ValueError, match="broker URL") as raised:
        parse_broker_url(url)
    message = str(raised.value)
    assert SECRET not in message, message
    assert "line-server" in message, message  # still says which URL


def test_the_configuration_error_does_not_carry_the_password(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        load_controller_config(None, {
            "broker.url": f"mqtts://controller:{SECRET}@line-server:8883",
            "data_dir": tmp_path, "bundles": tmp_path,
        })
    message = str(raised.value)
    assert "credentials do not belong in the URL" in message
    assert SECRET not in message, message
