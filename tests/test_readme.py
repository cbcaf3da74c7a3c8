"""The README's Python example runs as written (in a temporary folder)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own documentation
    assert namespace["result"].step == 20 and (tmp_path / "runs" / "demo" / "checkpoint.pt").is_file()
    assert float(namespace["error"]) > 0


def test_readme_quickstart_is_two_commands():
    text = README.read_text()
    quick = text[text.index("## Quickstart") :]
    block = re.search(r"```bash\n(.*?)```", quick, flags=re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip()]
    assert commands == ["pip install -e . && deepsim train", "pip install -e '.[test]' && python -m pytest"]
