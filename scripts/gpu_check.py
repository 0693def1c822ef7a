"""One call that checks the toolkit on a GPU machine: ``python -m scripts.gpu_check``.

Parts, each with a wall-clock budget (about 9 minutes in all on one H100):

1. ``tests``   the suite's ``gpu``-marked tests (tests/test_gpu.py), 120 s;
2. ``resume``  exact resume of every optimizer and callback (tests/test_contract.py's resume
               tests, which run on CUDA when it is there), 150 s;
3. ``recipes`` every recipe for a few steps on CUDA through the toolkit CLI, bf16-mixed
               unless the recipe sets its own precision, 4 at a time, 180 s;
4. ``benches`` the GPU bench cases (scripts/bench_cases/cuda.py: muon step, DP-SGD LM step,
               compiled LM step) and, with 2+ GPUs, an FSDP2 vs DDP Muon fit on all of them, 120 s.

Results go to ``docs/results/gpu/<part>.json`` and ``docs/results/gpu/summary.md`` (a table
with the device name). Without CUDA it says so, checks its own plan (every recipe exists and
parses, every bench case and every referenced test exists) and exits 0; ``--dry-run`` does
that anywhere (tests/test_gpu_check.py runs it in CI).
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "results" / "gpu"
BUDGET_S = {"tests": 120, "resume": 150, "recipes": 180, "benches": 120}
GPU_TESTS = ["tests/test_gpu.py"]
RESUME_TESTS = ["tests/test_contract.py::test_every_optimizer_resumes_bitwise_mid_epoch",
                "tests/test_contract.py::test_every_callback_resumes_bitwise_mid_epoch"]
BENCH_CASES = ["cuda-muon-step", "cuda-dp-lm-step", "cuda-compile-lm-step"]
CPU_COUNTERPARTS = ["muon-step", "dp-lm-step-16", "fsdp-muon-step", "compile-lm-step"]
RECIPE_STEPS = 3


def recipes() -> list[Path]:
    return sorted((ROOT / "recipes").glob("*.yaml"))


# ---- the plan, checked without a GPU -----------------------------------------------------
def check_plan() -> list[str]:
    """Problems with this script's plan (empty: every referenced piece exists)."""
    problems = []
    for r in recipes():
        try:
            cfg = yaml.safe_load(r.read_text())
        except yaml.YAMLError as e:
            problems.append(f"{r.name}: does not parse ({e})")
            continue
        if not isinstance(cfg, dict) or "model" not in cfg:
            problems.append(f"{r.name}: no model section")
            continue
        for path in _class_paths(cfg):
            mod, _, name = path.rpartition(".")
            try:
                if not hasattr(__import__(mod, fromlist=[name]), name):
                    problems.append(f"{r.name}: {path} does not exist")
            except ImportError as e:
                problems.append(f"{r.name}: {path} does not import ({e})")
    from scripts.harness import CASES, load_cases
    load_cases()
    problems += [f"bench case {c} is not registered" for c in BENCH_CASES + CPU_COUNTERPARTS
                 if c not in CASES]
    for ref in GPU_TESTS + RESUME_TESTS:
        path, _, func = ref.partition("::")
        if not (ROOT / path).is_file():
            problems.append(f"{path} does not exist")
        elif func and func not in _functions(ROOT / path):
            problems.append(f"{ref} does not exist")
    return problems


def _class_paths(node) -> list[str]:
    if isinstance(node, dict):
        own = [node["class_path"]] if isinstance(node.get("class_path"), str) else []
        return own + [p for v in node.values() for p in _class_paths(v)]
    if isinstance(node, list):
        return [p for v in node for p in _class_paths(v)]
    return []


def _functions(path: Path) -> set[str]:
    return {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}


