"""ae_kl.py against the official LDM code (golden tensors), the key sets, the paper's formulas, and the contract.

Golden files (tests/golden/ae_kl/*.xz) are the reference files of ../shared/reference/ae_kl/golden/, re-packed
to fit the size budget: only the tested tensors, stored as byte-shuffled raw arrays + a JSON header, xz-compressed
(`_pack` below wrote them; `_unpack` reads them back into the reference dict layout). Kept: tiny_kl_encode
(encoder incl. nin_shortcut, quant_conv, posterior, non-square input), tiny_kl_loss (the full model forward and
LPIPSWithDiscriminator, 3 variants), posterior. Left out for size: tiny_kl_decode (decoder covered by tiny_kl_loss)
and discriminator.pt (n_layers=3 / eval-mode BatchNorm; n_layers 1 and 2 are covered by the two loss files).
"""
import functools
import json
import lzma
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ae_kl
from conftest import GOLDEN, assert_close, blob_batch, lift, lightning_ckpt

KEYS = Path(__file__).resolve().parent / "golden" / "ae_kl" / "keys"


def _pack(d, path):
    """Write a reference golden dict as byte-shuffled raw tensors + JSON header, xz-compressed."""
    meta, entries, blobs = {}, [], []
    for part in ("state_dict", "inputs", "outputs"):
        for k, v in d.get(part, {}).items():
            a = v.detach().cpu().contiguous().numpy()
            blobs.append(np.frombuffer(a.tobytes(), np.uint8).reshape(-1, a.itemsize).T.copy().tobytes())
            entries.append([part, k, str(a.dtype), list(a.shape), len(blobs[-1])])
    meta = {k: v for k, v in d.items() if k not in ("state_dict", "inputs", "outputs")}
    header = json.dumps({"meta": meta, "tensors": entries}).encode()
    raw = b"GOLD1" + len(header).to_bytes(8, "little") + header + b"".join(blobs)
    Path(path).write_bytes(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))


@functools.lru_cache(maxsize=None)
def _unpack(name):
    """tests/golden/ae_kl/<name>.xz -> {"state_dict", "inputs", "outputs", + the reference's metadata}."""
    raw = lzma.decompress((GOLDEN / "ae_kl" / f"{name}.xz").read_bytes())
    n = int.from_bytes(raw[5:13], "little")
    header = json.loads(raw[13:13 + n])
    d, pos = {"state_dict": {}, "inputs": {}, "outputs": {}, **header["meta"]}, 13 + n
    for part, key, dtype, shape, nbytes in header["tensors"]:
        itemsize = np.dtype(dtype).itemsize
        planes = np.frombuffer(raw[pos:pos + nbytes], np.uint8).reshape(itemsize, -1)  # un-shuffle bytes
        a = np.frombuffer(planes.T.tobytes(), dtype=dtype).reshape(shape)
        d[part][key] = torch.from_numpy(a.copy())
        pos += nbytes
    return d


def _tol(d, key, ref):
    """The reference README's tolerance: 4 * (float32 vs float64 official) + 1e-6 * max|ref|."""
    return 4 * d["f32_vs_f64_max_abs_diff"].get(key, 0.0) + 1e-6 * ref.abs().max().item()


def _check(d, key, mine, errors, ref=None):
    ref = d["outputs"][key] if ref is None else ref
    mine = mine.detach().reshape(ref.shape) if mine.numel() == ref.numel() else mine.detach()
    errors[key] = assert_close(mine, ref, atol=_tol(d, key, ref), what=key)


# ----------------------------------------------------------------------------------------------------------
# golden cases
# ----------------------------------------------------------------------------------------------------------

def test_golden_encode():
    """T1 (ch_mult [1,2]: nin_shortcut, asymmetric Downsample, attention at 16 and mid, posterior, 32x24)."""
    d = _unpack("tiny_kl_encode")
    model = ae_kl.create(d["config"]).eval()
    missing, unexpected = model.load_state_dict(d["state_dict"], strict=False)
    assert not unexpected and all(k.startswith(("decoder.", "post_quant_conv.", "loss_fn.")) or k == "scale_factor"
                                  for k in missing)
    x, x_rect, noise = d["inputs"]["x"], d["inputs"]["x_rect"], d["inputs"]["noise"]
    errors = {}
    with torch.no_grad():
        post = model.encode_posterior(x)
        _check(d, "moments", post.parameters, errors)
        sample = post.sample(noise)
        _check(d, "sample", sample, errors)
        _check(d, "kl", post.kl(), errors)
        _check(d, "nll", post.nll(sample), errors)
        _check(d, "rect_moments", model.encode_posterior(x_rect).parameters, errors)
    print("tiny_kl_encode max abs err:", errors)


