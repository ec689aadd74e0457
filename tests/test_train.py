"""train.py and sample.py end to end: checkpoints, grids, logs, resume, DDP on CPU (gloo), bad input.

The runs use DiT's `tiny` preset on the built-in `shapes` data at 16x16 pixels, so each takes seconds.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, ddp_and_single, fails_with

import sample
import train

TINY = ["--model", "dit", "--config", "tiny", "--data", "shapes", "--image-size", "16", "--batch-size", "4",
        "--workers", "0", "--sample-steps", "2", "--lr", "1e-3"]


def run_train(out, *extra):
    return train.main(TINY + ["--out", str(out), *extra])


def log_lines(out):
    return [json.loads(line) for line in open(out / "log.jsonl")]


def params(state):
    return {k: v for k, v in state.items()}


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_train_writes_checkpoint_grid_and_log(tmp_path):
    out = tmp_path / "run"
    run_train(out, "--steps", "4", "--log-every", "2", "--sample-every", "4", "--ckpt-every", "2")
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["step"] == 4 and {"model", "ema", "opt", "rng", "args", "create"} <= set(ck)
    assert ck["create"]["overrides"] == {"image_size": 16, "in_channels": 3, "num_classes": 4}
    assert max_diff(ck["model"], ck["ema"]) > 0  # EMA is a different average, not a copy
    logs = log_lines(out)
    assert [r["step"] for r in logs] == [2, 4]
    assert all(np.isfinite(r["loss"]) and r["img_per_s"] > 0 for r in logs)
    grid = Image.open(out / "samples" / "step_0000004.png")
    assert grid.size == (4 * 18 + 2, 4 * 18 + 2)  # 16 samples of 16 px with 2 px gaps
    assert not (out / "ckpt.pt.tmp").exists()


def test_resume_repeats_an_uninterrupted_run(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    common = ["--log-every", "1", "--sample-every", "100", "--warmup-steps", "3"]
    run_train(whole, "--steps", "6", *common)
    run_train(parts, "--steps", "3", *common)  # "killed" after step 3 (its last checkpoint)
    run_train(parts, "--steps", "6", "--resume", *common)
    a, b = torch.load(whole / "ckpt.pt", weights_only=True), torch.load(parts / "ckpt.pt", weights_only=True)
    assert b["step"] == 6
    assert max_diff(a["model"], b["model"]) == 0 and max_diff(a["ema"], b["ema"]) == 0
    losses_whole = {r["step"]: r["loss"] for r in log_lines(whole)}
    losses_parts = {r["step"]: r["loss"] for r in log_lines(parts)}
    assert losses_whole == losses_parts


def test_ddp_two_processes_equal_one_process(tmp_path):
    """torchrun --nproc_per_node 2 (gloo): both ranks hold the same parameters, equal (to float rounding) to
    one process that accumulates the same global batch in two micro-batches."""
    args = TINY + ["--steps", "3", "--log-every", "1", "--sample-every", "100", "--batch-size", "8"]
    r0, r1, one, ddp_dir, one_dir = ddp_and_single(tmp_path, args, port=29533)
    assert max_diff(r0, r1) == 0
    assert max_diff(r0, one) < 1e-5
    assert log_lines(ddp_dir)[-1]["loss"] == pytest.approx(log_lines(one_dir)[-1]["loss"], rel=1e-4)


def test_sample_py_writes_pngs(tmp_path):
    out = tmp_path / "run"
    run_train(out, "--steps", "2", "--sample-every", "100")
    sample.main([str(out), "--n", "6", "--steps", "3", "--class", "1", "2", "--each", "--out", str(tmp_path / "g")])
    assert Image.open(tmp_path / "g" / "grid.png").size == (3 * 18 + 2, 2 * 18 + 2)
    singles = sorted((tmp_path / "g").glob("0*.png"))
    assert len(singles) == 6 and Image.open(singles[0]).size == (16, 16)
    # --out is a folder in every mode; by default inside the run folder, or next to a checkpoint file
    sample.main([str(out / "ckpt.pt"), "--n", "2", "--sampler", "ddim", "--steps", "2", "--cfg", "3", "--raw"])
    assert (out / "generated" / "grid.png").exists()


def test_cli_runs_as_a_script(tmp_path):
    """The README's command form, in a fresh interpreter: progress bar on stderr, files on disk."""
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, "--steps", "2", "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "img/s" in r.stderr and "GFLOP/sample" in r.stdout
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), str(tmp_path / "r"), "--n", "4", "--steps", "2"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "r" / "generated" / "grid.png").exists(), r.stderr[-2000:]


