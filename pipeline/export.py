"""`rded export`: a finished run or slice in layouts that other tools read, with nothing recomputed.

- `imagefolder`: the RDED authors' layout, `<label:05d>/class<label:05d>_id<id:05d>.jpg` (or .png), which
  torchvision's `ImageFolder` and DD-Ranking's `image_path` read; the shard members' bytes, unchanged.
- `ddranking`: `images.pt` (uint8 [C*IPC, 3, S, S], class-major), `labels.pt` (the class per image) and
  `soft_labels.pt` (per image, the log of its stored views' mean probability at T = 1).
- `arrays`: the per-view labels as plain `.npy` WebDataset members (`<key>.logits.npy`, `<key>.views.npy`) in
  `labels-arrays-NNNNNN.tar`, beside byte-identical copies of the image shards.

Classes are renumbered 0..C-1 over the manifest's classes that have images, by class index; an image's id is
its place in its class in tier order. Every shard read is checked against the manifest's sha256. The export is
built in a hidden folder inside DIR and moved into place with `export.json` last: a DIR with `export.json` is a
complete export, and the files it lists are all that `--overwrite` removes. docs/export.md has the formats.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
import zstandard

from .errors import OptionError, OutputIOError, RunError
from .geometry import decode_distilled
from .grid import view_grid_of
from .labels import FLOOR, LABELS_FORMAT, LABELS_FORMAT_V1, read_image_labels, unpack_logits
from .rundir import MANIFEST, ClassRecord, Manifest, ShardRecord, read_manifest, read_verified, write_json
from .tario import copy_atomic, fsync_dir, replace_durably, sha256_file, write_tar

EXPORT_FORMAT = "rded-export/1"
FORMATS = ("imagefolder", "ddranking", "arrays")
RECORD = "export.json"
STAGING = ".rded-export.partial"
CLASSES_JSON, CLASSES_TXT = "classes.json", "classes.txt"
DDRANKING_FILES = ("images.pt", "labels.pt", "soft_labels.pt")


@dataclass(frozen=True, slots=True)
class Image:
    key: str
    index: int  # the data set's class index (the shard's `.cls`)
    label: int  # the class renumbered 0..C-1
    id: int  # the image's place in its class, in tier order
    data: bytes  # the shard member, as stored


@dataclass(frozen=True, slots=True)
class ViewLabels:
    records: np.ndarray  # the image's view records (rded.labels.view_dtype)
    tail: np.ndarray | None  # its tail basis (rded-soft-labels/2 partial labels), else None


# -- reading a run

def exported_classes(manifest: Manifest) -> list[ClassRecord]:
    """The classes an export keeps, in label order: the manifest's classes that have images, by index."""
    return sorted((c for c in manifest.classes if c.images > 0), key=lambda c: c.index)


def iter_images(run: Path, manifest: Manifest, classes: list[ClassRecord]) -> Iterator[tuple[ShardRecord, list[Image]]]:
    """Each image shard (checked against its sha256) with its images, in manifest order (tier by tier), each
    image numbered within its class; at the end, every class must have had the images the manifest says."""
    label_of = {c.index: n for n, c in enumerate(classes)}
    ids: dict[int, int] = {}
    for shard in manifest.shards:
        images = []
        for key, members in read_verified(run, shard.name, shard.sha256).items():
            index = _class_of(run / shard.name, key, members, label_of)
            if manifest.image_format not in members:
                raise RunError(f"{run / shard.name}: {key} has no .{manifest.image_format} member")
            images.append(Image(key, index, label_of[index], ids.get(index, 0), members[manifest.image_format]))
            ids[index] = ids.get(index, 0) + 1
        yield shard, images
    wrong = [f"{c.index} {c.name!r} ({ids.get(c.index, 0)} of {c.images})" for c in classes
             if ids.get(c.index, 0) != c.images]
    if wrong:
        raise RunError(f"{run}: the shards do not hold the images the manifest counts, for classes {', '.join(wrong)}")


def _class_of(where: Path, key: str, members: Mapping[str, bytes], label_of: Mapping[int, int]) -> int:
    raw = members.get("cls", b"").strip()
    if not raw.isdigit() or int(raw) not in label_of:
        raise RunError(f"{where}: {key}: class {raw.decode(errors='replace')!r} is not one of the manifest's "
                       "classes with images")
    return int(raw)


