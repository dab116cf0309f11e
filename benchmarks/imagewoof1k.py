"""The 1,000-class form of ImageWoof: the same shards with each `.cls` written as the breed's ImageNet
index (classes.json's `imagenet_index`), and a job whose classes are EfficientNet-Lite0's 1,000 ImageNet
outputs (no `data.classes`, no class map). Used by benchmarks/imagewoof1k-results.sh (docs/results.md).

    .venv/bin/python benchmarks/imagewoof1k.py ../shared/data/imagewoof OUT_DIR     # writes OUT_DIR/{train,val}-*.tar, OUT_DIR/job.toml
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rded.synthetic import remap_labels

JOB = """# ImageWoof with ImageNet labels: the classes are the observer's 1,000 outputs; 990 of them have no data.
[data]
train = "train-{{000000..{last:06d}}}.tar"

[distill]
ipc = 10
subset = 300
crops = 5
factor = 2
resolution = 224
score_mode = "pad"
seed = 0

[observer]
kind = "efficientnet-lite0"

[runtime]
batch_size = 64
"""


def main(src: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    mapping = {int(c["index"]): int(c["imagenet_index"]) for c in json.loads((src / "classes.json").read_text())}
    train = sorted(src.glob("train-*.tar"))
    for path in train + sorted(src.glob("val-*.tar")):
        if not (out / path.name).is_file():
            remap_labels(path, out / path.name, mapping)
    (out / "job.toml").write_text(JOB.format(last=len(train) - 1))
    print(f"{out}: {len(train)} train shards with ImageNet labels {sorted(mapping.values())}; job {out / 'job.toml'}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
