"""The files that let other readers take a run directory as it is, written beside its shards by every run
and every slice:

    README.md     a Hugging Face dataset card: its YAML makes `datasets.load_dataset(DIR)` read the image
                  shards alone (the `train` split) with `cls` a ClassLabel of the run's class names, and a
                  body saying what the set is and how to load it, soft labels included
    _info.json    timm's `wds/` reader's split file: `create_dataset("wds/x", root=DIR, split="train")`

Both are derived from the manifest (and the provenance of the first image shard, for the card's schema);
they change no shard byte and the manifest does not hash them. Imports only rded.tario (its key rule and
atomic writes): rundir, staging and distill call it, so it takes the manifest structurally (`ManifestLike`)
rather than importing rded.rundir (which would make an import cycle with rundir's `slice_run`).
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, Union

from .tario import split_name, write_bytes_atomic

CARD = "README.md"
TIMM_INFO = "_info.json"
CARD_FILES = (CARD, TIMM_INFO)  # in the order a run publishes them, after its shards
IMAGE_SHARDS = "distilled-*.tar"  # the card's train split: never the labels-*.tar beside them
SPLIT = "train"


class ShardLike(Protocol):
    name: str
    tier: int
    samples: int


class ClassLike(Protocol):
    index: int
    name: str
    images: int


class ManifestLike(Protocol):
    """What the cards read of a manifest (rded.rundir.Manifest)."""

    ipc: int
    tiers: list[int]
    images: int
    labels: dict[str, Any] | None
    sliced_from: dict[str, Any] | None
    job: dict[str, Any]

    @property  # read-only members, so that a manifest's lists of records satisfy them
    def classes(self) -> Sequence[ClassLike]: ...

    @property
    def shards(self) -> Sequence[ShardLike]: ...

    @property
    def resolution(self) -> int: ...

    @property
    def image_format(self) -> str: ...


# A Hugging Face feature schema of JSON values: a dtype name, None (only nulls seen), [element], {field: schema}
Schema = Union[str, None, list, dict]


class _Conflict(ValueError):
    """Values of one field whose types no single feature holds (the card then leaves the provenance out)."""


# -- classes

def class_count(manifest: ManifestLike) -> int:
    """The size of the run's class-index space. Classes keep their data set index (`.cls`), which need not
    be 0..C-1 here (data.class_subset): the space runs to the highest index, or to the soft labels' width
    (the data set's class count) when the run has labels, so a model head and a ClassLabel cover every `.cls`."""
    highest = max((c.index for c in manifest.classes), default=-1) + 1
    return max(highest, int((manifest.labels or {}).get("classes", 0)))


def class_names(manifest: ManifestLike) -> list[str]:
    """The names by class index, 0..class_count-1: an index with no class in the run is `unused-<i>`, and
    names that occur more than once (ImageNet has two "crane") get their index appended, since a ClassLabel
    needs distinct names."""
    names = [f"unused-{i}" for i in range(class_count(manifest))]
    for c in manifest.classes:
        names[c.index] = c.name
    for _ in range(len(names) + 1):
        seen: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            seen.setdefault(name, []).append(i)
        repeated = [i for group in seen.values() if len(group) > 1 for i in group]
        if not repeated:
            return names
        for i in repeated:
            names[i] = f"{names[i]} ({i})"
    raise AssertionError("class names could not be made distinct")  # each round lengthens every repeated name


# -- the provenance's schema, as Hugging Face would infer it

def infer_schema(value: Any) -> Schema:
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int64"
    if isinstance(value, float):
        return "float64"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        element: Schema = None
        for item in value:
            element = merge_schema(element, infer_schema(item))
        return [element]
    if isinstance(value, dict):
        return {str(k): infer_schema(v) for k, v in value.items()}
    raise _Conflict(f"no feature for {type(value).__name__}")


def merge_schema(a: Schema, b: Schema) -> Schema:
    """One schema that holds values of both (a field missing from some samples is null there)."""
    if a is None or a == b:
        return b
    if b is None:
        return a
    if isinstance(a, str) and isinstance(b, str) and {a, b} == {"int64", "float64"}:
        return "float64"
    if isinstance(a, list) and isinstance(b, list):
        return [merge_schema(a[0], b[0])]
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: merge_schema(a.get(k), b.get(k)) for k in sorted({*a, *b})}
    raise _Conflict(f"{a!r} and {b!r}")


