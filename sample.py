"""sample.py: generate, reconstruct, or render at any size; from our checkpoints or the official ones.

    python sample.py runs/dit-demo --n 64 --class 2 --cfg 3    # -> runs/dit-demo/generated/grid.png

Like train.py it knows only the model-file contract (`sample`, `encode`, `decode`, `render`, `load_official`);
README.md lists the modes (--reconstruct, official weights, --npz for FID, torchrun) and their flags.
"""
import argparse, hashlib, importlib, inspect, json, math, os, random, sys, time  # noqa: E401
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from tqdm import tqdm

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def fail(msg):
    """Bad input ends the run with one line naming the problem, not a stack trace."""
    raise SystemExit(f"error: {msg}")


# ------------------------------------------------------- data (train.py reads it; sample.py never imports train.py)
def seed_for(*parts):
    """A 64-bit seed from any tuple of ints/strings: the same parts give the same seed in every process."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


class Shapes:
    """Built-in procedural data: one coloured shape on a two-colour gradient, label = shape kind.
    No files; image i is the same for the same seed at any size (drawn at 4x, then box-downsampled)."""

    classes = ["circle", "square", "triangle", "star"]

    def __init__(self, size, n=60_000, seed=0):
        self.size, self.n, self.seed = size, n, seed

    def __len__(self):
        return self.n

    def image(self, i):
        rng, s = random.Random(seed_for("shapes", self.seed, i)), 4 * self.size
        top, bottom = np.array([rng.randrange(256) for _ in range(6)]).reshape(2, 3)
        ramp = np.linspace(0, 1, s)[:, None, None]  # vertical gradient (s, 1, 1)
        bg = (top * (1 - ramp) + bottom * ramp).repeat(s, axis=1)  # (s, s, 3)
        img = Image.fromarray(bg.astype(np.uint8))
        mean = (top + bottom) / 2  # shape colour far from the background, so the shape is always visible
        color = tuple(int(c) for c in max((np.array([rng.randrange(256) for _ in range(3)]) for _ in range(8)),
                                          key=lambda c: np.abs(c - mean).sum()))
        kind, r = i % len(self.classes), rng.uniform(0.2, 0.34) * s
        cx, cy, a = rng.uniform(r, s - r), rng.uniform(r, s - r), rng.uniform(0, 2 * math.pi)
        draw = ImageDraw.Draw(img)
        if kind == 0:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        else:
            corners = {1: 4, 2: 3, 3: 10}[kind]
            angles = [a + 2 * math.pi * j / corners for j in range(corners)]
            radii = [r if kind != 3 or j % 2 == 0 else 0.45 * r for j in range(corners)]  # a star's inner corners
            draw.polygon([(cx + q * math.cos(t), cy + q * math.sin(t)) for t, q in zip(angles, radii)], fill=color)
        return img.resize((self.size, self.size), Image.BOX), kind


class Folder:
    """Images under a folder. With class sub-folders (ImageNet layout) the label is the sub-folder;
    otherwise (or labelled=False, e.g. FFHQ's numbered sub-folders) every image has label 0."""

    def __init__(self, root, labelled=True):
        root = Path(root)
        if not root.is_dir():
            fail(f"data folder {root} does not exist (give --data PATH, or set $DATA_ROOT)")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
        if not files:
            fail(f"data folder {root} has no images ({' '.join(sorted(IMAGE_EXTS))})")
        subdirs = sorted(d.name for d in root.iterdir() if d.is_dir())
        labelled = labelled and subdirs and not any(p.parent == root for p in files)
        self.classes = subdirs if labelled else ["all"]
        index = {c: k for k, c in enumerate(self.classes)}
        self.files, self.labels = files, [index[p.relative_to(root).parts[0]] if labelled else 0 for p in files]

    def __len__(self):
        return len(self.files)

    def image(self, i):
        with Image.open(self.files[i]) as img:
            return img.convert("RGB"), self.labels[i]


class CenterCrop:
    """ADM/DiT preprocessing: box-halve while large, bicubic-resize the short side, centre crop; random flip
    (flip=False: never). A class, not a closure, so that workers started by `spawn` (macOS, Windows) can unpickle it."""

    def __init__(self, image_size, flip=True):
        self.image_size, self.flip = image_size, flip

    def __call__(self, img, rng):
        size = self.image_size
        while min(img.size) >= 2 * size:
            img = img.resize(tuple(x // 2 for x in img.size), Image.BOX)
        scale = size / min(img.size)
        img = img.resize(tuple(max(size, round(x * scale)) for x in img.size), Image.BICUBIC)
        left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
        img = img.crop((left, top, left + size, top + size))
        img = img.transpose(Image.FLIP_LEFT_RIGHT) if self.flip and rng.random() < 0.5 else img
        return {"x": torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)}  # (3, H, W)


def pick_device(name=None):
    """--device cpu|cuda|mps (default: cuda, else Apple's mps, else cpu). A GPU (under torchrun, number LOCAL_RANK)
    becomes the current device, with TF32 matmuls and convolutions."""
    ok = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    name = name or next(k for k, v in ok.items() if v)
    if not ok[name]:
        fail(f"--device {name}: not available on this machine (torch {torch.__version__})")
    if name != "cuda":
        return torch.device(name)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cuda", torch.cuda.current_device())


# ------------------------------------------------------- checkpoints and images (train.py uses these too)
def load_checkpoint(path):
    """Our own checkpoint (a run folder or a .pt file), loaded with weights_only=True."""
    path = Path(path)
    path = path / "ckpt.pt" if path.is_dir() else path
    if not path.is_file():
        fail(f"no checkpoint at {path}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        fail(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    if not isinstance(ck, dict) or "create" not in ck:
        fail(f"{path} was not written by train.py (no 'create' entry); for official weights use sample.py --official")
    return ck


def load_weights(model, state, what):
    """Strict load; a mismatch names the first differing keys (the usual cause: the wrong --model/--config)."""
    mine, theirs = set(model.state_dict()), set(state)
    if mine != theirs:
        fail(f"{what} does not fit this model: missing {sorted(mine - theirs)[:4]}, "
             f"unexpected {sorted(theirs - mine)[:4]}")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        fail(f"{what} does not fit this model: {str(e).splitlines()[-1].strip()[:200]}")


def build_model(create, weights=None, what="checkpoint"):
    """create = {"model": module name, "config": preset, "overrides": {...}}, as stored in every checkpoint."""
    try:
        module = importlib.import_module(create["model"])
    except ModuleNotFoundError:
        fail(f"no model file {create['model']}.py")
    if create["config"] not in module.CONFIGS:
        fail(f"{create['model']} has no preset {create['config']!r}; presets: {', '.join(module.CONFIGS)}")
    model = module.create(create["config"], **create["overrides"])
    if weights is not None:
        load_weights(model, weights, what)
    return model


def load_official(name, path, config, flag):
    try:
        return importlib.import_module(name).load_official(path, config)
    except Exception as e:  # noqa: BLE001 (unpickling, a wrong file or config: all mean "not this checkpoint")
        fail(f"{flag} {path}: not a loadable {name} {config} checkpoint ({type(e).__name__}: "
             f"{(str(e).strip() or '-').splitlines()[0][:160]})")


def load_autoencoder(spec, device):
    """--ae: one of our autoencoder checkpoints (EMA weights), or MODEL:CONFIG:PATH for an official one."""
    if spec.count(":") >= 2 and not Path(spec).exists():
        name, config, path = spec.split(":", 2)
        ae = load_official(name, path, config, "--ae")
    else:
        ck = load_checkpoint(spec)
        ae = build_model(ck["create"], ck["ema"], f"--ae {spec}")
    if not all(hasattr(ae, f) for f in ("encode", "decode", "scale_factor")):
        fail(f"--ae {spec} is not an autoencoder (no encode/decode/scale_factor)")
    return ae.to(device).eval().requires_grad_(False)


def to_uint8(x):
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8 on the host."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(x, path):
    """Images (B, 3, H, W) in [-1, 1] (or uint8 (B, H, W, 3)) -> one square-ish PNG grid with a 2-pixel gap."""
    imgs = x if isinstance(x, np.ndarray) else to_uint8(x[:, :3])
    b, h, w, c = imgs.shape
    nrow = math.ceil(math.sqrt(b))
    grid = np.full((math.ceil(b / nrow) * (h + 2) + 2, nrow * (w + 2) + 2, c), 255, np.uint8)
    for k, img in enumerate(imgs):
        r, q = divmod(k, nrow)
        grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + q * (w + 2): 2 + q * (w + 2) + w] = img
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


# ------------------------------------------------------- shape score (issue 17): is each sample the shape it was asked for?
# A small CNN, trained once on real Shapes images and cached, names the shape in each generated image. The shape score
# is the share of samples it names as the class they were drawn for; for an unconditional model, the class histogram.
SCORE_SIZE = 32  # the classifier's input side: larger samples are box-filtered down to it, smaller ones are refused
SCORE_VERSION = 2  # in the cache file's name: bump it whenever Shapes or the classifier's recipe changes
SCORE_SEEDS = (1_000_001, 1_000_002)  # Shapes seeds of the classifier's training and held-out images (runs: 0, 1..)


def shapes_tensor(n, seed):
    """n real Shapes images at SCORE_SIZE -> (n, 3, 32, 32) in [-1, 1] and their labels (n,)."""
    source = Shapes(SCORE_SIZE, n, seed)
    images, labels = zip(*(source.image(i) for i in range(n)))
    x = torch.from_numpy(np.stack([np.asarray(img) for img in images]))  # (n, H, W, 3) uint8
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1, torch.tensor(labels)


def shape_classifier_net():
    """(B, 3, 32, 32) -> (B, 4) logits: four 3x3 conv + BatchNorm + ReLU stages of 16, 32, 64, 64 channels with a 2x2
    max-pool between them, global average pool, linear. 60,948 parameters, 6.8 MFLOP per image (a test counts both)."""
    nn = torch.nn

    def stage(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(*stage(3, 16), nn.MaxPool2d(2), *stage(16, 32), nn.MaxPool2d(2), *stage(32, 64),
                         nn.MaxPool2d(2), *stage(64, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 4))


def train_shape_classifier(n=30_000, batch=32, lr=3e-3):
    """One pass over n fresh Shapes images, AdamW with a one-cycle learning rate; each batch is turned by one of the
    square's 8 rotations/flips (none changes a shape's kind), and blurred and noised as below. Seeded, and the
    caller's RNG is left as it was.
    One CPU thread: such small convolutions gain little from a second one, and on a busy 2-core machine a second thread
    waiting for its core made training 5x slower (measured); one thread also gives the same weights at any thread count.
    -> (net in eval mode, accuracy on 2,000 held-out Shapes images of another seed)."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]), torch.enable_grad():  # first use may come from under no_grad (--score)
        torch.set_num_threads(1)
        torch.manual_seed(SCORE_SEEDS[0])
        x, y = shapes_tensor(n, SCORE_SEEDS[0])
        net, order = shape_classifier_net(), torch.randperm(n)
        opt = torch.optim.AdamW(net.parameters(), lr, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=n // batch, pct_start=0.15)
        for step in range(n // batch):
            j, turn = order[step * batch:(step + 1) * batch], int(torch.randint(8, ()))
            xb = torch.rot90(x[j], turn % 4, (2, 3))  # (B, 3, 32, 32), turned by 90 * turn degrees
            xb = xb.flip(3) if turn >= 4 else xb
            # Samples of a model in training are soft or grainy: a 3x3 box blur on 30% of the images and Gaussian noise
            # of a random std in [0, 0.2] on all, so the classifier judges the shape, not the finish (without them,
            # noise of std 0.1 alone left 30% of real shapes recognised).
            blur = torch.rand(len(j), 1, 1, 1) < 0.3
            xb = torch.where(blur, torch.nn.functional.avg_pool2d(xb, 3, 1, 1, count_include_pad=False), xb)
            xb = xb + 0.2 * torch.rand(len(j), 1, 1, 1) * torch.randn_like(xb)
            loss = torch.nn.functional.cross_entropy(net(xb), y[j])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
        torch.set_num_threads(threads)
    x, y = shapes_tensor(2000, SCORE_SEEDS[1])
    return net.eval(), (classify_shapes(net.eval(), x) == y).float().mean().item()


def shape_classifier_path():
    """$XDG_CACHE_HOME (default ~/.cache)/seven-papers/shape_classifier_<SCORE_SIZE>px_v<SCORE_VERSION>.pt; the tests
    point XDG_CACHE_HOME at a temporary folder."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "seven-papers" / f"shape_classifier_{SCORE_SIZE}px_v{SCORE_VERSION}.pt"


def shape_classifier(device):
    """The cached classifier in eval mode on `device`; trained here (once, on the CPU) when the cache has none or an
    unreadable one. -> (net, its held-out accuracy)."""
    path, net = shape_classifier_path(), shape_classifier_net()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state["net"])
        accuracy = float(state["held_out_accuracy"])
    except Exception as e:  # noqa: BLE001 (no file yet, or a truncated / foreign one: train again)
        if path.exists():
            print(f"note: {path} is unreadable ({type(e).__name__}); training the shape classifier again")
        t0 = time.time()
        net, accuracy = train_shape_classifier()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"net": net.state_dict(), "held_out_accuracy": accuracy}, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)  # atomic: a killed run never leaves half a file under the name
        print(f"shape classifier trained in {time.time() - t0:.0f} s ({100 * accuracy:.2f}% right on 2,000 held-out "
              f"shapes), cached at {path}")
    return net.to(device).eval(), accuracy


