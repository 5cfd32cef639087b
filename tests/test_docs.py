"""docs/design.md: every "design.md §N" the repository cites exists, and the family tables name every model type
of the adapter table."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from hf_fam.modeling.fam_adapters import supported_model_types

ROOT = Path(__file__).resolve().parents[1]


def test_every_design_citation_names_a_section_that_exists():
    design = (ROOT / "docs" / "design.md").read_text()
    sections = set(re.findall(r"^## (\d+)\. ", design, flags=re.M))
    assert {"1", "2", "3", "4"} <= sections
    files = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.ipynb"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    cited = {}
    for name in files:
        path = ROOT / name
        if path.exists():
            for number in re.findall(r"design(?:\.md)? §(\d+)", path.read_text(), flags=re.I):
                cited.setdefault(number, name)
    assert cited, "nothing cites docs/design.md"
    missing = {n: f for n, f in cited.items() if n not in sections}
    assert not missing, f"cited sections missing from docs/design.md: {missing}"


def test_family_tables_name_every_supported_model_type():
    for doc in ("README.md", "docs/architectures.md"):
        text = (ROOT / doc).read_text()
        missing = [t for t in supported_model_types() if f"`{t}`" not in text]
        assert not missing, f"{doc} does not list {missing}"
