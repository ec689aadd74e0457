"""train.py: the one training loop for every model file in this repository.

    python train.py --model dit --config demo --data shapes --image-size 32 --steps 3000
    torchrun --nproc_per_node 8 train.py --model hdit --config hdit_ffhq1024 --data ffhq --image-size 1024

It knows only the model-file contract (README.md, "Model file contract"): `create`, `optimizer_groups`,
`loss`, `hparams`, and `sample` / `encode` / `decode` for the grids. Everything else here is plumbing that
any diffusion or autoencoder paper needs: data, DDP, bf16, EMA, checkpoints, resume, logs.

Reproducibility: --batch-size is the GLOBAL batch. Each optimizer step reads one global batch from a
per-epoch permutation and cuts it into world_size * grad_accum equal shards; shard s is the same samples
and is run under the same RNG seed whatever the number of processes. So two DDP ranks compute exactly what
one process with --grad-accum 2 computes, and a resumed run repeats an uninterrupted one step for step.
"""
import argparse, ast, contextlib, copy, json, os, random, sys, time  # noqa: E401
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from sample import (Folder, Shapes, build_model, center_crop_transform, fail, fit_scale_factor, load_autoencoder,
                    load_checkpoint, load_weights, log_shape_score, save_grid, seed_for)

DEFAULTS = dict(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, ema_decay=0.9999, warmup_steps=0, grad_clip=1.0, batch_size=64)
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

    def __len__(self):
        return len(self.source)

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
    """Yields (index, augmentation seed) for this process's shards of every global batch, from start_step on.
    Used instead of DistributedSampler (which deals rank r the samples r::world) so that the samples of a
    shard do not depend on how many processes share the batch (see the module docstring)."""

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


# ------------------------------------------------------------------------------------ helpers
@torch.no_grad()
def ema_update(ema_params, params, decay):
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)  # ema += (1 - decay) * (p - ema)


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


