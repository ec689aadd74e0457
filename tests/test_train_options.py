"""train.py and sample.py under every option (issue 15; issue 14 item 4): latent runs that resume and scale out
exactly, resume checks, precision and devices, spawn workers, --cache-latents, FID sample files, bad flags.

All runs are tiny presets at 16-32 px for a few steps on CPU; the multi-process ones use gloo.
"""
import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, ddp_and_single

import sample
import train

AUTOENCODERS = ["ae_kl", "ae_vq", "dcae", "infd"]
TINY = ["--model", "dit", "--config", "tiny", "--data", "shapes", "--batch-size", "4", "--workers", "0",
        "--sample-every", "0", "--log-every", "1", "--lr", "1e-3"]
LATENT = TINY + ["--image-size", "32", "--set", "patch_size=1"]  # patch 1 fits every AE's tiny latent grid


def ae_checkpoint(path, name, seed=0):
    """A tiny autoencoder with random weights, saved as train.py saves one (no training needed to encode)."""
    create = {"model": name, "config": "tiny", "overrides": {"image_size": 32, "in_channels": 3, "num_classes": 4,
                                                             "lpips_pretrained": False}}
    torch.manual_seed(seed)
    state = importlib.import_module(name).create("tiny", **create["overrides"]).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"create": create, "model": state, "ema": state, "step": 0}, path)
    return path


def states(out):
    return torch.load(out / "ckpt.pt", weights_only=True)


def log(out):
    return [json.loads(line) for line in open(out / "log.jsonl")]


def one_line_error(fn, *words):
    with pytest.raises(SystemExit) as e:
        fn()
    msg = str(e.value.code)
    assert msg.startswith("error:") and "\n" not in msg, msg
    assert all(w in msg for w in words), msg
    return msg


# ------------------------------------------------------------------------------ item 1: latent runs are exact
@pytest.mark.parametrize("ae", AUTOENCODERS)
def test_latent_run_resumes_exactly(ae, tmp_path):
    """--ae: the encode (ae_kl: a posterior sample) is seeded per (seed, step, shard), and the FLOP count at start-up
    draws nothing from the training RNG, so 2 + 2 resumed steps equal 4 uninterrupted ones, bit for bit."""
    ckpt = ae_checkpoint(tmp_path / "ae" / "ckpt.pt", ae)
    args = LATENT + ["--ae", str(ckpt)]
    train.main(args + ["--steps", "4", "--out", str(tmp_path / "whole")])
    train.main(args + ["--steps", "2", "--out", str(tmp_path / "parts")])
    train.main(args + ["--steps", "4", "--out", str(tmp_path / "parts"), "--resume"])
    a, b = states(tmp_path / "whole"), states(tmp_path / "parts")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [r["loss"] for r in log(tmp_path / "whole")] == [r["loss"] for r in log(tmp_path / "parts")]


@pytest.mark.parametrize("ae", ["ae_kl", pytest.param("ae_vq", marks=pytest.mark.slow),
                                pytest.param("dcae", marks=pytest.mark.slow), pytest.param("infd", marks=pytest.mark.slow)])
def test_latent_ddp_equals_one_process(ae, tmp_path):
    """torchrun --nproc_per_node 2 (gloo) --ae == one process with --grad-accum 2: the scale factor is measured on
    the same images under the same seed in every process, and each shard's encode draws the same noise."""
    ckpt = ae_checkpoint(tmp_path / "ae" / "ckpt.pt", ae)
    r0, r1, one, _, _ = ddp_and_single(tmp_path, LATENT + ["--steps", "2", "--batch-size", "8", "--ae", str(ckpt)],
                                       port=29561 + AUTOENCODERS.index(ae))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    err = max((r0[k] - one[k]).abs().max().item() for k in r0)
    assert err < 1e-5, err


def test_every_micro_batch_knows_its_part_of_the_global_batch(tmp_path, monkeypatch):
    """batch["shard"] = (k, K): part k = rank * grad_accum + micro-step of K = world * grad_accum (HDiT stratifies
    its noise levels over the global batch with it)."""
    import dit
    seen, loss = [], type(dit.create("tiny")).loss
    monkeypatch.setattr(type(dit.create("tiny")), "loss", lambda self, g, b, s: seen.append(b["shard"]) or loss(self, g, b, s))
    train.main(TINY + ["--image-size", "16", "--steps", "2", "--grad-accum", "2", "--out", str(tmp_path / "r")])
    assert seen[-4:] == [(0, 2), (1, 2), (0, 2), (1, 2)]


