"""Curves of a GlimpsePrune+ run from its ``train_summary.json``: rollout reward (mean over a moving window of steps),
KL to the adapter-disabled model, and the periodic held-out exact match, as a PNG (matplotlib, the `bench` extra) and a
markdown table on stdout.

    python benchmarks/stage2_curves.py runs/stage2_world/train_summary.json --png results/stage2_world/curves.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def moving(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("summary", help="train_summary.json of a stage-2 run")
    ap.add_argument("--png", help="write the plot here")
    ap.add_argument("--window", type=int, default=20, help="steps in the reward / KL moving average")
    args = ap.parse_args()
    s = json.loads(Path(args.summary).read_text())
    hist, evals = s["history"], s["evals"]
    steps = [h["step"] for h in hist]
    reward = moving([h["reward"] for h in hist], args.window)
    kl = moving([h["kl"] for h in hist], args.window)
    print("| step | exact match (held-out, greedy, pruned) | kept | rollout reward (moving mean) | KL |")
    print("|---|---|---|---|---|")
    for e in evals:
        i = min(range(len(steps)), key=lambda j: abs(steps[j] - e["step"])) if steps else None
        r = f"{reward[i]:.3f}" if i is not None and e["step"] > 0 else "-"
        k = f"{kl[i]:.4f}" if i is not None and e["step"] > 0 else "-"
        print(f"| {e['step']} | {e['exact_match']:.4f} | {e['kept_frac']:.4f} | {r} | {k} |")
    if args.png:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("no plot: pip install matplotlib", file=sys.stderr)
            return 0
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, reward, label=f"rollout reward (T = 1, mean of {args.window} steps)")
        ax.plot([e["step"] for e in evals], [e["exact_match"] for e in evals], "o-", label="held-out exact match "
                "(greedy, pruned)")
        ax.set_xlabel("GRPO step")
        ax.set_ylabel("reward / accuracy")
        ax.grid(alpha=0.3)
        ax2 = ax.twinx()
        ax2.plot(steps, kl, color="grey", alpha=0.5, label="KL to the base (k3)")
        ax2.set_ylabel("KL")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="lower right", fontsize=8)
        fig.tight_layout()
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.png, dpi=110)
        print(f"wrote {args.png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
