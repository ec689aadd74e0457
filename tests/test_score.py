"""The shape score (issue 17): a classifier trained once on real `shapes` images rates how recognisable a shapes
run's samples are; `sample.py RUN --score` prints it and train.py logs it at each grid.

The classifier is trained once for this module (about 30-60 s on 2 CPU cores) into a temporary cache folder:
these tests never write into the user's ~/.cache.
"""
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import train
from conftest import fails_with

TINY = ["--config", "tiny", "--data", "shapes", "--batch-size", "4", "--workers", "0", "--sample-steps", "2"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache folder holding the trained classifier (trained here, timed), and the training time in seconds."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root))
        t0 = time.time()
        sample.shape_classifier(torch.device("cpu"))
        return root, time.time() - t0


@pytest.fixture(autouse=True)
def cached(cache, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache[0]))


def real_shapes(n, size=32, seed=0):
    """n real shapes images (n, 3, size, size) in [-1, 1] and their labels; seed 0 is what training runs draw."""
    source = sample.Shapes(size, n, seed)
    images, labels = zip(*(source.image(i) for i in range(n)))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1, torch.tensor(labels)


# ------------------------------------------------------------------------------------------- the classifier
def test_classifier_is_cached_and_right_on_held_out_shapes(cache, capsys):
    path = sample.shape_classifier_path()
    assert path.is_file() and str(path).startswith(str(cache[0]))  # keyed by size and version, under the cache
    assert path.name == f"shape_classifier_{sample.SCORE_SIZE}px_v{sample.SCORE_VERSION}.pt"
    t0 = time.time()
    net, accuracy = sample.shape_classifier(torch.device("cpu"))  # from the cache: no training, no message
    assert time.time() - t0 < 5 and capsys.readouterr().out == ""
    assert accuracy >= 0.99  # measured at training time on the held-out seed
    x, y = real_shapes(2000)  # the runs' own data (seed 0), disjoint from the classifier's training seed
    assert (sample.classify_shapes(net, x) == y).float().mean() >= 0.99
    print(f"classifier trained in {cache[1]:.0f} s, held-out accuracy {100 * accuracy:.2f}%")


def test_classifier_size_as_its_docstring_states():
    from torch.utils.flop_counter import FlopCounterMode
    net = sample.shape_classifier_net().eval()
    assert sum(p.numel() for p in net.parameters()) == 60_948
    with FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 3, 32, 32))
    assert round(counter.get_total_flops() / 1e5) == 68  # 6.8 MFLOP


def test_training_is_deterministic():
    """Two trainings give the same weights whatever the caller's thread count (and under no_grad, as in --score), and
    leave its RNG and thread count as they were."""
    torch.manual_seed(123)
    before, threads = torch.get_rng_state(), torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            a, _ = sample.train_shape_classifier(n=640)
        assert torch.equal(torch.get_rng_state(), before) and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        b, _ = sample.train_shape_classifier(n=640)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_corrupt_cache_trains_again(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    trained = []
    monkeypatch.setattr(sample, "train_shape_classifier",
                        lambda: trained.append(1) or (sample.shape_classifier_net().eval(), 0.5))
    path = sample.shape_classifier_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    assert sample.shape_classifier(torch.device("cpu"))[1] == 0.5 and trained == [1]
    assert "unreadable" in capsys.readouterr().out
    assert sample.shape_classifier(torch.device("cpu"))[1] == 0.5 and trained == [1]  # rewritten: loads now


# ------------------------------------------------------------------------------------------- the score
def test_real_shapes_score_perfect_and_wrong_labels_score_low():
    x, y = real_shapes(512)
    net = sample.shape_classifier(torch.device("cpu"))[0]
    right = sample.shape_score(sample.classify_shapes(net, x), y)
    assert right["score"] >= 0.99 and right["n"] == 512 and min(right["per_class"]) >= 0.97
    wrong = sample.shape_score(sample.classify_shapes(net, x), (y + 1) % 4)
    assert wrong["score"] <= 0.02
    line = sample.format_score(right)
    assert line.startswith(f"shape score {100 * right['score']:.1f}% ({right['right']}/512 right; per class circle ")


def test_soft_or_grainy_shapes_are_still_recognised():
    """Samples in training are not clean: noise of std 0.1 or a 3x3 blur must not hide the shape."""
    x, y = real_shapes(1000)
    net = sample.shape_classifier(torch.device("cpu"))[0]
    noisy = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    assert sample.shape_score(sample.classify_shapes(net, noisy), y)["score"] >= 0.98
    soft = torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    assert sample.shape_score(sample.classify_shapes(net, soft), y)["score"] >= 0.97


def test_larger_images_are_box_filtered_to_the_classifier():
    x, y = real_shapes(512, size=64)  # e.g. a latent run decoded to 64 px
    net = sample.shape_classifier(torch.device("cpu"))[0]
    assert sample.shape_score(sample.classify_shapes(net, x), y)["score"] >= 0.98
    with pytest.raises(ValueError, match="at least 32 px"):
        sample.classify_shapes(net, real_shapes(4, size=16)[0])


def test_histogram_for_unconditional_samples():
    x, y = real_shapes(400)
    net = sample.shape_classifier(torch.device("cpu"))[0]
    balanced = sample.shape_score(sample.classify_shapes(net, x))
    assert "score" not in balanced and np.allclose(balanced["hist"], 0.25, atol=0.01)
    circles = sample.shape_score(sample.classify_shapes(net, x[y == 0]))
    assert circles["hist"][0] >= 0.99 and sum(circles["hist"]) == pytest.approx(1)
    line = sample.format_score(circles)
    assert line.startswith("shape histogram of 100 unconditional samples: circle 100% square 0%")


class FakeModel(torch.nn.Module):
    """sample() draws a real shape (its label's, or its index's when labels are ignored) at 32 px."""

    def __init__(self, conditional, shift=0):
        super().__init__()
        self.conditional, self.shift, self.w = conditional, shift, torch.nn.Parameter(torch.zeros(()))

    def sample(self, n, labels=None, generator=None, **kw):
        kinds = (labels.tolist() if self.conditional
                 else [int(torch.randint(4, (), generator=generator)) for _ in range(n)])
        source = sample.Shapes(32, 10**6, seed=1)
        images = [source.image(4 * k + (kind + self.shift) % 4)[0] for k, kind in enumerate(kinds)]
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_label_probe_tells_conditional_from_unconditional():
    cpu = torch.device("cpu")
    assert sample.label_probe(FakeModel(True), None, cpu) == (True, 32)
    assert sample.label_probe(FakeModel(False), None, cpu) == (False, 32)
    good = sample.score_samples(FakeModel(True), None, 24, cpu, True, batch=10)
    assert good["score"] == 1 and good["right"] == 24
    bad = sample.score_samples(FakeModel(True, shift=1), None, 24, cpu, True, batch=10)
    assert bad["score"] == 0
    assert "score" not in sample.score_samples(FakeModel(False), None, 24, cpu, False, batch=10)


# ------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def dit_run(tmp_path_factory, cache):
    """A tiny DiT trained 2 steps on 32 px shapes, with a grid (and so a score) at step 2."""
    out = tmp_path_factory.mktemp("dit") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(cache[0]))
        train.main(["--model", "dit", *TINY, "--image-size", "32", "--lr", "1e-3", "--steps", "2", "--log-every", "1",
                    "--sample-every", "2", "--out", str(out)])
    return out