@torch.no_grad()
def classify_shapes(net, x):
    """Images (B, 3, H, W) in [-1, 1], H = W >= 32 -> the class the classifier names for each, (B,) on the CPU."""
    if x.shape[-1] != x.shape[-2] or x.shape[-1] < SCORE_SIZE:
        raise ValueError(f"the shape score needs square images of at least {SCORE_SIZE} px, got {tuple(x.shape[-2:])}")
    x = x.float().clamp(-1, 1)  # as the saved PNGs show them
    if x.shape[-1] != SCORE_SIZE:  # box filter (an average over each output pixel's area), as Shapes itself downsamples
        x = torch.nn.functional.interpolate(x, size=SCORE_SIZE, mode="area")
    device = next(net.parameters()).device
    with torch.autocast(device.type, enabled=False):  # train.py calls this under bf16 autocast
        return torch.cat([net(x[i:i + 256].to(device)).argmax(1).cpu() for i in range(0, len(x), 256)])


def shape_score(predicted, labels=None):
    """-> {"n", "hist": share of the samples named as each class}, and when the samples had labels,
    "right", "score" (share named as their own class) and "per_class" (that share for each class, None if not drawn)."""
    k, n = len(Shapes.classes), len(predicted)
    result = {"n": n, "hist": (torch.bincount(predicted, minlength=k).float() / n).tolist()}
    if labels is not None:
        hit = predicted == labels
        result.update(right=int(hit.sum()), score=hit.float().mean().item(),
                      per_class=[hit[labels == c].float().mean().item() if (labels == c).any() else None
                                 for c in range(k)])
    return result


