"""The README's code example runs as written, and CI runs the README's test command."""
import re
from pathlib import Path

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
