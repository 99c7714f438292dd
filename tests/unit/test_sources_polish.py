"""Stream URLs and camera modes as a station's config writes them: RTSP over TLS (``rtsps://``),
fractional frame rates, and URLs whose address is wrong, each refused with a message that names
the source and says what is wrong. The streams are opened by the real reader and real OpenCV,
against a local port nothing listens on."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from typing import Any

import cv2
import pytest

from edge_agent import sources
from edge_agent.sources import (
    LatestFrameReader,
    SourceOptions,
    TriggeredSource,
    camera_mode_mismatch,
    parse_source,
    parse_spec,
    port_problem,
    stream_url_problem,
)
from tests.unit.test_sources import wait_until
from tests.unit.test_sources_memory import RecordingCapture

pytestmark = pytest.mark.unit


# --- rtsps:// --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "target"),
    [
        ("rtsps://user:pw@10.0.0.5:322/stream1", "rtsps://user:pw@10.0.0.5:322/stream1"),
        ("RTSPS://u:P@Cam/Path", "rtsps://u:P@Cam/Path"),  # FFmpeg wants the scheme lower-case
        ("rtsps://[fd00::5]:322/s", "rtsps://[fd00::5]:322/s"),
    ],
)
def test_an_rtsps_url_is_a_stream_like_rtsp(spec: str, target: str) -> None:
    parsed = parse_spec(spec)
    assert (parsed.kind, parsed.target, parsed.is_live) == ("stream", target, True)


def test_an_rtsps_stream_takes_the_options_of_an_rtsp_stream() -> None:
    nth = SourceOptions(trigger="every_nth", every_nth=5)
    assert parse_spec("rtsps://cam/s1", nth).options.every_nth == 5
    with pytest.raises(ValueError, match="width does not apply to a stream source"):
        parse_spec("rtsps://admin:s3cret@cam/s1", SourceOptions(width=1280))


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("", "needs a host"),
        ("cam:70000/s", "port 70000 is out of range: 1 to 65535"),
        ("admin:pa/ss@cam/s", "percent-encoded"),
    ],
)
def test_an_rtsps_url_is_checked_like_an_rtsp_url(path: str, message: str) -> None:
    for scheme in ("rtsp", "rtsps"):
        with pytest.raises(ValueError, match=message) as error:
            parse_spec(f"{scheme}://{path}")
        assert f"source spec '{scheme}://" in str(error.value)
        assert "pa/ss" not in str(error.value)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A local port that refuses connections: bound (so nothing else takes it), not listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.mark.parametrize("scheme", ["rtsp", "rtsps"])
def test_an_unreachable_stream_reconnects_with_backoff_through_opencv(
    scheme: str, closed_port: int
) -> None:
    """A camera that is down when the station starts is no error: the reader keeps reopening
    the stream, through OpenCV's FFmpeg backend, with the same backoff for both schemes."""
    options = SourceOptions(reconnect_min_s=0.01, reconnect_max_s=0.05)
    source = parse_source(
        f"{scheme}://admin:s3cret@127.0.0.1:{closed_port}/stream", station="st-1", options=options
    )
    try:
        assert isinstance(source, TriggeredSource)
        reader = source.inner
        assert isinstance(reader, LatestFrameReader)
        assert reader.name == f"{scheme}://admin:***@127.0.0.1:{closed_port}/stream"
        assert wait_until(lambda: reader.reconnect_attempts >= 3)
        assert not reader.connected
        assert source.read(0.05) is None
        assert source.reconnects == 0  # tried, never back
    finally:
        source.close()


# --- fractional frame rates ------------------------------------------------------------------


@pytest.mark.parametrize("fps", [7.5, 12.5, 29.97, 1000])
def test_a_camera_frame_rate_may_be_fractional(fps: float) -> None:
    assert SourceOptions.model_validate({"fps": fps}).fps == fps
    assert parse_spec("camera:0", SourceOptions(fps=fps)).options.fps == fps


