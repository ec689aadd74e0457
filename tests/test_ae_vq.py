"""ae_vq.py against the official LDM / taming code (golden tensors), the key sets, the paper's claims, the contract.

Golden files (tests/golden/ae_vq/*.xz) are re-packed copies of ../shared/reference/ae_vq/golden/ (only the tested
tensors, byte-shuffled + xz; the format is written by tests/test_ae_kl.py::_pack). Kept: quantizer (VectorQuantizer2
alone: indices, legacy beta gradients, straight-through) and tiny_vq_loss (VQModel forward with an attention-free
body, both loss classes, 5 variants, VQModelInterface). Left out for size: tiny_vq_encode / tiny_vq_decode (the
Encoder/Decoder are the ae_kl code, checked identical below and against ae_kl's golden files).
"""
import functools
import json
import lzma
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import ae_kl
import ae_vq
from conftest import GOLDEN, assert_close, blob_batch, lift

KEYS = Path(__file__).resolve().parent / "golden" / "ae_vq" / "keys"


@functools.lru_cache(maxsize=None)
def _unpack(name):
    """tests/golden/ae_vq/<name>.xz -> {"state_dict", "inputs", "outputs", + the reference's metadata}."""
    raw = lzma.decompress((GOLDEN / "ae_vq" / f"{name}.xz").read_bytes())
    n = int.from_bytes(raw[5:13], "little")
    header = json.loads(raw[13:13 + n])
    d, pos = {"state_dict": {}, "inputs": {}, "outputs": {}, **header["meta"]}, 13 + n
    for part, key, dtype, shape, nbytes in header["tensors"]:
        itemsize = np.dtype(dtype).itemsize
        planes = np.frombuffer(raw[pos:pos + nbytes], np.uint8).reshape(itemsize, -1)  # un-shuffle bytes
        d[part][key] = torch.from_numpy(np.frombuffer(planes.T.tobytes(), dtype=dtype).reshape(shape).copy())
        pos += nbytes
    return d


def _check(d, key, mine, errors, ref=None):
    """The README tolerance 4 * (float32 vs float64 official) + 1e-6 * max|ref|; integers exact."""
    ref = d["outputs"][key] if ref is None else ref
    mine = mine.detach().reshape(ref.shape)
    if not ref.dtype.is_floating_point:
        assert torch.equal(mine.to(ref.dtype), ref), key
        errors[key] = 0
        return
    atol = 4 * d["f32_vs_f64_max_abs_diff"].get(key, 0.0) + 1e-6 * ref.abs().max().item()
    errors[key] = assert_close(mine, ref, atol=atol, what=key)


def test_golden_quantizer():
    """VectorQuantizer2: indices, z_q, loss, codebook lookups, straight-through and legacy-beta gradients."""
    d = _unpack("quantizer")
    z, R = d["inputs"]["z"], d["inputs"]["R"]
    errors = {}
    for legacy in (True, False):
        q = ae_vq.VectorQuantizer(64, 4, beta=0.25, legacy=legacy)
        q.load_state_dict(d["state_dict"])
        zz = z.clone().requires_grad_(True)
        z_q, loss, (_, _, ind) = q(zz)
        g_z, g_e = torch.autograd.grad(loss, [zz, q.embedding.weight], retain_graph=True)
        _check(d, f"legacy_{legacy}/emb_loss", loss, errors)
        _check(d, f"legacy_{legacy}/grad_emb_loss_wrt_h", g_z, errors)
        _check(d, f"legacy_{legacy}/grad_emb_loss_wrt_codebook", g_e, errors)
        if legacy:
            _check(d, "z_q", z_q, errors)
            _check(d, "loss", loss, errors)
            _check(d, "indices", ind, errors)
            _check(d, "codebook_entry", q.get_codebook_entry(ind, (2, 6, 5, 4)), errors)
            _check(d, "codebook_entry_noshape", q.get_codebook_entry(ind, None), errors)
            # straight-through: d/dz sum(z_q * R) == R, and the codebook gets nothing from this path
            g_st, g_cb = torch.autograd.grad((z_q * R).sum(), [zz, q.embedding.weight], allow_unused=True)
            _check(d, "straight_through/grad_wrt_z", g_st, errors)
            assert g_cb is None
    q = ae_vq.VectorQuantizer(64, 4, beta=0.25, sane_index_shape=True)
    q.load_state_dict(d["state_dict"])
    _check(d, "indices_sane", q(z)[2][2], errors)
    print("quantizer max abs err:", errors)


