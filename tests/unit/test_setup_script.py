"""scripts/setup decides between Debian's chromium and Playwright's build by asking apt-cache.

The check runs under `set -o pipefail`; these tests run the script's own function against a
stand-in apt-cache whose output is as long as the real one's.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def _function_source() -> str:
    text = (ROOT / "scripts" / "setup").read_text()
    found = re.search(r"^apt_has_chromium\(\) \{\n.*?^\}\n", text, re.MULTILINE | re.DOTALL)
    assert found, "scripts/setup no longer defines apt_has_chromium"
    return found.group(0)


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
    script = f"set -euo pipefail\n{_function_source()}apt_has_chromium\n"
    done = subprocess.run(  # noqa: S603 - fixed bash, script from the repository
        ["/bin/bash", "-c", script],
        env={"PATH": f"{tmp_path}:/usr/bin:/bin"},
        capture_output=True,
        timeout=30,
    )
    return done.returncode == 0


def test_a_listed_candidate_means_apt_has_chromium(tmp_path: Path) -> None:
    assert _has_chromium(tmp_path, "156.0.8078.108-1~deb12u1")


def test_no_candidate_means_apt_has_none(tmp_path: Path) -> None:
    assert not _has_chromium(tmp_path, "(none)")