def provenance_schema(run_dir: Path, manifest: ManifestLike) -> Schema:
    """The schema of the `.json` provenance over the samples of the first image shard (a run writes one
    kind of record: refined or not, its images' records have the same fields), or None when there is none
    or no single schema holds it. The card must declare it: once a card declares features, Hugging Face
    infers none and drops the fields it does not declare."""
    if not manifest.shards:
        return None
    schema: Schema = None
    try:
        with tarfile.open(Path(run_dir) / manifest.shards[0].name) as tar:
            for member in tar:
                if member.isfile() and (split_name(member.name) or ("", ""))[1] == "json":
                    schema = merge_schema(schema, infer_schema(json.load(tar.extractfile(member))))
    except _Conflict:
        return None
    return schema if isinstance(schema, dict) else None


# -- README.md

def _q(text: str) -> str:
    """A YAML double-quoted scalar (a JSON string is one)."""
    return json.dumps(text, ensure_ascii=False)


def type_yaml(schema: Schema, indent: int) -> list[str]:
    """A feature's type in the card's YAML form (that of datasets' Features._to_yaml_list): `dtype: x`,
    `struct:` and `list:` followed by named fields, or `list:` over a nested type. A field seen only as
    null is a string."""
    pad = " " * indent
    if isinstance(schema, dict):
        return [f"{pad}struct:"] + [line for k in sorted(schema) for line in feature_yaml(k, schema[k], indent)]
    if isinstance(schema, list):
        element = schema[0]
        if isinstance(element, dict):
            return [f"{pad}list:"] + [line for k in sorted(element) for line in feature_yaml(k, element[k], indent)]
        if isinstance(element, list):
            return [f"{pad}list:"] + type_yaml(element, indent + 2)
        return [f"{pad}list: {element or 'string'}"]
    return [f"{pad}dtype: {schema or 'string'}"]


def feature_yaml(name: str, schema: Schema, indent: int) -> list[str]:
    """A named feature, an item of a YAML list at `indent`."""
    return [f"{' ' * indent}- name: {_q(name)}"] + type_yaml(schema, indent + 2)


def _size_category(n: int) -> str:
    for bound, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < bound:
            return label
    return "10M<n<100M"


def front_matter(manifest: ManifestLike, names: list[str], provenance: Schema) -> list[str]:
    """The card's YAML: hub metadata, the one config whose train split is the image shards, and the
    features (the image, `cls` as a ClassLabel, the provenance, the sample's key and shard) in the order
    datasets would infer them. No `splits`: datasets wants their Arrow size, which only it knows."""
    lines = ["---", f"pretty_name: {_q(f'RDED distilled set, IPC {manifest.ipc}')}",
             "task_categories:", "- image-classification",
             "tags:", "- dataset-distillation", "- rded", "- webdataset",
             "size_categories:", f"- {_q(_size_category(manifest.images))}",
             "configs:", "- config_name: default", "  data_files:", f"  - split: {SPLIT}",
             f"    path: {_q(IMAGE_SHARDS)}",
             "dataset_info:", "  config_name: default", "  features:",
             f"  - name: {_q(manifest.image_format)}", "    dtype: image",
             f"  - name: {_q('cls')}", "    dtype:", "      class_label:", "        names:"]
    lines += [f"          {_q(str(i))}: {_q(name)}" for i, name in enumerate(names)]
    if provenance is not None:
        lines += feature_yaml("json", provenance, 2)
    return lines + [f"  - name: {_q('__key__')}", "    dtype: string", f"  - name: {_q('__url__')}", "    dtype: string",
                    "---"]


def _made(manifest: ManifestLike) -> str:
    """How each image was made, from the job."""
    distill, observer = manifest.job.get("distill", {}), manifest.job.get("observer", {})
    size = f"{manifest.resolution}x{manifest.resolution} {manifest.image_format}"
    if distill.get("method", "rded") != "rded":  # the baseline: whole real images
        return (f"a uniform random draw of the source images (the baseline RDED is measured against), each its "
                f"centre square at {size}")
    factor = distill.get("factor", 1)
    grid = f"a {factor}x{factor} grid of the patches" if factor > 1 else "the patch"
    judge = observer.get("arch") or observer.get("kind") or "the observer"
    return (f"distilled by [RDED](https://arxiv.org/abs/2312.03526). Each image ({size}) is {grid} of one "
            f"class that the observer ({judge}) scored most realistic")