def test_train_logs_the_score_at_each_grid(dit_run):
    records = [json.loads(line) for line in open(dit_run / "log.jsonl")]
    assert [r["step"] for r in records] == [1, 2]  # merged into the step's record, not a record of its own
    assert "shape_score" not in records[0]
    last = records[1]
    assert 0 <= last["shape_score"] <= 1 and np.isfinite(last["loss"])
    assert len(last["shape_hist"]) == 4 and sum(last["shape_hist"]) == pytest.approx(1)
    assert (last["shape_score"] * 16) == pytest.approx(round(last["shape_score"] * 16))  # the grid's 16 samples


def test_score_end_to_end_prints_one_line(dit_run, capsys):
    result = sample.main([str(dit_run), "--score", "8", "--steps", "2", "--batch", "4"])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("shape score ") and "/8 right; per class circle " in out[-1]
    assert out[-1] == sample.format_score(result)


def test_score_refuses_other_runs(tmp_path, dit_run):
    folder = tmp_path / "pics"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    other = tmp_path / "folder_run"
    train.main(["--model", "dit", *TINY[:2], "--data", str(folder), *TINY[4:], "--image-size", "32", "--steps", "1",
                "--sample-every", "0", "--out", str(other)])
    fails_with(lambda: sample.main([str(other), "--score"]), "--score", "not shapes")
    ae = tmp_path / "ae"
    train.main(["--model", "ae_kl", *TINY, "--image-size", "32", "--steps", "1", "--sample-every", "0",
                "--set", "lpips_pretrained=False", "--out", str(ae)])
    fails_with(lambda: sample.main([str(ae), "--score"]), "--score", "autoencoder")
    small = tmp_path / "small"
    train.main(["--model", "dit", *TINY, "--image-size", "16", "--steps", "1", "--sample-every", "1",
                "--out", str(small)])
    assert "shape_score" not in open(small / "log.jsonl").read()  # too small to score: the grid logs nothing
    fails_with(lambda: sample.main([str(small), "--score", "--steps", "2"]), "16 px", "at least 32 px")
    fails_with(lambda: sample.main([str(dit_run), "--score", "--class", "5"]), "--class 5")
    fails_with(lambda: sample.main(["--model", "dit", "--official", "x.pt", "--config", "DiT-XL/2", "--score"]),
               "--score", "run folder")


def test_unconditional_run_logs_and_prints_the_histogram(tmp_path, capsys):
    out = tmp_path / "uncond"
    train.main(["--model", "hdit", *TINY, "--image-size", "32", "--steps", "1", "--sample-every", "1",
                "--set", "num_classes=0", "--out", str(out)])  # HDiT without a class embedding ignores labels
    last = json.loads(open(out / "log.jsonl").read().splitlines()[-1])
    assert last["shape_score"] is None and sum(last["shape_hist"]) == pytest.approx(1)
    capsys.readouterr()
    sample.main([str(out), "--score", "8", "--steps", "2", "--batch", "4"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("shape histogram of 8 unconditional samples: circle ")
