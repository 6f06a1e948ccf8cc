"""README.md as a new user reads it: every ```python block runs verbatim on the CPU, each on its own in a fresh
namespace (blocks whose first lines say ``# requires: cuda`` run only with a GPU), the files it links exist, and
CI runs exactly its test command."""

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```python\n(.*?)^```", README, flags=re.DOTALL | re.MULTILINE)


def test_the_readme_has_its_examples():
    assert len(BLOCKS) >= 5  # a changed fence style must not turn this test into a no-op


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_python_block_runs(index, monkeypatch):
    code = BLOCKS[index]
    if "# requires: cuda" in code.splitlines()[:3] and not torch.cuda.is_available():
        pytest.skip("the block needs a CUDA GPU")
    monkeypatch.delenv("EFFICIENT_OPS_BACKEND", raising=False)  # the README's default backend choice
    torch.manual_seed(0)
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})


def test_local_links_exist():
    links = [t for t in re.findall(r"\]\(([^)#]+)[^)]*\)", README) if "://" not in t]
    assert "docs/DESIGN.md" in links and "LICENSE" in links
    assert [t for t in links if not (ROOT / t).exists()] == []


def test_ci_runs_the_readme_test_command():
    command = re.search(r"```bash\n(pip install .*pytest)\n```", README)[1]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert command in ci
