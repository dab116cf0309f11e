"""DD-Ranking (PyPI `ddranking`) on an `rded export --format ddranking` of an ImageWoof run.

Run by benchmarks/ddranking.sh inside DD-Ranking's own virtualenv (not .venv). Two steps:

  prepare SHARDS_DIR DATA_DIR   real ImageWoof shards -> DATA_DIR/{train,val}/NNNN/*.jpg
  eval EXPORT_DIR DATA_DIR      AugmentationRobustScore (hard labels) on the export, prints the figures

Why the layout and the remapping (ddranking 0.2.0, ddranking/utils/data.py get_dataset):
- For 'ImageWoof' DD-Ranking reads ImageFolder(DATA/train) and ImageFolder(DATA/val) and keeps the samples
  whose ImageFolder target is in its ImageNet index list [193, 182, 258, 162, 155, 167, 159, 273, 207, 229].
  So folder k must be ImageNet class k: we write 1000 folders 0000..0999; the 990 non-ImageWoof ones hold one
  tiny placeholder JPEG each (ImageFolder refuses empty class folders; DD-Ranking filters them out).
- DD-Ranking's class c is ImageNet class IMAGEWOOF[c], and it builds the hard labels of the synthetic set as
  class-major 0..9 in *its* order. The export is class-major in the data set's class-index order. We reorder
  the export's rows (by classes.json `index` -> shared classes.json `imagenet_index`) to DD-Ranking's order.
"""
import json
import os
import sys
import tarfile
import time
import traceback

IMAGEWOOF = [193, 182, 258, 162, 155, 167, 159, 273, 207, 229]  # ddranking.utils.data.ImageNetSubsets.imagewoof


def env(name, default, cast=str):
    return cast(os.environ.get(name, default))


def prepare(shards_dir, data_dir):
    classes = json.load(open(os.path.join(shards_dir, "classes.json")))
    to_imagenet = {c["index"]: c["imagenet_index"] for c in classes}
    assert sorted(to_imagenet.values()) == sorted(IMAGEWOOF), (to_imagenet, IMAGEWOOF)
    val_cap = env("DDR_VAL_PER_CLASS", "0", int)  # 0 = all
    from PIL import Image

    for split in ("train", "val"):
        root = os.path.join(data_dir, split)
        os.makedirs(root, exist_ok=True)
        placeholder = os.path.join(data_dir, f"placeholder-{split}.jpg")
        Image.new("RGB", (8, 8)).save(placeholder)
        for k in range(1000):
            d = os.path.join(root, f"{k:04d}")
            os.makedirs(d, exist_ok=True)
            if k not in IMAGEWOOF and not os.listdir(d):
                os.link(placeholder, os.path.join(d, "placeholder.jpg"))
        counts = {k: 0 for k in IMAGEWOOF}
        shards = sorted(f for f in os.listdir(shards_dir) if f.startswith(split + "-") and f.endswith(".tar"))
        for shard in shards:
            pending = {}
            with tarfile.open(os.path.join(shards_dir, shard)) as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, ext = m.name.rsplit(".", 1)
                    pending.setdefault(key, {})[ext] = tar.extractfile(m).read()
                    s = pending[key]
                    if "jpg" in s and "cls" in s:
                        del pending[key]
                        k = to_imagenet[int(s["cls"].decode().strip())]
                        if split == "val" and val_cap and counts[k] >= val_cap:
                            continue
                        counts[k] += 1
                        with open(os.path.join(root, f"{k:04d}", os.path.basename(key) + ".jpg"), "wb") as f:
                            f.write(s["jpg"])
            assert not pending, f"{shard}: members without jpg/cls pair: {list(pending)[:3]}"
        print(f"prepare: {split}: {sum(counts.values())} images, per ImageNet class {counts}", flush=True)


def load_export(export_dir, shards_dir, im_size):
    import torch
    import torch.nn.functional as F

    images = torch.load(os.path.join(export_dir, "images.pt"))
    labels = torch.load(os.path.join(export_dir, "labels.pt"))
    meta = json.load(open(os.path.join(export_dir, "export.json")))
    classes = json.load(open(os.path.join(export_dir, "classes.json")))
    shard_classes = {c["index"]: c["imagenet_index"] for c in json.load(open(os.path.join(shards_dir, "classes.json")))}
    ipc = meta["run"]["ipc"]
    assert images.dtype == torch.uint8 and images.shape[0] == len(classes) * ipc == 100, images.shape
    # export label -> DD-Ranking class
    to_ddr = {c["label"]: IMAGEWOOF.index(shard_classes[c["index"]]) for c in classes}
    ddr = torch.tensor([to_ddr[int(l)] for l in labels])
    order = torch.argsort(ddr * 10_000 + torch.arange(len(ddr)))  # stable: DD-Ranking class-major, ids kept
    images, ddr = images[order], ddr[order]
    assert torch.equal(ddr, torch.arange(10).repeat_interleave(ipc)), ddr
    # as DD-Ranking's own ImageWoof transform: ToTensor, Normalize(ImageNet), Resize(im_size)
    x = images.float().div(255)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (x - mean) / std
    x = F.interpolate(x, size=im_size, mode="bilinear", antialias=True, align_corners=False)
    print(f"export: {tuple(images.shape)} uint8 -> {tuple(x.shape)} float32, IPC {ipc}; "
          f"export label -> DD-Ranking class {to_ddr}", flush=True)
    return x, ipc


