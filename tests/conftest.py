"""Shared test helpers. Every test uses only data it makes or the golden tensors in tests/golden/."""
import os
import sys
from pathlib import Path

# Set before torch loads: spinning OpenMP workers starve each other (and the subprocesses the end-to-end
# tests start) on a 2-core CI machine; passive waiting keeps the suite's time predictable.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
sys.path.insert(0, str(ROOT))

# Two CPU cores in CI: keep torch from oversubscribing them (and keep results reproducible).
torch.set_num_threads(min(2, os.cpu_count() or 1))


def load_golden(model: str, name: str) -> dict:
    """tests/golden/<model>/<name>: a dict made by running the official code (see ../shared/reference)."""
    return torch.load(GOLDEN / model / name, map_location="cpu", weights_only=False)


def assert_close(mine, ref, atol, rtol=0.0, what=""):
    """allclose with a message that says how far off we are (the number the notes report)."""
    mine, ref = mine.detach().double().cpu(), ref.detach().double().cpu()
    assert mine.shape == ref.shape, f"{what}: shape {tuple(mine.shape)} != {tuple(ref.shape)}"
    err = (mine - ref).abs().max().item()
    assert torch.allclose(mine, ref, atol=atol, rtol=rtol), f"{what}: max abs err {err:.3g} (atol {atol}, rtol {rtol})"
    return err


@pytest.fixture
def tmp_run(tmp_path):
    return tmp_path / "run"