# ------------------------------------------------------------------------------ item 2: resume checks
def test_resume_checks_flags_and_trims_the_log(tmp_path, capsys):
    out = tmp_path / "run"
    args = TINY + ["--image-size", "16", "--out", str(out)]
    train.main(args + ["--steps", "2"])
    for flag, value in [("--batch-size", "8"), ("--seed", "1"), ("--image-size", "32"), ("--set", "depth=1")]:
        one_line_error(lambda: train.main(args + ["--steps", "3", "--resume", flag, value]), flag, "now")
    one_line_error(lambda: train.main(args + ["--steps", "3", "--resume", "--model", "hdit"]), "--model dit (now hdit)")
    # steps 3 and 4 were logged, then the run died before its next checkpoint: the resumed run logs them again
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 9.0}) + "\n" + json.dumps({"step": 4, "loss": 9.0}) + "\n")
    train.main(args + ["--lr", "5e-4", "--steps", "4", "--resume"])  # the lr may change on purpose: said
    assert "note: --resume with lr 0.0005 (the checkpoint's run used 0.001) from step 2" in capsys.readouterr().out
    assert [r["step"] for r in log(out)] == [1, 2, 3, 4] and 9.0 not in [r["loss"] for r in log(out)]


def test_nodes_that_see_different_checkpoints_stop(tmp_path):
    """Multi-node with per-node disks: rank 1 does not see rank 0's checkpoint -> one clear error on every rank."""
    train.main(TINY + ["--image-size", "16", "--steps", "1", "--out", str(tmp_path / "node0")])
    script = tmp_path / "per_node_disk.py"
    script.write_text(f"import os, sys\nsys.path.insert(0, {str(ROOT)!r})\nimport train\n"
                      "sys.argv[sys.argv.index('--out') + 1] += os.environ['RANK']\ntrain.main(sys.argv[1:])\n")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29571",
                        str(script), *TINY, "--image-size", "16", "--steps", "2", "--batch-size", "8", "--resume",
                        "--out", str(tmp_path / "node")], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0 and "error: the processes see different checkpoints" in r.stderr, r.stderr[-2000:]
    assert "step by rank: [1, None]" in r.stderr


# ------------------------------------------------------------------------------ item 4: spawn workers
@pytest.mark.parametrize("model", ["dit", "infd"])
def test_data_workers_start_with_spawn(model, tmp_path):
    """macOS and Windows start DataLoader workers with `spawn`, which pickles the data set and its transform:
    the centre crop (dit) and a model's own data_transform (INFD, a closure in the model file) both survive."""
    script = tmp_path / "spawn_run.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nimport torch.multiprocessing as mp\n"
                      "import train\nif __name__ == '__main__':\n    mp.set_start_method('spawn', force=True)\n"
                      "    train.main(sys.argv[1:])\n")
    extra = ["--set", "lpips_pretrained=False"] if model == "infd" else []
    args = [*TINY, "--model", model, "--image-size", "16" if model == "dit" else "32", "--steps", "2",
            "--workers", "2", "--out", str(tmp_path / model), *extra]
    r = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert states(tmp_path / model)["step"] == 2


# ------------------------------------------------------------------------------ item 5: precision and devices
def test_precision_choice(monkeypatch):
    assert train.pick_precision("auto", torch.device("cpu"))[0] == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert train.pick_precision("auto", torch.device("cuda"))[0] == "fp16"  # emulated bf16 (T4, V100) is not bf16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert train.pick_precision("auto", torch.device("cuda"))[0] == "bf16"


def test_fp16_with_grad_scaler_trains_and_resumes(tmp_path, capsys):
    """--precision fp16: autocast fp16 + GradScaler (CPU autocast here; the same code runs on CUDA). The scaler's
    state is checkpointed, so a resumed run equals an uninterrupted one."""
    args = TINY + ["--image-size", "16", "--precision", "fp16"]
    train.main(args + ["--steps", "4", "--out", str(tmp_path / "whole")])
    assert "precision fp16 + GradScaler" in capsys.readouterr().out
    train.main(args + ["--steps", "2", "--out", str(tmp_path / "parts")])
    train.main(args + ["--steps", "4", "--out", str(tmp_path / "parts"), "--resume"])
    a, b = states(tmp_path / "whole"), states(tmp_path / "parts")
    assert a["scaler"]["scale"] == b["scaler"]["scale"] > 0
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(np.isfinite(r["loss"]) for r in log(tmp_path / "whole"))


