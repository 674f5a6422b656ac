"""Every ```python block of the project README runs as written: blocks that use CUDA under the gpu
marker (skipped on a CPU machine), the others here. The blocks are read from README.md at test time,
never copied, so the README cannot drift from what runs."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def fenced_blocks() -> list[tuple[str, int, str]]:
    """(language, line of the opening fence, code) of every fenced block, in order."""
    text = README.read_text(encoding="utf-8")
    return [(m.group(1), text.count("\n", 0, m.start()) + 1, m.group(2)) for m in _FENCE.finditer(text)]


def python_blocks() -> list[tuple[int, str, dict[str, str]]]:
    """(line, code, files) of each python block; files: a yaml block right before it, under the
    .yaml name the python code loads (the policy example loads the file shown above it)."""
    out = []
    blocks = fenced_blocks()
    for i, (lang, line, code) in enumerate(blocks):
        if lang != "python":
            continue
        files = {}
        if i and blocks[i - 1][0] == "yaml":
            for name in re.findall(r"[\"']([\w.-]+\.ya?ml)[\"']", code):
                files[name] = blocks[i - 1][2]
        out.append((line, code, files))
    return out


def needs_cuda(code: str) -> bool:
    return "cuda" in code


def _params() -> list[object]:
    return [pytest.param(code, files, id=f"README.md:{line}", marks=[pytest.mark.gpu] if needs_cuda(code) else [])
            for line, code, files in python_blocks()]


def _top_modules(code: str) -> set[str]:
    return set(re.findall(r"^\s*(?:import|from)\s+(\w+)", code, re.M))


@pytest.mark.parametrize("code, files", _params())
def test_readme_python_block_runs(code: str, files: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    missing = sorted(m for m in _top_modules(code) if importlib.util.find_spec(m) is None)
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (not installed here)")
    monkeypatch.chdir(tmp_path)
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})  # noqa: S102 - the README's own code


def test_the_readme_has_a_cpu_and_a_cuda_quick_start():
    blocks = python_blocks()
    assert len(blocks) == README.read_text(encoding="utf-8").count("```python")  # every block was extracted
    quick_starts = [code for _, code, _ in blocks if "lz.attention(q, k, v, is_causal=True)" in code]
    assert any(needs_cuda(c) for c in quick_starts) and any(not needs_cuda(c) for c in quick_starts)
    assert all('layout="BHSD"' in c for c in quick_starts if needs_cuda(c))  # the layout rule, in the first example
