"""Static checks as tests: `mypy --strict` on dilo/ (config in pyproject.toml) and ruff on the repository.

Both tools are in the `dev` extra, so CI runs these with the rest of the suite; without them the tests skip
and say which tool is missing. mypy keeps its cache in the repository's .mypy_cache (gitignored, shared
with a manual `python -m mypy`), so only the first run pays for a cold cache.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MYPY_TIMEOUT_S = 300  # measured on 2 CPU cores: 26 s with a cold cache (dilo/ plus torch's stubs), a few s warm
RUFF_TIMEOUT_S = 60


def _run(cmd: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False)


def _ruff() -> list[str]:
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    exe = shutil.which("ruff")
    if exe is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    return [exe]


@pytest.mark.slow
@pytest.mark.timeout(MYPY_TIMEOUT_S + 20)
def test_mypy_strict_on_dilo() -> None:
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (pip install -e '.[dev]')")
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")]
    cmd += ["--cache-dir", str(ROOT / ".mypy_cache"), "--no-color-output", "dilo"]
    res = _run(cmd, MYPY_TIMEOUT_S)
    if res.returncode != 0:
        pytest.fail(f"mypy --strict found errors in dilo/:\n{res.stdout}{res.stderr}", pytrace=False)


@pytest.mark.timeout(2 * RUFF_TIMEOUT_S + 20)
def test_ruff_check_and_format() -> None:
    ruff = _ruff()
    failed: list[str] = []
    for args in (["check", "--no-fix", "."], ["format", "--check", "."]):
        res = _run([*ruff, *args], RUFF_TIMEOUT_S)
        if res.returncode != 0:
            failed.append(f"$ ruff {' '.join(args)}\n{res.stdout}{res.stderr}")
    if failed:
        pytest.fail("\n".join(failed), pytrace=False)
