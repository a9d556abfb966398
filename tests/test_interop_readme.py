"""The README's interop examples run as written (tiny models, no downloads)."""

import re
from pathlib import Path

import pytest

import mae_fast

README = Path(__file__).resolve().parents[1] / "README.md"
SECTIONS = [
    "Interop: official checkpoints",
    "Interop: transformers",
    "Interop: timm",
    "Patching other ViT code",
]


def _python_blocks(heading: str) -> list[str]:
    text = README.read_text()
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"README.md has no section '## {heading}'"
    return re.findall(r"^```python\n(.*?)^```", match.group(1), flags=re.M | re.S)


@pytest.mark.parametrize("heading", SECTIONS)
def test_readme_example_runs(heading, tmp_path, monkeypatch):
    blocks = _python_blocks(heading)
    assert blocks, f"section '## {heading}' has no python example"
    monkeypatch.chdir(tmp_path)
    # What a user without a GPU runs: "auto" picks the reference ops on CPU tensors. (conftest turns on
    # Triton's interpreter for the kernel tests, which would make these examples slow, not more tested.)
    with mae_fast.use_backend("reference"):
        for code in blocks:
            exec(compile(code, f"README.md ## {heading}", "exec"), {"__name__": "__readme__"})
