"""The README is a front page: its code example runs as written, CI runs its test command, its
links into docs/ resolve, it links every page of the docs site, and it stays short (the
reference lives in docs/)."""
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_own_module_example_trains(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    block = README.split("<!-- example: own-module")[1]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    trainer, model, x, y = (scope[k] for k in ("trainer", "model", "x", "y"))
    assert trainer.global_step == 5 * 16
    accuracy = (model.net(x).argmax(1) == y).float().mean()
    assert accuracy > 0.9  # chance is about 1/3


def test_ci_runs_the_readme_test_command():
    command = re.search(r"# the tests:.*\n(.*)\n", README).group(1).strip()
    assert command in (ROOT / ".ci" / "run").read_text()


def test_the_fast_lane_it_names_exists():
    assert 'python -m pytest -m "not slow"' in README
    assert '"slow:' in (ROOT / "pyproject.toml").read_text()


def test_links_into_docs_resolve():
    links = re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", README)
    assert links
    missing = [l for l in links if not (ROOT / l).is_file()]
    assert not missing, f"README links to missing pages {missing}"


def _nav_pages(nav) -> list[str]:
    out = []
    for entry in nav:
        for value in entry.values():
            out += _nav_pages(value) if isinstance(value, list) else [value]
    return out


def test_it_links_every_page_of_the_site():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    pages = [p for p in _nav_pages(nav) if not p.startswith("api/") and p != "index.md"]
    unlinked = [p for p in pages if f"(docs/{p}" not in README]
    assert not unlinked, f"pages of the site the README does not link: {unlinked}"


def test_every_docs_page_is_on_the_site():
    nav = set(_nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]))
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")
             if "figures" not in p.parts}
    assert not pages - nav, f"pages under docs/ missing from mkdocs.yml's nav: {sorted(pages - nav)}"


def test_it_stays_a_front_page():
    # the DP-SGD sections are moving to docs/dp.md; everything else is the front page
    front = re.split(r"(?m)^## Differential privacy", README)[0]
    assert len(front.splitlines()) <= 200
    assert "<!-- recipe-table:begin" in README and "<!-- recipe-table:end -->" in README
