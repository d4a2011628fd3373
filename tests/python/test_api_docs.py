"""The API reference (docs/guide/api.md) covers every public name and matches the docstrings.

tools/apidoc.py generates the page; here its check runs on the real package, and on a made-up
package, to show that it fails when a public name lacks a docstring or the page is stale.
"""
import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import BINDINGS

ROOT = os.path.dirname(BINDINGS)
TOOL = os.path.join(ROOT, "tools", "apidoc.py")


def load_tool():
    spec = importlib.util.spec_from_file_location("apidoc_tool", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_public_name_is_documented_and_the_page_is_current():
    r = subprocess.run([sys.executable, TOOL, "--check"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=BINDINGS))
    assert r.returncode == 0, r.stderr


def test_the_reference_names_the_public_api():
    import ringpool

    with open(os.path.join(ROOT, "docs", "guide", "api.md")) as f:
        page = f.read()
    for name in ringpool.__all__:
        if name != "__version__":
            assert f"`ringpool.{name}`" in page or f"### ringpool.{name}\n" in page, name
    assert "### ringpool.joblib.RingpoolBackend" in page
    assert "### ringpool.executor.Executor.submit" in page or "#### ringpool.executor.Executor.submit" in page


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    pkg = tmp_path / "fakepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        '"""A package."""\nfrom .part import documented, Thing\n__all__ = ["documented", "Thing"]\n')
    (pkg / "part.py").write_text(
        '"""Parts."""\n__all__ = ["documented", "bare", "Thing"]\n'
        'def documented():\n    """Has a docstring."""\n'
        'def bare():\n    pass\n'
        'class Thing:\n    """A thing."""\n    def method(self):\n        pass\n'
        '    def _private(self):\n        pass\n')
    (pkg / "_hidden.py").write_text("def undocumented_but_private():\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "fakepkg"
    for name in [m for m in sys.modules if m == "fakepkg" or m.startswith("fakepkg.")]:
        del sys.modules[name]


def test_check_fails_on_a_name_without_docstring(fake_package):
    tool = load_tool()
    sections, missing = tool.collect(fake_package)
    assert sorted(missing) == ["fakepkg.part.Thing.method", "fakepkg.part.bare"]
    page = tool.render(sections)
    assert "### fakepkg.part.documented" in page and "Has a docstring." in page
    assert "undocumented_but_private" not in page  # _hidden is not public


def test_check_fails_on_a_stale_page(tmp_path):
    stale = tmp_path / "api.md"
    with open(os.path.join(ROOT, "docs", "guide", "api.md")) as f:
        stale.write_text(f.read().replace("ringpool", "ringpoo1", 1))
    r = subprocess.run([sys.executable, TOOL, "--check", "--output", str(stale)], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, PYTHONPATH=BINDINGS))
    assert r.returncode == 1 and "stale" in r.stderr
