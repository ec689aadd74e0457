"""train.py: the one training loop for every model file in this repository.

    python train.py --model dit --config demo --data shapes --image-size 32 --steps 3000
    torchrun --nproc_per_node 8 train.py --model hdit --config hdit_ffhq1024 --data ffhq --image-size 1024

It knows only the model-file contract (README.md); the rest is plumbing: data, DDP, precision, EMA, checkpoints.

Reproducibility: --batch-size is the GLOBAL batch. Each step reads one global batch from a per-epoch permutation and
cuts it into world_size * grad_accum equal shards; shard s is the same samples, and every random draw for it (the
--ae encode included) is seeded from (seed, step, s), whatever the number of processes. So two DDP ranks compute
what one process with --grad-accum 2 computes, and a resumed run repeats an uninterrupted one step for step.
"""
import argparse, ast, contextlib, copy, functools, hashlib, json, os, random, sys, time  # noqa: E401
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from sample import (CenterCrop, Folder, Shapes, build_model, fail, load_autoencoder, load_checkpoint, load_weights,
                    log_shape_score, pick_device, save_grid, seed_for)

DEFAULTS = dict(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, ema_decay=0.9999, warmup_steps=0, grad_clip=1.0,
                batch_size=64)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}


# ----------------------------------------------------------------------------------------------- data
def find_data(name, image_size, seed):
    root = Path(os.environ.get("DATA_ROOT", "./data"))
    if name == "shapes":
        return Shapes(image_size, seed=seed)
    if name == "ffhq":
        return Folder(root / "ffhq", labelled=False)
    if name == "imagenet":
        return Folder(root / "imagenet" / "train" if (root / "imagenet" / "train").is_dir() else root / "imagenet")
    return Folder(name)


class Examples(torch.utils.data.Dataset):
    """source.image(i) -> transform -> tensors; an unreadable image is skipped (one warning line, then counted)."""

    def __init__(self, source, transform):
        self.source, self.transform, self.warned = source, transform, False

    def __getitem__(self, item):
        i, aug_seed = item
        for skipped in range(len(self.source)):
            j = (i + skipped) % len(self.source)
            try:
                img, label = self.source.image(j)
            except Exception as e:  # noqa: BLE001 (any decoder error means "unreadable")
                if not self.warned:
                    print(f"warning: skipping unreadable image {self.source.files[j]}: {type(e).__name__} "
                          "(further skips are only counted)", file=sys.stderr)
                self.warned = True
                continue
            out = self.transform(img, random.Random(aug_seed))
            return {**out, "y": torch.tensor(label), "skipped": torch.tensor(skipped)}
        raise RuntimeError("no readable image in the data set")


class ShardSampler(torch.utils.data.Sampler):
    """Yields (index, augmentation seed) for this process's shards of every global batch, from start_step on. Not
    DistributedSampler (rank r gets samples r::world): a shard's samples must not depend on the number of processes."""

    def __init__(self, n, global_batch, shards, total_shards, seed, start_step):
        if global_batch > n:
            fail(f"--batch-size {global_batch} is larger than the data set ({n} images)")
        self.n, self.g, self.shards, self.seed, self.start = n, global_batch, shards, seed, start_step
        self.mb = global_batch // total_shards  # samples per shard (= per micro-batch)

    def __iter__(self):
        per_epoch, mb, step, perm, epoch = self.n // self.g, self.mb, self.start, None, -1
        while True:
            if step // per_epoch != epoch:
                epoch = step // per_epoch
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            base = (step % per_epoch) * self.g
            for s in self.shards:
                for j in perm[base + s * mb: base + (s + 1) * mb]:
                    yield j, seed_for("aug", self.seed, epoch, j)
            step += 1


@functools.cache
def built_transform(spec, image_size):  # once per process: the main one and each DataLoader worker
    return build_model(ast.literal_eval(spec)).data_transform(image_size)


def model_transform(spec, image_size, img, rng):
    """A model's own data_transform (INFD's patch sampler), rebuilt from the run's spec (a repr) in each process: the
    model file returns a closure, which DataLoader workers started by `spawn` (macOS, Windows) cannot unpickle."""
    return built_transform(spec, image_size)(img, rng)


