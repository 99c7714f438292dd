"""scripts/setup on the machines the README promises, run whole against stand-in commands.

The script runs in a copy of the repository's layout under a path with a space in it; `id`,
`sudo`, `apt-get`, `apt-cache` and the Python interpreter are small stand-ins on PATH that
write what they were asked to a log. The stand-in `sudo` resets the environment the way sudo's
default `env_reset` does.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]

# A venv interpreter: every command works and is logged.
VENV_PYTHON = '#!/bin/bash\necho "venv-python $*" >> "$SETUP_LOG"\nexit 0\n'

# The interpreter named by PYTHON. `-m venv [--clear] DIR` makes a working venv in DIR;
# `import ensurepip` fails when FAKE_NO_ENSUREPIP is set (Debian without python3.X-venv);
# code that prints is asked for the version.
PYTHON = f"""#!/bin/bash
echo "python $*" >> "$SETUP_LOG"
if [ "$1" = -m ] && [ "$2" = venv ]; then
  dir="${{!#}}"
  [ "$3" != --clear ] || rm -rf "$dir"
  mkdir -p "$dir/bin"
  cat > "$dir/bin/python" <<'EOF'
{VENV_PYTHON}EOF
  chmod +x "$dir/bin/python"
  exit 0
fi
case "$2" in
  *ensurepip*) [ -z "${{FAKE_NO_ENSUREPIP:-}}" ] || exit 1 ;;
  *print*) echo "${{FAKE_VERSION:-3.11}}" ;;
esac
exit 0
"""

STANDINS = {
    "id": '#!/bin/bash\necho "${FAKE_UID:-0}"\n',
    # sudo's env_reset: the command gets a minimal environment, not the caller's.
    "sudo": '#!/bin/bash\necho "sudo $*" >> "$SETUP_LOG"\n'
    'exec env -i PATH="$PATH" SETUP_LOG="$SETUP_LOG" "$@"\n',
    "apt-get": '#!/bin/bash\necho "apt-get $* [DEBIAN_FRONTEND=${DEBIAN_FRONTEND:-}]"'
    ' >> "$SETUP_LOG"\n',
    "apt-cache": "#!/bin/bash\necho 'chromium:'\necho '  Candidate: (none)'\n",
    "mosquitto": "#!/bin/bash\n",
    "python-under-test": PYTHON,
}


def _repo(tmp_path: Path) -> Path:
    repo = tmp_path / "my repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup", repo / "scripts" / "setup")
    (repo / "pyproject.toml").write_text('[project]\nname = "x"\nversion = "0"\n')
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in STANDINS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return repo


def _setup(tmp_path: Path, *args: str, **env: str) -> tuple[int, list[str], str]:
    repo = tmp_path / "my repo"
    log = tmp_path / "log"
    log.write_text("")
    done = subprocess.run(  # noqa: S603 - the repository's script, stand-ins on PATH
        ["/bin/bash", str(repo / "scripts" / "setup"), *args],
        env={
            "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin",
            "HOME": str(tmp_path),
            "SETUP_LOG": str(log),
            "PYTHON": "python-under-test",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, log.read_text().splitlines(), done.stdout + done.stderr


def _pip_installs(log: list[str]) -> list[str]:
    return [line for line in log if re.match(r"venv-python -m pip install .*-e \.\[dev\]", line)]


def test_a_fresh_run_makes_the_venv_and_installs_the_project(tmp_path: Path) -> None:
    _repo(tmp_path)
    status, log, output = _setup(tmp_path)
    assert status == 0, output
    assert any(re.match(r"python -m venv .*\.venv$", line) for line in log), log
    assert len(_pip_installs(log)) == 1


def test_a_second_run_needs_neither_the_network_nor_apt(tmp_path: Path) -> None:
    _repo(tmp_path)
    assert _setup(tmp_path)[0] == 0
    status, log, output = _setup(tmp_path)
    assert status == 0, output
    assert not _pip_installs(log)
    assert not [line for line in log if line.startswith(("apt-get", "sudo"))]


def test_a_venv_left_without_pip_by_an_interrupted_run_is_made_again(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    # What `python -m venv` leaves when it is stopped before ensurepip has installed pip.
    broken = repo / ".venv" / "bin" / "python"
    broken.parent.mkdir(parents=True)
    broken.write_text(
        '#!/bin/bash\necho "broken-python $*" >> "$SETUP_LOG"\n'
        'case "$*" in *pip*) echo "No module named pip" >&2; exit 1 ;; esac\n'
    )
    broken.chmod(0o755)
    status, log, output = _setup(tmp_path)
    assert status == 0, output
    assert any(re.match(r"python -m venv --clear \.venv$", line) for line in log), log
    assert len(_pip_installs(log)) == 1


def test_a_python_without_ensurepip_gets_the_venv_package_of_its_own_version(
    tmp_path: Path,
) -> None:
    """PYTHON=python3.12 on a machine whose python3 is another version: python3-venv would
    bring ensurepip for the default python3 only."""
    _repo(tmp_path)
    status, log, output = _setup(tmp_path, FAKE_NO_ENSUREPIP="1", FAKE_VERSION="3.12")
    assert status == 0, output
    installs = [line for line in log if line.startswith("apt-get install")]
    assert len(installs) == 1, log
    assert re.search(r" python3\.12-venv ", installs[0] + " "), installs


def test_apt_get_install_through_sudo_stays_noninteractive(tmp_path: Path) -> None:
    _repo(tmp_path)
    status, log, output = _setup(tmp_path, FAKE_UID="1000", FAKE_NO_ENSUREPIP="1")
    assert status == 0, output
    assert any(line.startswith("sudo ") for line in log), log
    installs = [line for line in log if line.startswith("apt-get install")]
    assert installs and all("[DEBIAN_FRONTEND=noninteractive]" in line for line in installs), log


def test_root_runs_apt_get_without_sudo(tmp_path: Path) -> None:
    _repo(tmp_path)
    status, log, output = _setup(tmp_path, FAKE_UID="0", FAKE_NO_ENSUREPIP="1")
    assert status == 0, output
    assert not [line for line in log if line.startswith("sudo")], log
    installs = [line for line in log if line.startswith("apt-get install")]
    assert installs and all("[DEBIAN_FRONTEND=noninteractive]" in line for line in installs), log


def test_stand_ins_shadow_the_real_commands(tmp_path: Path) -> None:
    """Guards the harness: the script must never reach the machine's apt-get or sudo."""
    _repo(tmp_path)
    path = f"{tmp_path / 'bin'}:/usr/bin:/bin"
    for name in ("id", "sudo", "apt-get", "apt-cache"):
        assert shutil.which(name, path=path) == str(tmp_path / "bin" / name)
    assert os.access(tmp_path / "bin" / "python-under-test", os.X_OK)


def _function(name: str) -> str:
    text = (ROOT / "scripts" / "setup").read_text()
    found = re.search(rf"^{name}\(\) \{{\n.*?^\}}\n", text, re.MULTILINE | re.DOTALL)
    assert found, f"scripts/setup no longer defines {name}"
    return found.group(0)


def _playwright_ready(tmp_path: Path, complete: list[str], status: int = 0) -> bool:
    """Run the script's check in a folder whose .venv has a stand-in Playwright that prints
    what `playwright install --dry-run chromium` prints."""
    work = tmp_path / "my repo"
    browsers = tmp_path / "ms playwright"
    listing = ""
    for part in ("chromium-1255", "ffmpeg-1013", "chromium_headless_shell-1255"):
        (browsers / part).mkdir(parents=True)
        if part in complete:
            (browsers / part / "INSTALLATION_COMPLETE").write_text("")
        listing += (
            f"Chrome ({part})\n  Install location:    {browsers / part}\n"
            f"  Download url:        https://example.invalid/{part}.zip\n\n"
        )
    (work / ".venv" / "bin").mkdir(parents=True)
    (work / "listing").write_text(listing)
    python = work / ".venv" / "bin" / "python"
    python.write_text(f'#!/bin/bash\ncat "$(dirname "$0")/../../listing"\nexit {status}\n')
    python.chmod(0o755)
    check = _function("playwright_chromium_ready")
    script = f"set -euo pipefail\n{check}playwright_chromium_ready\n"
    done = subprocess.run(  # noqa: S603 - fixed bash, function from the repository
        ["/bin/bash", "-c", script],
        cwd=work,
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        timeout=30,
    )
    return done.returncode == 0


ALL_PARTS = ["chromium-1255", "ffmpeg-1013", "chromium_headless_shell-1255"]


def test_playwright_chromium_downloaded_whole_is_ready(tmp_path: Path) -> None:
    assert _playwright_ready(tmp_path, ALL_PARTS)


def test_playwright_chromium_with_an_unfinished_part_is_not_ready(tmp_path: Path) -> None:
    assert not _playwright_ready(tmp_path, ALL_PARTS[:2])


def test_playwright_that_cannot_answer_means_not_ready(tmp_path: Path) -> None:
    assert not _playwright_ready(tmp_path, ALL_PARTS, status=1)
