"""Prints the table of docs/results.md ("The paper's recipe") from the JSON results of benchmarks/paper-recipe.sh."""

import json
import sys
from pathlib import Path

ROWS = [("rded-stored", "RDED (`pad`)", "stored soft labels"), ("native-stored", "RDED (`native` scoring)", "stored soft labels"),
        ("refine-stored", "RDED + refine", "stored soft labels"), ("random-soft", "random real", "stored soft labels"),
        ("random-hard", "random real", "hard labels")]


def main(out: Path) -> None:
    print("| IPC | data | labels | final top-1 % (3,929 val) | final top-5 % | best-of top-1 % (epoch) | train s | total s |")
    print("|---|---|---|---|---|---|---|---|")
    for ipc in (1, 10, 50):
        for stem, data, labels in ROWS:
            path = out / f"{stem}-ipc{ipc}.json"
            if path.is_file():
                r = json.loads(path.read_text())
                best = r["best_of"]
                print(f"| {ipc} | {data} | {labels} | {100 * r['top1']:.1f} | {100 * r['top5']:.1f} | "
                      f"{100 * best['top1']:.1f} ({best['epoch']}) | {r['train_seconds']:.0f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "out/paper-recipe"))