def test_device_flag(tmp_path):
    for name, there in [("cuda", torch.cuda.is_available()), ("mps", torch.backends.mps.is_available())]:
        if not there:
            one_line_error(lambda: train.main(TINY + ["--device", name, "--out", str(tmp_path / "r")]),
                           f"--device {name}: not available")
            one_line_error(lambda: sample.main([str(tmp_path), "--device", name]), f"--device {name}")
    assert sample.pick_device("cpu") == torch.device("cpu")


# ------------------------------------------------------------------------------ item 6: FLOPs under checkpointing
def test_flop_count_under_grad_checkpointing_is_close_to_the_full_count():
    """--grad-checkpoint counts 3x a no-grad forward (the counter's hooks would keep every activation of a
    backward pass): within 15% of the exact forward + backward count for HDiT."""
    import hdit
    torch.manual_seed(0)
    model = hdit.create("tiny", image_size=32, num_classes=4)
    batch = {"x": torch.randn(2, 3, 32, 32), "y": torch.tensor([0, 1]), "shard": (0, 1)}
    exact = train.count_flops(train.LossCall(model), batch, ["model"], 0)
    model.set_grad_checkpointing()
    estimate = train.count_flops(train.LossCall(model), batch, ["model"], 0, forward_only=True)
    assert abs(estimate / exact - 1) < 0.15, (estimate, exact)


# ------------------------------------------------------------------------------ issue 14 item 4; presets' 0 values
def test_ema_copies_buffers(tmp_path):
    """DC-AE's BatchNorm statistics: the EMA copy holds the model's (k-diffusion copies buffers), not stale ones."""
    out = tmp_path / "dcae"
    train.main(TINY + ["--model", "dcae", "--image-size", "32", "--steps", "2", "--out", str(out),
                       "--set", "lpips_pretrained=False"])
    ck = states(out)
    bn = [k for k in ck["model"] if k.endswith("running_mean")]
    assert bn and any(not torch.equal(ck["model"][k], torch.zeros_like(ck["model"][k])) for k in bn)
    buffers = [k for k in ck["model"] if "running_" in k or "num_batches" in k]
    assert all(torch.equal(ck["ema"][k], ck["model"][k]) for k in buffers)


def test_presets_without_clipping_or_ema(tmp_path, monkeypatch):
    """hparams grad_clip=0.0: no clipping (and no grad_norm logged); ema_decay=0.0: the EMA equals the weights
    (official use_ema: False), also under a warm-up power (HDiT)."""
    import dit
    monkeypatch.setitem(dit.PRESET_HPARAMS, "tiny", dict(grad_clip=0.0, ema_decay=0.0))
    train.main(TINY + ["--image-size", "16", "--steps", "3", "--out", str(tmp_path / "dit")])
    ck = states(tmp_path / "dit")
    assert all(torch.equal(ck["ema"][k], ck["model"][k]) for k in ck["model"])
    assert not any(k.startswith("grad_norm") for k in log(tmp_path / "dit")[-1])
    train.main(TINY + ["--model", "hdit", "--image-size", "16", "--steps", "3", "--ema-decay", "0", "--grad-clip", "0",
                       "--out", str(tmp_path / "hdit")])
    ck = states(tmp_path / "hdit")
    assert all(torch.equal(ck["ema"][k], ck["model"][k]) for k in ck["model"])