@pytest.mark.parametrize("fps", [0, -1, 0.0, 1000.5, True, "fast", float("nan"), float("inf")])
def test_a_frame_rate_that_is_not_a_positive_number_up_to_1000_is_refused(fps: Any) -> None:
    with pytest.raises(ValueError, match="fps"):
        SourceOptions.model_validate({"fps": fps})


class ModeCapture(RecordingCapture):
    """Records what the opener sets, and answers with the mode the camera actually took
    (``GIVES``)."""

    GIVES: dict[int, float] = {}

    def get(self, prop: int) -> float:
        return self.GIVES.get(prop, super().get(prop))


def open_camera(
    monkeypatch: pytest.MonkeyPatch, options: SourceOptions, gives: dict[int, float]
) -> ModeCapture:
    monkeypatch.setattr(cv2, "VideoCapture", ModeCapture)
    monkeypatch.setattr(ModeCapture, "GIVES", gives)
    capture: Any = sources._camera_opener(0, options)()
    assert isinstance(capture, ModeCapture)
    return capture


def test_the_camera_is_asked_for_the_fractional_rate_itself(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """29.97 reaches OpenCV as 29.97, not rounded; a camera that reports its rate as
    30000/1001 gives what was asked, so there is nothing to warn about."""
    options = SourceOptions(width=1280, height=720, fps=29.97)
    with caplog.at_level(logging.WARNING, logger="edge_agent.sources"):
        capture = open_camera(monkeypatch, options, {cv2.CAP_PROP_FPS: 30000 / 1001})
    assert capture.props[cv2.CAP_PROP_FPS] == 29.97
    assert (capture.props[cv2.CAP_PROP_FRAME_WIDTH], capture.props[cv2.CAP_PROP_FRAME_HEIGHT]) == (
        1280.0, 720.0)
    assert "asked for" not in caplog.text


def test_a_camera_that_refuses_a_fractional_rate_is_logged_with_both_rates(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    gives = {cv2.CAP_PROP_FRAME_WIDTH: 640.0, cv2.CAP_PROP_FRAME_HEIGHT: 480.0,
             cv2.CAP_PROP_FPS: 30.0}
    with caplog.at_level(logging.WARNING, logger="edge_agent.sources"):
        open_camera(monkeypatch, SourceOptions(fps=7.5), gives)
    assert "camera:0: asked for 7.5 fps, the camera gives 640x480 at 30 fps" in caplog.text


@pytest.mark.parametrize(
    ("asked", "got", "expected"),
    [
        ((None, None, 29.97), (640, 480, 30000 / 1001), None),
        ((None, None, 12.5), (640, 480, 12.5), None),
        ((640, 480, None), (640.0, 480.0, 30.0), None),
        ((None, None, 30), (640, 480, 30000 / 1001),
         "asked for 30 fps, the camera gives 640x480 at 29.97 fps"),
        ((1280, 720, 12.5), (1280, 720, 15.0),
         "asked for 1280x720 at 12.5 fps, the camera gives 1280x720 at 15 fps"),
        ((1280, None, None), (640, 480, 30.0),
         "asked for width 1280, the camera gives 640x480 at 30 fps"),
        ((None, 720, 59.94), (640, 480, 60000 / 1001),
         "asked for height 720 at 59.94 fps, the camera gives 640x480 at 59.94 fps"),
    ],
)
def test_camera_mode_mismatch_names_what_was_asked_and_what_was_given(
    asked: tuple[int | None, int | None, float | None],
    got: tuple[float, float, float],
    expected: str | None,
) -> None:
    assert camera_mode_mismatch(asked, got) == expected


# --- ports -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("rtsp://cam:70000/stream", "port 70000 is out of range: 1 to 65535"),
        ("http://cam:0/x", "port 0 is out of range: 1 to 65535"),
        ("rtsp://cam:abc/", "port 'abc' is not a number"),
        ("rtsp://10.0.0.5:55a/stream", "port '55a' is not a number"),
        ("https://cam:-1/x", "port '-1' is not a number"),
        ("rtsps://[fd00::5]:99999/s", "port 99999 is out of range: 1 to 65535"),
        ("rtsp://cam:" + "9" * 5000 + "/s", "port 9999999999… is out of range: 1 to 65535"),
    ],
)
def test_a_port_out_of_range_or_not_a_number_is_named(spec: str, message: str) -> None:
    with pytest.raises(ValueError) as error:
        parse_spec(spec)
    assert str(error.value).startswith(f"source spec '{spec[:20]}")
    assert str(error.value).endswith(f": {message}")
    assert "percent-encoded" not in str(error.value)


