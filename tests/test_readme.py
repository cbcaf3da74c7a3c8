"""The README as users read it: its Python example runs as written (in a temporary folder), its quickstart is
a clone and two commands, its `deepsim` commands parse, its sections come in reading order, it stays short,
and every link in it and in docs/ resolves."""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def _fenced(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def _prose(text: str) -> str:
    """``text`` with fenced code blocks blanked out (their lines kept, so line counts hold)."""
    return re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = _fenced(README.read_text(), "python")
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own documentation
    assert namespace["result"].step == 20 and (tmp_path / "runs" / "demo" / "checkpoint.pt").is_file()
    assert float(namespace["error"]) > 0
    assert namespace["per_image"].shape == (4,) and namespace["lpips_values"].shape == (4,)


def test_readme_quickstart_is_a_clone_and_two_commands():
    text = README.read_text()
    quick = text[text.index("## Quickstart") :]
    block = re.search(r"```bash\n(.*?)```", quick, flags=re.S).group(1)
    commands = [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands[0].startswith("git clone ") and commands[0].endswith("&& cd deepsim"), commands[0]
    assert commands[1:] == [
        "pip install -e . && deepsim train",
        "pip install -e '.[test]' && python -m pytest",
    ]


def test_readme_sections_come_in_reading_order():
    """What it is, the quickstart, one measured result, then usage; benchmarks, kernels, internals after."""
    text = README.read_text()
    order = [
        "## Quickstart",
        "## A measured result",
        "## Using it",
        "### Which commands need downloaded weights",
        "### The command line, per task",
        "### Python",
        "## Files you did not make",
        "## LPIPS, fused",
        "## Benchmarks and kernels",
        "## Training at scale",
        "## Differences from the paper and the derived code",
        "## What is inside",
    ]
    positions = [text.index("\n" + heading) for heading in order]
    assert positions == sorted(positions), [h for h, _ in sorted(zip(order, positions), key=lambda x: x[1])]
    assert text.index("[-1, 1]") < text.index("## Quickstart") and "normalize=True" in text[: positions[0]]


def test_readme_is_short_and_has_no_wall_of_prose():
    text = README.read_text()
    assert len(text.splitlines()) <= 200, f"README has {len(text.splitlines())} lines; move detail to docs/"
    paragraph: list[str] = []
    for line in _prose(text).splitlines() + [""]:
        starts_item = line.startswith(("- ", "#", "|", "    ", "!["))
        if not line.strip() or starts_item:
            assert len(paragraph) <= 5, f"a {len(paragraph)}-line paragraph: {paragraph[0][:60]!r}"
            paragraph = [line] if line.startswith("- ") else []
        else:
            paragraph.append(line)


def test_readme_claims_no_speed_without_a_gpu_figure():
    text = README.read_text()
    claims = [m.start() for m in re.finditer(r"\bfast", text, flags=re.I)]
    for start in claims:
        sentence = text[start : text.index(".", start)]
        assert "GPU figures pending" in sentence, f"speed claim without a GPU figure: {sentence!r}"


def test_readme_offline_table_names_the_random_weights():
    text = README.read_text()
    section = text[
        text.index("### Which commands need downloaded weights") : text.index("### The command line")
    ]
    for needed in (
        "deepsim train --random-weights",
        "alexnet-random",
        "--download-weights",
        "deepsim train invert",
    ):
        assert needed in section, needed


def _readme_deepsim_commands() -> list[str]:
    lines = []
    for block in _fenced(README.read_text(), "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["deepsim"]:
                lines.append(line)
    return lines


@pytest.mark.parametrize("line", _readme_deepsim_commands())
def test_readme_deepsim_commands_parse(line):
    """Every `deepsim ...` line of the README names a real command with real flags (parsed, not run)."""
    from deepsim.cli import build_parser

    words = shlex.split(line, comments=True)
    try:
        build_parser().parse_args(words[1:])
    except SystemExit as exit_:
        pytest.fail(f"README command does not parse (exit {exit_.code}): {line.strip()}")


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_links_resolve(page):
    """Every relative link of the README and docs/ names a file that exists (and a heading, with #anchor)."""
    text = _prose(page.read_text())
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name} links to a missing {target}"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", _prose(file.read_text()), flags=re.M)
            assert anchor in {_anchor(h) for h in headings}, f"{page.name}: no heading for {target}"


def test_slurm_script_is_linked_not_pasted():
    script = (ROOT / "examples" / "slurm" / "train.sbatch").read_text()
    scale = (ROOT / "docs" / "scale.md").read_text()
    assert (
        "(../examples/slurm/train.sbatch)" in scale and "(examples/slurm/train.sbatch)" in README.read_text()
    )
    pasted = [line for line in script.splitlines() if line.startswith("#SBATCH --")]
    for page in (README, *DOCS):
        assert not any(line in page.read_text().splitlines() for line in pasted), (
            f"{page.name} pastes the script"
        )
