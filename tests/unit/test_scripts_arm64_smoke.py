"""scripts/arm64-smoke installs qemu-user-static and debootstrap when they are missing; run
against stand-in commands up to that apt-get install, which the stand-in fails to stop it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]

STANDINS = {
    "uname": "#!/bin/bash\necho x86_64\n",
    "id": '#!/bin/bash\necho "${FAKE_UID:-1000}"\n',
    # sudo's env_reset: the command gets a minimal environment, not the caller's.
    "sudo": '#!/bin/bash\necho "sudo $*" >> "$SMOKE_LOG"\n'
    'exec env -i PATH="$PATH" SMOKE_LOG="$SMOKE_LOG" "$@"\n',
    # Logs, and stops the script at the install: nothing after it may run here.
    "apt-get": '#!/bin/bash\necho "apt-get $* [DEBIAN_FRONTEND=${DEBIAN_FRONTEND:-}]"'
    ' >> "$SMOKE_LOG"\n[ "$1" != install ]\n',
}


@pytest.mark.skipif(
    Path("/usr/bin/qemu-aarch64-static").exists() and Path("/usr/sbin/debootstrap").exists(),
    reason="nothing to install on this machine",
)
@pytest.mark.parametrize("uid", ["0", "1000"])
def test_apt_get_install_stays_noninteractive_with_and_without_sudo(
    tmp_path: Path, uid: str
) -> None:
    repo = tmp_path / "my repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "arm64-smoke", repo / "scripts" / "arm64-smoke")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in STANDINS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "log"
    log.write_text("")
    done = subprocess.run(  # noqa: S603 - the repository's script, stand-ins on PATH
        ["/bin/bash", str(repo / "scripts" / "arm64-smoke")],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "SMOKE_LOG": str(log), "FAKE_UID": uid},
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = log.read_text().splitlines()
    assert done.returncode != 0, "the stand-in apt-get install stops the script"
    installs = [line for line in lines if line.startswith("apt-get install")]
    assert len(installs) == 1, lines
    assert "[DEBIAN_FRONTEND=noninteractive]" in installs[0], lines
    assert any(line.startswith("sudo ") for line in lines) == (uid != "0"), lines