def test_a_port_problem_does_not_show_the_password() -> None:
    with pytest.raises(ValueError, match="port 70000 is out of range") as error:
        parse_spec("rtsp://admin:s3cret@cam:70000/stream")
    assert "s3cret" not in str(error.value)
    assert "'rtsp://admin:***@cam:70000/stream'" in str(error.value)


@pytest.mark.parametrize(
    "spec", ["rtsp://cam:1/s", "rtsp://cam:65535/s", "rtsp://cam:/s", "http://cam:08080/v"]
)
def test_ports_in_range_and_an_empty_port_are_accepted(spec: str) -> None:
    assert parse_spec(spec).kind == "stream"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", None),
        ("554", None),
        ("0", "port 0 is out of range: 1 to 65535"),
        ("65536", "port 65536 is out of range: 1 to 65535"),
        ("+554", "port '+554' is not a number"),
        ("１", "port '１' is not a number"),  # a full-width digit
    ],
)
def test_port_problem(text: str, expected: str | None) -> None:
    assert port_problem(text) == expected


# --- other addresses the parser took wrongly or named unclearly -------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        # Raised by urllib without naming the source: "Invalid IPv6 URL".
        ("rtsp://[::1/x", "'[::1' opens a [ it does not close: write an IPv6 address as "
                          "[ADDRESS]"),
        ("rtsp://[bad]/x", "[bad] is not an IPv6 address"),
        ("rtsp://[::1]554/x", "'554' follows the IPv6 address [::1]: expected [ADDRESS]:PORT"),
        ("rtsp://fe80::1/x", "an IPv6 address is written in brackets: [ADDRESS]:PORT"),
        ("rtsp://cam]/x", "'cam]' is not HOST[:PORT]"),
        # Accepted before: OpenCV was handed a URL FFmpeg cannot open.
        ("rtsp://cam /x", "a space or control character (character 11): write a space as %20"),
        ("rtsp://ca\tm/x", "a space or control character (character 10)"),
        ("http://cam/my video.mjpg", "a space or control character (character 14)"),
        # A digits-only password with a '/': the host was taken to be the user name.
        ("rtsp://admin:1234/5@10.0.0.5/stream", "percent-encoded (%23, %2F, %3F)"),
        ("rtsp://admin:12#34@10.0.0.5/stream", "percent-encoded (%23, %2F, %3F)"),
        # Python's isdigit() takes a superscript two; int() then failed when the source opened.
        ("camera:²", "camera needs an index"),
        ("camera:/dev/", "camera needs an index"),
        ("rtsp:/cam/x", "the URL needs a host: rtsp://HOST[:PORT]/PATH"),
    ],
)
def test_an_address_that_cannot_open_is_refused_naming_the_source(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match="source spec '") as error:
        parse_spec(spec)
    assert message in str(error.value)
    assert "1234/5" not in str(error.value) and "12#34" not in str(error.value)


@pytest.mark.parametrize(
    "spec",
    [
        "rtsp://[::1]:554/x",
        "rtsp://[fe80::1%25eth0]/x",
        "http://cam/cgi-bin/video.cgi?user=ops@plant.example",  # an @ in the query
        "rtsp://admin:p@ss@cam/s",  # an unescaped @ in a password: the last @ ends it
        "camera:12",
    ],
)
def test_addresses_that_open_are_still_accepted(spec: str) -> None:
    assert parse_spec(spec).kind in ("stream", "camera")


def test_stream_url_problem_is_none_for_a_good_url() -> None:
    assert stream_url_problem("rtsps://admin:s3cret@cam.local:322/s") is None
