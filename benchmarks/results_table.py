"""Prints a markdown table of docs/results.md from the JSON results of benchmarks/imagewoof-results.sh (the short
CPU recipe, the default OUT) or benchmarks/paper-recipe.sh (the paper's recipe: adds the best-of column)."""

import json
import sys
from pathlib import Path

ROWS = [("rded-stored", "RDED (`pad`)", "stored soft labels"),
        ("rded-online", "RDED (`pad`)", "observer online (authors' way)"),
        ("native-stored", "RDED (`native` scoring)", "stored soft labels"),
        ("refine-stored", "RDED + refine", "stored soft labels"),
        ("random-soft", "random real", "stored soft labels"),
        ("random-hard", "random real", "hard labels")]


def main(out: Path) -> None:
    results = [(ipc, data, labels, json.loads(path.read_text()))
               for ipc in (1, 10, 50) for stem, data, labels in ROWS
               if (path := out / f"{stem}-ipc{ipc}.json").is_file()]
    best_of = any("best_of" in r for *_, r in results)
    columns = ["IPC", "data", "labels"]
    if best_of:  # the paper's-recipe table names the final figure's val sample beside the best-of subset
        columns += [f"final top-1 % ({results[0][3]['val_samples']:,} val)", "final top-5 %", "best-of top-1 % (epoch)"]
    else:
        columns += ["top-1 %", "top-5 %"]
    columns += ["train s", "total s"]
    print("| " + " | ".join(columns) + " |")
    print("|---" * len(columns) + "|")
    for ipc, data, labels, r in results:
        cells = [str(ipc), data, labels, f"{100 * r['top1']:.1f}", f"{100 * r['top5']:.1f}"]
        if best_of:
            best = r.get("best_of")
            cells.append(f"{100 * best['top1']:.1f} ({best['epoch']})" if best else "")
        cells += [f"{r['train_seconds']:.0f}", f"{r['seconds']:.0f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "out/imagewoof-results"))