def test_lift_quantizer():
    """Issue 16 item 2: VectorQuantizer copied alone (torch, nn, F, math only) gives the file's z_q, loss, indices
    and straight-through gradient on the golden codebook."""
    d = _unpack("quantizer")
    ns = lift(ae_vq, "VectorQuantizer")
    outs = []
    for cls in (ae_vq.VectorQuantizer, ns["VectorQuantizer"]):
        q = cls(64, 4, beta=0.25)
        q.load_state_dict(d["state_dict"])
        z = d["inputs"]["z"].clone().requires_grad_(True)
        z_q, loss, (_, _, ind) = q(z)
        outs.append((z_q, loss, ind, torch.autograd.grad((z_q * d["inputs"]["R"]).sum() + loss, z)[0]))
    assert all(torch.equal(a, b) for a, b in zip(*outs))

def _loss_model(d, variant):
    v = d["variants"][variant]
    cfg = json.loads(json.dumps(d["config"]))
    params = {k: val for k, val in v["loss_params"].items() if k != "n_classes"}
    cfg["lossconfig"]["params"].update(params)
    model = ae_vq.create(cfg, lpips_pretrained=False)
    sd = {re.sub(r"^loss\.", "loss_fn.", k): t for k, t in d["state_dict"].items()}
    sd["scale_factor"] = model.scale_factor
    model.load_state_dict(sd, strict=True)
    return model.train(), v


@pytest.mark.parametrize("variant", ["A", "B", "C", "LDM_l1", "LDM_l2"])
def test_golden_loss(variant):
    """VQModel.forward + (taming | ldm) VQLPIPSWithDiscriminator, optimizer_idx 0 and 1, with gradients."""
    d = _unpack("tiny_vq_loss")
    model, v = _loss_model(d, variant)
    x, step, P = d["inputs"]["x"], v["global_step"], f"{variant}/"
    D = model.loss_fn.discriminator
    seen, errors = [], {}
    hook = D.register_forward_hook(lambda mod, inp, out: seen.append(out))
    xrec, qloss, ind = model(x, return_pred_indices=True)
    _check(d, "A/xrec", xrec, errors)  # identical weights and input in every variant: stored once
    _check(d, "A/ind", ind, errors)
    _check(d, P + "qloss", qloss, errors)
    aeloss, log0 = model.loss_fn(qloss, x, xrec, 0, step, last_layer=model.get_last_layer(),
                                 predicted_indices=ind if v.get("pass_indices") else None)
    _check(d, P + "aeloss", aeloss, errors)
    for k, val in log0.items():
        if k != "unused_codes":
            _check(d, f"{P}log0/train/{k}", val, errors)
    if v.get("pass_indices"):
        assert log0["unused_codes"].item() == 64 - d["outputs"][P + "log0/train/cluster_usage"].item()
    _check(d, P + "logits_fake_gen", seen[-1], errors)
    names = ["quantize.embedding.weight", "decoder.conv_out.weight", "decoder.conv_out.bias",
             "encoder.conv_in.weight", "quant_conv.weight", "post_quant_conv.weight"]
    params = dict(model.named_parameters())
    for n, g in zip(names, torch.autograd.grad(aeloss, [params[n] for n in names], retain_graph=True)):
        _check(d, P + "grad_aeloss/" + n, g, errors)
    discloss, log1 = model.loss_fn(qloss, x, xrec, 1, step)
    _check(d, P + "discloss", discloss, errors)
    for k, val in log1.items():
        _check(d, f"{P}log1/train/{k}", val, errors)
    _check(d, P + "logits_real_disc", seen[-2], errors)
    _check(d, P + "logits_fake_disc", seen[-1], errors)
    hook.remove()
    for n in ("main.0.weight", "main.3.weight"):
        if f"{P}grad_discloss/loss.discriminator.{n}" in d["outputs"]:  # not stored for C (disc_factor 0)
            g = torch.autograd.grad(discloss, dict(D.named_parameters())[n], retain_graph=True)[0]
            _check(d, f"{P}grad_discloss/loss.discriminator.{n}", g, errors)
    if variant == "A":  # VQModelInterface: the contract's encode / decode (scale_factor 0 -> 1)
        with torch.no_grad():
            h = model.encode(x)
            _check(d, "A/interface/h", h, errors)
            _check(d, "A/xrec", model.decode(h), errors)  # interface/decode == xrec (stored once)
            _check(d, "A/interface/decode_force_not_quantize", model.decode(h, force_not_quantize=True), errors)
    print(f"tiny_vq_loss {variant} max abs err:", errors)


