"""Every python example in the README runs as written (tiny models, no downloads)."""

import re
from pathlib import Path

import pytest

import mae_fast

README = Path(__file__).resolve().parents[1] / "README.md"
MUST_HAVE_EXAMPLES = {
    "Quick start",
    "Attention",
    "Interop: official checkpoints",
    "Interop: transformers",
    "Interop: timm",
    "Patching other ViT code",
}


def _examples_by_section() -> dict[str, list[str]]:
    text = README.read_text()
    sections = {}
    for match in re.finditer(r"^## (.+?)\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S):
        blocks = re.findall(r"^```python\n(.*?)^```", match.group(2), flags=re.M | re.S)
        if blocks:
            sections[match.group(1)] = blocks
    return sections


def test_the_sections_that_promise_examples_have_them():
    assert MUST_HAVE_EXAMPLES <= set(_examples_by_section())


@pytest.mark.parametrize("heading", sorted(_examples_by_section()))
def test_readme_example_runs(heading, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert mae_fast.get_backend() == "auto"  # what a user gets: the reference ops on CPU tensors
    for code in _examples_by_section()[heading]:
        exec(compile(code, f"README.md ## {heading}", "exec"), {"__name__": "__readme__"})
