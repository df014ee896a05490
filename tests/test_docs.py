"""The docs a user reaches from a clone: every relative link resolves inside the repository, none
points outside it, and the README's quickstart opens with the two scripts that exist."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_relative_links_resolve_inside_the_repository() -> None:
    checked = 0
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        assert "../shared" not in text and "shared/DESIGN" not in text, doc.name
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path = (doc.parent / target).resolve()
            assert path.is_relative_to(ROOT), f"{doc.name} links outside the repository: {target}"
            assert path.exists(), f"{doc.name} links to {target}, which does not exist"
            checked += 1
    assert checked >= 5  # the README links to docs/, and docs/design.md to the guides


def test_readme_quickstart_opens_with_the_two_scripts() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quickstart = readme.split("## Quickstart", 1)[1]
    block = quickstart.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["./scripts/demo", "./scripts/test"]
    for script in ("demo", "test"):
        assert os.access(ROOT / "scripts" / script, os.X_OK), script
    assert "pip install neuroscope" not in readme.replace("pip install neuroscope` would", "")
