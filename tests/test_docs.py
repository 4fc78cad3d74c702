"""Docs hygiene: the README stays inside the repository and lists every example."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_readme_lists_every_example():
    missing = [p.name for p in sorted((REPO / "examples").glob("*.py")) if f"examples/{p.name}" not in README]
    assert not missing, f"examples not listed in README.md: {missing}"


def test_readme_points_only_inside_the_repository():
    links = re.findall(r"\]\(([^)#]+)\)", README)  # markdown links
    paths = re.findall(r"`((?:\.\./|docs/|examples/|tests/|slurm/|scripts/)[\w./-]+\.\w+)", README)
    outside = [p for p in links + paths if p.startswith("../") or p.startswith("/")]
    assert not outside, f"README.md points outside the repository: {outside}"
    absent = [p for p in links + paths if not p.startswith("http") and not (REPO / p).exists()]
    assert not absent, f"README.md names files that do not exist: {absent}"
