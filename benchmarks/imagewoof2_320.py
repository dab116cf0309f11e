"""ImageWoof's full train (9,025 photos) or val (3,929) split at 320 px (fastai imagewoof2-320) as WebDataset shards,
byte-reproducible.

    nice -n 10 .venv/bin/python benchmarks/imagewoof2_320.py SRC [OUT] [--split train|val] [--seed 0] [--per-shard 2000]
        [--force] [--reference DIR]
    .venv/bin/python benchmarks/imagewoof2_320.py --check [OUT] [--split train|val]

SRC: the bare git dir of github:q878787/imagewoof2-320 (read at --rev, default HEAD) or a dir with
<split>/<wnid>/*.JPEG. OUT (default out/imagewoof2-320, or out/imagewoof2-320-val for --split val; git-ignored) gets
<split>-NNNNNN.tar in the shared 160-px set's layout (<key>.jpg: the source JPEG bytes unchanged; <key>.cls: the
classes.json index), classes.json, files.tsv, build.json, SHA256SUMS, README.md. jobs/imagewoof.toml runs on the train
build with only data.train changed; the val build has the shared set's val shard names, keys and classes, so
`rded eval --val` takes it in place of the 160-px val. A rerun skips when SHA256SUMS verifies and the settings match
(--force rebuilds); --check verifies OUT against SHA256SUMS; --reference ../shared/data/imagewoof compares keys and
classes with its shards of the same split.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tarfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import PIL
from PIL import Image

from rded.tario import sha256_file, write_bytes_atomic, write_tar

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "val")
DEFAULT_OUT = {"train": ROOT / "out" / "imagewoof2-320", "val": ROOT / "out" / "imagewoof2-320-val"}
SOURCE = "github:q878787/imagewoof2-320"
FORMAT = 1  # bump when the output for the same source and settings would change

# classes.json of the shared 160-px set (../shared/data/imagewoof): index = sorted-wnid order,
# imagenet_index = the wnid's position among the 1,000 sorted ImageNet-1k wnids.
CLASSES = [
    ("n02086240", "Shih-Tzu", 155),
    ("n02087394", "Rhodesian ridgeback", 159),
    ("n02088364", "beagle", 162),
    ("n02089973", "English foxhound", 167),
    ("n02093754", "Border terrier", 182),
    ("n02096294", "Australian terrier", 193),
    ("n02099601", "golden retriever", 207),
    ("n02105641", "Old English sheepdog", 229),
    ("n02111889", "Samoyed", 258),
    ("n02115641", "dingo", 273),
]
INDEX = {wnid: i for i, (wnid, _, _) in enumerate(CLASSES)}
# fastai's imagewoof2 splits (noisy_imagewoof.csv: is_valid False / True), per class; val is also the shared
# 160-px set's val, which keeps all of it
EXPECTED = {"train": dict(zip(INDEX, [941, 942, 932, 580, 949, 943, 949, 928, 921, 940])),
            "val": dict(zip(INDEX, [409, 408, 418, 224, 401, 407, 401, 422, 429, 410]))}
JPEG_EXTS = (".jpeg", ".jpg")


def classes_json() -> bytes:
    rows = [{"index": i, "wnid": w, "name": n, "imagenet_index": m} for i, (w, n, m) in enumerate(CLASSES)]
    return (json.dumps(rows, indent=2) + "\n").encode()


# -- sources

@dataclass
class Entry:
    path: str  # <split>/<wnid>/<file name>, as in the source
    ref: str  # the git blob id, or the file's path on disk
    size: int
    kind: str = "file"  # what the listing said it is (a git mode other than a plain blob is reported)


class GitSource:
    """A bare git dir, read at one commit with `git ls-tree` and one `git cat-file --batch` process."""

    def __init__(self, git_dir: Path, rev: str):
        self.git_dir = git_dir
        self.commit = self._git("rev-parse", "--verify", f"{rev}^{{commit}}").strip()
        self.commit_date = self._git("show", "-s", "--format=%cI", self.commit).strip()
        self.label = SOURCE
        self._cat = None

    def _git(self, *args: str) -> str:
        return subprocess.run(["git", f"--git-dir={self.git_dir}", *args], check=True,
                              capture_output=True, text=True).stdout

    def list(self, split: str) -> list[Entry]:
        out = subprocess.run(["git", f"--git-dir={self.git_dir}", "ls-tree", "-r", "-l", "-z", self.commit,
                              "--", f"{split}/"], check=True, capture_output=True).stdout
        entries = []
        for rec in out.decode().split("\0"):
            if not rec:
                continue
            meta, path = rec.split("\t", 1)
            mode, typ, obj, size = meta.split()
            kind = "file" if (typ == "blob" and mode in ("100644", "100755")) else f"{typ} {mode}"
            entries.append(Entry(path, obj, int(size) if size != "-" else -1, kind))
        return entries

    def listing_line(self, e: Entry) -> str:
        return f"{e.path}\t{e.ref}"

    def read(self, e: Entry) -> bytes:
        if self._cat is None:
            self._cat = subprocess.Popen(["git", f"--git-dir={self.git_dir}", "cat-file", "--batch"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._cat.stdin.write(e.ref.encode() + b"\n")
        self._cat.stdin.flush()
        header = self._cat.stdout.readline().split()
        if len(header) != 3 or header[1] != b"blob":
            raise RuntimeError(f"git cat-file: {e.path} ({e.ref}): {b' '.join(header).decode()}")
        data = self._cat.stdout.read(int(header[2]))
        self._cat.stdout.read(1)  # the newline after the content
        return data

    def close(self) -> None:
        if self._cat is not None:
            self._cat.stdin.close()
            self._cat.wait()
            self._cat = None


class DirSource:
    """A directory with <split>/<wnid>/*.JPEG (its commit is whatever --commit says, else unknown)."""

    def __init__(self, root: Path, commit: str | None):
        self.root = root
        self.commit = commit or "unknown"
        self.commit_date = "unknown"
        self.label = f"directory {root.name}/ (said to be {SOURCE})" if commit else f"directory {root.name}/"

    def list(self, split: str) -> list[Entry]:
        top = self.root / split
        if not top.is_dir():
            sys.exit(f"imagewoof2_320: {self.root} has no {split}/ directory and is not a bare git dir")
        entries = []
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for name in sorted(filenames):
                p = Path(dirpath) / name
                kind = "file" if p.is_file() and not p.is_symlink() else "not a regular file"
                entries.append(Entry(p.relative_to(self.root).as_posix(), str(p), p.lstat().st_size, kind))
        return entries

    def listing_line(self, e: Entry) -> str:
        return f"{e.path}\t{e.size}"

    def read(self, e: Entry) -> bytes:
        return Path(e.ref).read_bytes()

    def close(self) -> None:
        pass


def open_source(src: Path, rev: str, commit: str | None):
    if (src / "objects").is_dir() and (src / "HEAD").is_file():
        return GitSource(src, rev)
    return DirSource(src, commit)


# -- listing and verifying

@dataclass
class Sample:
    key: str
    cls: int
    wnid: str
    entry: Entry
    sha256: str = ""
    width: int = 0
    height: int = 0
    mode: str = ""


def plan(entries: list[Entry], split: str) -> tuple[list[Sample], list[tuple[str, str]]]:
    """The JPEGs to use, in sorted-path order, and the (path, why) of every listed file that is not one."""
    samples, ignored, seen = [], [], {}
    for e in sorted(entries, key=lambda e: e.path):
        parts = e.path.split("/")
        if e.kind != "file":
            ignored.append((e.path, e.kind))
            continue
        if len(parts) != 3:
            ignored.append((e.path, f"not at {split}/<wnid>/<file>"))
            continue
        _, wnid, name = parts
        if wnid not in INDEX:
            sys.exit(f"imagewoof2_320: {e.path}: class folder {wnid} is not one of the 10 ImageWoof wnids")
        if not name.lower().endswith(JPEG_EXTS):
            ignored.append((e.path, "not named .JPEG/.jpg"))
            continue
        key = name[: name.rindex(".")]
        if "." in key or "/" in key or not key:
            sys.exit(f"imagewoof2_320: {e.path}: key {key!r} breaks WebDataset's key rule (no dots)")
        if key in seen:
            sys.exit(f"imagewoof2_320: key {key} is in {seen[key]} and {e.path}; keys must be unique")
        seen[key] = e.path
        samples.append(Sample(key, INDEX[wnid], wnid, e))
    return samples, ignored


def check_counts(samples: list[Sample], split: str) -> None:
    expected = EXPECTED[split]
    got = Counter(s.wnid for s in samples)
    bad = [(w, got.get(w, 0), n) for w, n in expected.items() if got.get(w, 0) != n]
    if bad or len(samples) != sum(expected.values()):
        lines = "\n".join(f"  {w}: {g} listed, {n} expected" for w, g, n in bad)
        sys.exit(f"imagewoof2_320: the source lists {len(samples)} JPEGs, fastai's imagewoof2 {split} has "
                 f"{sum(expected.values())}:\n{lines}\n(--no-count-check builds anyway)")


def verify(source, samples: list[Sample]) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Decode every JPEG fully with Pillow; the good ones get sha256/size/mode, the others are returned."""
    good, bad = [], []
    for i, s in enumerate(samples):
        data = source.read(s.entry)
        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt = im.format
                im.load()
                s.width, s.height, s.mode = im.width, im.height, im.mode
            if fmt != "JPEG":
                raise ValueError(f"Pillow reads it as {fmt}, not JPEG")
        except Exception as exc:  # anything Pillow cannot decode is reported, never dropped silently
            bad.append((s.entry.path, f"{type(exc).__name__}: {exc}"))
            print(f"  BAD {s.entry.path}: {type(exc).__name__}: {exc}", flush=True)
            continue
        s.sha256 = hashlib.sha256(data).hexdigest()
        good.append(s)
        if (i + 1) % 2000 == 0:
            print(f"  verified {i + 1}/{len(samples)}", flush=True)
    return good, bad


def shard_order(samples: list[Sample], seed: int, per_shard: int) -> list[list[Sample]]:
    """As the shared set: sorted by key, shuffled across classes with random.Random(seed), cut into
    ceil(n / per_shard) consecutive shards of equal count (boundaries floor(i * n / shards))."""
    order = sorted(samples, key=lambda s: s.key)
    random.Random(seed).shuffle(order)
    n = len(order)
    k = max(1, math.ceil(n / per_shard))
    bounds = [i * n // k for i in range(k + 1)]
    return [order[bounds[i]:bounds[i + 1]] for i in range(k)]


# -- output

def read_sums(out: Path) -> dict[str, str] | None:
    path = out / "SHA256SUMS"
    if not path.is_file():
        return None
    sums = {}
    for line in path.read_text().splitlines():
        digest, name = line.split(None, 1)
        sums[name.lstrip("*")] = digest
    return sums


def check(out: Path, verbose: bool = True) -> bool:
    sums = read_sums(out)
    if sums is None:
        if verbose:
            print(f"{out}: no SHA256SUMS")
        return False
    ok = True
    for name, digest in sums.items():
        p = out / name
        got = sha256_file(p) if p.is_file() else "missing"
        if got != digest:
            ok = False
        if verbose:
            print(f"{name}: {'OK' if got == digest else 'FAILED (' + got + ')'}")
    for p in sorted(p for split in SPLITS for p in out.glob(f"{split}-*.tar")):  # leftovers of either split
        if p.name not in sums:
            ok = False
            if verbose:
                print(f"{p.name}: FAILED (not in SHA256SUMS)")
    if verbose:
        print(f"{out}: {'ok' if ok else 'FAILED'} ({len(sums)} files in SHA256SUMS)")
    return ok


def guard_out(out: Path, split: str) -> None:
    """Refuse an OUT inside a git work tree unless git ignores it: the shards must never be committed."""
    probe = out.resolve()
    parent = probe
    while not parent.exists():
        parent = parent.parent
    top = subprocess.run(["git", "-C", str(parent), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if top.returncode != 0:
        return
    shard = probe / f"{split}-000000.tar"
    ignored = subprocess.run(["git", "-C", top.stdout.strip(), "check-ignore", "-q", str(shard)])
    if ignored.returncode != 0:
        sys.exit(f"imagewoof2_320: {out} is inside the git work tree {top.stdout.strip()} and not git-ignored; "
                 f"write the shards elsewhere (e.g. {DEFAULT_OUT[split].relative_to(ROOT)})")


def stats(values: list[int]) -> str:
    return f"{min(values)} / {statistics.median(values):g} / {max(values)}"


def readme_intro(build: dict, split: str) -> str:
    """The title and what the shards are for (train's text is what it was before --split, byte for byte)."""
    purpose = {"train": f"""so `jobs/imagewoof.toml` runs on them with only `data.train` changed. Built by
`benchmarks/imagewoof2_320.py` (format {FORMAT}).
""", "val": f"""with the shard names, keys and class indices of its `val-*.tar`, so
`rded eval --val` takes them in place of the 160-px val (a training's checkpoint names its val by shard names
and best-of keys, which stay the same). Built by `benchmarks/imagewoof2_320.py --split val` (format {FORMAT}).
ImageWoof's val is mostly ImageNet *train* images: an ImageNet-1k observer has seen most of it.
"""}
    return f"""# ImageWoof {split} (320 px, full split) as WebDataset shards

All {build['samples']:,} {split} photographs of ImageWoof (fastai's `imagewoof2-320`: the 10 dog-breed classes of
ImageNet, 320 px on the shorter side), stored as WebDataset tar shards in the layout of the shared 160-px set
(`../shared/data/imagewoof`), {purpose[split]}"""


def readme(build: dict, samples: list[Sample]) -> str:
    split = build.get("split", "train")  # a build.json without "split" is train's (it predates --split)
    expected = f"{sum(EXPECTED[split].values()):,}"
    per_class = Counter(s.cls for s in samples)
    w = [s.width for s in samples]
    h = [s.height for s in samples]
    short = [min(s.width, s.height) for s in samples]
    long_ = [max(s.width, s.height) for s in samples]
    modes = Counter(s.mode for s in samples)
    rows = "\n".join(f"| {i} | {wnid} | {name} | {imn} | {per_class[i]:,} |"
                     for i, (wnid, name, imn) in enumerate(CLASSES))
    shards = "\n".join(f"| `{s['name']}` | {s['samples']:,} | {s['bytes']:,} | `{s['sha256']}` |"
                       for s in build["shards"])
    bad = "\n".join(f"- `{p}`: {why}" for p, why in build["bad"]) or "- none"
    ignored = "\n".join(f"- `{p}`: {why}" for p, why in build["ignored"]) or "- none"
    dups = "\n".join(f"- {', '.join(f'`{k}`' for k in g)}" for g in build["duplicate_content"]) or "- none"
    total = sum(s["bytes"] for s in build["shards"])
    return f"""{readme_intro(build, split)}
## Source

- {build['source']}, commit `{build['commit']}` ({build['commit_date']}): `{split}/<wnid>/*.JPEG`.
- Listing: {build['listed']:,} JPEGs under `{split}/` (fastai's imagewoof2 {split} split has {expected}); sha256 of the
  sorted `path<TAB>{'blob id' if build['commit'] != 'unknown' else 'size'}` lines: `{build['listing_sha256']}`.
- Every JPEG was decoded in full with Pillow {build['pillow']}; any that did not decode would be listed here and
  left out. Not decodable: {len(build['bad'])}. Files under `{split}/` that are not JPEGs: {len(build['ignored'])}.
- Terms: ImageWoof is a subset of ImageNet (ILSVRC-2012): the ImageNet terms of access apply (non-commercial
  research and education).

Not decodable:
{bad}

Not used (not `{split}/<wnid>/*.JPEG`):
{ignored}

Identical bytes under more than one key:
{dups}

## Classes

`classes.json` is the shared set's: index = sorted-wnid order, `imagenet_index` = the wnid's position among
the 1,000 sorted ImageNet-1k wnids.

| idx | wnid | name | imagenet_index | images |
|---|---|---|---|---|
{rows}
| | | **total** | | **{len(samples):,}** |

## Images

The JPEG bytes are the source's, unchanged (no decode/re-encode), so the shards do not depend on Pillow.
Sizes in px, min / median / max: width {stats(w)}; height {stats(h)}; shorter side {stats(short)};
longer side {stats(long_)}. Pillow modes: {', '.join(f'{m} {n:,}' for m, n in sorted(modes.items()))}
(a reader should convert to RGB, as the job does).

## Shards

{len(build['shards'])} shards, {total:,} bytes in all. The samples are sorted by key, shuffled across classes
with `random.Random({build['seed']}).shuffle` and cut into consecutive shards of equal count
(`ceil(n / {build['per_shard']})` shards; boundaries `floor(i * n / shards)`), as in the shared set.

| shard | samples | bytes | sha256 |
|---|---|---|---|
{shards}

Each sample is two consecutive members: `<key>.jpg` (the JPEG bytes) then `<key>.cls` (the class index as ASCII
decimal, no newline). The key is the source file's stem (`n02086240_1069`, `ILSVRC2012_val_00000907`). Tars are
USTAR from Python's `tarfile` (`rded.tario.write_tar`): mtime 0, uid/gid 0, empty uname/gname, mode 0444.
`files.tsv` lists every sample (key, class, wnid, shard, source path, bytes, sha256, width, height, mode);
`build.json` the settings and counts. `SHA256SUMS` covers the shards, `classes.json`, `files.tsv` and
`build.json`: `sha256sum -c SHA256SUMS`, or `benchmarks/imagewoof2_320.py --check OUT`.

```python
import webdataset as wds
ds = (wds.WebDataset("{split}-{{000000..{len(build['shards']) - 1:06d}}}.tar", shardshuffle=False)
        .decode("pil").to_tuple("jpg", "cls"))
```
"""


def up_to_date(out: Path, settings: dict, args, t0: float) -> bool:
    """True (after printing the summary) when OUT verifies and was built from the same listing and settings."""
    prev = out / "build.json"
    if args.force or read_sums(out) is None or not prev.is_file():
        return False
    old = json.loads(prev.read_text())
    same = old.get("split", "train") == args.split and all(old.get(k) == v for k, v in settings.items())
    if same and check(out, verbose=False):
        print(f"{out}: up to date (SHA256SUMS verifies; source {old['commit']}, seed {old['seed']}, "
              f"{len(old['shards'])} shards); --force rebuilds")
        summary(old, None, time.time() - t0, args)
        return True
    print(f"{out}: SHA256SUMS does not verify or the settings differ: rebuilding")
    return False


def write_shards(out: Path, source, good: list[Sample], args) -> tuple[list[dict], dict[str, str]]:
    """<split>-NNNNNN.tar in shard order (each JPEG re-read and checked against its verified sha256), and stale
    shards of this split from an earlier build with more shards removed."""
    shards, shard_of = [], {}
    for i, part in enumerate(shard_order(good, args.seed, args.per_shard)):
        name = f"{args.split}-{i:06d}.tar"

        def members(part=part):
            for s in part:
                data = source.read(s.entry)
                if hashlib.sha256(data).hexdigest() != s.sha256:
                    raise RuntimeError(f"{s.entry.path} changed between verifying and writing")
                yield s.key, {"jpg": data, "cls": str(s.cls).encode()}

        digest = write_tar(out / name, members())
        shards.append({"name": name, "samples": len(part), "bytes": (out / name).stat().st_size, "sha256": digest,
                       "per_class": [sum(1 for s in part if s.cls == c) for c in range(len(CLASSES))]})
        shard_of.update((s.key, name) for s in part)
        print(f"  wrote {name}: {len(part):,} samples, {shards[-1]['bytes']:,} bytes", flush=True)
    names = {s["name"] for s in shards}
    for p in sorted(out.glob(f"{args.split}-*.tar")):
        if p.name not in names:
            print(f"  removing stale {p.name} (not part of this build)")
            p.unlink()
    return shards, shard_of


def build(args) -> int:
    t0 = time.time()
    out: Path = args.out
    guard_out(out, args.split)
    source = open_source(args.src, args.rev, args.commit)
    entries = source.list(args.split)
    listing = hashlib.sha256("".join(source.listing_line(e) + "\n"
                                     for e in sorted(entries, key=lambda e: e.path)).encode()).hexdigest()
    settings = {"format": FORMAT, "listing_sha256": listing, "seed": args.seed, "per_shard": args.per_shard}
    if args.split != "train":  # train's build.json predates --split and stays byte-identical without the key
        settings["split"] = args.split
    if up_to_date(out, settings, args, t0):
        source.close()
        return 0

    samples, ignored = plan(entries, args.split)
    print(f"{source.label} @ {source.commit}: {len(entries):,} files under {args.split}/, {len(samples):,} JPEGs"
          + (f", {len(ignored)} not used" if ignored else ""), flush=True)
    for p, why in ignored:
        print(f"  NOT USED {p}: {why}")
    if not args.no_count_check:
        check_counts(samples, args.split)
    t1 = time.time()
    good, bad = verify(source, samples)
    t_verify = time.time() - t1
    if not good:
        sys.exit("imagewoof2_320: no decodable JPEG")
    by_sha = defaultdict(list)
    for s in good:
        by_sha[s.sha256].append(s.key)
    dups = sorted(sorted(g) for g in by_sha.values() if len(g) > 1)

    out.mkdir(parents=True, exist_ok=True)
    (out / "SHA256SUMS").unlink(missing_ok=True)  # present only when a build is complete
    t2 = time.time()
    shards, shard_of = write_shards(out, source, good, args)
    source.close()
    t_write = time.time() - t2

    per_class = Counter(s.cls for s in good)
    listed = Counter(s.cls for s in samples)
    record = {**settings, "source": source.label, "commit": source.commit, "commit_date": source.commit_date,
              "pillow": PIL.__version__, "listed": len(samples), "samples": len(good),
              "per_class": {CLASSES[c][0]: per_class[c] for c in range(len(CLASSES))},
              "listed_per_class": {CLASSES[c][0]: listed[c] for c in range(len(CLASSES))},
              "bad": bad, "ignored": ignored, "duplicate_content": dups, "shards": shards}
    tsv = "key\tcls\twnid\tshard\tpath\tbytes\tsha256\twidth\theight\tmode\n" + "".join(
        f"{s.key}\t{s.cls}\t{s.wnid}\t{shard_of[s.key]}\t{s.entry.path}\t{s.entry.size}\t{s.sha256}\t"
        f"{s.width}\t{s.height}\t{s.mode}\n" for s in sorted(good, key=lambda s: s.key))
    files = {"classes.json": classes_json(), "files.tsv": tsv.encode(),
             "build.json": (json.dumps(record, indent=2) + "\n").encode()}
    for name, data in files.items():
        write_bytes_atomic(out / name, data)
    write_bytes_atomic(out / "README.md", readme(record, good).encode())
    sums = [(s["sha256"], s["name"]) for s in shards] + [(hashlib.sha256(d).hexdigest(), n) for n, d in files.items()]
    write_bytes_atomic(out / "SHA256SUMS", "".join(f"{d}  {n}\n" for d, n in sums).encode())
    print(f"verify {t_verify:.1f} s, write {t_write:.1f} s")
    summary(record, good, time.time() - t0, args)
    return 0


def summary(record: dict, samples: list[Sample] | None, seconds: float, args) -> None:
    split = record.get("split", "train")  # a build.json without "split" is train's (it predates --split)
    print(f"\n{split} split of {record['source']} @ {record['commit']} ({record['commit_date']})")
    print(f"{'idx':>3} {'wnid':<10} {'name':<21} {'listed':>6} {'written':>7}")
    for i, (wnid, name, _) in enumerate(CLASSES):
        print(f"{i:>3} {wnid:<10} {name:<21} {record['listed_per_class'][wnid]:>6} {record['per_class'][wnid]:>7}")
    print(f"{'':>3} {'':<10} {'total':<21} {record['listed']:>6} {record['samples']:>7}")
    print(f"not decodable: {len(record['bad'])}; not used: {len(record['ignored'])}; "
          f"keys with byte-identical content: {sum(len(g) for g in record['duplicate_content'])} "
          f"in {len(record['duplicate_content'])} groups")
    if samples is not None:
        print(f"px min / median / max: width {stats([s.width for s in samples])}, "
              f"height {stats([s.height for s in samples])}, "
              f"short side {stats([min(s.width, s.height) for s in samples])}, "
              f"long side {stats([max(s.width, s.height) for s in samples])}; "
              f"modes {dict(sorted(Counter(s.mode for s in samples).items()))}")
    total = sum(s["bytes"] for s in record["shards"])
    print(f"{len(record['shards'])} shards, {total:,} bytes ({total / 2**20:.1f} MiB):")
    for s in record["shards"]:
        print(f"  {s['sha256']}  {s['name']}  {s['samples']:,} samples  {s['bytes']:,} bytes")
    if args.reference:
        compare_reference(args.reference, args.out, args.split)
    print(f"{seconds:.1f} s")


def read_cls(shards: list[Path]) -> dict[str, tuple[int, str]]:
    """key -> (class index, shard name) from the .cls members of tar shards in this layout."""
    found = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for m in tar:
                if m.name.endswith(".cls"):
                    found[m.name[:-4]] = (int(tar.extractfile(m).read()), shard.name)
    return found


def compare_reference(ref: Path, out: Path, split: str) -> None:
    """Keys and classes against another set in this layout (the shared 160-px set): its shards of this split
    (which of its keys are here, with the same class index, and whether keys, classes and shard names are all
    the same), then its other split (any key of ours there would leak between train and val)."""
    ours = {}
    with open(out / "files.tsv") as f:
        next(f)
        for line in f:
            key, cls, _, shard = line.split("\t", 4)[:4]
            ours[key] = (int(cls), shard)
    same_classes = (ref / "classes.json").read_bytes() == classes_json()
    for other in sorted(SPLITS, key=lambda s: s != split):  # this split first
        theirs = read_cls(sorted(ref.glob(f"{other}-*.tar")))
        if not theirs:
            continue
        common = theirs.keys() & ours.keys()
        agree = sum(theirs[k][0] == ours[k][0] for k in common)
        print(f"reference {ref} {other}: {len(theirs):,} keys, {len(common):,} of them here, "
              f"{agree:,} with the same class index")
        if other == split:
            same = {k: c for k, (c, _) in theirs.items()} == {k: c for k, (c, _) in ours.items()}
            print(f"reference {other}: the same keys and class indices as ours: {same}; "
                  f"the same keys in each shard of the same name: {theirs == ours}")
    print(f"reference classes.json identical to ours: {same_classes}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, nargs="?", help="bare git dir of q878787/imagewoof2-320, or a dir with <split>/")
    p.add_argument("out", type=Path, nargs="?", help="output dir (default out/imagewoof2-320, or -val for --split val)")
    p.add_argument("--split", choices=SPLITS, default="train", help="the split to build (default train)")
    p.add_argument("--check", action="store_true", help="only verify OUT against its SHA256SUMS (no SRC)")
    p.add_argument("--rev", default="HEAD", help="the commit to read from a git dir (default HEAD)")
    p.add_argument("--commit", help="the commit id to record for a plain directory source")
    p.add_argument("--seed", type=int, default=0, help="the shuffle seed (default 0, as the shared set)")
    p.add_argument("--per-shard", type=int, default=2000, help="at most this many samples a shard (default 2000)")
    p.add_argument("--force", action="store_true", help="rebuild even when OUT verifies")
    p.add_argument("--no-count-check", action="store_true", help="build even if the counts are not fastai's")
    p.add_argument("--reference", type=Path, help="compare keys/classes with this set (../shared/data/imagewoof)")
    args = p.parse_args(argv)
    if args.check:
        if args.src is not None and args.out is not None:
            p.error("--check takes one directory: OUT")
        return 0 if check(args.src or DEFAULT_OUT[args.split]) else 1
    args.out = args.out or DEFAULT_OUT[args.split]
    if args.src is None:
        p.error("SRC is required (or --check)")
    if args.per_shard < 1:
        p.error("--per-shard must be at least 1")
    return build(args)


if __name__ == "__main__":
    sys.exit(main())