def check_labels(run: Path, manifest: Manifest) -> int:
    """The number of classes a label covers, once the run is known to have readable soft labels."""
    if manifest.labels is None:
        raise RunError(f"{run}: this run has no soft labels (relabel.enabled was false)")
    if manifest.labels.get("format") not in (LABELS_FORMAT, LABELS_FORMAT_V1):
        raise RunError(f"{run}: soft labels in format {manifest.labels.get('format')!r}; this version reads "
                       f"{LABELS_FORMAT_V1} and {LABELS_FORMAT}")
    return int(manifest.labels["classes"])


def read_view_labels(run: Path, shard: ShardRecord, num_classes: int) -> dict[str, ViewLabels]:
    """The view labels of a shard's images (its label shard, checked against its sha256), by key."""
    if not shard.labels:
        raise RunError(f"{run}: {shard.name} has no soft-label shard in the manifest")
    name = shard.labels["name"]
    return {key: _view_labels(run / name, key, members, num_classes)
            for key, members in read_verified(run, name, shard.labels["sha256"]).items()}


def _view_labels(where: Path, key: str, members: Mapping[str, bytes], num_classes: int) -> ViewLabels:
    try:
        return ViewLabels(*read_image_labels(dict(members), num_classes))
    except (ValueError, OSError, zstandard.ZstdError) as e:  # a member that does not decode (the sha256 matched)
        raise RunError(f"{where}: {key}: {e}") from None


def labels_of(labels: Mapping[str, ViewLabels], image: Image, where: str) -> ViewLabels:
    if image.key not in labels:
        raise RunError(f"{where}: no labels for {image.key}")
    return labels[image.key]


# -- what is stored per image

def view_logits(labels: ViewLabels, num_classes: int) -> np.ndarray:
    """[V, C] float32: the stored log-probabilities of every view (shifted so the largest is 0)."""
    return unpack_logits(labels.records, num_classes, labels.tail)


def view_params(records: np.ndarray, resolution: int) -> np.ndarray:
    """[V, 2F + 5]: each view's col_perm (F), row_perm (F), crop x, y, w, h and flip; uint8 when the image
    side fits in a byte (as the codec stores it), else int16."""
    columns = [records["col_perm"], records["row_perm"], records["crop"], records["flip"][:, None]]
    return np.concatenate([c.astype(np.int64) for c in columns], axis=1).astype(view_params_dtype(resolution))


def view_params_dtype(resolution: int) -> type:
    return np.uint8 if resolution <= 255 else np.int16


def view_columns(factor: int) -> list[str]:
    return ([f"col_perm[{i}]" for i in range(factor)] + [f"row_perm[{i}]" for i in range(factor)]
            + ["x", "y", "w", "h", "flip"])


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    peak = a.max(axis=axis, keepdims=True)
    return np.log(np.exp(a - peak).sum(axis=axis)) + np.squeeze(peak, axis=axis)


