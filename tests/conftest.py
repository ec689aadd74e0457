"""Shared test helpers. Every test uses only data it makes or the golden tensors in tests/golden/."""
import os
import sys
from pathlib import Path

# Set before torch loads: spinning OpenMP workers starve each other (and the subprocesses the end-to-end
# tests start) on a 2-core CI machine; passive waiting keeps the suite's time predictable.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Tests never write into the user's home: caches (the shape classifier of sample.py --score) go under the
# repository's .pytest_cache, so a second run reuses them; subprocesses inherit this.
os.environ["XDG_CACHE_HOME"] = str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "xdg")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
sys.path.insert(0, str(ROOT))

# Two CPU cores in CI: keep torch from oversubscribing them (and keep results reproducible).
torch.set_num_threads(min(2, os.cpu_count() or 1))


def load_golden(model: str, name: str) -> dict:
    """tests/golden/<model>/<name>: a dict made by running the official code (each folder says how)."""
    return torch.load(GOLDEN / model / name, map_location="cpu", weights_only=False)


def assert_close(mine, ref, atol, rtol=0.0, what=""):
    """allclose with a message that says how far off we are (the number the notes report)."""
    mine, ref = mine.detach().double().cpu(), ref.detach().double().cpu()
    assert mine.shape == ref.shape, f"{what}: shape {tuple(mine.shape)} != {tuple(ref.shape)}"
    err = (mine - ref).abs().max().item()
    assert torch.allclose(mine, ref, atol=atol, rtol=rtol), f"{what}: max abs err {err:.3g} (atol {atol}, rtol {rtol})"
    return err


def blob_batch(n=4, seed=0, size=32):
    """Smooth coloured discs on their negative: images an autoencoder can fit in a few CPU steps."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    c = torch.rand(n, 3, 1, 1, generator=g) * 2 - 1
    r = torch.rand(n, 1, 1, 1, generator=g) * 0.5 + 0.3
    x = torch.where((xx ** 2 + yy ** 2) < r ** 2, c, -c).clamp(-1, 1)
    return {"x": x, "y": torch.zeros(n, dtype=torch.long)}


def ddp_and_single(tmp_path, args, port):
    """train.py under `torchrun --nproc_per_node 2` (gloo, CPU) and in one process with --grad-accum 2 on the
    same global batch. Returns the final state dicts (rank 0, rank 1, single) and the two run folders."""
    import subprocess
    script = tmp_path / "ddp_run.py"
    script.write_text(
        "import os, sys, torch\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import train\n"
        "model = train.main(sys.argv[1:])\n"
        "torch.save(model.state_dict(), os.path.join(sys.argv[sys.argv.index('--out') + 1], "
        "f\"rank{os.environ.get('RANK', 'single')}.pt\"))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp, one = tmp_path / "ddp", tmp_path / "one"
    for cmd in ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                 str(script), *args, "--out", str(ddp)],
                [sys.executable, str(script), *args, "--grad-accum", "2", "--out", str(one)]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    states = [torch.load(ddp / "rank0.pt"), torch.load(ddp / "rank1.pt"), torch.load(one / "ranksingle.pt")]
    return (*states, ddp, one)


@pytest.fixture
def tmp_run(tmp_path):
    return tmp_path / "run"


def lift(module, *names):
    """Issue 16's "liftable block" check: the source of each named top-level def/class of `module` (read with
    inspect.getsource), executed alone, in order, in a namespace that holds only torch, nn, F and math, as a
    reader who copies those blocks into a fresh file would. Returns that namespace, so a test can build the
    lifted block and compare it with the file's own result."""
    import inspect
    import math
    import textwrap
    namespace = {"torch": torch, "nn": torch.nn, "F": torch.nn.functional, "math": math,
                 "__name__": f"lifted_{module.__name__}"}
    for name in names:
        source = textwrap.dedent(inspect.getsource(getattr(module, name)))
        exec(compile(source, f"<lifted {module.__name__}.{name}>", "exec"), namespace)
    return namespace


def lightning_ckpt(tmp_path, state_dict):
    """A .ckpt laid out as LDM's released model.ckpt: saved by a process that has pytorch_lightning (a fake one
    here), its ModelCheckpoint class and an instance under "callbacks", the weights under "state_dict"."""
    import subprocess
    pkg = tmp_path / "fake_pl" / "pytorch_lightning" / "callbacks"
    pkg.mkdir(parents=True)
    for init in (pkg.parent / "__init__.py", pkg / "__init__.py"):
        init.write_text("")
    (pkg / "model_checkpoint.py").write_text("class ModelCheckpoint:\n    def __init__(self):\n        self.k = 3\n")
    torch.save(state_dict, tmp_path / "weights.pt")
    save = ("import sys, torch\nfrom pytorch_lightning.callbacks.model_checkpoint import ModelCheckpoint as M\n"
            "torch.save({'epoch': 3, 'global_step': 7, 'pytorch-lightning_version': '1.4.2', 'state_dict': "
            "torch.load(sys.argv[1], weights_only=True), 'callbacks': {M: {'best_model_score': torch.tensor(0.5)}, "
            "'instance': M()}}, sys.argv[2])")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "fake_pl"), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", save, str(tmp_path / "weights.pt"), str(tmp_path / "model.ckpt")],
                   env=env, check=True)
    return tmp_path / "model.ckpt"


def fails_with(fn, *words):
    """fn() stops with one line "error: ..." (no stack trace, no usage text) that names each of `words`."""
    with pytest.raises(SystemExit) as e:
        fn()
    msg = str(e.value.code)
    assert msg.startswith("error:") and "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg
