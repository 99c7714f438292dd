"""scripts/setup decides between Debian's chromium and Playwright's build by asking apt-cache,
and installs libatomic1 before Playwright's driver (a Node build that needs it) first runs.

The checks run under `set -o pipefail`; these tests run the script's own functions against
stand-ins for apt-cache and ldd whose output has the real ones' shape.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def _function_source(name: str = "apt_has_chromium") -> str:
    text = (ROOT / "scripts" / "setup").read_text()
    found = re.search(rf"^{name}\(\) \{{\n.*?^\}}\n", text, re.MULTILINE | re.DOTALL)
    assert found, f"scripts/setup no longer defines {name}"
    return found.group(0)


def _run_function(tmp_path: Path, name: str, *args: str) -> int:
    """Exit status of scripts/setup's function `name`, with tmp_path first on PATH."""
    script = f"set -euo pipefail\n{_function_source(name)}{name} \"$@\"\n"
    done = subprocess.run(  # noqa: S603 - fixed bash, script from the repository
        ["/bin/bash", "-c", script, name, *args],
        env={"PATH": f"{tmp_path}:/usr/bin:/bin"},
        capture_output=True,
        timeout=30,
    )
    return done.returncode


def _has_chromium(tmp_path: Path, candidate: str) -> bool:
    fake = tmp_path / "apt-cache"
    # The real output is followed by kilobytes of version table; so is this one.
    fake.write_text(
        "#!/usr/bin/env bash\n"
        "echo 'chromium:'\n"
        "echo '  Installed: (none)'\n"
        f"echo '  Candidate: {candidate}'\n"
        "for i in $(seq 1 5000); do echo \"     500 http://deb.debian.org/debian line $i\"; done\n"
    )
    fake.chmod(0o755)
    return _run_function(tmp_path, "apt_has_chromium") == 0


def test_a_listed_candidate_means_apt_has_chromium(tmp_path: Path) -> None:
    assert _has_chromium(tmp_path, "156.0.8078.108-1~deb12u1")


def test_no_candidate_means_apt_has_none(tmp_path: Path) -> None:
    assert not _has_chromium(tmp_path, "(none)")


def _lacks_libatomic(tmp_path: Path, libatomic_line: str) -> bool:
    """lacks_libatomic on a stand-in node binary, as a stand-in ldd reports its libraries."""
    fake = tmp_path / "ldd"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        "echo '\tlinux-vdso.so.1 (0x00007ffd5a5f2000)'\n"
        f"echo '\t{libatomic_line}'\n"
        "echo '\tlibstdc++.so.6 => /lib/x86_64-linux-gnu/libstdc++.so.6 (0x00007f7558a00000)'\n"
        "echo '\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f7558600000)'\n"
    )
    fake.chmod(0o755)
    node = tmp_path / "node"
    node.write_text("")
    return _run_function(tmp_path, "lacks_libatomic", str(node)) == 0


def test_a_driver_whose_libatomic_is_not_found_lacks_it(tmp_path: Path) -> None:
    # A fresh Ubuntu 24.04: Playwright's driver then fails before it can install anything.
    assert _lacks_libatomic(tmp_path, "libatomic.so.1 => not found")


def test_a_driver_whose_libatomic_resolves_does_not_lack_it(tmp_path: Path) -> None:
    assert not _lacks_libatomic(
        tmp_path, "libatomic.so.1 => /lib/x86_64-linux-gnu/libatomic.so.1 (0x00007feb694f8000)"
    )


def test_a_driver_that_needs_no_libatomic_does_not_lack_it(tmp_path: Path) -> None:
    assert not _lacks_libatomic(tmp_path, "libm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x0)")


def test_a_missing_driver_is_not_taken_for_one_lacking_libatomic(tmp_path: Path) -> None:
    assert _run_function(tmp_path, "lacks_libatomic", str(tmp_path / "no-such-node")) != 0


def _install_playwright_chromium(
    tmp_path: Path, *, libatomic: str, download_works: bool
) -> tuple[int, str, list[str]]:
    """install_playwright_chromium in a tree whose .venv/bin/python, ldd and apt-get are
    stand-ins; returns its exit status, its stderr and the commands it ran, in order."""
    tools = tmp_path / "bin"
    tools.mkdir()
    log = tmp_path / "ran"
    node = tmp_path / "driver-node"
    node.write_text("")
    venv_python = tmp_path / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text(
        "#!/usr/bin/env bash\n"
        f"if [ \"$1\" = -c ]; then echo '{node}'; exit 0; fi\n"
        f"echo \"python $*\" >> '{log}'\n"
        "echo 'Error: getaddrinfo ENOTFOUND cdn.example' >&2\n"
        f"exit {0 if download_works else 1}\n"
    )
    (tools / "ldd").write_text(f"#!/usr/bin/env bash\necho '\\t{libatomic}'\n")
    (tools / "apt-get").write_text(f"#!/usr/bin/env bash\necho \"apt-get $*\" >> '{log}'\n")
    for tool in (venv_python, tools / "ldd", tools / "apt-get"):
        tool.chmod(0o755)
    functions = "".join(
        _function_source(name)
        for name in ("apt_get_install", "lacks_libatomic", "install_playwright_chromium")
    )
    script = f"set -euo pipefail\nsudo_cmd=()\n{functions}install_playwright_chromium\n"
    done = subprocess.run(  # noqa: S603 - fixed bash, script from the repository
        ["/bin/bash", "-c", script],
        cwd=tmp_path,
        env={"PATH": f"{tools}:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    ran = log.read_text().splitlines() if log.exists() else []
    return done.returncode, done.stderr, ran


def test_libatomic1_goes_in_before_playwrights_driver_first_runs(tmp_path: Path) -> None:
    status, _, ran = _install_playwright_chromium(
        tmp_path, libatomic="libatomic.so.1 => not found", download_works=True
    )
    assert status == 0
    assert ran == [
        "apt-get install -y -qq --no-install-recommends libatomic1",
        "python -m playwright install --with-deps chromium",
    ]


def test_libatomic1_is_not_installed_where_the_driver_finds_it(tmp_path: Path) -> None:
    status, _, ran = _install_playwright_chromium(
        tmp_path, libatomic="libatomic.so.1 => /lib/libatomic.so.1 (0x0)", download_works=True
    )
    assert status == 0
    assert ran == ["python -m playwright install --with-deps chromium"]


def test_a_failed_download_fails_setup_and_says_what_to_do(tmp_path: Path) -> None:
    status, stderr, _ = _install_playwright_chromium(
        tmp_path, libatomic="libatomic.so.1 => /lib/libatomic.so.1 (0x0)", download_works=False
    )
    assert status == 1
    assert "ENOTFOUND cdn.example" in stderr  # Playwright's own error stays visible
    assert "Playwright's Chromium could not be installed" in stderr
    assert "/usr/bin/chromium" in stderr
    assert ".venv/bin/python -m pytest" in stderr
