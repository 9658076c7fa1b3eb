"""The shape of the house (issue 20): no import cycle, small modules, DEVELOPERS.md's layout table
drawn from the code (``scripts/layout_table.py``)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _layout():
    spec = importlib.util.spec_from_file_location("layout_table", ROOT / "scripts" / "layout_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scanner_finds_a_cycle(tmp_path, monkeypatch):
    layout = _layout()
    pkg = tmp_path / "src" / "preftune"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""pkg."""\n')
    (pkg / "a.py").write_text('"""a."""\n\ndef f():\n    from preftune.b import g  # lazy: counts too\n')
    (pkg / "b.py").write_text('"""b."""\nfrom preftune import a\n')
    (pkg / "c.py").write_text('"""c."""\nfrom .a import f\n')
    monkeypatch.setattr(layout, "PACKAGE", pkg)
    assert layout.cycles() == [["preftune.a", "preftune.b"]]
    (pkg / "a.py").write_text('"""a."""\n\ndef f():\n    return 1\n')
    assert layout.cycles() == []
    assert [(path, level) for path, level, _ in layout.rows()] == [("__init__.py", 0), ("a.py", 0), ("b.py", 1),
                                                                  ("c.py", 1)]


def test_no_import_cycle():
    assert _layout().cycles() == []


def test_no_module_over_400_lines():
    assert _layout().long_modules(400) == []


def test_developers_layout_table_is_drawn_from_the_code():
    layout = _layout()
    doc = (ROOT / "DEVELOPERS.md").read_text()
    assert layout.BEGIN in doc and layout.END in doc
    embedded = doc.split(layout.BEGIN, 1)[1].split(layout.END, 1)[0].strip()
    assert embedded == layout.table(), "DEVELOPERS.md is out of date: python3 scripts/layout_table.py --write"