def _golden_block(prefix, block):
    """`block` loaded with the tiny_kl_encode weights under `prefix` (official names)."""
    sd = _unpack("tiny_kl_encode")["state_dict"]
    block.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, strict=True)
    return block.eval()


def _official_resnet(x, w, p):
    """The official ResnetBlock (temb None, conv_shortcut False) written out with the golden weights `w`."""
    silu = lambda t: t * torch.sigmoid(t)  # noqa: E731 (the official nonlinearity)
    h = F.conv2d(silu(F.group_norm(x, 32, w[p + "norm1.weight"], w[p + "norm1.bias"], 1e-6)),
                 w[p + "conv1.weight"], w[p + "conv1.bias"], padding=1)
    h = F.conv2d(silu(F.group_norm(h, 32, w[p + "norm2.weight"], w[p + "norm2.bias"], 1e-6)),
                 w[p + "conv2.weight"], w[p + "conv2.bias"], padding=1)
    return F.conv2d(x, w[p + "nin_shortcut.weight"], w[p + "nin_shortcut.bias"]) + h


def test_resnet_block():
    """ResnetBlock (32 -> 64 channels, so with the 1x1 nin_shortcut) on the official tiny_kl_encode weights."""
    p, w = "encoder.down.1.block.0.", _unpack("tiny_kl_encode")["state_dict"]
    block = _golden_block(p, ae_kl.ResnetBlock(32, 64))
    x = torch.randn(2, 32, 8, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(block(x), _official_resnet(x, w, p), atol=1e-5, what="ResnetBlock")


def test_attn_block():
    """AttnBlock against the official bmm form, softmax(q^T k * C^-0.5) over the H*W positions, golden weights."""
    p, w = "encoder.mid.attn_1.", _unpack("tiny_kl_encode")["state_dict"]
    block = _golden_block(p, ae_kl.AttnBlock(64))
    x = torch.randn(2, 64, 5, 4, generator=torch.Generator().manual_seed(1))
    h = F.group_norm(x, 32, w[p + "norm.weight"], w[p + "norm.bias"], 1e-6)
    q, k, v = (F.conv2d(h, w[p + n + ".weight"], w[p + n + ".bias"]).reshape(2, 64, 20) for n in "qkv")
    attn = torch.softmax(torch.bmm(q.permute(0, 2, 1), k) * 64 ** -0.5, dim=2)  # (B, HW queries, HW keys)
    ref = x + F.conv2d(torch.bmm(v, attn.permute(0, 2, 1)).reshape(2, 64, 5, 4), w[p + "proj_out.weight"],
                       w[p + "proj_out.bias"])
    with torch.no_grad():
        assert_close(block(x), ref, atol=1e-5, what="AttnBlock")


def test_golden_decode():
    """Decoder (with post_quant_conv) on the official tiny_kl_loss weights: D(z) == the stored reconstruction
    (z = the posterior sample from the stored noise, so a wrong Encoder fails this test too)."""
    d = _unpack("tiny_kl_loss")
    model, _ = _loss_model(d, "A")
    with torch.no_grad():
        z = model.encode_posterior(d["inputs"]["x"]).sample(d["inputs"]["noise"])
        rec = model.decode_latent(z)
    _check(d, "A/reconstructions", rec, {})


def test_hinge_d_loss():
    """hinge_d_loss on the official discriminator logits of tiny_kl_loss variant A (disc_factor 1)."""
    o = _unpack("tiny_kl_loss")["outputs"]
    mine = ae_kl.hinge_d_loss(o["A/logits_real_disc"], o["A/logits_fake_disc"])
    assert_close(mine, o["A/log1/train/disc_loss"], atol=1e-6, what="hinge_d_loss")
    assert ae_kl.hinge_d_loss(torch.full((2, 1, 3, 3), 2.0), torch.full((2, 1, 3, 3), -2.0)) == 0  # both margins met


def test_lift_posterior():
    """Issue 16 item 2: DiagonalGaussianDistribution copied alone (torch, nn, F, math only) gives the file's numbers."""
    ns = lift(ae_kl, "DiagonalGaussianDistribution")
    moments, noise = torch.randn(2, 8, 4, 4), torch.randn(2, 4, 4, 4)
    mine, lifted = ae_kl.DiagonalGaussianDistribution(moments), ns["DiagonalGaussianDistribution"](moments)
    for f in (lambda p: p.sample(noise), lambda p: p.mode(), lambda p: p.kl(), lambda p: p.nll(p.mean + 0.1)):
        assert torch.equal(f(mine), f(lifted))


def test_golden_posterior():
    """Clamp of logvar at [-30, 20], sample, mode, kl, kl(other), nll (float64: ill-conditioned in float32)."""
    d = _unpack("posterior")
    m, o, noise = (d["inputs"][k].double() for k in ("moments", "other_moments", "noise"))
    p, q = ae_kl.DiagonalGaussianDistribution(m), ae_kl.DiagonalGaussianDistribution(o)
    ref = d["outputs"]
    errs = {}
    mine = {"mean": p.mean, "logvar": p.logvar, "std": p.std, "var": p.var, "sample": p.sample(noise),
            "mode": p.mode(), "kl": p.kl(), "kl_other": p.kl(q), "nll": p.nll(p.sample(noise)),
            "nll_dims123": p.nll(p.sample(noise), dims=[1, 2, 3]), "nll_dims23": p.nll(p.sample(noise), dims=[2, 3])}
    for k, v in mine.items():  # relative tolerance (var reaches e^20); outputs are float32 copies of float64
        r = ref[k].double()
        errs[k] = (v - r).abs().max().item() / max(r.abs().max().item(), 1e-30)
        assert errs[k] < 1e-6, (k, errs[k])
    det = ae_kl.DiagonalGaussianDistribution(m.float(), deterministic=True)
    assert torch.equal(det.std, ref["det_std"]) and torch.equal(det.var, ref["det_var"])
    assert torch.equal(det.sample(noise.float()), ref["det_sample"])
    for k, v in (("det_kl", det.kl()), ("det_nll", det.nll(det.sample()))):
        assert v.shape == (1,) and v.dtype == torch.float32 and torch.equal(v, ref[k])
    print("posterior max rel err:", errs)


def _loss_model(d, variant):
    """The tiny_kl_loss model with a variant's loss parameters, weights loaded, logvar set, train mode."""
    v = d["variants"][variant]
    cfg = json.loads(json.dumps(d["config"]))
    cfg["lossconfig"]["params"].update(v["loss_params"])
    model = ae_kl.create(cfg, lpips_pretrained=False)
    sd = {re.sub(r"^loss\.", "loss_fn.", k): t for k, t in d["state_dict"].items()}
    sd["scale_factor"] = model.scale_factor
    model.load_state_dict(sd, strict=True)  # strict: perceptual_loss is not in our state dict either
    with torch.no_grad():
        model.loss_fn.logvar.fill_(v["logvar"])
    model.loss_fn.logvar.requires_grad_(True)  # the official gives logvar a gradient (never stepped)
    return model.train(), v["global_step"]


@pytest.mark.parametrize("variant", ["A", "B", "C"])
def test_golden_loss(variant):
    """AutoencoderKL.forward + LPIPSWithDiscriminator for optimizer_idx 0 and 1, with gradients."""
    d = _unpack("tiny_kl_loss")
    model, step = _loss_model(d, variant)
    x, noise = d["inputs"]["x"], d["inputs"]["noise"]
    D = model.loss_fn.discriminator
    seen = []
    hook = D.register_forward_hook(lambda mod, inp, out: seen.append(out))
    post = model.encode_posterior(x)
    rec = model.decode_latent(post.sample(noise))  # = model(x) with the stored noise
    errors, P = {}, f"{variant}/"
    _check(d, "A/reconstructions", rec, errors)
    _check(d, P + "kl", post.kl(), errors)
    aeloss, log0 = model.loss_fn(x, rec, post, 0, step, last_layer=model.get_last_layer())
    _check(d, P + "aeloss", aeloss, errors)
    for k, v in log0.items():
        _check(d, f"{P}log0/train/{k}", v, errors)
    _check(d, P + "logits_fake_gen", seen[-1], errors)
    names = ["loss_fn.logvar", "decoder.conv_out.weight", "decoder.conv_out.bias", "encoder.conv_in.weight",
             "quant_conv.weight", "post_quant_conv.weight"]
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(aeloss, [params[n] for n in names], retain_graph=True)
    for n, g in zip(names, grads):
        _check(d, P + "grad_aeloss/" + n.replace("loss_fn.", "loss."), g, errors)
    discloss, log1 = model.loss_fn(x, rec, post, 1, step)
    _check(d, P + "discloss", discloss, errors)
    for k, v in log1.items():
        _check(d, f"{P}log1/train/{k}", v, errors)
    _check(d, P + "logits_real_disc", seen[-2], errors)
    _check(d, P + "logits_fake_disc", seen[-1], errors)
    hook.remove()
    for n in ("main.0.weight", "main.3.weight"):
        if f"{P}grad_discloss/loss.discriminator.{n}" in d["outputs"]:  # not stored for C (disc_factor 0)
            g = torch.autograd.grad(discloss, dict(D.named_parameters())[n], retain_graph=True)[0]
            _check(d, f"{P}grad_discloss/loss.discriminator.{n}", g, errors)
    print(f"tiny_kl_loss {variant} max abs err:", errors)


def test_adaptive_weight_formula():
    """VQGAN Eq. 7: d_weight = clamp(||dL_rec/dW|| / (||dL_GAN/dW|| + 1e-4), 0, 1e4) * disc_weight, W = conv_out."""
    d = _unpack("tiny_kl_loss")
    model, step = _loss_model(d, "A")
    x, noise = d["inputs"]["x"], d["inputs"]["noise"]
    post = model.encode_posterior(x)
    rec = model.decode_latent(post.sample(noise))  # = model(x) with the stored noise
    W = model.get_last_layer()
    nll = torch.sum(torch.abs(x - rec) / torch.exp(model.loss_fn.logvar) + model.loss_fn.logvar) / x.shape[0]
    g = -model.loss_fn.discriminator(rec).mean()
    gn_nll = torch.autograd.grad(nll, W, retain_graph=True)[0].norm()
    gn_g = torch.autograd.grad(g, W, retain_graph=True)[0].norm()
    ref = d["outputs"]
    assert_close(gn_nll, ref["A/helper/nll_grad_norm"], atol=_tol(d, "A/helper/nll_grad_norm", ref["A/helper/nll_grad_norm"]))
    assert_close(gn_g, ref["A/helper/g_grad_norm"], atol=_tol(d, "A/helper/g_grad_norm", ref["A/helper/g_grad_norm"]))
    formula = torch.clamp(gn_nll / (gn_g + 1e-4), 0, 1e4) * 0.5
    mine = ae_kl.calculate_adaptive_weight(nll, g, W, 0.5)
    assert_close(mine, formula, atol=1e-3)
    assert not mine.requires_grad  # detached, as the official
    # the clamp at 1e4: a tiny GAN gradient
    assert ae_kl.calculate_adaptive_weight(nll, g * 1e-9, W, 1.0).item() == pytest.approx(1e4)
    with torch.no_grad():  # no graph (evaluation): 0, the official's except-branch
        assert ae_kl.calculate_adaptive_weight(nll.detach(), g.detach(), W, 0.5).item() == 0.0


def test_kl_formula():
    """Sec. 3.1 KL-reg: kl() = KL(N(mu, sigma^2) || N(0, I)) summed over C, H, W (vs torch.distributions)."""
    torch.manual_seed(0)
    moments = torch.randn(3, 8, 5, 4, dtype=torch.float64)
    p = ae_kl.DiagonalGaussianDistribution(moments)
    mean, logvar = moments.chunk(2, dim=1)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mean, (0.5 * logvar).exp()),
                                            torch.distributions.Normal(0.0, 1.0)).sum(dim=[1, 2, 3])
    assert_close(p.kl(), ref, atol=1e-10)
    q = ae_kl.DiagonalGaussianDistribution(torch.randn_like(moments))
    ref_q = torch.distributions.kl_divergence(torch.distributions.Normal(p.mean, p.std),
                                              torch.distributions.Normal(q.mean, q.std)).sum(dim=[1, 2, 3])
    assert_close(p.kl(q), ref_q, atol=1e-10)
    nll = -torch.distributions.Normal(p.mean, p.std).log_prob(p.mean + 0.3).sum(dim=[1, 2, 3])
    assert_close(p.nll(p.mean + 0.3), nll, atol=1e-10)