def evaluate(export_dir, data_dir, shards_dir):
    import torch
    from torchvision import transforms
    from importlib.metadata import version
    from ddranking.metrics import AugmentationRobustScore

    s = env("DDR_IM_SIZE", "32", int)
    im_size = (s, s)
    model = env("DDR_MODEL", "ConvNet-3")
    epochs = env("DDR_EPOCHS", "20", int)
    num_eval = env("DDR_NUM_EVAL", "1", int)
    syn_lr = env("DDR_SYN_LR", "")  # "" = None: DD-Ranking searches lr in [0.001, 0.005, 0.01, 0.05, 0.1]
    syn_lr = float(syn_lr) if syn_lr else None
    torch.set_num_threads(env("OMP_NUM_THREADS", "1", int))
    print(f"ddranking {version('ddranking')}, torch {torch.__version__}, numpy {version('numpy')}, "
          f"threads {torch.get_num_threads()}", flush=True)

    images, ipc = load_export(export_dir, shards_dir, im_size)
    train_trans = transforms.Compose([  # = the class's default_transform; cutmix is the augmentation
        transforms.Resize(im_size), transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    settings = dict(
        dataset="ImageWoof", real_data_path=data_dir, ipc=ipc, model_name=model, label_type="hard",
        data_aug_func="cutmix", aug_params={"beta": 1.0}, optimizer="sgd", lr_scheduler="cosineannealing",
        weight_decay=0.0005, momentum=0.9, num_eval=num_eval, im_size=im_size, num_epochs=epochs,
        batch_size=env("DDR_BATCH", "10", int), num_workers=0, random_data_format="image",
        random_data_path=os.path.join(data_dir, "random"), save_path=os.path.join(data_dir, "results", "aug_scores.csv"),
        custom_train_trans=train_trans, device="cpu", dist=False)
    print("AugmentationRobustScore(" + ", ".join(f"{k}={v!r}" for k, v in settings.items() if k != "custom_train_trans")
          + f"), compute_metrics(syn_lr={syn_lr})", flush=True)
    workarounds = env("DDR_WORKAROUNDS", "0") == "1"
    if workarounds:
        # ddranking 0.2.0 bug 1: for ImageNette/ImageWoof/... get_dataset returns torch Subsets, and
        # AugmentationRobustScore._get_class_to_indices (metrics/aug_robust.py:187) reads `dataset.targets`,
        # which a Subset does not have. Give the Subsets the targets of their samples (ImageNet indices).
        import ddranking.metrics.aug_robust as ar
        orig = ar.get_dataset

        def get_dataset(*a, **k):
            out = list(orig(*a, **k))
            for d in out:
                if isinstance(d, torch.utils.data.Subset) and not hasattr(d, "targets"):
                    d.targets = [d.dataset.targets[i] for i in d.indices]
            return tuple(out)

        ar.get_dataset = get_dataset
        print("workaround 1: Subset.targets set (ddranking 0.2.0 aug_robust.py:187 needs it)", flush=True)
    ars = AugmentationRobustScore(**settings)
    if workarounds and not hasattr(ars, "teacher_models"):
        # ddranking 0.2.0 bug 2: __init__ sets self.teacher_models only for label_type='soft', but the
        # hard-label path reads it (aug_robust.py:298, tea_models=self.teacher_models).
        ars.teacher_models = None
        print("workaround 2: ars.teacher_models = None (unset for label_type='hard', read at aug_robust.py:298)")
    if workarounds and not hasattr(ars, "test_loader_real"):
        # ddranking 0.2.0 bug 3: __init__ deletes dst_test_real and builds only test_loader_syn, but the
        # hard-label path validates on self.test_loader_real (aug_robust.py:304). With no custom_val_trans
        # the two are the same val set and transform.
        ars.test_loader_real = ars.test_loader_syn
        print("workaround 3: ars.test_loader_real = ars.test_loader_syn (read at aug_robust.py:304)")
    print(f"test set: {len(ars.test_loader_syn.dataset)} val images; train pool for the random baseline: "
          f"{len(ars.dst_train)} images", flush=True)
    t = time.time()
    result = ars.compute_metrics(image_tensor=images, syn_lr=syn_lr)
    print(f"compute_metrics: {time.time() - t:.0f} s", flush=True)
    print("RESULT " + json.dumps({k: float(v) for k, v in result.items()}), flush=True)


def main():
    cmd = sys.argv[1]
    try:
        if cmd == "prepare":
            prepare(sys.argv[2], sys.argv[3])
        elif cmd == "eval":
            evaluate(sys.argv[2], sys.argv[3], sys.argv[4])
        else:
            raise SystemExit(f"unknown step {cmd!r}")
    except Exception as e:
        tb = traceback.extract_tb(e.__traceback__)
        last = tb[-1]
        print(f"DD-RANKING FAILED in step {cmd!r} at {last.filename}:{last.lineno} ({last.name}): "
              f"{type(e).__name__}: {e}", file=sys.stderr)
        traceback.print_exc()
        sys.exit(1)


if __name__ == "__main__":
    main()
