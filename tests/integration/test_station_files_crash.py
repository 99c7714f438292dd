"""A station killed (SIGKILL, as a power cut) in the middle of a deploy's download: the bundle
half written in its staging folder is never loaded, and the folder does not stay on the disk
until some later deploy happens to clear it. A real agent process, a real broker."""

from __future__ import annotations

import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from edge_agent.store import StationStore
from linesight import protocol as p
from linesight.artifacts import MANIFEST_FILE, MODEL_FILE, SIGNATURE_FILE, sha256_file
from linesight.broker import Broker
from linesight.mqtt import LinkConfig, MqttLink
from tests.support import DEMO_PUB, V1, V2, Collector, command, http_server, kill_agent, wait_for

STATION = "press-12"


class StallingServer(BaseHTTPRequestHandler):
    """Serves the shipped 2.0.0 bundle, but sends only the first half of model.onnx and then
    holds the connection open until `release` is set."""

    release = threading.Event()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.close_connection = True
        name = self.path.rpartition("/")[2]
        data = (V2 / name).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if name != MODEL_FILE:
            self.wfile.write(data)
            return
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        type(self).release.wait(120)


def agent_process(data_dir: Path, broker: Broker, *extra: str, log: Path
                  ) -> subprocess.Popen[bytes]:
    with log.open("ab") as stream:
        return subprocess.Popen(
            [
                sys.executable, "-m", "linesight.cli", "agent", "--station", STATION,
                "--broker", broker.url, "--source", "synthetic:seed=4,rate=40",
                "--active", str(V1), "--data-dir", str(data_dir), "--key", str(DEMO_PUB),
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=stream,
        )




def half_written(data_dir: Path) -> list[Path]:
    return [path for path in data_dir.glob(f".staging-*/{MODEL_FILE}")
            if path.stat().st_size > 0]


def test_a_station_killed_mid_download_clears_the_half_bundle_at_its_next_start(
    tmp_path: Path, broker: Broker
) -> None:
    data = tmp_path / "data"
    log = tmp_path / "agent.log"
    handler: type[StallingServer] = type(
        "Stalling", (StallingServer,), {"release": threading.Event()}
    )
    collector = Collector(broker.url)
    sender = MqttLink(LinkConfig(url=broker.url, client_id="test-controller"))
    sender.start()
    assert sender.wait_connected(10)
    try:
        with http_server(handler) as base:
            first = agent_process(data, broker, log=log)
            try:
                wait_for(lambda: any(s.online for s in collector.of(p.StationState, STATION)),
                         60, "the station online")
                deploy = command(STATION, p.DeployCandidate(
                    url=f"{base}/part-classifier/2.0.0/",
                    model=p.ModelRef(name="part-classifier", version="2.0.0",
                                     sha256=sha256_file(V2 / MANIFEST_FILE)),
                    signature=(V2 / SIGNATURE_FILE).read_text().strip(),
                    mode=p.DeploymentMode.SHADOW,
                ))
                sender.publish(p.Topics().station(STATION, p.Channel.CMD), deploy.to_json(),
                               qos=1)
                wait_for(lambda: half_written(data) != [], 60,
                         "the station to be half-way through writing model.onnx")
            finally:
                kill_agent(first)
                handler.release.set()
        assert half_written(data), "the kill left the half-written bundle behind"
        second = agent_process(data, broker, "--max-parts", "5", "--receipt-wait", "1", log=log)
        assert second.wait(90) == 0, log.read_text()[-3000:]
    finally:
        sender.stop()
        collector.close()
    assert list(data.glob(".staging-*")) == [], "the half-written bundle is still on the disk"
    assert not (data / "bundles").exists(), "nothing was ever verified, so nothing was kept"
    with StationStore(data) as store:
        saved = store.load_slots()
    assert saved is not None and saved["candidate"] is None, "the half bundle was never loaded"
    assert saved["active"] == str(V1)