# ----------------------------------------------------------------------------------------------------------
# key sets and load_official
# ----------------------------------------------------------------------------------------------------------

def _read_keys(path):
    """A reference keys file (xz-compressed copy): (official constructor kwargs, {key: (shape, dtype)})."""
    with lzma.open(path, "rt") as f:
        lines = f.read().splitlines()
    cfg = json.loads(lines[0].split(" ", 2)[2].rsplit(" params=", 1)[0])
    keys = {}
    for line in lines[1:]:
        k, shape, dtype = line.split("\t")
        keys[k] = (tuple(json.loads(shape.replace("(", "[").replace(")", "]").replace(",]", "]"))), dtype)
    return cfg, keys


KEY_FILES = sorted(p.name[:-7] for p in KEYS.glob("kl-f*.txt.xz") if not p.name.endswith("_loss.txt.xz"))


def test_key_files_present():
    assert KEY_FILES == ["kl-f16", "kl-f32", "kl-f4", "kl-f8"]


@pytest.mark.parametrize("name", KEY_FILES)
def test_key_set(name):
    """state_dict == official model part + loss part (loss. -> loss_fn., LPIPS kept out) + scale_factor."""
    cfg, model_keys = _read_keys(KEYS / f"{name}.txt.xz")
    _, loss_keys = _read_keys(KEYS / f"{name}_loss.txt.xz")
    with torch.device("meta"):
        m = ae_kl.create(cfg)
        m_preset = ae_kl.create(name)
    mine = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in m.state_dict().items()}
    expected = dict(model_keys)
    expected.update({"loss_fn." + k[5:]: v for k, v in loss_keys.items() if not k.startswith("loss.perceptual_loss.")})
    expected["scale_factor"] = ((), "float32")
    assert mine == expected
    # same order as the official state_dict (minus the loss part and our scale_factor buffer)
    assert [k for k in mine if k != "scale_factor" and not k.startswith("loss_fn.")] == list(model_keys)
    assert {k: tuple(v.shape) for k, v in m_preset.state_dict().items()} == {k: v[0] for k, v in mine.items()}
    # the LPIPS we build has the official perceptual_loss layout (pip lpips adds 5 aliases lins.*)
    import lpips
    with torch.device("meta"):
        net = lpips.LPIPS(net="vgg", pnet_rand=True, pretrained=False, verbose=False)
    lp = {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.startswith("lins.")}
    assert lp == {k[len("loss.perceptual_loss."):]: v[0] for k, v in loss_keys.items()
                  if k.startswith("loss.perceptual_loss.")}
    # load_official accepts exactly this key set, strict (a Lightning dict, meta tensors: no memory)
    ckpt = {"state_dict": {k: torch.empty(s, dtype=getattr(torch, t), device="meta")
                           for k, (s, t) in {**model_keys, **loss_keys}.items()}}
    with torch.device("meta"):
        loaded = ae_kl.load_official(ckpt, cfg)
    assert loaded.scale_factor.shape == ()