def count_flops(call, batch, groups, step):
    """FLOPs of one training step for one sample: every group's loss forward + backward (FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode
    n = min(2, len(batch["x"]))
    few = {k: v[:n] for k, v in batch.items()}
    buffers = [b.clone() for b in call.buffers()]  # e.g. BatchNorm statistics: this extra step must not move them
    with FlopCounterMode(display=False) as counter:
        for g in groups:
            loss, _ = call(g, few, step)
            loss.backward()
    call.zero_grad(set_to_none=True)
    torch._foreach_copy_(list(call.buffers()), buffers)
    return counter.get_total_flops() / n


@torch.no_grad()
def preview(ema, ae, fixed, args, num_classes, device):
    """Grid of EMA samples (diffusion models, decoded through --ae) or of input|reconstruction pairs (AEs)."""
    if hasattr(ema, "sample"):
        labels = torch.arange(16, device=device) % num_classes  # 16 samples, cycling through the classes
        gen = torch.Generator(device).manual_seed(args.seed)
        x = ema.sample(16, labels=labels, steps=args.sample_steps, cfg=args.sample_cfg, generator=gen)
        return ae.decode(x) if ae is not None else x
    x = fixed["x"][:8]
    pairs = torch.stack([x, ema.decode(ema.encode(x))], 1)  # (8, 2, C, H, W): input next to reconstruction
    return pairs.flatten(0, 1)


# ------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train any model file of this repository (see README.md).")
    p.add_argument("--model", required=True, help="model file name: dit, hdit, unet_ldm, ae_kl, ae_vq, dcae, infd")
    p.add_argument("--config", default="tiny", help="preset name from the model file's CONFIGS")
    p.add_argument("--data", default="shapes", help="shapes | ffhq | imagenet (under $DATA_ROOT, default ./data) | PATH")
    p.add_argument("--image-size", type=int, default=None, help="pixels (default 32 for shapes, else 256)")
    p.add_argument("--out", default=None, help="run folder (default runs/MODEL-CONFIG)")
    p.add_argument("--batch-size", type=int, default=None, help="GLOBAL batch over all processes and accumulation")
    for name, default, what in [("steps", 10_000, "optimizer steps"), ("grad-accum", 1, "micro-batches per step"),
                                ("warmup-steps", None, "linear LR warm-up"), ("seed", 0, "data order and RNG"),
                                ("workers", min(4, os.cpu_count() or 1), "data loader processes"),
                                ("log-every", 10, "steps"), ("sample-every", 1000, "steps (0: no grids)"), ("ckpt-every", 1000, "steps"),
                                ("sample-steps", None, "sampler steps for the grids")]:
        p.add_argument(f"--{name}", type=int, default=default, help=what)
    for name in ("lr", "weight-decay", "ema-decay", "grad-clip"):
        p.add_argument(f"--{name}", type=float, default=None, help="default: the preset's hparams")
    p.add_argument("--sample-cfg", type=float, default=1.0)
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/ckpt.pt if there is one")
    p.add_argument("--init", default=None, help="start from this checkpoint's EMA weights (e.g. a DC-AE phase)")
    p.add_argument("--phase", type=int, default=None, help="passed to optimizer_groups (DC-AE phases 1-3)")
    p.add_argument("--ae", default=None, help="train on the latents of this autoencoder checkpoint (or MODEL:CONFIG:PATH)")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="create() overrides")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="autocast dtype on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the loss")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute each layer in backward (saves memory)")
    p.add_argument("--cpu", action="store_true", help="do not use CUDA even if present")
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU (default: known GPUs)")
    args = p.parse_args(argv)
    args.image_size = args.image_size or (32 if args.data == "shapes" else 256)
    args.out = args.out or f"runs/{args.model}-{args.config.replace('/', '-')}"
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


def main(argv=None):
    args = parse_args(argv)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cuda  # TF32 matmuls/convs on GPU
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    main_proc, out = rank == 0, Path(args.out)
    autocast = torch.autocast("cuda", torch.bfloat16) if cuda and args.precision == "bf16" else contextlib.nullcontext()

    ck = load_checkpoint(out / "ckpt.pt") if args.resume and (out / "ckpt.pt").exists() else None
    if ck and (ck["create"]["model"], ck["create"]["config"]) != (args.model, args.config):
        fail(f"{out}/ckpt.pt is a {ck['create']['model']} {ck['create']['config']} run, not {args.model} {args.config}")
    if args.resume and not ck and main_proc:
        print(f"no checkpoint in {out}; starting at step 0")
    start = ck["step"] if ck else 0

    # Data, and the shape the model sees: pixels, or the latents of a frozen autoencoder (--ae).
    source = find_data(args.data, args.image_size, args.seed)
    num_classes, accum, shards = len(source.classes), args.grad_accum, world * args.grad_accum
    default_tf = center_crop_transform(args.image_size)
    ae, ae_info, shape = None, None, (3, args.image_size, args.image_size)
    if args.ae:  # latents of a frozen autoencoder: measure their shape (and scale) on 8 images of this rank
        ae, _ = load_autoencoder(args.ae, device)
        probe = torch.stack([Examples(source, default_tf)[(j % len(source), j)]["x"] for j in range(8 * rank, 8 * rank + 8)])
        if ck and ck.get("ae"):
            ae.scale_factor.fill_(ck["ae"]["scale_factor"])
        elif float(ae.scale_factor) == 0:
            fit_scale_factor(ae, probe.to(device))
        with torch.no_grad(), autocast:
            shape = tuple(ae.encode(probe[:1].to(device)).shape[1:])
        ae_info = {"spec": str(Path(args.ae).resolve()) if Path(args.ae).exists() else args.ae,
                   "scale_factor": float(ae.scale_factor)}
    spec = ck["create"] if ck else {"model": args.model, "config": args.config, "overrides": {
        "image_size": shape[-1], "in_channels": shape[0], "num_classes": num_classes, **parse_sets(args.set)}}
    torch.manual_seed(args.seed)  # the same initial weights in every process and every run with this seed
    try:
        model = build_model(spec)
    except ValueError as e:
        fail(f"--ae latent shape {shape} does not fit {args.model} {args.config}: {e}" if args.ae else str(e))
    if args.grad_checkpoint:  # activation checkpointing, where the model file offers it (HDiT)
        getattr(model, "set_grad_checkpointing", lambda: fail(f"--grad-checkpoint: {args.model} does not support it"))()
    if args.init:
        load_weights(model, load_checkpoint(args.init)["ema"], f"--init {args.init}")
    model.to(device)
    groups = model.optimizer_groups(phase=args.phase)
    hp = {**DEFAULTS, **getattr(model, "hparams", {})}
    hp.update({k: getattr(args, k) for k in ("lr", "weight_decay", "ema_decay", "grad_clip", "batch_size",
                                             "warmup_steps") if getattr(args, k) is not None})
    batch = hp["batch_size"]
    if batch % shards:
        fail(f"--batch-size {batch} is not divisible by processes x --grad-accum = {shards}")

    # One AdamW per group; a group may be a list of torch param-group dicts when parts need other settings.
    opts, params = {}, {}
    for name, group in groups.items():
        pgs = [dict(g) for g in group] if group and isinstance(group[0], dict) else [{"params": list(group)}]
        for pg in pgs:  # a dict may scale the base lr (HDiT's mapping network: lr_scale 1/3)
            scale = pg.pop("lr_scale", 1.0)
            pg["initial_lr"] = pg.setdefault("lr", hp["lr"] * scale)
        opts[name] = torch.optim.AdamW(pgs, lr=hp["lr"], betas=tuple(hp["betas"]), weight_decay=hp["weight_decay"],
                                       fused=cuda or None)
        params[name] = [p for pg in pgs for p in pg["params"]]
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    ema_pairs = [(e, p) for e, p in zip(ema.parameters(), model.parameters()) if p.is_floating_point()]
    if ck:
        load_weights(model, ck["model"], "checkpoint 'model'")
        load_weights(ema, ck["ema"], "checkpoint 'ema'")
        for name, opt in opts.items():
            lrs = [pg["initial_lr"] for pg in opt.param_groups]  # this command's learning rates win on resume
            opt.load_state_dict(ck["opt"][name])
            for pg, lr in zip(opt.param_groups, lrs):
                pg["initial_lr"] = lr
        torch.set_rng_state(ck["rng"]["torch"])

    transform = default_tf if args.ae or not hasattr(model, "data_transform") else model.data_transform(args.image_size)
    sampler = ShardSampler(len(source), batch, range(rank * accum, (rank + 1) * accum), shards, args.seed, start)
    loader = torch.utils.data.DataLoader(Examples(source, transform), batch_size=batch // shards, sampler=sampler,
                                         num_workers=args.workers, pin_memory=cuda, persistent_workers=args.workers > 0)

    def prepare(b):
        b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
        if ae is not None:
            with torch.no_grad(), autocast:
                b["x"] = ae.encode(b["x"]).float()
        return b

    first = torch.utils.data.default_collate([Examples(source, transform)[(j, j)] for j in (0, 1)])
    first = prepare({k: v for k, v in first.items() if k != "skipped"})
    # FlopCounterMode's module hooks keep every activation alive, undoing --grad-checkpoint: no count where no MFU shows
    count = main_proc and (cuda or args.peak_tflops or not args.grad_checkpoint)
    try:
        flops = count_flops(LossCall(model), first, list(groups), start) if count else None
    except Exception as e:  # noqa: BLE001 (an op FlopCounterMode does not know: report no MFU, train anyway)
        flops, _ = None, print(f"note: FLOP count failed ({type(e).__name__}); MFU not reported")
    # Wrapped only now: DDP hooks every parameter's gradient, and the FLOP count's backward is not a DDP step.
    call = LossCall(model)
    if world > 1:
        call = torch.nn.parallel.DistributedDataParallel(call, device_ids=[device.index] if cuda else None,
                                                         find_unused_parameters=len(groups) > 1)
    no_sync = call.no_sync if world > 1 else contextlib.nullcontext
    call = torch.compile(call) if args.compile else call
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if cuda and k in torch.cuda.get_device_name()), None)
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        print(f"{args.model} {args.config}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, input {shape}, "
              f"{f'{flops / 1e9:.3g}' if flops else '-'} GFLOP/sample/step, {len(source)} images, {num_classes} classes, "
              f"{world} process(es), global batch {batch} = {shards} x {batch // shards}, {device}")

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
                "opt": {n: o.state_dict() for n, o in opts.items()}, "args": vars(args),
                "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if cuda else []}},
                out / "ckpt.pt.tmp")
            os.replace(out / "ckpt.pt.tmp", out / "ckpt.pt")
        return done

    for step in range(start, args.steps):
        micro = [prepare(next(it)) for _ in range(accum)]
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
                    (loss / accum).backward()
                bad |= ~torch.isfinite(loss.detach())
                for key, v in {"loss" if len(opts) == 1 else f"loss_{name}": loss, **logs}.items():
                    sums[key] = sums.get(key, 0) + v.detach().float() / accum
            if hp["grad_clip"]:
                norm = torch.nn.utils.clip_grad_norm_(params[name], hp["grad_clip"], foreach=True)
                sums[f"grad_norm_{name}"] = sums.get(f"grad_norm_{name}", 0) + norm
            opt.step()
        # EMA warm-up so short runs get a useful EMA: k-diffusion's 1 - (1 + n)^-ema_power when the preset names a
        # power (HDiT), else LDM LitEma's (1 + n) / (10 + n); both capped at the preset's decay.
        power = hp.get("ema_power")
        ema_update(*zip(*ema_pairs), min(hp["ema_decay"], 1 - (1 + step) ** -power if power else (1 + step) / (10 + step)))
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
                pbar.set_postfix_str(f"loss {rec[keys[0]]:.4f} | {rate:.1f} img/s | MFU {mfu} | mem {rec['peak_mem_gb']:.1f}G")
            sums, n_steps, t0 = {}, 0, time.time()
        if main_proc and args.sample_every > 0 and (done % args.sample_every == 0 or done == args.steps):
            with autocast:
                save_grid(preview(ema, ae, fixed, args, num_classes, device), out / "samples" / f"step_{done:07d}.png")
                if args.data == "shapes":  # issue 17: the shape score of 64 fresh samples joins this step's log record
                    log_shape_score(ema, ae, args, out / "log.jsonl", done, device)
        if done % args.ckpt_every == 0 or done == args.steps:
            saved = checkpoint(done)
    pbar.close()
    if world > 1:
        dist.destroy_process_group()
    return model


if __name__ == "__main__":
    main()