def format_score(result):
    """One line: "shape score 87.5% (224/256 right; per class circle 95% ...; named circle 26% ...)", or the
    histogram."""
    hist = " ".join(f"{c} {100 * h:.0f}%" for c, h in zip(Shapes.classes, result["hist"]))
    if "score" not in result:
        return f"shape histogram of {result['n']} unconditional samples: {hist}"
    per = " ".join(f"{c} {100 * s:.0f}%" for c, s in zip(Shapes.classes, result["per_class"]) if s is not None)
    return (f"shape score {100 * result['score']:.1f}% ({result['right']}/{result['n']} right; per class {per}; "
            f"named {hist})")


@torch.no_grad()
def label_probe(model, ae, device, size=None, **sampling):
    """The contract has no "is class-conditional" flag, so ask the model: do labels 0 and 1 draw different images from
    the same noise? -> (class-conditional?, side of the decoded images in pixels). Costs two one-image samples."""
    a, b = (to_image(model.sample(1, labels=torch.tensor([c], device=device),
                                  generator=torch.Generator(device).manual_seed(0), **sampling), ae, size)
            for c in (0, 1))
    return not torch.equal(a, b), a.shape[-1]


@torch.no_grad()
def score_samples(model, ae, n, device, conditional, classes=(0, 1, 2, 3), seed=0, batch=64, size=None, bar=False,
                  **sampling):
    """Draw n samples (decoded through `ae`; labels cycling through `classes` if the model is conditional), batch i
    seeded as sample.py seeds it, and score them."""
    labels, predicted = torch.tensor([classes[i % len(classes)] for i in range(n)]), []
    net = shape_classifier(device)[0]
    for i in tqdm(range(0, n, batch), disable=not bar, desc="scoring", unit="batch"):
        y = labels[i:i + batch].to(device) if conditional else None
        gen = torch.Generator(device).manual_seed(seed_for("sample", seed, i))  # batch i: as sample.py seeds it
        x = model.sample(min(batch, n - i), labels=y, generator=gen, **sampling)
        predicted.append(classify_shapes(net, to_image(x, ae, size)))
    return shape_score(torch.cat(predicted), labels if conditional else None)