def test_adaptive_weight_formula():
    """d_weight = clamp(||d nll/dW|| / (||d g_loss/dW|| + 1e-4), 0, 1e4) * disc_weight, with no disc_factor guard."""
    d = _unpack("tiny_vq_loss")
    model, v = _loss_model(d, "C")  # disc_factor 0 at this step, d_weight still computed
    x = d["inputs"]["x"]
    xrec, qloss = model(x)
    W = model.get_last_layer()
    nll = torch.abs(x - xrec).mean()
    g = -model.loss_fn.discriminator(xrec).mean()
    a = torch.autograd.grad(nll, W, retain_graph=True)[0].norm()
    b = torch.autograd.grad(g, W, retain_graph=True)[0].norm()
    ref = d["outputs"]
    assert_close(a, ref["C/helper/nll_grad_norm"], atol=1e-5)
    assert_close(b, ref["C/helper/g_grad_norm"], atol=1e-5)
    _, log0 = model.loss_fn(qloss, x, xrec, 0, v["global_step"], last_layer=W)
    assert log0["disc_factor"].item() == 0.0
    assert_close(log0["d_weight"], torch.clamp(a / (b + 1e-4), 0, 1e4) * 0.75, atol=1e-5)


def test_straight_through_gradient():
    """Sec. 3.1 / VQGAN Eq. 4: the gradient at the decoder input reaches the encoder output unchanged."""
    torch.manual_seed(0)
    m = ae_vq.create("tiny", lpips_pretrained=False)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    h = m.encode_to_prequant(x)
    h.retain_grad()
    quant, _, _ = m.quantize(h)
    quant.retain_grad()
    m.decode_quant(quant).square().sum().backward()
    assert quant.grad.abs().sum() > 0
    assert torch.equal(h.grad, quant.grad)
    assert m.quantize.embedding.weight.grad is None  # the codebook learns only from the codebook loss
    assert m.encoder.conv_in.weight.grad is not None


def test_perplexity_formula():
    """perplexity = exp(-sum p log p) over the code histogram, cluster usage = #codes used (ldm, via one-hot)."""
    ind = torch.tensor([0, 0, 1, 5, 5, 5, 7, 0])
    p = torch.nn.functional.one_hot(ind, 10).float().mean(0)
    ref = torch.exp(-torch.sum(p * torch.log(p + 1e-10)))
    perplexity, used = ae_vq.measure_perplexity(ind, 10)
    assert_close(perplexity, ref, atol=1e-6)
    assert used.item() == 4


def _read_keys(path):
    with lzma.open(path, "rt") as f:
        lines = f.read().splitlines()
    cfg = json.loads(lines[0].split(" ", 2)[2].rsplit(" params=", 1)[0])
    keys = {}
    for line in lines[1:]:
        k, shape, dtype = line.split("\t")
        keys[k] = (tuple(json.loads(shape.replace("(", "[").replace(")", "]").replace(",]", "]"))), dtype)
    return cfg, keys


KEY_FILES = ["vq-f16", "vq-f4", "vq-f4-noattn", "vq-f8", "vq-f8-n256"]


@pytest.mark.parametrize("name", KEY_FILES)
def test_key_set(name):
    """state_dict == official model part + loss part (loss. -> loss_fn., LPIPS kept out) + scale_factor."""
    cfg, model_keys = _read_keys(KEYS / f"{name}.txt.xz")
    _, loss_keys = _read_keys(KEYS / f"{name}_loss.txt.xz")
    with torch.device("meta"):
        m, m_preset = ae_vq.create(cfg), ae_vq.create(name)
    mine = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in m.state_dict().items()}
    expected = dict(model_keys)
    expected.update({"loss_fn." + k[5:]: v for k, v in loss_keys.items() if not k.startswith("loss.perceptual_loss.")})
    expected["scale_factor"] = ((), "float32")
    assert mine == expected
    assert [k for k in mine if k != "scale_factor" and not k.startswith("loss_fn.")] == list(model_keys)
    assert {k: tuple(v.shape) for k, v in m_preset.state_dict().items()} == {k: v[0] for k, v in mine.items()}
    assert m_preset.loss_fn.discriminator_iter_start == cfg["lossconfig"]["params"]["disc_start"]
    ckpt = {"state_dict": {k: torch.empty(s, dtype=getattr(torch, t), device="meta")
                           for k, (s, t) in {**model_keys, **loss_keys}.items()}}
    with torch.device("meta"):
        ae_vq.load_official(ckpt, cfg)


