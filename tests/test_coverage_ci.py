"""CI runs exactly the README's two set-up commands, and the test command measures coverage."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL).group(1)
    return [ln for ln in block.splitlines() if ln.strip()]


def test_ci_runs_the_readme_commands():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [ln for ln in ci if ln.strip() and not ln.startswith("#") and not ln.startswith(("set ", "cd "))]
    assert commands == readme_commands()


def test_the_test_command_reports_coverage_and_fails_under_90():
    test_cmd = readme_commands()[1]
    assert "pytest" in test_cmd and "--cov=deepshap_opt" in test_cmd and "--cov-fail-under=90" in test_cmd
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'\[tool\.coverage\.run\]\s*\nsource = \["deepshap_opt"\]', pyproject)