def test_training_recipe():
    """Issue 14 item 7: LDM main.py --scale_lr sets lr = accumulate_grad_batches x GPUs x batch x 4.5e-6, and
    configs/autoencoder/autoencoder_kl_*.yaml train with batch 12 and accumulate_grad_batches 2: a global batch of
    24 on one GPU (train.py's --batch-size is global) and lr 1.08e-4. Adam (0.5, 0.9), no EMA, no clipping."""
    for name in ("kl-f4", "kl-f8", "kl-f16", "kl-f32"):
        with torch.device("meta"):
            hp = ae_kl.create(name).hparams
        assert hp["batch_size"] == 2 * 1 * 12 and hp["lr"] == pytest.approx(2 * 1 * 12 * 4.5e-6) == 1.08e-4
        assert hp["betas"] == (0.5, 0.9) and hp["ema_decay"] == 0 and hp["grad_clip"] == 0
    hp = ae_kl.create("tiny", lpips_pretrained=False).hparams
    assert hp["batch_size"] == 12 and hp["lr"] == pytest.approx(12 * 4.5e-6)


def test_param_counts():
    """The counts in the CONFIGS comments (model part | with loss_fn)."""
    expect = {"kl-f4": (55312063, 58077697), "kl-f8": (83653863, 86419497), "kl-f16": (69610963, 72376597),
              "kl-f32": (103880131, 106645765), "tiny": (954567, 997529)}
    src = Path(ae_kl.__file__).read_text()
    for name, (net, total) in expect.items():
        with torch.device("meta"):
            m = ae_kl.create(name)
        assert sum(p.numel() for n, p in m.named_parameters() if not n.startswith("loss_fn.")) == net
        assert sum(p.numel() for p in m.parameters()) == total
        assert f"{net:,} | {total:,} params" in src