def test_training_recipe():
    """Issue 14 item 7: lr = 4.5e-6 x global batch (LDM main.py --scale_lr), batch = each released yaml's batch_size
    (models/first_stage_models/vq-*/config.yaml; no accumulate_grad_batches there)."""
    for name, batch in {"vq-f4": 8, "vq-f4-noattn": 8, "vq-f8": 10, "vq-f8-n256": 10, "vq-f16": 14}.items():
        with torch.device("meta"):
            hp = ae_vq.create(name).hparams
        assert hp["batch_size"] == batch and hp["lr"] == pytest.approx(4.5e-6 * batch), name
        assert hp["betas"] == (0.5, 0.9) and hp["ema_decay"] == 0 and hp["grad_clip"] == 0


def test_param_counts():
    expect = {"vq-f4": (55322782, 58088415), "vq-f4-noattn": (53219486, 55985119), "vq-f8": (67717295, 68380656),
              "vq-f8-n256": (67652783, 70418416), "vq-f16": (69593371, 70256732), "tiny": (953231, 996192)}
    src = Path(ae_vq.__file__).read_text()
    for name, (net, total) in expect.items():
        with torch.device("meta"):
            m = ae_vq.create(name)
        assert sum(p.numel() for n, p in m.named_parameters() if not n.startswith("loss_fn.")) == net
        assert sum(p.numel() for p in m.parameters()) == total
        assert f"{net:,} | {total:,} params" in src


