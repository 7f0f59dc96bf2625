"""docs/reference-model.md: every section the code cites exists, and the key lists it names are in the repo.

Docstrings and comments cite the published model's design as "docs/reference-model.md §4.6"
(older ones as "REFERENCE.md §4.6" or "REFERENCE §8", the same numbering), ranges as "§4.2-§4.4"
and pitfalls as "§11.3" (item 3 of §11's numbered list). A renumbered or deleted section would
leave those citations pointing at nothing; this test catches it.
"""
from __future__ import annotations

import re
from repo_files import ROOT, read_text, repo_files

DOC = ROOT / "docs" / "reference-model.md"
_CITATION = re.compile(r"(?:reference-model\.md|REFERENCE(?:\.md)?)(?:'s)? (§[0-9.]*[0-9](?:\s*-\s*§[0-9.]*[0-9])?)")


def doc_sections(text: str) -> set[str]:
    """Section numbers of the doc: its numbered headings ("4", "4.6") and §11's list items ("11.3")."""
    sections = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, re.MULTILINE))
    pitfalls = text.split("\n## 11.", 1)[1].split("\n## ", 1)[0]
    sections |= {f"11.{n}" for n in re.findall(r"^(\d+)\. ", pitfalls, re.MULTILINE)}
    return sections


def test_doc_keeps_the_cited_numbering():
    """The numbering the code relies on: §1-§13, §4.1-§4.10, §5.1-§5.4, §10.1-§10.2, §11.1-§11.10."""
    expected = ({str(n) for n in range(1, 14)} | {f"4.{n}" for n in range(1, 11)} | {f"5.{n}" for n in range(1, 5)}
                | {"10.1", "10.2"} | {f"11.{n}" for n in range(1, 11)})
    assert doc_sections(DOC.read_text(encoding="utf-8")) == expected


def test_every_citation_names_an_existing_section():
    """Each "§N" after a reference-doc name in a tracked file is a section of docs/reference-model.md."""
    sections = doc_sections(DOC.read_text(encoding="utf-8"))
    cited, missing = 0, []
    for path in repo_files():
        text = read_text(path)
        if text is None or path == DOC:
            continue
        for match in _CITATION.finditer(text):
            for number in re.findall(r"§([0-9.]*[0-9])", match.group(1)):
                cited += 1
                if number not in sections:
                    missing.append(f"{path.relative_to(ROOT)}: {match.group(0)}")
    assert cited > 0 and not missing, missing


def test_key_lists_named_by_the_doc_are_in_the_repo():
    """Every tests/data/reference/*.txt the doc names exists, and the doc names all of them."""
    named = set(re.findall(r"tests/data/reference/(\w+\.txt)", DOC.read_text(encoding="utf-8")))
    present = {p.name for p in (ROOT / "tests" / "data" / "reference").glob("*.txt")}
    assert named == present and len(present) == 8