class Latents(torch.utils.data.Dataset):
    """--cache-latents: RUN/latents.npy holds per image z (its latent and its mirror's; fast-DiT's extract_features
    stores one random flip, which freezes the augmentation) and y (its label), read through a memory map."""

    def __init__(self, path):
        self.path, self.rows = path, None

    def __getstate__(self):  # each worker maps the file itself
        return {"path": self.path, "rows": None}

    def __getitem__(self, item):
        i, aug_seed = item
        self.rows = np.load(self.path, mmap_mode="r") if self.rows is None else self.rows
        flip = int(random.Random(aug_seed).random() < 0.5)  # the one draw CenterCrop makes
        return {"x": torch.from_numpy(self.rows[i]["z"][flip].copy()), "y": torch.tensor(int(self.rows[i]["y"])),
                "skipped": torch.tensor(0)}


@torch.no_grad()
def cache_latents(path, ae, source, args, autocast, device, rank, world):
    """Encode the data set once, each process a strided share, into one memory-mapped file. Its key (AE weights,
    image size, data) is written last: an interrupted or outdated cache is rebuilt, a matching one reused."""
    h, key_file = hashlib.blake2b(repr((args.image_size, args.data, len(source))).encode()), path.with_suffix(".key")
    for t in ae.state_dict().values():
        h.update(t.detach().float().cpu().numpy().tobytes())
    if key_file.exists() and key_file.read_text() == h.hexdigest():
        return Latents(path)
    data, mine = Examples(source, CenterCrop(args.image_size, flip=False)), range(rank, len(source), world)
    sync = dist.barrier if world > 1 else (lambda: None)
    if rank == 0:
        key_file.unlink(missing_ok=True)
        z = ae.encode(data[(0, 0)]["x"][None].to(device))[0]
        np.lib.format.open_memmap(path, "w+", [("z", np.float32, (2, *z.shape)), ("y", np.int64)], (len(source),))
    sync()
    rows = np.load(path, mmap_mode="r+")
    loader = torch.utils.data.DataLoader(data, batch_size=64, sampler=[(i, 0) for i in mine], num_workers=args.workers)
    for k, b in enumerate(tqdm(loader, desc="caching latents", disable=rank != 0)):
        idx, x = list(mine[64 * k: 64 * (k + 1)]), b["x"].to(device)
        torch.manual_seed(seed_for("cache", args.seed, idx[0]))  # ae_kl: one fixed posterior sample per image
        with autocast:
            rows["z"][idx] = torch.stack([ae.encode(x), ae.encode(x.flip(-1))], 1).float().cpu().numpy()
        rows["y"][idx] = b["y"].numpy()
    rows.flush()
    sync()
    if rank == 0:
        key_file.write_text(h.hexdigest())
    return Latents(path)


# ------------------------------------------------------------------------------------ helpers
@torch.no_grad()
def ema_update(ema, model, decay):
    """ema += (1 - decay) * (p - ema) for the parameters; buffers (BatchNorm statistics) are copied, as
    k-diffusion's ema_update does. decay 0 makes the EMA equal the weights (presets with use_ema: False)."""
    pairs = [(e, p) for e, p in zip(ema.parameters(), model.parameters()) if p.is_floating_point()]
    torch._foreach_lerp_(*map(list, zip(*pairs)), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


class LossCall(torch.nn.Module):
    """model.loss as forward() (DDP syncs gradients only through forward()); a missing weights file is one line."""
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, group, batch, step):
        try:
            return self.m.loss(group, batch, step)
        except FileNotFoundError as e:
            fail(str(e))
        except (NotImplementedError, TypeError) as e:  # an op Apple's MPS backend lacks (float64, some kernels)
            if "MPS" not in str(e):
                raise
            fail(f"{str(e).splitlines()[0]} (set PYTORCH_ENABLE_MPS_FALLBACK=1 for a CPU fallback, or --device cpu)")


