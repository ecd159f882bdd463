"""The documentation site builds with warnings as errors (`make docs`): a docstring the API reference
cannot render, a link to a missing page, heading or image, or a page left out of the nav fails here.
The README stays short and its links point at files that exist."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
README = os.path.join(ROOT, "README.md")
README_MAX_LINES = 200

for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
    pytest.importorskip(module, reason=f"{module} not installed: pip install -e '.[docs]'")


def test_docs_build_strict(tmp_path):
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", os.path.join(ROOT, "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    messages = [line for line in (result.stdout + result.stderr).splitlines()
                if line.startswith(("WARNING", "ERROR"))]
    assert result.returncode == 0, "\n".join(messages) or result.stderr[-4000:]
    reference = (site / "api" / "methods" / "index.html").read_text()
    assert 'id="mtl_jax.train.methods.base.Method"' in reference  # the reference is generated


def test_readme_is_short_and_its_links_exist():
    text = open(README).read()
    assert len(text.splitlines()) <= README_MAX_LINES
    targets = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not t.startswith(("http://", "https://"))]
    assert targets, "the README links into docs/"
    missing = [t for t in targets if not os.path.exists(os.path.join(ROOT, t.split("#")[0]))]
    assert not missing, f"README links to missing files: {missing}"
