"""Every model file through train.py and sample.py, and the compositions the contract promises.

- each of the seven files trains on `shapes` (checkpoint, grid, log) and samples / reconstructs with sample.py;
- latent diffusion by composition: dit, hdit and unet_ldm on the latents of each autoencoder (ae_kl, ae_vq,
  dcae, infd), sample.py decoding (and INFD rendering at another size);
- an --ae whose latents do not fit the diffusion preset is one line;
- DDP with two optimizer groups (ae_kl: autoencoder + discriminator) equals one process;
- DC-AE's phases through train.py --phase / --init: frozen parameters do not move;
- the hparams train.py honours for HDiT (lr_scale per group, k-diffusion's EMA warm-up power).
- --grad-checkpoint gives the same weights; --sample-every 0 writes no grid.

All runs are `tiny` presets at 32x32 (latents 4x4 to 8x8) for 1-2 steps, so each takes a second or two.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ddp_and_single

import sample
import train

AUTOENCODERS = ["ae_kl", "ae_vq", "dcae", "infd"]
DIFFUSION = ["dit", "hdit", "unet_ldm"]
COMMON = ["--config", "tiny", "--data", "shapes", "--image-size", "32", "--batch-size", "4", "--workers", "0",
          "--log-every", "1", "--sample-steps", "2"]
NO_DOWNLOAD = ["--set", "lpips_pretrained=False"]  # random-backbone LPIPS: tests never download


def run(model, out, *extra):
    more = NO_DOWNLOAD if model in AUTOENCODERS else []
    return train.main(["--model", model, *COMMON, "--out", str(out), *more, *extra])


def log(out):
    return [json.loads(line) for line in open(out / "log.jsonl")]


@pytest.fixture(autouse=True)
def no_lpips_metric(monkeypatch):
    """sample.py --reconstruct reports LPIPS-Alex, which needs a download: tests skip that number."""
    monkeypatch.setattr(sample, "lpips_metric", lambda device: None)


@pytest.fixture(scope="module")
def ae_runs(tmp_path_factory):
    """One tiny run of each autoencoder (2 steps): the --ae of the composition tests."""
    root = tmp_path_factory.mktemp("ae_runs")
    for name in AUTOENCODERS:
        run(name, root / name, "--steps", "2", "--sample-every", "2")
    return root


@pytest.mark.parametrize("model", DIFFUSION)
def test_diffusion_model_trains_and_samples(model, tmp_path):
    out = tmp_path / "run"
    run(model, out, "--steps", "2", "--sample-every", "2")
    assert (out / "ckpt.pt").exists() and (out / "samples" / "step_0000002.png").exists()
    assert all(np.isfinite(r["loss"]) for r in log(out)) and len(log(out)) == 2
    sample.main([str(out), "--n", "4", "--steps", "2", "--class", "0", "3", "--each", "--out", str(tmp_path / "s")])
    assert Image.open(tmp_path / "s" / "grid.png").size == (2 * 34 + 2, 2 * 34 + 2)
    assert len(list((tmp_path / "s").glob("0*.png"))) == 4


@pytest.mark.parametrize("model", AUTOENCODERS)
def test_autoencoder_trains_and_reconstructs(model, ae_runs, tmp_path, capsys):
    out = ae_runs / model
    assert (out / "ckpt.pt").exists() and (out / "samples" / "step_0000002.png").exists()
    first = log(out)[0]
    assert any(k.startswith("loss") for k in first) and all(np.isfinite(v) for v in first.values() if v is not None)
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert "ae" in ck["opt"] and set(ck["opt"]) <= {"ae", "disc"}
    photos = tmp_path / "photos"
    photos.mkdir()
    for k in range(2):
        Image.fromarray((np.random.default_rng(k).random((40, 48, 3)) * 255).astype(np.uint8)).save(photos / f"p{k}.png")
    sample.main([str(out), "--reconstruct", str(photos), "--out", str(tmp_path / "rec")])
    pairs = sorted((tmp_path / "rec").glob("*_recon.png"))
    assert [p.name for p in pairs] == ["p0_recon.png", "p1_recon.png"]
    assert Image.open(pairs[0]).size == (64, 32)  # input | output, 32x32 each (centre crop of the trained size)
    assert "mean PSNR" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="autoencoder: use --reconstruct"):
        sample.main([str(out), "--out", str(tmp_path / "x")])


# Patch sizes that fit each latent grid at 32 px: DC-AE's f8 tiny gives 16x4x4, so the transformers use patch 1.
FIT = {("dit", "dcae"): ["--set", "patch_size=1"], ("hdit", "dcae"): ["--set", "patch_size=1"]}


@pytest.mark.parametrize("ae", AUTOENCODERS)
@pytest.mark.parametrize("model", DIFFUSION)
def test_latent_diffusion_by_composition(model, ae, ae_runs, tmp_path, capsys):
    """train.py --ae: the diffusion model sees the frozen AE's latents; sample.py decodes them to pixels."""
    out = tmp_path / "ldm"
    run(model, out, "--steps", "2", "--sample-every", "2", "--ae", str(ae_runs / ae), *FIT.get((model, ae), []))
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    latent = {"ae_kl": (4, 8), "ae_vq": (4, 8), "dcae": (16, 4), "infd": (3, 8)}[ae]
    assert (ck["create"]["overrides"]["in_channels"], ck["create"]["overrides"]["image_size"]) == latent
    assert ck["ae"]["scale_factor"] > 0  # measured on the first batch (1 / std), stored for sample.py
    assert ck["create"]["overrides"]["clip_denoised"] is False  # never clip latents, whatever the preset says
    assert Image.open(out / "samples" / "step_0000002.png").size == (4 * 34 + 2, 4 * 34 + 2)  # decoded to 32 px
    sample.main([str(out), "--n", "2", "--steps", "2"])
    assert Image.open(out / "generated" / "grid.png").size == (2 * 34 + 2, 1 * 34 + 2)
    if ae == "infd":  # INFD renders its latents at any size
        sample.main([str(out), "--n", "2", "--steps", "2", "--size", "48", "--out", str(tmp_path / "r")])
        assert Image.open(tmp_path / "r" / "grid.png").size == (2 * 50 + 2, 1 * 50 + 2)