def count_flops(call, batch, groups, step, forward_only=False):
    """FLOPs of one training step for one sample: every group's loss forward + backward (FlopCounterMode). forward_only
    (--grad-checkpoint): 3x a no-grad forward, as the counter's hooks would keep all activations of a backward alive."""
    from torch.utils.flop_counter import FlopCounterMode
    n = min(2, len(batch["x"]))
    few = {k: v[:n] if torch.is_tensor(v) else v for k, v in batch.items()}
    buffers = [b.clone() for b in call.buffers()]  # e.g. BatchNorm statistics: this extra step must not move them
    with FlopCounterMode(display=False) as counter, torch.no_grad() if forward_only else contextlib.nullcontext():
        for g in groups:
            loss, _ = call(g, few, step)
            if not forward_only:
                loss.backward()
    call.zero_grad(set_to_none=True)
    for b, kept in zip(call.buffers(), buffers):
        b.copy_(kept)
    return counter.get_total_flops() / n * (3 if forward_only else 1)


@torch.no_grad()
def preview(ema, ae, fixed, args, num_classes, device):
    """Grid of EMA samples (diffusion models, decoded through --ae) or of input|reconstruction pairs (AEs)."""
    if hasattr(ema, "sample"):
        labels = torch.arange(16, device=device) % num_classes  # 16 samples, cycling through the classes
        gen = torch.Generator(device).manual_seed(args.seed)
        x = ema.sample(16, labels=labels, steps=args.sample_steps, cfg=args.sample_cfg, generator=gen)
        return ae.decode(x) if ae is not None else x
    x = fixed["x"][:8]
    return torch.stack([x, ema.decode(ema.encode(x))], 1).flatten(0, 1)  # input next to its reconstruction


