"""The design notes every module and the README cite exist, and are cited by their real path."""
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_every_design_reference_points_at_docs_design():
    assert (REPO / "docs" / "DESIGN.md").is_file()
    files = [REPO / "README.md", *sorted((REPO / "influence").rglob("*.py"))]
    bare = []
    for path in files:
        for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            for m in re.finditer(r"[\w./-]*DESIGN\.md", line):
                if not m.group(0).endswith("docs/DESIGN.md"):
                    bare.append(f"{path.relative_to(REPO)}:{no}: {m.group(0)}")
    assert not bare, "cite docs/DESIGN.md: " + "; ".join(bare)


def test_readme_links_resolve():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    missing = [target for target in re.findall(r"\]\(([^)#:]+)\)", text) if not (REPO / target).exists()]
    assert not missing, missing