def test_ae_latents_that_do_not_fit_are_one_line(ae_runs, tmp_path):
    with pytest.raises(SystemExit) as e:
        run("hdit", tmp_path / "x", "--steps", "1", "--ae", str(ae_runs / "dcae"))
    msg = str(e.value)
    assert msg.startswith("error: --ae latent shape (16, 4, 4) does not fit hdit tiny") and "\n" not in msg
    run("dit", tmp_path / "dit", "--steps", "1", "--sample-every", "100")
    with pytest.raises(SystemExit, match="is not an autoencoder"):
        run("dit", tmp_path / "y", "--steps", "1", "--ae", str(tmp_path / "dit"))


def test_ddp_with_two_optimizer_groups_equals_one_process(tmp_path):
    """ae_kl with the GAN on from step 0: autoencoder and discriminator groups under DDP (gloo, 2 processes)
    end equal across ranks and equal to one process accumulating the same global batch."""
    args = ["--model", "ae_kl", *COMMON, "--steps", "2", "--sample-every", "100", "--lr", "1e-3",
            *NO_DOWNLOAD, "disc_start=0"]
    r0, r1, single, ddp_dir, _ = ddp_and_single(tmp_path, args, port=29547)
    import ae_kl
    names = [n for n, _ in ae_kl.create("tiny", lpips_pretrained=False).named_parameters()]
    assert any(n.startswith("loss_fn.discriminator") for n in names)
    # Parameters, not buffers: the PatchGAN's BatchNorm statistics are per process (DDP broadcasts rank 0's at
    # each forward; the last local update differs), as in the official multi-GPU training.
    assert all(torch.equal(r0[k], r1[k]) for k in names)
    err = max((r0[k] - single[k]).abs().max().item() for k in names)
    assert err < 1e-5, err
    saved = torch.load(ddp_dir / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(saved[k], r0[k]) for k in r0)  # rank 0 wrote the final weights
    assert {"loss_ae", "loss_disc"} <= set(log(ddp_dir)[-1])


@pytest.mark.parametrize("phase", [2, 3])
def test_dcae_phases_through_train_py(phase, ae_runs, tmp_path):
    """--phase N --init CKPT: the run starts from the phase-1 weights and moves only the phase's trainable set."""
    import dcae
    out = tmp_path / f"phase{phase}"
    size = "64" if phase == 2 else "32"  # phase 2 adapts to a higher resolution
    run("dcae", out, "--phase", str(phase), "--init", str(ae_runs / "dcae"), "--steps", "2", "--sample-every", "100",
        "--image-size", size, "--lr", "1e-3")
    before = torch.load(ae_runs / "dcae" / "ckpt.pt", weights_only=True)["ema"]
    after = torch.load(out / "ckpt.pt", weights_only=True)["model"]
    probe = dcae.create("tiny", lpips_pretrained=False)
    groups = probe.optimizer_groups(phase)
    trainable = {n for n, p in probe.named_parameters() if any(p is q for g in groups.values() for q in g)}
    frozen = [n for n, _ in probe.named_parameters() if n not in trainable]
    assert trainable and frozen
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert any(not torch.equal(before[n], after[n]) for n in trainable if not n.startswith("disc."))
    bn_stats = [n for n in after if n.endswith("running_mean") and n.rsplit(".", 1)[0] + ".weight" in frozen]
    assert all(torch.equal(before[n], after[n]) for n in bn_stats)