def _official_names(model):
    return {re.sub(r"^loss_fn\.", "loss.", k): v.clone() for k, v in model.state_dict().items() if k != "scale_factor"}


def test_load_official_roundtrip(capsys):
    torch.manual_seed(0)
    src = ae_kl.create("tiny", lpips_pretrained=False)
    for p in src.parameters():
        p.data.normal_()
    sd = _official_names(src)
    sd["loss.perceptual_loss.lin0.model.1.weight"] = torch.zeros(1, 64, 1, 1)
    m = ae_kl.load_official({"state_dict": sd, "global_step": 7}, "tiny")
    assert "skipped 1 loss.perceptual_loss" in capsys.readouterr().out
    for k, v in src.state_dict().items():
        if k != "scale_factor":
            assert torch.equal(m.state_dict()[k], v), k
    # a LatentDiffusion checkpoint: first_stage_model.* (no loss.*) + its scale_factor buffer
    ldm = {"first_stage_model." + k: v for k, v in sd.items() if not k.startswith("loss.")}
    ldm.update({"model.diffusion_model.x.weight": torch.zeros(1), "scale_factor": torch.tensor(0.5)})
    m = ae_kl.load_official(ldm, "tiny")
    out = capsys.readouterr().out
    assert "ignoring 1 other keys" in out and "no loss.* entries" in out
    assert m.scale_factor.item() == 0.5 and torch.equal(m.encoder.conv_in.weight, src.encoder.conv_in.weight)
    # preset scale factors
    assert ae_kl.CONFIGS["kl-f8"]["scale_factor"] == 0.18215
    assert ae_kl.create("tiny", lpips_pretrained=False, scale_factor=0.25).scale_factor.item() == 0.25