def score_run(args, device):
    """sample.py RUN --score [N]: N samples with the run's sampler defaults (or --steps/--sampler/--cfg), one line."""
    if args.official or not args.ckpt:
        fail("--score rates a run of train.py --data shapes: give its run folder")
    if args.score < 1:
        fail(f"--score {args.score}: expected a number of samples >= 1")
    data = load_checkpoint(args.ckpt).get("args", {}).get("data")
    if data != "shapes":
        fail(f"--score: {args.ckpt} was trained on --data {data}, not shapes; the shape score rates shapes runs only")
    model, ae, _ = load(args, device)
    if not hasattr(model, "sample"):
        fail(f"--score: {args.ckpt} is an autoencoder; score a diffusion run (a latent run decodes through it)")
    classes = args.classes or list(range(len(Shapes.classes)))
    if not all(0 <= c < len(Shapes.classes) for c in classes):
        fail(f"--class {' '.join(map(str, classes))}: shapes has classes 0..{len(Shapes.classes) - 1} "
             f"({', '.join(Shapes.classes)})")
    sampling = dict(steps=args.steps, cfg=args.cfg, sampler=args.sampler)
    try:
        conditional, side = label_probe(model, ae, device, args.size, **sampling)
        if side < SCORE_SIZE:
            fail(f"--score: the samples are {side} px; the shape classifier needs at least {SCORE_SIZE} px (below that "
                 "Shapes' classes are not told apart reliably)")
        result = score_samples(model, ae, args.score, device, conditional, classes, args.seed, args.batch, args.size,
                               bar=True, **sampling)
    except ValueError as e:
        fail(str(e))
    print(format_score(result))
    return result


