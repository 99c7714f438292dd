"""Edge cases on the station's input side: slow bundle servers, bad frames, triggers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest

from edge_agent.bundle_fetch import download
from edge_agent.config import load_config
from edge_agent.preprocess import preprocess
from edge_agent.sources import (
    SourceOptions,
    TriggeredSource,
    parse_source,
    parse_spec,
    part_id_problem,
    to_bgr,
)
from linesight.artifacts import MANIFEST_FILE, BundleError, parse_manifest
from linesight.config_file import ConfigError
from tests.support import V1, http_server
from tests.unit.test_sources import FakeCamera, camera, solid, wait_until

__all__ = ["camera"]  # the fixture, imported for its name

pytestmark = pytest.mark.unit


class TricklingServer(BaseHTTPRequestHandler):
    """Announces 1,000 bytes and sends one every 50 ms: never silent for a socket time-out."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        try:
            for _ in range(1000):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:
            pass


@pytest.fixture
def trickling() -> Iterator[str]:
    with http_server(TricklingServer) as url:
        yield url


def test_a_download_that_trickles_is_abandoned_after_its_timeout(trickling: str) -> None:
    outcome: list[BaseException | bytes] = []

    def run() -> None:
        try:
            outcome.append(download(f"{trickling}/manifest.json", 0.5))
        except BaseException as exc:  # noqa: BLE001
            outcome.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(5.0)
    assert not thread.is_alive(), "the download ran on far past its 0.5 s timeout"
    assert time.monotonic() - started < 2.0
    assert isinstance(outcome[0], BundleError)
    assert "manifest.json" in str(outcome[0]) and "0.5 s" in str(outcome[0])


@pytest.mark.parametrize("shape", [(0, 0), (0, 0, 1), (0, 0, 4), (5, 0), (0, 7, 4)])
def test_an_empty_gray_or_bgra_frame_stays_an_empty_frame(shape: tuple[int, ...]) -> None:
    """An empty frame is the model's to refuse (the part held by the fail-safe): a crash in the
    colour conversion here would end the inspection loop."""
    frame = to_bgr(np.zeros(shape, np.uint8))
    assert frame.shape == (*shape[:2], 3) and frame.dtype == np.uint8
    with pytest.raises(ValueError, match="empty"):
        preprocess(frame, parse_manifest((V1 / MANIFEST_FILE).read_bytes()).input)


def test_a_camera_that_hands_on_an_empty_gray_frame_does_not_stop_the_reader(
    camera: FakeCamera,
) -> None:
    source = parse_source("camera:0", station="st-1", capture_factory=camera.open)
    try:
        assert wait_until(lambda: len(camera.captures) == 1)
        camera.push(np.zeros((0, 0), np.uint8))
        frame = source.read(2.0)
        assert frame is not None and frame.image.size == 0
        camera.push(solid(3, (8, 8)))
        frame = source.read(2.0)
        assert frame is not None and frame.image.shape == (8, 8, 3)
    finally:
        camera.shut = True
        source.close()


def test_a_trigger_whose_frame_came_in_time_is_served_when_the_station_is_late(
    camera: FakeCamera,
) -> None:
    """The station is busy for longer than stale_after_s (a slow part, a model being loaded):
    the frame captured just after the trigger is still that part's, not a missed trigger."""
    source = parse_source(
        "camera:0", station="st-1",
        options=SourceOptions(trigger="external", stale_after_s=0.3),
        capture_factory=camera.open,
    )
    assert isinstance(source, TriggeredSource)
    try:
        assert wait_until(lambda: len(camera.captures) == 1)
        source.trigger("A")
        camera.push(solid(4))
        assert wait_until(lambda: source.inner.frames_captured == 1)  # type: ignore[attr-defined]
        time.sleep(0.6)  # the station is busy with the previous part
        part = source.read(1.0)
        assert part is not None and part.part_id == "A" and int(part.image[0, 0, 0]) == 4
        assert source.missed_triggers == 0
    finally:
        camera.shut = True
        source.close()


def test_a_trigger_with_no_frame_in_time_is_still_missed(camera: FakeCamera) -> None:
    source = parse_source(
        "camera:0", station="st-1",
        options=SourceOptions(trigger="external", stale_after_s=0.3),
        capture_factory=camera.open,
    )
    assert isinstance(source, TriggeredSource)
    try:
        assert wait_until(lambda: len(camera.captures) == 1)
        source.trigger("A")
        time.sleep(0.6)  # no frame: the camera is silent
        camera.push(solid(4))
        assert wait_until(lambda: source.inner.frames_captured == 1)  # type: ignore[attr-defined]
        assert source.read(0.2) is None
        assert source.missed_triggers == 1
    finally:
        camera.shut = True
        source.close()


def test_a_synthetic_seed_too_long_for_a_part_id_is_refused_at_start_up() -> None:
    with pytest.raises(ValueError, match="seed"):
        parse_source("synthetic:seed=1" + "0" * 130, station="st-1")
    source = parse_source(f"synthetic:seed={2**63 - 1}", station="st-1")
    frame = source.read(1.0)
    assert frame is not None and part_id_problem(frame.part_id) is None


@pytest.mark.parametrize(
    ("spec", "kind", "target"),
    [("folder: /srv/parts", "folder", "/srv/parts"), ("video:  line.avi ", "video", "line.avi"),
     ("camera: 0", "camera", "0"), ("camera: /dev/video2", "camera", "/dev/video2")],
)
def test_a_space_after_the_colon_is_not_part_of_the_path(
    spec: str, kind: str, target: str
) -> None:
    """Else "folder: /srv/parts" fails with "/srv/parts: not a directory" for a folder that is
    there."""
    parsed = parse_spec(spec)
    assert (parsed.kind, parsed.target) == (kind, target)


STATION_YAML = (
    "station: press-01\nbroker: {url: 'mqtt://127.0.0.1:1883'}\nsource: 'synthetic:'\n"
    "active: models/part-classifier/1.0.0\ndata_dir: /tmp/linesight-test\n"
)


@pytest.mark.parametrize(("url", "problem"), [
    ("http://", "host"),
    ("http://:8080/reject", "host"),
    ("http://plc-gw:80a/reject", "port"),
    ("http://plc gw/reject", "space"),
    ("http://plc-gw/pr\u00fcfung", "non-ASCII"),
    ("http://admin:s3cret@plc-gw/reject", "user name or password"),
])
def test_a_webhook_url_no_post_can_use_stops_start_up_naming_the_key(
    tmp_path: Path, url: str, problem: str
) -> None:
    """Else the station starts, and every part's signal fails (with "gave a malformed answer"
    for a URL the station itself cannot use)."""
    path = tmp_path / "station.yaml"
    path.write_text(STATION_YAML + f"reject_output: {{type: webhook, url: '{url}'}}\n")
    with pytest.raises(ConfigError, match=r"(?m)^  reject_output\.webhook\.url: ") as caught:
        load_config(path, {})
    assert problem in str(caught.value)
    assert "s3cret" not in str(caught.value)


def test_a_usable_webhook_url_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "station.yaml"
    path.write_text(STATION_YAML + "reject_output: {type: webhook, "
                    "url: 'https://plc-gw.local:8443/reject?line=A'}\n")
    assert load_config(path, {}).reject_output.type == "webhook"