def test_load_official_reads_lightning_ckpt(tmp_path, monkeypatch):
    """Released LDM .ckpt files pickle Lightning's callback classes: read with weights_only=True and stand-ins for
    those classes, without pytorch_lightning in this process (issue 16 item 3)."""
    torch.manual_seed(0)
    src = ae_kl.create("tiny", lpips_pretrained=False)
    for p in src.parameters():
        p.data.normal_()
    ckpt = lightning_ckpt(tmp_path, _official_names(src))
    with monkeypatch.context() as mp:  # torch 2.5 cannot list a pickle's globals: one line naming the fix
        mp.delattr(torch.serialization, "get_unsafe_globals_in_checkpoint", raising=False)
        with pytest.raises(ValueError, match=r"GLOBAL pytorch_lightning\.callbacks\.model_checkpoint\.ModelCheckpoint"
                                             r".*\(torch >= 2.6 reads Lightning checkpoints\)$"):
            ae_kl.load_official(ckpt, "tiny")
    if not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        return
    m = ae_kl.load_official(ckpt, "tiny")
    assert all(torch.equal(m.state_dict()[k], v) for k, v in src.state_dict().items() if k != "scale_factor")


def test_read_checkpoint_refuses_unsafe_pickle(tmp_path):
    """Only pytorch_lightning.* / lightning.* globals are stubbed: a pickle that would call os.system is refused,
    in one line, and nothing runs."""
    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)
    torch.save({"state_dict": {}, "callbacks": {"x": Evil()}}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*evil.ckpt.*(posix|os|nt)\.system") as e:
        ae_kl.load_official(tmp_path / "evil.ckpt", "tiny")
    assert "\n" not in str(e.value) and not (tmp_path / "pwned").exists()
    with pytest.raises(ValueError, match="must be a dict or a path, got list"):
        ae_kl.read_checkpoint([1, 2])


def test_load_official_mismatch():
    src = ae_kl.create("tiny", lpips_pretrained=False)
    sd = _official_names(src)
    bad = dict(sd)
    bad.pop("decoder.conv_out.bias")
    bad["decoder.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing \['decoder.conv_out.bias'\], unexpected \['decoder.extra'\]"):
        ae_kl.load_official(bad, "tiny")
    with pytest.raises(ValueError, match="shapes do not match"):
        ae_kl.load_official(sd, dict(ae_kl.CONFIGS["tiny"], z_channels=8, embed_dim=8))
    bad = {k: v for k, v in sd.items() if not k.startswith("loss.discriminator.main.6")}
    with pytest.raises(ValueError, match="loss.discriminator.main.6"):
        ae_kl.load_official(bad, "tiny")


# ----------------------------------------------------------------------------------------------------------
# the contract, training behaviour, bad input
# ----------------------------------------------------------------------------------------------------------

def test_contract_tiny():
    """create -> optimizer_groups -> loss per group -> backward -> encode/decode, as train.py / sample.py do."""
    torch.manual_seed(0)
    m = ae_kl.create("tiny", image_size=32, in_channels=3, num_classes=4, lpips_pretrained=False)
    groups = m.optimizer_groups()
    assert list(groups) == ["ae", "disc"]
    ae_ids, disc_ids = {id(p) for p in groups["ae"]}, {id(p) for p in groups["disc"]}
    assert not ae_ids & disc_ids and all(p.requires_grad for g in groups.values() for p in g)
    assert len(ae_ids) + len(disc_ids) == sum(p.requires_grad for p in m.parameters())
    batch = blob_batch()
    for group in groups:
        m.zero_grad(set_to_none=True)
        loss, logs = m.loss(group, batch, step=2000)
        assert loss.dtype == torch.float32 and loss.ndim == 0 and torch.isfinite(loss)
        assert all(v.ndim == 0 and not v.requires_grad for v in logs.values())
        loss.backward()
        other = "disc" if group == "ae" else "ae"
        assert all(p.grad is not None for p in groups[group] if p is not m.loss_fn.logvar)
        assert all(p.grad is None for p in groups[other]), f"{group} pass left gradients in {other}"
    assert "scale_factor" in m.state_dict() and m.scale_factor.item() == 0.0
    with torch.no_grad():
        z = m.encode(batch["x"])
        assert z.shape == (4, 4, 8, 8)
        m.scale_factor.fill_(0.5)
        torch.manual_seed(1)
        z_half = m.encode(batch["x"])
        torch.manual_seed(1)
        z_one = m.encode_posterior(batch["x"]).sample()
        assert_close(z_half, 0.5 * z_one, atol=1e-6)
        x = m.decode(z_half)
        assert_close(x, m.decode_latent(z_one), atol=1e-5)
        assert x.shape == (4, 3, 32, 32)
    # latents of another channel count (train.py's --ae composition passes its own shapes)
    m1 = ae_kl.create("tiny", image_size=32, in_channels=1, num_classes=1, lpips_pretrained=False)
    assert m1.decode(m1.encode(torch.zeros(2, 1, 32, 32))).shape == (2, 1, 32, 32)


def _overfit(disc_start, steps, perceptual_weight=0.0):
    torch.manual_seed(0)
    m = ae_kl.create("tiny", disc_start=disc_start, perceptual_weight=perceptual_weight, lpips_pretrained=False)
    opts = {k: torch.optim.AdamW(v, lr=2e-3, betas=(0.5, 0.9), weight_decay=0.0)
            for k, v in m.optimizer_groups().items()}
    batch, hist = blob_batch(), []
    for step in range(steps):
        for group, opt in opts.items():
            opt.zero_grad(set_to_none=True)
            loss, logs = m.loss(group, batch, step)
            loss.backward()
            opt.step()
            hist.append({group + "/" + k: v.item() for k, v in logs.items()})
    return m, hist


def test_overfit_gan_off():
    """A tiny AE fits one batch: the L1 reconstruction error halves (GAN weight 0 before disc_start)."""
    m, hist = _overfit(disc_start=10 ** 6, steps=80)
    rec = [h["ae/rec_loss"] for h in hist if "ae/rec_loss" in h]
    assert sum(rec[-5:]) / 5 < 0.5 * rec[0], (rec[0], rec[-5:])
    assert all(h["disc/disc_loss"] == 0.0 for h in hist if "disc/disc_loss" in h)


def test_overfit_gan_on():
    """disc_start=5: the adversarial term switches on at step 5 (disc_factor 0 -> 1), the discriminator
    trains, and the reconstruction still halves."""
    m, hist = _overfit(disc_start=5, steps=130)
    ae = [h for h in hist if "ae/rec_loss" in h]
    disc = [h for h in hist if "disc/disc_loss" in h]
    assert [h["ae/disc_factor"] for h in ae[:7]] == [0.0] * 5 + [1.0] * 2
    assert all(h["disc/disc_loss"] == 0.0 for h in disc[:5]) and disc[5]["disc/disc_loss"] > 0.0
    assert all(h["ae/d_weight"] > 0.0 for h in ae)  # computed even before disc_start, as the official
    assert disc[-1]["disc/logits_real"] > disc[-1]["disc/logits_fake"]  # D learned to tell them apart
    rec = [h["ae/rec_loss"] for h in ae]
    assert sum(rec[-5:]) / 5 < 0.5 * rec[0], (rec[0], rec[-5:])


def test_inference_model_and_encode_mode(capsys):
    """Issue 16 item 2: loss=None builds no PatchGAN / logvar; encode(x, sample=False) is the posterior mode; an
    unmeasured scale factor warns once; a checkpoint without loss.* (an LDM one) loads strict into loss=None."""
    torch.manual_seed(0)
    m = ae_kl.create("tiny", loss=None).eval()
    assert m.loss_fn is None and not any(k.startswith("loss_fn.") for k in m.state_dict())
    with pytest.raises(ValueError, match="loss=None"):
        m.optimizer_groups()
    x = blob_batch(2)["x"]
    with pytest.warns(UserWarning, match="scale_factor is not measured"):
        z = m.encode(x, sample=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per model
        assert torch.equal(z, m.encode(x, sample=False)) and torch.equal(z, m.encode_posterior(x).mean)
        assert not torch.equal(m.encode(x), z)  # the default: a posterior sample, as LDM
    full = ae_kl.create("tiny", lpips_pretrained=False)
    ldm = {"first_stage_model." + k: v for k, v in full.state_dict().items() if not k.startswith("loss_fn.")}
    loaded = ae_kl.load_official(ldm, "tiny")
    assert loaded.loss_fn is None and "built with loss=None" in capsys.readouterr().out
    # official kwargs with LDM's Identity lossconfig: no loss either (the official builds none)
    assert ae_kl.create(_unpack("tiny_kl_encode")["config"]).loss_fn is None


def test_lpips_in_loss_is_frozen_and_outside_state_dict():
    torch.manual_seed(0)
    m = ae_kl.create("tiny", perceptual_weight=1.0, lpips_pretrained=False)
    n_keys = len(m.state_dict())
    loss, _ = m.loss("ae", blob_batch(2), 0)
    loss.backward()
    net = ae_kl.get_lpips(False, "cpu")  # the process-wide cached network the loss used
    assert not net.training and all(p.grad is None and not p.requires_grad for p in net.parameters())
    assert len(m.state_dict()) == n_keys and not any(mod is net for mod in m.modules())


def test_architecture_needs_no_lpips():
    """Issue 16 item 2: the model files import lpips (and so torchvision) only where the loss builds it."""
    import subprocess
    import sys
    code = "import sys, ae_kl, ae_vq, infd; print(sorted({'lpips', 'torchvision'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(ae_kl.__file__).parent, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]


def test_offline_lpips_message(monkeypatch, tmp_path):
    """No network: one clear error naming the VGG16 file and the folder to put it in."""
    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(FileNotFoundError) as e:
        ae_kl.build_lpips(pretrained=True)
    msg = str(e.value)
    assert "vgg16-397923af.pth" in msg and str(tmp_path / "hub" / "checkpoints") in msg and "\n" not in msg
    m = ae_kl.create("tiny")  # lpips_pretrained=True by default; built lazily at the first loss call
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        m.loss("ae", blob_batch(2), 0)


def test_bad_input():
    with pytest.raises(ValueError, match="unknown ae_kl preset"):
        ae_kl.create("kl-f7")
    with pytest.raises(ValueError, match="unknown ae_kl config keys"):
        ae_kl.create("tiny", widht=3)
    with pytest.raises(ValueError, match="multiples of 32"):
        ae_kl.create("tiny", ch=48)
    with pytest.raises(ValueError, match="image_size 30"):
        ae_kl.create("tiny", image_size=30)
    m = ae_kl.create("tiny", lpips_pretrained=False)
    with pytest.raises(ValueError, match=r"x must be \(B, 3, H, W\), got \(2, 1, 32, 32\)"):
        m.encode(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="multiples of 4"):
        m.encode(torch.zeros(2, 3, 30, 32))
    with pytest.raises(ValueError, match=r"z must be \(B, 4, H, W\)"):
        m.decode(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="unknown optimizer group"):
        m.loss("gen", blob_batch(2), 0)
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        ae_kl.load_official("/nonexistent/model.ckpt", "tiny")