def log_shape_score(grid, model, ae, args, path, step, device):
    """train.py, at each grid of a shapes run: the grid's own samples (drawn with labels cycling through the classes,
    so scoring costs no extra sampling; 16 samples: a coarse, 6.25%-step view, sample.py --score gives the 256-sample
    number) are scored; shape_score (conditional models, else null) and shape_hist join the step's record in
    log.jsonl (train.py logged it just before; a new record when the step logged none). Autoencoders' grids, and
    samples under 32 px, are not scored."""
    if not hasattr(model, "sample") or grid.shape[-1] < SCORE_SIZE:
        return
    conditional, _ = label_probe(model, ae, device, steps=args.sample_steps, cfg=args.sample_cfg)
    labels = torch.arange(len(grid)) % len(Shapes.classes)
    result = shape_score(classify_shapes(shape_classifier(device)[0], grid), labels if conditional else None)
    tqdm.write(f"step {step}: {format_score(result)}")
    values = {"shape_score": result.get("score"), "shape_hist": result["hist"]}
    lines = path.read_text().splitlines() if path.exists() else []
    if lines and json.loads(lines[-1])["step"] == step:
        lines[-1] = json.dumps({**json.loads(lines[-1]), **values})
    else:
        lines.append(json.dumps({"step": step, **values}))
    path.with_suffix(".tmp").write_text("".join(line + "\n" for line in lines))
    os.replace(path.with_suffix(".tmp"), path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample from, or reconstruct with, a trained or official model.")
    p.error = fail  # a bad value is one line naming the flag, not usage text
    p.add_argument("ckpt", nargs="?", help="run folder or checkpoint written by train.py")
    p.add_argument("--model", help="with --official: the model file (dit, hdit, ...)")
    p.add_argument("--official", help="an official released checkpoint (needs --model and --config)")
    p.add_argument("--config", help="with --official: a CONFIGS preset of the model file")
    p.add_argument("--ae", help="decode through this autoencoder: our checkpoint or MODEL:CONFIG:OFFICIAL_PATH")
    p.add_argument("--n", "--num-samples", type=int, default=16, help="samples (under torchrun: --num-samples)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the paper's)")
    p.add_argument("--sampler", default=None, help="default: the paper's. " + (sampler_help() if {"-h", "--help"} &
                   set(sys.argv[1:] if argv is None else argv) else ""))
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--class", dest="classes", type=int, nargs="+", default=None, help="class label(s), cycled")
    p.add_argument("--context", help="text-conditioned models: .pt of precomputed text-encoder states (README.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=16, help="images per forward pass (batch b is seeded by --seed and b)")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--reconstruct", help="autoencoders: an image or a folder of images to encode and decode")
    p.add_argument("--image-size", type=int, default=None, help="--reconstruct: input size (default: trained size)")
    p.add_argument("--size", type=int, default=None, help="render at this size (INFD's render(z, size))")
    p.add_argument("--out", default=None, help="output FOLDER (default: RUN/generated or RUN/reconstructed)")
    p.add_argument("--each", action="store_true", help="also write one PNG per image")
    p.add_argument("--score", type=int, nargs="?", const=256, metavar="N", help="shapes runs: classify N samples "
                   "(default 256), print the shape score")
    p.add_argument("--npz", help="also write the samples to this .npz (uint8 arr_0, as ADM/DiT's FID suite reads)")
    p.add_argument("--device", choices=["cpu", "cuda", "mps"], default=None, help="default: cuda, else mps, else cpu")
    args = p.parse_args(argv)
    for flag in ("n", "batch", "steps", "image_size", "size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            fail(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected an integer >= 1")
    return args


def sampler_help():
    """--help: the names of each model file's SAMPLERS, where it declares them."""
    names = [f.stem for f in sorted(Path(__file__).parent.glob("*.py")) if "\nSAMPLERS = " in f.read_text()]
    return "; ".join(f"{m}: {', '.join(importlib.import_module(m).SAMPLERS)}" for m in names) + \
        "; other model files: model-specific (see their sample(), e.g. ddpm, ddim)"


def load(args, device):
    """-> (model, autoencoder or None, trained image size or None)."""
    if args.official:
        if not (args.model and args.config):
            fail("--official needs --model and --config")
        model = load_official(args.model, args.official, args.config, "--official")
        return model.to(device).eval(), load_autoencoder(args.ae, device) if args.ae else None, None
    if not args.ckpt:
        fail("give a run folder / checkpoint, or --model NAME --official PATH --config NAME")
    ck, weights = load_checkpoint(args.ckpt), "model" if args.raw else "ema"
    model = build_model(ck["create"], ck[weights], f"{args.ckpt} '{weights}'").to(device).eval()
    size, stored = ck["create"]["overrides"].get("image_size"), ck.get("ae")
    if args.ae or not stored:
        return model, load_autoencoder(args.ae, device) if args.ae else None, size
    # train.py stores an AE inside the run folder relative to it, and the scale factor it measured (or the official one)
    run = Path(args.ckpt) if Path(args.ckpt).is_dir() else Path(args.ckpt).parent
    ae = load_autoencoder(str(run / stored["spec"]) if (run / stored["spec"]).exists() else stored["spec"], device)
    ae.scale_factor.fill_(stored["scale_factor"])
    return model, ae, size


def to_image(x, ae, size):
    """Model space -> pixels in [-1, 1]: decode latents (or render them at `size`, INFD) when there is an AE."""
    if ae is None:
        if x.shape[1] != 3:
            fail(f"the model samples {x.shape[1]}-channel latents; give --ae to decode them")
        return x
    return ae.render(x, size) if size and hasattr(ae, "render") else ae.decode(x)


def load_context(path, model, n, device):
    """--context: no text encoder ships, so text conditioning comes as precomputed states (LDM: BERT / CLIP)."""
    if "context" not in inspect.signature(model.sample).parameters:
        fail("--context: this model takes no text context")
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001
        fail(f"--context {path} is not readable ({type(e).__name__})")
    obj = obj if isinstance(obj, dict) else {"context": obj}
    for k, v in obj.items():
        if k not in ("context", "uc_context") or not torch.is_tensor(v) or v.dim() not in (2, 3) or \
                (v.dim() == 3 and len(v) not in (1, n)):
            fail(f"--context {path}: expected a tensor (L, D) or ({n}, L, D), or a dict of them (context, uc_context)")
    return {k: (v if v.dim() == 3 else v[None]).float().expand(n, -1, -1) for k, v in obj.items()}


@torch.no_grad()
def generate(model, ae, args, device, out):
    """--n samples in batches of --batch. Batch i (its first sample's index) draws from the seed (--seed, i) and its
    labels cycle by index, so torchrun's processes (process r: batches r, r + N, ...) give what one process gives."""
    if not hasattr(model, "sample"):
        fail("this is an autoencoder: use --reconstruct IMAGE_OR_FOLDER")
    ctx = load_context(args.context, model, args.n, device) if args.context else {}
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine, bar = {}, tqdm(total=args.n, unit="img", disable=rank != 0, desc="sampling")
    for i in range(rank * args.batch, args.n, world * args.batch):
        n = min(args.batch, args.n - i)
        labels = (torch.tensor([args.classes[(i + j) % len(args.classes)] for j in range(n)], device=device)
                  if args.classes else None)
        gen = torch.Generator(device).manual_seed(seed_for("sample", args.seed, i))
        try:
            x = model.sample(n, labels=labels, steps=args.steps, cfg=args.cfg, sampler=args.sampler, generator=gen,
                             **{k: v[i:i + n] for k, v in ctx.items()})
        except ValueError as e:
            fail(str(e))
        mine[i] = to_uint8(to_image(x, ae, args.size)[:, :3])
        bar.update(min(n * world, args.n - bar.n))  # rank 0 counts for all: the bar's img/s is the whole job's
    bar.close()
    if world > 1:  # the processes' batches meet on rank 0 (gloo, through host memory)
        parts = [None] * world if rank == 0 else None
        dist.gather_object(mine, parts, dst=0)
        mine = {i: v for part in parts or [] for i, v in part.items()}
    if rank != 0:
        return
    images = np.concatenate([mine[i] for i in sorted(mine)])  # (N, H, W, 3) uint8
    save_grid(images[:256], out / "grid.png")  # a look at the first 256
    for k, img in enumerate(images if args.each else []):
        Image.fromarray(img).save(out / f"{k:06d}.png")
    if args.npz:
        np.savez(args.npz, arr_0=images)
    print(f"wrote {len(images)} samples to {out}/grid.png" + (f" (+ {len(images)} single PNGs)" if args.each else "")
          + (f" and {args.npz} (arr_0 {images.shape} uint8)" if args.npz else ""))


def lpips_metric(device):
    """LPIPS (AlexNet, as the LPIPS paper recommends for evaluation), or None when its weights cannot be downloaded."""
    try:
        import lpips
        return lpips.LPIPS(net="alex", verbose=False).to(device).eval()
    except Exception as e:  # noqa: BLE001 (no network: torchvision cannot fetch the backbone)
        print(f"note: LPIPS not computed ({type(e).__name__}): put alexnet-owt-7be5be79.pth (torchvision's "
              f"AlexNet ImageNet weights) in {Path(torch.hub.get_dir()) / 'checkpoints'}/ and run again")
        return None


@torch.no_grad()
def reconstruct(model, args, size, device, out):
    if not (hasattr(model, "encode") and hasattr(model, "decode")):
        fail("--reconstruct needs an autoencoder checkpoint (encode/decode)")
    src = Path(args.reconstruct)
    files = [src] if src.is_file() and src.suffix.lower() in IMAGE_EXTS else Folder(src, labelled=False).files
    size_in = args.image_size or size or 256
    size_out = args.size or size_in
    out.mkdir(parents=True, exist_ok=True)
    tf_in, tf_out = CenterCrop(size_in, flip=False), CenterCrop(size_out, flip=False)
    metric, psnrs, dists = lpips_metric(device), [], []
    for f in files:
        with Image.open(f) as img:
            img = img.convert("RGB")
        x, target = tf_in(img, None)["x"][None].to(device), tf_out(img, None)["x"][None].to(device)
        y = to_image(model.encode(x), model, args.size).float().clamp(-1, 1)  # decoded, or rendered at --size
        if y.shape != target.shape:
            fail(f"the model reconstructs {tuple(y.shape[-2:])} from {size_in}px input; give --size")
        mse = ((y - target) / 2).pow(2).mean().item()  # on [0, 1] images
        psnrs.append(10 * math.log10(1 / max(mse, 1e-12)))
        if metric is not None:
            dists.append(metric(target, y).item())
        pair = np.concatenate(list(to_uint8(torch.cat([target, y]))), axis=1)  # input | output, side by side
        Image.fromarray(pair).save(out / f"{f.stem}_recon.png")
        print(f"{f.name}: PSNR {psnrs[-1]:.2f} dB" + (f", LPIPS {dists[-1]:.4f}" if dists else ""))
    print(f"{len(files)} image(s) -> {out}/: mean PSNR {np.mean(psnrs):.2f} dB"
          + (f", mean LPIPS {np.mean(dists):.4f}" if dists else ""))


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # torchrun: every process samples its share of the batches
        dist.init_process_group("gloo")
    if args.score is not None:  # the shape score of a shapes run (issue 17)
        return score_run(args, device)
    model, ae, size = load(args, device)
    run = Path(args.official or args.ckpt)
    run = run if run.is_dir() else run.parent
    out = Path(args.out or run / ("reconstructed" if args.reconstruct else "generated"))
    if args.reconstruct:
        reconstruct(model, args, size, device, out)
    else:
        generate(model, ae, args, device, out)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