# ------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train any model file of this repository (see README.md).")
    p.error = fail  # a bad value is one line naming the flag, not usage text
    p.add_argument("--model", required=True, help="model file name: dit, hdit, unet_ldm, ae_kl, ae_vq, dcae, infd")
    p.add_argument("--config", default="tiny", help="preset name from the model file's CONFIGS")
    p.add_argument("--data", default="shapes", help="shapes | ffhq | imagenet (under $DATA_ROOT) | PATH")
    p.add_argument("--image-size", type=int, default=None, help="pixels (default 32 for shapes, else 256)")
    p.add_argument("--out", default=None, help="run folder (default runs/MODEL-CONFIG)")
    p.add_argument("--batch-size", type=int, default=None, help="GLOBAL batch over all processes and accumulation")
    for name, default, what in [("steps", 10_000, "optimizer steps"), ("grad-accum", 1, "micro-batches per step"),
                                ("warmup-steps", None, "linear LR warm-up"), ("seed", 0, "data order and RNG"),
                                ("workers", min(4, os.cpu_count() or 1), "data loader processes"),
                                ("log-every", 10, "steps"), ("sample-every", 1000, "steps (0: no grids)"),
                                ("ckpt-every", 1000, "steps"), ("sample-steps", None, "sampler steps for the grids")]:
        p.add_argument(f"--{name}", type=int, default=default, help=what)
    for name in ("lr", "weight-decay", "ema-decay", "grad-clip"):
        p.add_argument(f"--{name}", type=float, default=None, help="default: the preset's hparams (0: none)")
    p.add_argument("--sample-cfg", type=float, default=1.0)
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/ckpt.pt (same flags; --lr may change)")
    p.add_argument("--init", default=None, help="start from this checkpoint's EMA weights (e.g. a DC-AE phase)")
    p.add_argument("--phase", type=int, default=None, help="passed to optimizer_groups (DC-AE phases 1-3)")
    p.add_argument("--ae", default=None, help="train on this autoencoder's latents: a checkpoint, or MODEL:CONFIG:PATH")
    p.add_argument("--cache-latents", action="store_true", help="with --ae: encode the data once (RUN_DIR/latents.npy)")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="create() overrides")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="autocast; auto: bf16 on GPUs that support it, else fp16 + GradScaler; fp32 on CPU and MPS")
    p.add_argument("--device", choices=["cpu", "cuda", "mps"], default=None, help="default: cuda, else mps, else cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the loss")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute each layer in backward (saves memory)")
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU (default: known GPUs)")
    args = p.parse_args(argv)
    for flag, low in [("batch_size", 1), ("steps", 1), ("grad_accum", 1), ("image_size", 1), ("log_every", 1),
                      ("ckpt_every", 1), ("workers", 0), ("sample_every", 0), ("warmup_steps", 0), ("lr", 0),
                      ("ema_decay", 0), ("grad_clip", 0)]:
        if getattr(args, flag) is not None and getattr(args, flag) < low:
            fail(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected a number >= {low}")
    if args.cache_latents and not args.ae:
        fail("--cache-latents needs --ae (it caches the autoencoder's latents)")
    args.image_size = args.image_size or (32 if args.data == "shapes" else 256)
    args.out = args.out or f"runs/{args.model}-{args.config.replace('/', '-')}"
    args.ae = str(Path(args.ae).resolve()) if args.ae and Path(args.ae).exists() else args.ae
    return args


def parse_sets(items):
    """--set depth=4 --set attn=global -> {"depth": 4, "attn": "global"} (Python literals, else strings)."""
    out = {}
    for key, sep, value in (item.partition("=") for item in items):
        if not sep:
            fail(f"--set {key!r}: expected KEY=VALUE")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def check_resume(ck, args, out):
    """--resume continues the same run: the flags that fix the model, its inputs and the data order must match."""
    was, now = ck["args"], vars(args)
    same = ("model", "config", "data", "image_size", "batch_size", "seed", "ae", "set", "phase")
    diff = [f"--{k.replace('_', '-')} {was.get(k)} (now {now[k]})" for k in same if was.get(k) != now[k]]
    if diff:
        fail(f"--resume: {out}/ckpt.pt was trained with other flags: {', '.join(diff)}; use them or a new --out")
    if was.get("lr") != args.lr:
        print(f"note: --resume with lr {args.lr} (the checkpoint's run used {was.get('lr')}) from step {ck['step']}")


def pick_precision(choice, device):
    """auto: bf16 autocast where the GPU has bf16 (not emulated), else fp16 autocast with a GradScaler (T4, V100);
    fp32 on CPU and MPS. -> (name, autocast context, GradScaler (a no-op unless fp16))."""
    if choice == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        choice = ("bf16" if bf16 else "fp16") if device.type == "cuda" else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(choice)
    autocast = torch.autocast(device.type, dtype) if dtype else contextlib.nullcontext()
    return choice, autocast, torch.amp.GradScaler(device.type, enabled=choice == "fp16")


def main(argv=None):
    args = parse_args(argv)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = pick_device(args.device)
    cuda, main_proc, out = device.type == "cuda", rank == 0, Path(args.out)
    precision, autocast, scaler = pick_precision(args.precision, device)

    ck = load_checkpoint(out / "ckpt.pt") if args.resume and (out / "ckpt.pt").exists() else None
    if world > 1:  # every process reads RUN_DIR itself: with per-node disks the other nodes would start at step 0
        dist.init_process_group("nccl" if cuda else "gloo")
        seen = [None] * world
        dist.all_gather_object(seen, ck["step"] if ck else None)
        if len(set(seen)) > 1:
            fail(f"the processes see different checkpoints in {out} (step by rank: {seen}); a multi-node run needs "
                 "--out (and --data, --ae, --init) on a file system that every node shares")
    if args.resume and not ck and main_proc:
        print(f"no checkpoint in {out}; starting at step 0")
    start = ck["step"] if ck else 0
    out.mkdir(parents=True, exist_ok=True)
    if main_proc and (out / "log.jsonl").exists():  # drop records past the resumed step (logged after its checkpoint)
        lines = (out / "log.jsonl").read_text().splitlines()
        (out / "log.jsonl").write_text("".join(r + "\n" for r in lines if json.loads(r)["step"] <= start))

    source = find_data(args.data, args.image_size, args.seed)
    num_classes, accum, shards = len(source.classes), args.grad_accum, world * args.grad_accum
    default_tf = CenterCrop(args.image_size)
    ae, ae_info, shape = None, None, (3, args.image_size, args.image_size)
    if args.ae:  # latents of a frozen autoencoder: measure their shape (and scale) on the first 8 images, seeded
        ae = load_autoencoder(args.ae, device)
        probe = torch.stack([Examples(source, default_tf)[(j % len(source), j)]["x"] for j in range(8)]).to(device)
        torch.manual_seed(seed_for("scale", args.seed))  # the same factor in every process and every run
        if ck and ck.get("ae"):
            ae.scale_factor.fill_(ck["ae"]["scale_factor"])
        elif float(ae.scale_factor) == 0:  # LDM's scale_by_std: 1 / std of the latents, so the model sees unit variance
            ae.scale_factor.fill_(1.0)  # encode unscaled (the AE is frozen: no graph is kept)
            ae.scale_factor.fill_(float(ae.encode(probe).float().var().rsqrt()))
        with torch.no_grad(), autocast:
            shape = tuple(ae.encode(probe[:1]).shape[1:])
        inside = Path(args.ae).is_relative_to(out.resolve())  # stored relative: a moved run folder keeps working
        ae_info = {"spec": str(Path(args.ae).relative_to(out.resolve())) if inside else args.ae,
                   "scale_factor": float(ae.scale_factor)}
    spec = ck["create"] if ck else {"model": args.model, "config": args.config, "overrides": {
        "image_size": shape[-1], "in_channels": shape[0], "num_classes": num_classes,
        **({"clip_denoised": False} if args.ae else {}), **parse_sets(args.set)}}  # latents are not in [-1, 1]
    torch.manual_seed(args.seed)  # the same initial weights in every process and every run with this seed
    try:
        model = build_model(spec)
    except (ValueError, TypeError) as e:
        what = f"--set {' '.join(args.set)}" if args.set else f"--ae latent shape {shape}" if args.ae else "--model"
        fail(f"{what} does not fit {args.model} {args.config}: {type(e).__name__}: {str(e).splitlines()[0]}")
    if args.grad_checkpoint:  # activation checkpointing, where the model file offers it (HDiT)
        getattr(model, "set_grad_checkpointing", lambda: fail(f"--grad-checkpoint: {args.model} does not support it"))()
    if args.init:
        load_weights(model, load_checkpoint(args.init)["ema"], f"--init {args.init}")
    model.to(device)
    groups = model.optimizer_groups(phase=args.phase)
    hp = {**DEFAULTS, **getattr(model, "hparams", {})}
    for k in ("lr", "weight_decay", "ema_decay", "grad_clip", "batch_size", "warmup_steps"):  # a flag overrides
        hp[k] = hp[k] if getattr(args, k) is None else getattr(args, k)
        setattr(args, k, hp[k])  # the checkpoint records the values used, so --resume can compare them
    if ck:
        check_resume(ck, args, out)
    batch = hp["batch_size"]
    if batch % shards:
        fail(f"--batch-size {batch} is not divisible by processes x --grad-accum = {shards}")

    # One AdamW per group; a group may be a list of torch param-group dicts when parts need other settings.
    opts, params = {}, {}
    for name, group in groups.items():
        pgs = [dict(g) for g in group] if group and isinstance(group[0], dict) else [{"params": list(group)}]
        for pg in pgs:  # a dict may scale the base lr (HDiT's mapping network: lr_scale 1/3)
            pg["initial_lr"] = pg.setdefault("lr", hp["lr"] * pg.pop("lr_scale", 1.0))
        opts[name] = torch.optim.AdamW(pgs, lr=hp["lr"], betas=tuple(hp["betas"]), weight_decay=hp["weight_decay"],
                                       fused=cuda or None)
        params[name] = [p for pg in pgs for p in pg["params"]]
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    if ck:
        load_weights(model, ck["model"], "checkpoint 'model'")
        load_weights(ema, ck["ema"], "checkpoint 'ema'")
        for name, opt in opts.items():
            lrs = [pg["initial_lr"] for pg in opt.param_groups]  # this command's learning rates win on resume
            opt.load_state_dict(ck["opt"][name])
            for pg, lr in zip(opt.param_groups, lrs):
                pg["initial_lr"] = lr
        scaler.load_state_dict(ck.get("scaler") or scaler.state_dict())
        torch.set_rng_state(ck["rng"]["torch"])
        if cuda and torch.is_tensor(ck["rng"].get("cuda")):
            torch.cuda.set_rng_state(ck["rng"]["cuda"], device)

    own = hasattr(model, "data_transform") and not args.ae
    tf = functools.partial(model_transform, repr(spec), args.image_size) if own else default_tf
    data = cache_latents(out / "latents.npy", ae, source, args, autocast, device, rank, world) if args.cache_latents \
        else Examples(source, tf)
    sampler = ShardSampler(len(source), batch, range(rank * accum, (rank + 1) * accum), shards, args.seed, start)
    loader = torch.utils.data.DataLoader(data, batch_size=batch // shards, sampler=sampler, num_workers=args.workers,
                                         pin_memory=cuda, persistent_workers=args.workers > 0)

    def prepare(b, step, shard):  # -> device; latents under the (step, shard) seed; which part of the global batch
        b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
        if ae is not None and not args.cache_latents:
            torch.manual_seed(seed_for("encode", args.seed, step, shard))  # ae_kl's posterior sample
            with torch.no_grad(), autocast:
                b["x"] = ae.encode(b["x"]).float()
        return {**b, "shard": (shard, shards)}  # part k of K: HDiT stratifies its noise levels over the global batch

    first = torch.utils.data.default_collate([data[(j, j)] for j in (0, 1)])
    first = prepare({k: v for k, v in first.items() if k != "skipped"}, start, 0)
    try:
        with torch.random.fork_rng(devices=[device] if cuda else []):  # rank 0 alone counts: keep its RNG in step
            flops = count_flops(LossCall(model), first, groups, start, args.grad_checkpoint) if main_proc else None
    except Exception as e:  # noqa: BLE001 (an op FlopCounterMode does not know: report no MFU, train anyway)
        flops, _ = None, print(f"note: FLOP count failed ({type(e).__name__}); MFU not reported")
    # Wrapped only now: DDP hooks every parameter's gradient, and the FLOP count's backward is not a DDP step.
    call = LossCall(model)
    if world > 1:
        call = torch.nn.parallel.DistributedDataParallel(call, device_ids=[device.index] if cuda else None,
                                                         find_unused_parameters=len(groups) > 1)
    no_sync = call.no_sync if world > 1 else contextlib.nullcontext
    call = torch.compile(call) if args.compile else call
    gpu = torch.cuda.get_device_name() if cuda else ""
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    if main_proc:
        print(f"{args.model} {args.config}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
              f"input {shape}, {f'{flops / 1e9:.3g}' if flops else '-'} GFLOP/sample/step"
              f"{' (3x forward)' * args.grad_checkpoint}, {len(source)} images, {num_classes} classes, {world} "
              f"process(es), global batch {batch} = {shards} x {batch // shards}, {device}, precision {precision}"
              f"{' + GradScaler' * scaler.is_enabled()}")

    bad = torch.zeros((), dtype=torch.bool, device=device)
    sums, n_steps, t0, skipped, saved, fixed = {}, 0, time.time(), torch.zeros((), device=device), start, None
    it = iter(loader)
    pbar = tqdm(total=args.steps, initial=start, disable=not main_proc, dynamic_ncols=True, desc=args.model)

    def check_finite(done):  # a non-finite loss, or weights it already broke, ends the run
        flag = (bad | ~torch.stack(torch._foreach_norm(list(model.parameters()))).isfinite().all()).float()
        if world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            fail(f"loss became NaN/inf before step {done}; stopped. The last good checkpoint "
                 f"({out / 'ckpt.pt'}, step {saved}) is kept")

    def checkpoint(done):
        check_finite(done)
        if main_proc:  # atomic: temp file, then rename, so a run killed while writing keeps the previous one
            torch.save({
                "model": model.state_dict(), "ema": ema.state_dict(), "step": done, "create": spec, "ae": ae_info,
                "opt": {n: o.state_dict() for n, o in opts.items()}, "scaler": scaler.state_dict(), "args": vars(args),
                "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if cuda else None}},
                out / "ckpt.pt.tmp")
            os.replace(out / "ckpt.pt.tmp", out / "ckpt.pt")
        return done

    for step in range(start, args.steps):
        micro = [prepare(next(it), step, rank * accum + k) for k in range(accum)]
        for b in micro:
            skipped += b.pop("skipped").sum()
        fixed = fixed or micro[0]
        warm = min(1.0, (step + 1) / hp["warmup_steps"]) if hp["warmup_steps"] else 1.0
        for gi, (name, opt) in enumerate(opts.items()):
            for pg in opt.param_groups:
                pg["lr"] = pg["initial_lr"] * warm
            opt.zero_grad(set_to_none=True)
            for k, b in enumerate(micro):
                torch.manual_seed(seed_for("step", args.seed, step, gi, rank * accum + k))
                with no_sync() if k < accum - 1 else contextlib.nullcontext():
                    with autocast:
                        loss, logs = call(name, b, step)
                    scaler.scale(loss / accum).backward()
                bad |= ~torch.isfinite(loss.detach())
                for key, v in {"loss" if len(opts) == 1 else f"loss_{name}": loss, **logs}.items():
                    sums[key] = sums.get(key, 0) + v.detach().float() / accum
            if hp["grad_clip"]:  # 0: no clipping
                scaler.unscale_(opt)
                norm = torch.nn.utils.clip_grad_norm_(params[name], hp["grad_clip"], foreach=True)
                sums[f"grad_norm_{name}"] = sums.get(f"grad_norm_{name}", 0) + norm
            scaler.step(opt)  # opt.step(), skipped by an fp16 GradScaler when the gradients overflowed
        scaler.update()
        # EMA warm-up so short runs get a useful EMA: k-diffusion's 1 - (1 + n)^-ema_power when the preset names a
        # power (HDiT), else LDM LitEma's (1 + n) / (10 + n); both capped at the preset's decay (0: EMA = weights).
        power = hp.get("ema_power")
        ema_update(ema, model, min(hp["ema_decay"], 1 - (1 + step) ** -power if power else (1 + step) / (10 + step)))
        n_steps, done = n_steps + 1, step + 1
        pbar.update(1)
        if done % args.log_every == 0 or done == args.steps:
            keys = sorted(sums, key=lambda k: (not k.startswith("loss"), k))
            vals = torch.stack([torch.as_tensor(sums[k], device=device).float() for k in keys] + [skipped]) / n_steps
            if world > 1:
                dist.all_reduce(vals)  # a sum (gloo has no AVG)
            vals = (vals / world).tolist()
            check_finite(done)
            rate = n_steps * batch / (time.time() - t0)
            rec = {"step": done, **dict(zip(keys, vals)), "img_per_s": rate, "lr": hp["lr"] * warm,
                   "mfu": flops * rate / world / (peak * 1e12) if flops and peak else None,
                   "peak_mem_gb": (torch.cuda.max_memory_allocated() if cuda else 0) / 2**30,
                   "skipped_images": vals[-1] * n_steps * world}
            if main_proc:
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
                mfu = f"{100 * rec['mfu']:.1f}%" if rec["mfu"] is not None else "-"
                mem = rec["peak_mem_gb"]
                pbar.set_postfix_str(f"loss {rec[keys[0]]:.4f} | {rate:.1f} img/s | MFU {mfu} | mem {mem:.1f}G")
            sums, n_steps, t0 = {}, 0, time.time()
        if main_proc and args.sample_every > 0 and (done % args.sample_every == 0 or done == args.steps):
            with autocast:
                grid = preview(ema, ae, fixed, args, num_classes, device)
                save_grid(grid, out / "samples" / f"step_{done:07d}.png")
                if args.data == "shapes":  # issue 17: the grid's shape score joins this step's log record
                    log_shape_score(grid, ema, ae, args, out / "log.jsonl", done, device)
        if done % args.ckpt_every == 0 or done == args.steps:
            saved = checkpoint(done)
    pbar.close()
    if world > 1:
        dist.destroy_process_group()
    return model


if __name__ == "__main__":
    main()