# ------------------------------------------------------------------------------ item 11: bad command-line values
def test_bad_values_are_one_line(tmp_path):
    out = str(tmp_path / "r")
    one_line_error(lambda: train.main(TINY + ["--set", "depth=abc", "--out", out]), "--set depth=abc", "dit tiny")
    one_line_error(lambda: train.main(TINY + ["--batch-size", "0", "--out", out]), "--batch-size 0", ">= 1")
    one_line_error(lambda: train.main(TINY + ["--batch-size", "abc", "--out", out]), "--batch-size", "invalid int")
    one_line_error(lambda: train.main(TINY + ["--ema-decay", "-1", "--out", out]), "--ema-decay -1", ">= 0")
    one_line_error(lambda: train.main(TINY + ["--cache-latents", "--out", out]), "--cache-latents needs --ae")
    (tmp_path / "garbage.pt").write_bytes(b"this is not a checkpoint")
    one_line_error(lambda: sample.main(["--model", "dit", "--config", "DiT-XL/2", "--official", str(tmp_path / "garbage.pt")]),
                   "--official", "garbage.pt", "not a loadable dit DiT-XL/2 checkpoint")
    one_line_error(lambda: sample.main([out, "--n", "0"]), "--n 0")


# ------------------------------------------------------------------------------ item 7: --cache-latents
def write_images(folder, n, size=36):
    from PIL import Image
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size + 6, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_cache_latents(tmp_path):
    """The data set is encoded once (both flips) into RUN/latents.npy; with a deterministic AE (DC-AE) training from
    it equals training on the fly; resume reuses it; another AE rebuilds it."""
    write_images(tmp_path / "data", 8)
    ae = ae_checkpoint(tmp_path / "ae" / "ckpt.pt", "dcae")
    args = LATENT + ["--data", str(tmp_path / "data"), "--ae", str(ae), "--steps", "2"]
    train.main(args + ["--out", str(tmp_path / "fly")])
    train.main(args + ["--out", str(tmp_path / "cached"), "--cache-latents"])
    z = np.load(tmp_path / "cached" / "latents.npy")["z"]  # per image: its latent and its mirror's
    assert z.shape == (8, 2, 16, 4, 4) and not np.array_equal(z[:, 0], z[:, 1])
    a, b = states(tmp_path / "fly"), states(tmp_path / "cached")
    err = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
    assert err < 1e-5, err
    built = os.stat(tmp_path / "cached" / "latents.npy").st_mtime_ns
    train.main(args[:-1] + ["3", "--out", str(tmp_path / "cached"), "--cache-latents", "--resume"])
    assert os.stat(tmp_path / "cached" / "latents.npy").st_mtime_ns == built
    ae_checkpoint(ae, "dcae", seed=1)  # the AE changed: the cache is rebuilt
    train.main(args + ["--out", str(tmp_path / "cached"), "--cache-latents"])
    assert not np.array_equal(np.load(tmp_path / "cached" / "latents.npy")["z"], z)


# ------------------------------------------------------------------------------ items 8, 9: sample.py
def test_npz_for_fid_and_torchrun_equals_one_process(tmp_path):
    out = tmp_path / "run"
    train.main(TINY + ["--image-size", "16", "--steps", "1", "--out", str(out)])
    sample.main([str(out), "--n", "5", "--batch", "2", "--steps", "2", "--class", "0", "1", "--npz", str(tmp_path / "one.npz")])
    one = np.load(tmp_path / "one.npz")["arr_0"]
    assert one.dtype == np.uint8 and one.shape == (5, 16, 16, 3)
    assert (out / "generated" / "grid.png").exists()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29575",
                        str(ROOT / "sample.py"), str(out), "--num-samples", "5", "--batch", "2", "--steps", "2", "--class", "0", "1",
                        "--npz", str(tmp_path / "two.npz"), "--out", str(tmp_path / "two")],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "img/s" in r.stderr
    assert np.array_equal(np.load(tmp_path / "two.npz")["arr_0"], one)


def test_ae_inside_the_run_folder_is_stored_relative(tmp_path):
    """A run folder that holds its AE can move: the AE path is stored relative to it."""
    run = tmp_path / "run"
    ae_checkpoint(run / "ae" / "ckpt.pt", "ae_vq")
    train.main(LATENT + ["--steps", "1", "--ae", str(run / "ae"), "--out", str(run)])
    assert states(run)["ae"]["spec"] == "ae"
    run.rename(tmp_path / "moved")
    sample.main([str(tmp_path / "moved"), "--n", "2", "--steps", "2"])
    assert (tmp_path / "moved" / "generated" / "grid.png").exists()


def test_help_lists_sampler_names(capsys):
    with pytest.raises(SystemExit):
        sample.parse_args(["--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines (and at hyphens)
    import hdit
    assert f"hdit:{','.join(hdit.SAMPLERS)}" in text and "model-specific" in text