# ---- the parts, on a GPU -----------------------------------------------------------------
def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _run(cmd: list[str], budget: float, cwd: Path = ROOT) -> dict:
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=budget)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = "timeout", (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else str(e.stdout or "")
    return {"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.time() - t0, 1), "tail": out[-3000:]}


def _pytest(targets: list[str], budget: float) -> dict:
    res = _run([sys.executable, "-m", "pytest", *targets, "-q", "-rfEs", "-p", "no:cacheprovider",
                f"--timeout={int(budget)}"], budget + 30)
    last = [ln for ln in res["tail"].splitlines() if " in " in ln and ("passed" in ln or "failed" in ln)]
    res["result"] = last[-1] if last else "no summary"
    return res


def part_tests() -> dict:
    return _pytest(GPU_TESTS + ["-m", "gpu"], BUDGET_S["tests"])


def part_resume() -> dict:
    return _pytest(RESUME_TESTS, BUDGET_S["resume"])


def _stand_ins(work: Path) -> tuple[Path, Path]:
    """An MNIST-format folder and a tiny LM checkpoint, as tests/test_cli.py runs the recipes:
    a few steps need no real digits, and the GPU machine need not hold the data."""
    from tests.helpers import write_fake_mnist, write_tiny_lm_checkpoint
    work.mkdir(parents=True, exist_ok=True)
    return (write_fake_mnist(work / "mnist", n_train=1200, n_test=100),
            write_tiny_lm_checkpoint(work / "tiny_lm.ckpt"))


def _recipe(path: Path, work: Path, deadline: float, stand_ins: tuple[Path, Path]) -> dict:
    from tests.test_cli import data_overrides, model_overrides
    name = path.stem
    budget = min(90.0, deadline - time.time())
    if budget < 20:
        return {"recipe": name, "rc": "skipped", "why": "the part's time budget ran out"}
    cfg = yaml.safe_load(path.read_text())
    # the recipes say 32-true for CPU speed; on a GPU bf16-mixed, except under DP-SGD, whose
    # mechanism arithmetic is fp32+ and which keeps the recipe's own precision
    dp = any("DPSGD" in p for p in _class_paths(cfg))
    precision = (cfg.get("trainer") or {}).get("precision", "32-true") if dp else "bf16-mixed"
    cmd = [sys.executable, "-m", "toolkit", "fit", "--config", str(path), "--trainer.max_steps",
           str(RECIPE_STEPS), "--trainer.accelerator", "cuda", "--trainer.devices", "1",
           "--trainer.precision", str(precision), "--trainer.limit_val_batches", "1",
           "--trainer.val_check_interval", str(RECIPE_STEPS), "--trainer.check_val_every_n_epoch", "null",
           *data_overrides(path, stand_ins[0]), *model_overrides(path, stand_ins[1])]
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    res = _run(cmd, budget, cwd=d)
    return {"recipe": name, "precision": precision, **res}


def part_recipes() -> dict:
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "gpu_check_recipes"
    t0, stand_ins = time.time(), _stand_ins(work)
    with ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(_recipe, r, work, t0 + BUDGET_S["recipes"], stand_ins) for r in recipes()]
        results = [f.result() for f in futs]
    ok = sum(r["rc"] == 0 for r in results)
    return {"result": f"{ok}/{len(results)} recipes ran {RECIPE_STEPS} steps on CUDA (stand-in data)",
            "seconds": round(time.time() - t0, 1), "recipes": results}


def part_benches() -> dict:
    import torch
    out = {}
    t0 = time.time()
    per = BUDGET_S["benches"] / (len(BENCH_CASES) + 1)
    for case in BENCH_CASES:
        res = _run([sys.executable, "-m", "scripts.bench", case, "--reps", "10", "--out",
                    str(OUT / "bench")], per)
        f = OUT / "bench" / f"{case}.json"
        out[case] = json.loads(f.read_text()) if res["rc"] == 0 and f.exists() else res
    n = torch.cuda.device_count()
    if n >= 2:  # FSDP2 vs DDP on every visible GPU, through the CLI
        for strategy in ("fsdp2", "ddp"):
            out[f"fsdp-muon-fit-{strategy}"] = _run(
                [sys.executable, "-m", "toolkit", "fit", "--config", str(ROOT / "recipes" / "muon_lm.yaml"),
                 "--trainer.max_steps", "30", "--trainer.accelerator", "cuda", "--trainer.devices", str(n),
                 "--trainer.strategy", strategy, "--trainer.limit_val_batches", "0"], per / 2, cwd=OUT)
    else:
        out["fsdp-muon-step"] = {"rc": "skipped", "why": f"{n} GPU visible: FSDP2 needs 2 or more"}
    return {"result": ", ".join(f"{k}: {_ratio(v)}" for k, v in out.items()),
            "seconds": round(time.time() - t0, 1), "cases": out}


def _ratio(res: dict) -> str:
    if "ratio_vs" in res:
        return " ".join(f"ours/{k}={v:.2f}" for k, v in res["ratio_vs"].items())
    if res.get("rc") == 0:
        return f"ok in {res['seconds']} s"
    return f"{res.get('rc')} ({res.get('why', 'see json')})"


PARTS = {"tests": part_tests, "resume": part_resume, "recipes": part_recipes, "benches": part_benches}


def device_line() -> str:
    import torch
    props = torch.cuda.get_device_properties(0)
    return (f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()} (sm_{props.major}{props.minor}, "
            f"{props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}")


def summary(device: str, results: dict) -> str:
    rows = [f"# GPU check\n\nDevice: {device}\n", "| part | result | seconds | budget |",
            "|---|---|---|---|"]
    for name, res in results.items():
        rows.append(f"| {name} | {res.get('result', res.get('rc'))} | {res.get('seconds', '')} | "
                    f"{BUDGET_S[name]} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="check the plan only")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {list(PARTS)}")
    args = ap.parse_args(argv)
    import torch
    problems = check_plan()
    for p in problems:
        print(f"plan: {p}")
    if args.dry_run or not torch.cuda.is_available():
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device here; checked the plan only")
        n = len(recipes())
        print(f"plan: {n} recipes, {len(BENCH_CASES)} GPU bench cases, "
              f"{len(GPU_TESTS + RESUME_TESTS)} test targets: {'ok' if not problems else 'PROBLEMS'}")
        return 1 if problems else 0
    OUT.mkdir(parents=True, exist_ok=True)
    device, results = device_line(), {}
    print(f"gpu_check on {device}", flush=True)
    for name in args.parts.split(","):
        t0 = time.time()
        results[name] = PARTS[name]()
        results[name]["device"] = device
        (OUT / f"{name}.json").write_text(json.dumps(results[name], indent=2, default=str))
        print(f"[{time.time() - t0:6.1f}s] {name}: {results[name].get('result')}", flush=True)
    text = summary(device, results)
    (OUT / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