# ------------------------------------------------------------------------------------------- bad input
def write_images(folder, n, size=20):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_missing_and_empty_data_folders(tmp_path):
    fails_with(lambda: train.main(TINY[:4] + ["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]),
               "does not exist")
    (tmp_path / "empty").mkdir()
    fails_with(lambda: train.main(TINY[:4] + ["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]),
               "has no images")
    os.environ["DATA_ROOT"] = str(tmp_path)
    try:
        fails_with(lambda: train.main(TINY[:4] + ["--data", "ffhq", "--out", str(tmp_path / "r")]), "ffhq")
    finally:
        del os.environ["DATA_ROOT"]


def test_folder_with_classes_and_an_unreadable_image(tmp_path, capfd):
    data = tmp_path / "data"
    write_images(data / "cats", 3)
    write_images(data / "dogs", 3)
    (data / "dogs" / "broken.png").write_bytes(b"not a png at all")
    out = tmp_path / "run"
    train.main(TINY[:4] + ["--data", str(data), "--image-size", "16", "--batch-size", "7", "--workers", "0",
                           "--steps", "1", "--log-every", "1", "--sample-every", "100", "--out", str(out)])
    err = capfd.readouterr().err
    assert err.count("warning: skipping unreadable image") == 1 and "broken.png" in err
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["create"]["overrides"]["num_classes"] == 2
    assert log_lines(out)[-1]["skipped_images"] == 1


def test_batch_larger_than_data_and_indivisible_batch(tmp_path):
    write_images(tmp_path / "few", 3)
    fails_with(lambda: train.main(TINY[:4] + ["--data", str(tmp_path / "few"), "--batch-size", "8",
                                                    "--workers", "0", "--out", str(tmp_path / "r")]), "larger than")
    fails_with(lambda: run_train(tmp_path / "r", "--batch-size", "5", "--grad-accum", "2"), "divisible")


def test_wrong_checkpoints(tmp_path):
    out = tmp_path / "run"
    run_train(out, "--steps", "1", "--sample-every", "100")
    fails_with(lambda: train.main(["--model", "dit", "--config", "DiT-S/2", "--out", str(out), "--resume",
                                         "--workers", "0"]), "--config tiny (now DiT-S/2)")
    fails_with(lambda: run_train(tmp_path / "r2", "--steps", "1", "--set", "depth=3", "--init", str(out)),
               "does not fit this model", "blocks.2")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    fails_with(lambda: sample.main([str(tmp_path / "junk.pt")]), "not a readable checkpoint")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    fails_with(lambda: sample.main([str(tmp_path / "foreign.pt")]), "not written by train.py")
    fails_with(lambda: sample.main([str(tmp_path / "none")]), "no checkpoint")
    fails_with(lambda: sample.main([str(out), "--reconstruct", str(out)]), "autoencoder")
    fails_with(lambda: run_train(tmp_path / "r3", "--config", "DiT-Q/2"), "no preset")
    fails_with(lambda: run_train(tmp_path / "r4", "--set", "depth"), "KEY=VALUE")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    run_train(out, "--steps", "2", "--sample-every", "100")
    good = torch.load(out / "ckpt.pt", weights_only=True)
    msg = fails_with(lambda: run_train(out, "--steps", "40", "--resume", "--lr", "1e30", "--grad-clip", "0",
                                             "--log-every", "1", "--ckpt-every", "1", "--sample-every", "100"), "NaN")
    kept = torch.load(out / "ckpt.pt", weights_only=True)
    assert f"step {kept['step']}) is kept" in msg
    assert all(v.isfinite().all() for v in kept["model"].values())
    if kept["step"] == 2:
        assert max_diff(kept["model"], good["model"]) == 0


def test_shapes_data_is_deterministic_and_labelled():
    a, b = train.Shapes(24, seed=3), train.Shapes(24, seed=3)
    img, label = a.image(5)
    assert img.size == (24, 24) and label == 5 % 4
    assert np.array_equal(np.asarray(img), np.asarray(b.image(5)[0]))
    assert not np.array_equal(np.asarray(img), np.asarray(train.Shapes(24, seed=4).image(5)[0]))
