"""docs/families.md: its capability table is generated from the family records, and the test fails when they
disagree (a record that gains or loses a capability cannot leave the page behind)."""

from __future__ import annotations

from dataclasses import replace

from conftest import load_script

from sdexplore import families
from sdexplore.families import CAPABILITIES, FAMILIES


def _row(table: str, name: str) -> list[str]:
    line = next(x for x in table.splitlines() if f"| `{name}` |" in x)
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_the_page_table_is_the_records() -> None:
    docs = load_script("docs_families")
    assert docs.main(["--check"]) == 0, "run python scripts/docs_families.py"
    table = docs.render()
    assert table in docs.PAGE.read_text(encoding="utf-8")
    for name, fam in FAMILIES.items():
        marks = _row(table, name)[4:]  # after family, name, pipelines, latent channels
        assert marks == [docs.YES if fam.can(c) else docs.NO for c in CAPABILITIES], name
    for capability in CAPABILITIES:
        assert f"| `{capability}` | " in table


def test_a_changed_record_fails_the_check(monkeypatch, capsys) -> None:
    docs = load_script("docs_families")
    sana = FAMILIES["sana"]
    changed = dict(FAMILIES, sana=replace(sana, capabilities=sana.capabilities - {"attention"}))
    monkeypatch.setattr(families, "FAMILIES", changed)
    table = docs.render()
    assert _row(table, "sana")[4 + list(CAPABILITIES).index("attention")] == docs.NO
    assert docs.main(["--check"]) == 1 and "run python scripts/docs_families.py" in capsys.readouterr().err
