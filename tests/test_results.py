"""Measured numbers have one source, docs/results/<recipe>.json: the README recipe table (and
docs/recipes.md), every recipe header's "Measured" block and the docs/benchmarks.md table are
rendered from it (python -m scripts.results)."""
import json
import shutil

import pytest

from scripts import results


def test_readme_and_recipe_headers_agree_with_the_results_json():
    assert results.stale() == [], "run python -m scripts.results"


def test_every_recipe_has_results_and_a_row():
    recipes = {p.stem for p in results.RECIPES.glob("*.yaml")}
    have = set(results.recipe_results())
    assert recipes == have, f"recipes without docs/results json: {sorted(recipes - have)}"
    table = results.readme_table(results.recipe_results())
    assert all(f"| `{name}` |" in table for name in recipes)


def test_a_changed_value_shows_up_everywhere_and_stale_files_are_caught(tmp_path, monkeypatch):
    for sub in ("docs/results", "recipes"):
        shutil.copytree(results.ROOT / sub, tmp_path / sub)
    shutil.copy(results.README, tmp_path / "README.md")
    for page in (results.RECIPE_PAGE, results.BENCH_PAGE):
        shutil.copy(page, tmp_path / "docs" / page.name)
    monkeypatch.setattr(results, "RECIPE_PAGE", tmp_path / "docs/recipes.md")
    monkeypatch.setattr(results, "BENCH_PAGE", tmp_path / "docs/benchmarks.md")
    monkeypatch.setattr(results, "RESULTS", tmp_path / "docs/results")
    monkeypatch.setattr(results, "RECIPES", tmp_path / "recipes")
    monkeypatch.setattr(results, "README", tmp_path / "README.md")
    monkeypatch.setattr(results, "ROOT", tmp_path)
    path = tmp_path / "docs/results/quickstart.json"
    data = json.loads(path.read_text())
    data["values"]["val_loss"] = 1.234
    path.write_text(json.dumps(data))
    assert set(results.stale()) == {tmp_path / "README.md", tmp_path / "docs/recipes.md",
                                    tmp_path / "recipes/quickstart.yaml"}
    results.record("quickstart", {"val_loss": 1.5}, command="python -m toolkit fit --config x")
    assert results.stale() == []
    assert "val loss 1.500" in (tmp_path / "README.md").read_text()
    assert "val loss 1.500" in (tmp_path / "docs/recipes.md").read_text()
    header = (tmp_path / "recipes/quickstart.yaml").read_text()
    assert "val loss 1.500" in header and "# Reproduce: python -m toolkit fit --config x" in header
    assert "1.661" not in header


def test_a_template_naming_a_missing_value_says_which():
    data = {"recipe": "x", "values": {"a": 1}, "summary": "{b}", "measured": ""}
    with pytest.raises(KeyError, match="'summary' uses 'b', which is not among its values"):
        results.render(data, "summary")


def test_the_bench_table_lists_every_kept_bench_result():
    table = results.bench_table(results.bench_results())
    for name, r in results.bench_results().items():
        for ref, ratio in r["ratio_vs"].items():
            assert f"| `{name}` | {r['ours']} | {ref} |" in table and f"{ratio:.2f}x" in table