def whole_image_log_probs(logits: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """One label for a whole image from its views' logits [V, C]: the log of the views' mean probability at
    T = 1, over the classes in `columns` only, renormalised over them (float64). Log-probabilities below
    -FLOOR count as -FLOOR, so that every entry is finite (a softmax of it is then exact to float64)."""
    lp = np.maximum(logits.astype(np.float64) - logits.max(axis=1, keepdims=True), -FLOOR)
    lp = lp - _logsumexp(lp, axis=1)[:, None]  # each view's log-probabilities
    kept = (_logsumexp(lp, axis=0) - np.log(len(lp)))[columns]  # log of the mean probability
    return np.maximum(kept - _logsumexp(kept, axis=0), -FLOOR)


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def torch_bytes(t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(t.contiguous().clone(), buf)  # a clone, so that no larger storage is saved with it
    return buf.getvalue()


# -- the staging folder

class Stage:
    """The export's files as they are written into the staging folder; `files` are their paths relative to DIR."""

    def __init__(self, root: Path):
        self.root = root
        self.files: list[str] = []

    def write(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "xb") as f:  # synced here; the folders once each, in `sync`
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self.files.append(rel)

    def tar(self, rel: str, samples: list[tuple[str, Mapping[str, bytes]]]) -> int:
        write_tar(self.root / rel, samples)
        self.files.append(rel)
        return (self.root / rel).stat().st_size

    def copy(self, src: Path, rel: str, sha256: str) -> None:
        def check(actual: str) -> None:
            if actual != sha256:
                raise RunError(f"{src}: sha256 {actual[:16]}... does not match the manifest's {sha256[:16]}... "
                               "(the shard was changed or damaged after the run)")
        copy_atomic(src, self.root / rel, check=check)
        self.files.append(rel)

    def sync(self) -> None:
        for folder in sorted({str(PurePosixPath(f).parent) for f in self.files}):
            fsync_dir(self.root / folder)


def class_list(classes: list[ClassRecord]) -> list[dict[str, Any]]:
    return [{"label": n, "index": c.index, "name": c.name, "images": c.images} for n, c in enumerate(classes)]


def write_classes(stage: Stage, classes: list[ClassRecord], text: bool = False) -> None:
    """classes.json (label, original index, name, images) and, with `text`, classes.txt (a name a line)."""
    stage.write(CLASSES_JSON, (json.dumps(class_list(classes), indent=2) + "\n").encode())
    if text:  # a name with a line break would make two lines
        names = [" ".join(c.name.splitlines()) for c in classes]
        stage.write(CLASSES_TXT, "".join(f"{n}\n" for n in names).encode())


# -- the three formats

def write_imagefolder(run: Path, manifest: Manifest, classes: list[ClassRecord], stage: Stage) -> dict[str, Any]:
    ext = manifest.image_format
    count = 0
    for _, images in iter_images(run, manifest, classes):
        for image in images:  # the member's bytes: no re-encoding
            stage.write(f"{image.label:05d}/class{image.label:05d}_id{image.id:05d}.{ext}", image.data)
            count += 1
    write_classes(stage, classes, text=True)
    return {"layout": f"<label:05d>/class<label:05d>_id<id:05d>.{ext}", "images": count}


def write_ddranking(run: Path, manifest: Manifest, classes: list[ClassRecord], stage: Stage) -> dict[str, Any]:
    short = [f"{c.index} {c.name!r} ({c.images} of {manifest.ipc})" for c in classes if c.images < manifest.ipc]
    if short:
        raise RunError(f"{run}: ddranking needs exactly {manifest.ipc} images per class; these classes have fewer: "
                       f"{', '.join(short)} (export a slice of a smaller IPC, or use imagefolder)")
    num_classes = check_labels(run, manifest) if manifest.labels is not None else 0
    if manifest.labels is not None and manifest.labels["views"] < 1:
        raise RunError(f"{run}: the run stored no training views (relabel.views = 0)")
    columns = np.array([c.index for c in classes])
    images: list[Image] = []
    soft: dict[str, np.ndarray] = {}
    for shard, batch in iter_images(run, manifest, classes):
        labels = read_view_labels(run, shard, num_classes) if num_classes else {}
        for image in batch:
            images.append(image)
            if num_classes:
                logits = view_logits(labels_of(labels, image, f"{run / shard.labels['name']}"), num_classes)
                soft[image.key] = whole_image_log_probs(logits, columns)
    order = sorted(images, key=lambda i: (i.label, i.id))  # class-major
    pixels = torch.stack([decode_distilled(i.data) for i in order])
    stage.write("images.pt", torch_bytes(pixels))
    stage.write("labels.pt", torch_bytes(torch.tensor([i.label for i in order], dtype=torch.int64)))
    tensors = ddranking_tensors(manifest, len(order), len(classes))
    if num_classes:
        stage.write("soft_labels.pt", torch_bytes(torch.from_numpy(np.stack([soft[i.key] for i in order])).float()))
    else:
        del tensors["soft_labels.pt"]
    write_classes(stage, classes)
    return {"tensors": tensors, "keys": [i.key for i in order]}


def ddranking_tensors(manifest: Manifest, n: int, num_classes: int) -> dict[str, Any]:
    s = manifest.resolution
    return {
        "images.pt": {"shape": [n, 3, s, s], "dtype": "uint8", "normalisation": "none: RGB 0..255 as decoded "
                      "from the shard (divide by 255, then normalise as your evaluation expects)",
                      "order": f"class-major: label 0's {manifest.ipc} images (id 0..{manifest.ipc - 1}), "
                               "then label 1's, ..."},
        "labels.pt": {"shape": [n], "dtype": "int64", "content": "the image's label (classes.json order)"},
        "soft_labels.pt": {"shape": [n, num_classes], "dtype": "float32", "temperature": 1.0,
                           "content": "log-probabilities (use as logits: softmax(x / T)): the log of the mean over "
                                      "the image's V stored views of softmax(view logits) at temperature 1, over "
                                      "the exported classes only, renormalised over them; at least -1000",
                           "views": manifest.labels["views"] if manifest.labels else 0},
    }


def write_arrays(run: Path, manifest: Manifest, classes: list[ClassRecord], stage: Stage) -> dict[str, Any]:
    num_classes = check_labels(run, manifest)
    resolution, grid = manifest.resolution, view_grid_of(manifest.job)
    shards, label_bytes = [], 0
    for shard, images in iter_images(run, manifest, classes):
        labels = read_view_labels(run, shard, num_classes)
        samples = []
        for image in images:
            stored = labels_of(labels, image, f"{run / shard.labels['name']}")
            samples.append((image.key, {"logits.npy": npy_bytes(view_logits(stored, num_classes).astype(np.float16)),
                                        "views.npy": npy_bytes(view_params(stored.records, resolution))}))
        name = arrays_shard_name(shard.name)
        label_bytes += stage.tar(name, samples)
        stage.copy(run / shard.name, shard.name, shard.sha256)  # byte for byte, checked again as copied
        shards.append({"images": shard.name, "labels": name, "tier": shard.tier, "samples": len(images)})
    write_classes(stage, classes)
    views = manifest.labels["views"]
    return {"shards": shards, "members": {
        "logits.npy": {"shape": [views, num_classes], "dtype": "float16", "content": "the stored log-probabilities "
                       "of each view, shifted so the largest is 0 (softmax(x / T) per row); columns are the data "
                       "set's class indices (the shards' .cls), not the labels of classes.json"},
        "views.npy": {"shape": [views, 2 * grid + 5], "dtype": np.dtype(view_params_dtype(resolution)).name,
                      "columns": view_columns(grid)}},
        "bytes": {"labels_compact": sum(s.labels["bytes"] for s in manifest.shards if s.labels),
                  "labels_arrays": label_bytes}}


def arrays_shard_name(image_shard: str) -> str:
    return "labels-arrays-" + image_shard.removeprefix("distilled-")


WRITERS = {"imagefolder": write_imagefolder, "ddranking": write_ddranking, "arrays": write_arrays}


def planned_names(manifest: Manifest, classes: list[ClassRecord], fmt: str) -> set[str]:
    """The top-level names an export will write into DIR (besides export.json)."""
    if fmt == "imagefolder":
        return {f"{n:05d}" for n in range(len(classes))} | {CLASSES_JSON, CLASSES_TXT}
    if fmt == "ddranking":
        return set(DDRANKING_FILES) | {CLASSES_JSON}
    return {n for s in manifest.shards for n in (s.name, arrays_shard_name(s.name))} | {CLASSES_JSON}


# -- the output directory

def previous_files(out: Path) -> set[str] | None:
    """The files of a previous export in `out`: those its export.json lists, and those of an export whose
    publishing was interrupted (its staging folder's export.json); None when there is no export record."""
    records = [p for p in (out / RECORD, out / STAGING / RECORD) if p.is_file()]
    if not records:
        return None
    files: set[str] = set()
    for path in records:
        try:
            record = json.loads(path.read_text())
            listed = record["files"] if record.get("format") == EXPORT_FORMAT else None
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, AttributeError):
            listed = None
        if not isinstance(listed, list) or not all(_inside(f) for f in listed):
            raise OptionError("out", f"{path}: not an {EXPORT_FORMAT} record; refusing to replace what it lists")
        files.update(listed)
    return files


def _inside(rel: Any) -> bool:
    p = PurePosixPath(rel) if isinstance(rel, str) else None
    return p is not None and not p.is_absolute() and ".." not in p.parts and p.parts not in ((), (".",))


def prepare_output(out: Path, overwrite: bool, planned: set[str]) -> None:
    """Before any work: `out` is absent or empty (a failed export's staging folder aside), or, with `overwrite`,
    holds a previous export, whose files are removed (export.json first, so it stops looking complete)."""
    if out.exists() and not out.is_dir():
        raise OptionError("out", f"{out}: exists and is not a directory")
    others = sorted(p.name for p in out.iterdir() if p.name != STAGING) if out.is_dir() else []
    if others and not overwrite:
        what = f"an export, {RECORD}" if RECORD in others else repr(others[0])
        raise OptionError("out", f"{out}: not empty (holds {what}); choose an absent or empty directory, "
                                 "or pass --overwrite to replace a previous export")
    previous = previous_files(out) if others else set()
    if previous is None:
        raise OptionError("out", f"{out}: holds files but no {RECORD}, so it is not a previous export; "
                                 "refusing to replace them")
    tops = {PurePosixPath(f).parts[0] for f in previous}
    clash = sorted(n for n in planned if (out / n).exists() and n not in tops)
    if clash:
        raise OptionError("out", f"{out / clash[0]}: exists and is not part of the previous export; move it away "
                                 "or choose another directory")
    if out.is_dir():
        remove_export(out, previous)


def remove_export(out: Path, files: set[str]) -> None:
    """Remove a previous export's files and the folders they leave empty, and any staging folder; nothing else."""
    (out / RECORD).unlink(missing_ok=True)
    fsync_dir(out)
    for rel in sorted(files):
        path = out / rel
        if path.is_file() or path.is_symlink():
            path.unlink()
    for folder in sorted({p for f in files for p in PurePosixPath(f).parents if str(p) != "."},
                         key=lambda p: -len(p.parts)):
        try:
            (out / folder).rmdir()
        except OSError:  # not empty (a file that is not the export's) or already gone
            pass
    shutil.rmtree(out / STAGING, ignore_errors=True)


def publish(stage: Path, out: Path, record: dict[str, Any]) -> None:
    """Move the staged export into `out`, export.json last (written to the staging folder first, so an
    interrupted publish can be finished or removed by the next export)."""
    write_json(stage / RECORD, record)
    for name in sorted({PurePosixPath(f).parts[0] for f in record["files"]}):
        try:
            move_into(stage / name, out / name)
        except OSError as e:
            raise RunError(f"{out / name}: cannot move the export into place: {e}") from None
    fsync_dir(out)
    replace_durably(stage / RECORD, out / RECORD)
    shutil.rmtree(stage, ignore_errors=True)


def move_into(src: Path, dst: Path) -> None:
    """Move a staged file or folder into place; into a folder that is already there (a previous export's,
    still holding files that were not the export's), file by file."""
    if src.is_dir() and dst.is_dir():
        for child in sorted(src.iterdir()):
            move_into(child, dst / child.name)
        src.rmdir()
        fsync_dir(dst)
    else:
        os.replace(src, dst)


def export_run(run: str | Path, fmt: str, out: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Export a finished run or slice as `fmt` (imagefolder, ddranking, arrays) into `out`; its export.json."""
    run, out = Path(run), Path(out)
    if fmt not in WRITERS:
        raise OptionError("format", f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    manifest = read_manifest(run)
    classes = exported_classes(manifest)
    prepare_output(out, overwrite, planned_names(manifest, classes, fmt))
    created = not out.exists()
    stage = Stage(out / STAGING)
    stage.root.mkdir(parents=True)
    try:
        details = WRITERS[fmt](run, manifest, classes, stage)
        stage.sync()
        record = {"format": EXPORT_FORMAT, "export": fmt, "run": run_summary(run, manifest),
                  "classes": class_list(classes), **details, "files": sorted(stage.files)}
        publish(stage.root, out, record)
    except BaseException as e:  # nothing half-made stays behind: the staging folder and whatever it moved in
        remove_export(out, set(stage.files))
        if created:
            shutil.rmtree(out, ignore_errors=True)  # nothing but the export's own files was ever in it
        if isinstance(e, OSError):
            raise OutputIOError(f"{out}: the export failed: {e}; nothing was published") from None
        raise
    return record


def run_summary(run: Path, manifest: Manifest) -> dict[str, Any]:
    return {"manifest_sha256": sha256_file(run / MANIFEST), "ipc": manifest.ipc, "tiers": manifest.tiers,
            "images": manifest.images, "resolution": manifest.resolution, "factor": manifest.job["distill"]["factor"],
            "image_format": manifest.image_format, "sliced_from": manifest.sliced_from,
            "labels_format": manifest.labels["format"] if manifest.labels else None}
