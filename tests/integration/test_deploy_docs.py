"""docs/deploy.md followed as written: the image's install steps leave the containers' user
(uid 10001) every file it reads, and a station started from the shipped station.yaml.example
inspects with a bundle signed by a site key made as the page says, under the kernel's
MemoryDenyWriteExecute rule the units set (tests/unit/test_docs_claims.py and
tests/unit/test_systemd_units.py check the flags, examples and unit files)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.config import load_controller_config
from edge_agent.config import load_config
from edge_agent.store import StationStore
from linesight.broker import free_port
from linesight.cli import main

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "deploy" / "systemd"
IMAGE_UID = 10001  # Dockerfile.arm64: useradd --uid 10001, USER 10001:10001
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)
# prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN): what systemd's MemoryDenyWriteExecute=yes does
SET_MDWE = "ctypes.CDLL(None).prctl(65, 1, 0, 0, 0)"


def _section(heading: str) -> str:
    text = (REPO / "docs" / "deploy.md").read_text()
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"deploy.md has no section {heading!r}"
    return match.group(1)


def _shell_lines(section: str) -> list[str]:
    """The commands of the section's sh blocks, continuation lines joined, comments dropped."""
    lines = []
    for kind, block in FENCE.findall(section):
        if kind == "sh":
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if words:
                    lines.append(shlex.join(words))
    return lines


@pytest.fixture
def host_root() -> Iterator[Path]:
    """A stand-in for the host's `/`, which a process of another user can walk into."""
    root = Path(tempfile.mkdtemp(prefix="linesight-host-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root)


def _as_image_user(*command: str) -> bool:
    done = subprocess.run(  # noqa: S603 - fixed programs, paths made by this test
        command, user=IMAGE_UID, group=IMAGE_UID, extra_groups=[],
        capture_output=True, timeout=30, check=False,
    )
    return done.returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: install -o/-g, and reading as 10001")
def test_the_image_steps_give_the_containers_user_every_file_it_reads(host_root: Path) -> None:
    """What `sudo install` in 'With the image' puts in /etc/linesight and /var/lib, each
    container (uid and gid 10001, no other group) can read; the command key only it."""
    work = host_root / "checkout"
    (work / "deploy" / "systemd").mkdir(parents=True)
    for example in ("station.yaml.example", "controller.yaml.example"):
        shutil.copy(EXAMPLES / example, work / "deploy" / "systemd" / example)
    assert main(["models", "keygen", "--private", str(work / "site.key"),
                 "--public", str(work / "site.pub")]) == 0
    assert main(["models", "keygen", "--private", str(work / "command.key"),
                 "--public", str(work / "command.pub")]) == 0

    installs = [line for line in _shell_lines(_section("With the image"))
                if line.startswith("sudo install ")]
    for line in installs:
        # the host's /etc and /var/lib are host_root's
        words = [str(host_root / word.lstrip("/")) if word.startswith(("/etc/", "/var/"))
                 else word for word in shlex.split(line)[1:]]
        subprocess.run(words, cwd=work, check=True, capture_output=True,  # noqa: S603
                       timeout=30)

    etc = host_root / "etc" / "linesight"
    station_file, controller_file = etc / "station.yaml", etc / "controller.yaml"
    assert station_file.is_file() and controller_file.is_file(), installs
    station = load_config(station_file, {})
    controller = load_controller_config(controller_file, {"api_token": "0123456789abcdef" * 2})
    readable = [station_file, controller_file]
    for named in (station.key, station.command_key, controller.key, controller.command_key):
        assert named is not None and named.is_absolute()
        readable.append(host_root / str(named).lstrip("/"))
    unreadable = [str(path.relative_to(host_root)) for path in readable
                  if not _as_image_user("cat", str(path))]
    assert unreadable == []
    # The broker password and the command key are nobody else's.
    assert station_file.stat().st_mode & 0o007 == 0
    command_key = host_root / str(controller.command_key).lstrip("/")
    assert command_key.stat().st_mode & 0o077 == 0
    for data_dir in (station.data_dir, controller.data_dir):
        probe = host_root / str(data_dir).lstrip("/") / "probe"
        assert _as_image_user("touch", str(probe)), data_dir


MDWE_MAIN = (
    "import ctypes, sys\n"
    f"if {SET_MDWE} != 0:\n"
    "    sys.exit('PR_SET_MDWE refused')\n"
    "from linesight.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _mdwe_supported() -> bool:
    """Linux 6.3+ has the rule MemoryDenyWriteExecute= stands for; probed in a child."""
    if not sys.platform.startswith("linux"):
        return False
    probe = f"import ctypes, sys; sys.exit({SET_MDWE} != 0)"
    return subprocess.run([sys.executable, "-c", probe], check=False,  # noqa: S603
                          timeout=30).returncode == 0


def test_the_example_station_inspects_with_a_site_signed_bundle_under_mdwe(
    tmp_path: Path,
) -> None:
    """The Keys steps (keygen, sign) and the shipped station.yaml.example, with only the
    line-specific keys overridden by flags, make a station whose model judges every part; run
    under PR_SET_MDWE, as MemoryDenyWriteExecute=yes in linesight-agent.service runs it."""
    if not _mdwe_supported():
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
    keys = tmp_path / "keys"
    keys.mkdir()
    assert main(["models", "keygen", "--private", str(keys / "site.key"),
                 "--public", str(keys / "site.pub")]) == 0
    assert main(["models", "keygen", "--private", str(keys / "command.key"),
                 "--public", str(keys / "command.pub")]) == 0
    bundle = tmp_path / "data" / "bundles" / "part-classifier" / "1.0.0"
    shutil.copytree(REPO / "models" / "part-classifier" / "1.0.0", bundle)
    assert main(["models", "sign", str(bundle), "--key", str(keys / "site.key")]) == 0
    assert main(["models", "verify", str(bundle), "--key", str(keys / "site.pub")]) == 0

    data_dir = tmp_path / "data"
    done = subprocess.run(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-c", MDWE_MAIN, "agent",
         "--config", str(EXAMPLES / "station.yaml.example"),
         # no broker at this address: the decisions wait in the outbox, where they are read
         "--broker", f"mqtt://127.0.0.1:{free_port()}", "--set", "broker.ca_file=null",
         "--source", "synthetic:seed=3", "--set", "source_options={}",
         "--active", str(bundle), "--key", str(keys / "site.pub"),
         "--command-key", str(keys / "command.pub"), "--data-dir", str(data_dir),
         "--set", "metrics_port=null", "--max-parts", "5", "--receipt-wait", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=180, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    store = StationStore(data_dir)
    try:
        decisions = [json.loads(row.payload) for row in store.pending(limit=100)
                     if row.topic.endswith("/decision")]
    finally:
        store.close()
    assert [d["station"] for d in decisions] == ["press-01"] * 5
    # judged by the model every time (automation partial sends the unsure ones to review)
    assert {d["decided_by"] for d in decisions} <= {"active", "operator"}
    assert all(d["label"] is not None for d in decisions)


def test_the_probe_of_mdwe_really_refuses_writable_executable_memory() -> None:
    """The rule the test above runs under is in force, not a no-op on this kernel."""
    if not _mdwe_supported():
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
    attempt = (
        "import ctypes, mmap, sys\n"
        f"assert {SET_MDWE} == 0\n"
        "try:\n"
        "    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
        "except PermissionError:\n"
        "    sys.exit(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", attempt], check=False,  # noqa: S603
                          timeout=30)
    assert done.returncode == 3
