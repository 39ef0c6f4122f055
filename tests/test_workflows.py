"""docs/workflows.md runs as written: every ```python block, in order, in one namespace (in a temporary
directory: it writes a figure and a saved intervention); the printed figures are the ones the text quotes."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "workflows.md"


def test_workflows_run_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"^```python\n(.*?)^```", DOC.read_text(), re.DOTALL | re.MULTILINE)
    assert len(blocks) >= 6
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/workflows.md python block {i}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "torch.Size([]) torch.Size([8, 10, 64])" in printed
    assert float(re.search(r"correlation (\S+)", printed).group(1)) > 0.999
    assert "12 keys matter; plain attribution misses 5, qk_fix misses 2" in printed
    assert (tmp_path / "attribution_vs_patching.png").stat().st_size > 10_000
    assert (tmp_path / "das_rotation" / "interventions.json").is_file()
