"""The README's quickstart runs exactly as written, and the set-up commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_quickstart_runs_as_written(capsys):
    block = re.search(r"## Quickstart\n\n```python\n(.*?)```", README, re.S).group(1)
    exec(compile(block, "README.md quickstart", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("['layers.0.input', 'layers.0.queries', 'layers.0.keys'")
    assert printed[1] == "torch.Size([2, 8, 64])"
    assert printed[-1] == "True"


def test_ci_runs_the_readme_test_command():
    commands = re.search(r"## Set-up: two commands.*?```bash\n(.*?)```", README, re.S).group(1)
    test_command = [line for line in commands.splitlines() if "pytest" in line]
    assert len(test_command) == 1
    assert test_command[0].strip() in (ROOT / ".ci" / "run").read_text()