def _what(manifest: ManifestLike, names: list[str]) -> list[str]:
    """The body's opening: what the set is, its tiers and its classes."""
    tiers = ", ".join(map(str, manifest.tiers))
    lines = [f"# RDED distilled set: IPC {manifest.ipc}, {len(manifest.classes)} classes", "",
             f"{manifest.images} images, up to {manifest.ipc} per class (IPC {manifest.ipc}) of "
             f"{len(manifest.classes)} classes, made with `rded`, {_made(manifest)}.", "",
             f"Tiers {tiers}: the first K images of every class (tier K) are themselves a set of IPC K, whole "
             "shards that `rded slice RUN --ipc K --out DIR` copies."]
    if manifest.sliced_from:
        lines += ["", f"This set was cut by `rded slice` from a run of IPC {manifest.sliced_from['ipc']} "
                      f"(tiers {', '.join(map(str, manifest.sliced_from['tiers']))})."]
    if len(names) != len(manifest.classes) or any(names[c.index] != c.name for c in manifest.classes):
        lines += ["", f"`cls` is the class's index in the source data set ({len(names)} classes): the names "
                      "cover every index, an index with no class in this set is named `unused-<i>`, and a name "
                      "that several classes share carries the index in parentheses."]
    return lines


def _how(manifest: ManifestLike, n_classes: int) -> list[str]:
    """The body's loading instructions and the soft labels."""
    ext = manifest.image_format
    lines = ["", "## Loading", "", "```python",
             "import datasets                     # Hugging Face: the image shards only, cls a ClassLabel",
             'ds = datasets.load_dataset("path/to/this/folder", split="train")',
             "", "import webdataset as wds          # any WebDataset reader",
             f'ds = wds.WebDataset("distilled-{{000000..{max(len(manifest.shards) - 1, 0):06d}}}.tar", '
             f'shardshuffle=False).decode("pil").to_tuple("{ext}", "cls", "json")',
             "", "import timm.data                   # timm's wds reader, by split name (_info.json)",
             'ds = timm.data.create_dataset("wds/rded", root="path/to/this/folder", split="train")',
             "```", "",
             f"timm's `train.py`: `--dataset wds/ --data-dir path/to/this/folder --train-split train "
             f"--num-classes {n_classes}` (the set has no validation split: pass your own or `--val-split ''`)."]
    if manifest.labels:
        views, fmt = manifest.labels.get("views"), manifest.labels.get("format")
        lines += ["", "## Soft labels", "",
                  f"`labels-NNNNNN.tar` beside each image shard holds the soft labels of the same samples under "
                  f"the same keys ({fmt}): for each image the observer's log-probabilities on {views} stored "
                  "training views (one per epoch) and on each grid cell. They are not rows of the `train` split. "
                  "Read them with `rded`, which gives each image after its stored view for the epoch and the "
                  "observer's probabilities for exactly that view:", "", "```python",
                  "from rded import DistilledDataset", "",
                  'ds = DistilledDataset("path/to/this/folder", temperature=20.0)',
                  "ds.set_epoch(epoch)", "image, soft_label = ds[i]", "```"]
    lines += ["", "## Files", "",
              "`manifest.json` records the job, the classes and each shard's sha256 (`rded.verify_run` checks "
              "them); `samples.tsv` accounts for every input sample. This card and `_info.json` are made from "
              "the manifest and are not hashed. The images are made of patches of the source data set's images: "
              "its license applies.", ""]
    return lines


def card_text(run_dir: Path, manifest: ManifestLike) -> str:
    names = class_names(manifest)
    lines = front_matter(manifest, names, provenance_schema(run_dir, manifest))
    return "\n".join(lines + _what(manifest, names) + _how(manifest, len(names)))


# -- _info.json

def timm_info(manifest: ManifestLike) -> dict[str, Any]:
    """timm's wds split file (timm.data.readers.reader_wds): the split by name, its shards in order with
    their sample counts; `num_classes` is for the model head (timm's reader itself ignores it)."""
    return {"name": f"rded-ipc{manifest.ipc}", "num_classes": class_count(manifest),
            "splits": {SPLIT: {"name": SPLIT, "num_samples": manifest.images,
                               "filenames": [s.name for s in manifest.shards],
                               "shard_lengths": [s.samples for s in manifest.shards]}}}


# -- writing

def write_cards(run_dir: Path, manifest: ManifestLike) -> list[str]:
    """README.md and _info.json for the run or slice whose shards are in `run_dir` (a run's staging folder
    or a slice's directory); the names written."""
    run_dir = Path(run_dir)
    write_bytes_atomic(run_dir / CARD, card_text(run_dir, manifest).encode())
    write_bytes_atomic(run_dir / TIMM_INFO, (json.dumps(timm_info(manifest), indent=2, sort_keys=True) + "\n").encode())
    return list(CARD_FILES)