def test_load_official(capsys):
    torch.manual_seed(0)
    src = ae_vq.create("tiny", lpips_pretrained=False)
    for p in src.parameters():
        p.data.normal_()
    sd = {re.sub(r"^loss_fn\.", "loss.", k): v.clone() for k, v in src.state_dict().items() if k != "scale_factor"}
    ldm = {"first_stage_model." + k: v for k, v in sd.items() if not k.startswith("loss.")}
    m = ae_vq.load_official({"state_dict": ldm}, "tiny")
    assert "no loss.* entries" in capsys.readouterr().out
    assert torch.equal(m.quantize.embedding.weight, src.quantize.embedding.weight)
    m = ae_vq.load_official(sd, "tiny")
    assert torch.equal(m.loss_fn.discriminator.main[0].weight, src.loss_fn.discriminator.main[0].weight)
    bad = dict(sd, **{"quantize.used": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"unexpected \['quantize.used'\]"):
        ae_vq.load_official(bad, "tiny")
    with pytest.raises(ValueError, match="quantize.embedding.weight"):
        ae_vq.load_official(sd, dict(ae_vq.CONFIGS["tiny"], n_embed=128))
    assert ae_vq.CONFIGS["vq-f8"]["scale_factor"] == 1.0  # the official VQ LDMs diffuse unscaled h


def test_contract_tiny():
    """create -> optimizer_groups -> loss per group -> backward -> encode/decode; logs carry codebook usage."""
    torch.manual_seed(0)
    m = ae_vq.create("tiny", image_size=32, in_channels=3, num_classes=4, lpips_pretrained=False)
    groups = m.optimizer_groups()
    assert list(groups) == ["ae", "disc"]
    assert len(groups["ae"]) + len(groups["disc"]) == sum(p.requires_grad for p in m.parameters())
    batch = blob_batch()
    for group in groups:
        m.zero_grad(set_to_none=True)
        loss, logs = m.loss(group, batch, step=2000)
        assert loss.dtype == torch.float32 and loss.ndim == 0 and torch.isfinite(loss)
        assert all(v.ndim == 0 and not v.requires_grad for v in logs.values())
        loss.backward()
        other = "disc" if group == "ae" else "ae"
        assert all(p.grad is None for p in groups[other]), f"{group} pass left gradients in {other}"
        if group == "ae":
            assert {"perplexity", "cluster_usage", "unused_codes"} <= set(logs)
            assert logs["cluster_usage"].item() + logs["unused_codes"].item() == 256
            assert m.quantize.embedding.weight.grad is not None
    with torch.no_grad():
        z = m.encode(batch["x"])
        assert z.shape == (4, 4, 8, 8)
        m.scale_factor.fill_(0.5)
        assert_close(m.encode(batch["x"]), 0.5 * z, atol=1e-6)
        assert_close(m.decode(0.5 * z), m.decode_quant(m.quantize(z)[0]), atol=1e-5)
    assert "scale_factor" in m.state_dict()


def _overfit(disc_start, steps):
    torch.manual_seed(0)
    m = ae_vq.create("tiny", disc_start=disc_start, perceptual_weight=0.0, lpips_pretrained=False)
    opts = {k: torch.optim.AdamW(v, lr=2e-3, betas=(0.5, 0.9), weight_decay=0.0)
            for k, v in m.optimizer_groups().items()}
    batch, hist = blob_batch(2), []  # two images: the 256-code bottleneck fits them within ~100 steps
    for step in range(steps):
        for group, opt in opts.items():
            opt.zero_grad(set_to_none=True)
            loss, logs = m.loss(group, batch, step)
            loss.backward()
            opt.step()
            hist.append({group + "/" + k: v.item() for k, v in logs.items()})
    return [h for h in hist if "ae/rec_loss" in h], [h for h in hist if "disc/disc_loss" in h]


def test_overfit_gan_off():
    ae, disc = _overfit(disc_start=10 ** 6, steps=100)
    rec = [h["ae/rec_loss"] for h in ae]
    assert sum(rec[-5:]) / 5 < 0.5 * rec[0], (rec[0], rec[-5:])
    assert all(h["disc/disc_loss"] == 0.0 for h in disc)


def test_overfit_gan_on():
    ae, disc = _overfit(disc_start=5, steps=100)
    assert [h["ae/disc_factor"] for h in ae[:7]] == [0.0] * 5 + [1.0] * 2
    assert all(h["disc/disc_loss"] == 0.0 for h in disc[:5]) and disc[5]["disc/disc_loss"] > 0.0
    rec = [h["ae/rec_loss"] for h in ae]
    assert sum(rec[-5:]) / 5 < 0.5 * rec[0], (rec[0], rec[-5:])


def test_inference_model_and_encode(capsys):
    """Issue 16 item 2: loss=None builds no PatchGAN; encode is deterministic and accepts sample=; an unmeasured
    scale factor warns once; a checkpoint without loss.* (an LDM one) loads strict into loss=None."""
    torch.manual_seed(0)
    m = ae_vq.create("tiny", loss=None).eval()
    assert m.loss_fn is None and not any(k.startswith("loss_fn.") for k in m.state_dict())
    with pytest.raises(ValueError, match="loss=None"):
        m.loss("ae", blob_batch(2), 0)
    x = blob_batch(2)["x"]
    with pytest.warns(UserWarning, match="scale_factor is not measured"):
        z = m.encode(x)
    assert torch.equal(z, m.encode(x, sample=False)) and torch.equal(z, m.encode_to_prequant(x))
    full = ae_vq.create("tiny", lpips_pretrained=False)
    ldm = {"first_stage_model." + k: v for k, v in full.state_dict().items() if not k.startswith("loss_fn.")}
    assert ae_vq.load_official(ldm, "tiny").loss_fn is None and "loss=None" in capsys.readouterr().out


def test_offline_lpips_message(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    m = ae_vq.create("tiny")  # lpips_pretrained=True by default; built lazily at the first loss call
    with pytest.raises(FileNotFoundError) as e:
        m.loss("ae", blob_batch(2), 0)
    assert "vgg16-397923af.pth" in str(e.value) and str(tmp_path / "hub" / "checkpoints") in str(e.value)


def test_bad_input():
    with pytest.raises(ValueError, match="unknown ae_vq preset"):
        ae_vq.create("vq-f32")
    with pytest.raises(ValueError, match="double_z = False"):
        ae_vq.create({"ddconfig": dict(ae_kl.CONFIGS["tiny"], double_z=True), "embed_dim": 4, "n_embed": 8})
    with pytest.raises(ValueError, match="disc_conditional"):  # issue 14 item 7: was silently dropped
        ae_vq.create("tiny", disc_conditional=True)
    m = ae_vq.create("tiny", lpips_pretrained=False)
    with pytest.raises(ValueError, match=r"x must be \(B, 3, H, W\)"):
        m.encode(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match=r"z must be \(B, 4, H, W\)"):
        m.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="unknown optimizer group"):
        m.loss("model", blob_batch(2), 0)