def test_hdit_lr_scale_and_ema_power(tmp_path):
    """HDiT's param groups carry lr_scale (mapping network at 1/3 of the base lr), and its EMA uses k-diffusion's
    warm-up 1 - (1 + step)^-ema_power, which is 0 at the first step: after one step EMA == weights."""
    out = tmp_path / "hdit"
    run("hdit", out, "--steps", "1", "--sample-every", "100", "--lr", "1e-3", "--warmup-steps", "0")
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    lrs = [g["lr"] for g in ck["opt"]["model"]["param_groups"]]
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-3 / 3, 1e-3 / 3])
    assert all(torch.equal(ck["ema"][k], ck["model"][k]) for k in ck["model"])
    # DiT (no ema_power): LDM's warm-up (1 + n) / (10 + n) = 0.1 at the first step, so the EMA lags
    run("dit", tmp_path / "dit", "--steps", "1", "--sample-every", "100", "--lr", "1e-2")
    ck = torch.load(tmp_path / "dit" / "ckpt.pt", weights_only=True)
    assert any(not torch.equal(ck["ema"][k], ck["model"][k]) for k in ck["model"])


def test_text_context_from_the_command_line(tmp_path):
    """sample.py --context: precomputed text-encoder states drive a text-conditioned UNet (no encoder ships)."""
    import unet_ldm
    create = {"model": "unet_ldm", "config": "tiny", "overrides": {"conditioning": "text", "image_size": 16}}
    torch.manual_seed(0)
    model = unet_ldm.create("tiny", **create["overrides"])
    with torch.no_grad():  # a fresh UNet's output layers are zero: perturb so the context changes the samples
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    torch.save({"create": create, "model": model.state_dict(), "ema": model.state_dict()}, tmp_path / "ckpt.pt")
    ctx = {"context": torch.randn(3, 32), "uc_context": torch.zeros(3, 32)}  # (L, D): the same prompt for all
    torch.save(ctx, tmp_path / "prompt.pt")
    args = [str(tmp_path / "ckpt.pt"), "--n", "2", "--steps", "2", "--context", str(tmp_path / "prompt.pt")]
    sample.main(args + ["--cfg", "3", "--out", str(tmp_path / "a")])
    sample.main(args + ["--out", str(tmp_path / "b")])
    assert Image.open(tmp_path / "a" / "grid.png").size == (2 * 18 + 2, 18 + 2)
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "a" / "grid.png")),
                              np.asarray(Image.open(tmp_path / "b" / "grid.png")))
    torch.save(torch.randn(3, 32), tmp_path / "only.pt")
    with pytest.raises(SystemExit, match="needs uc_context"):
        sample.main([str(tmp_path / "ckpt.pt"), "--n", "2", "--steps", "2", "--context", str(tmp_path / "only.pt"),
                     "--cfg", "3", "--out", str(tmp_path / "c")])
    torch.save(torch.randn(5, 3, 32), tmp_path / "bad.pt")
    with pytest.raises(SystemExit, match=r"expected a tensor \(L, D\) or \(2, L, D\)"):
        sample.main(args[:-1] + [str(tmp_path / "bad.pt"), "--out", str(tmp_path / "d")])
    with pytest.raises(SystemExit, match="needs context"):
        sample.main([str(tmp_path / "ckpt.pt"), "--n", "2", "--steps", "2", "--out", str(tmp_path / "e")])


def test_grad_checkpoint_and_no_grids(tmp_path):
    """--grad-checkpoint (HDiT's per-layer activation checkpointing) trains to the same weights as without it;
    a model that has no checkpointing says so in one line; --sample-every 0 writes no grid."""
    run("hdit", tmp_path / "plain", "--steps", "2", "--sample-every", "0")
    run("hdit", tmp_path / "recompute", "--steps", "2", "--sample-every", "0", "--grad-checkpoint")
    plain, recompute = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["model"] for d in ("plain", "recompute"))
    assert all(torch.allclose(plain[k], recompute[k], rtol=0, atol=1e-6) for k in plain)
    assert not (tmp_path / "plain" / "samples").exists()
    with pytest.raises(SystemExit, match="^error: --grad-checkpoint: dit does not support it$"):
        run("dit", tmp_path / "dit", "--steps", "1", "--grad-checkpoint")
