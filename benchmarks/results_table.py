"""Prints the markdown table of docs/results.md from the JSON results of benchmarks/imagewoof-results.sh."""

import json
import sys
from pathlib import Path

ROWS = [("rded-stored", "RDED", "stored soft labels"), ("rded-online", "RDED", "observer online (authors' way)"),
        ("random-soft", "random real", "stored soft labels"), ("random-hard", "random real", "hard labels")]


def main(out: Path) -> None:
    print("| IPC | data | labels | top-1 % | top-5 % | train s | total s |")
    print("|---|---|---|---|---|---|---|")
    for ipc in (1, 10, 50):
        for stem, data, labels in ROWS:
            path = out / f"{stem}-ipc{ipc}.json"
            if path.is_file():
                r = json.loads(path.read_text())
                print(f"| {ipc} | {data} | {labels} | {100 * r['top1']:.1f} | {100 * r['top5']:.1f} | "
                      f"{r['train_seconds']:.0f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "out/imagewoof-results"))
