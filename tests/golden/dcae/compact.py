"""Re-save ../shared/reference/dcae/golden/*.pt without their state dicts (how tests/golden/dcae/ was made).

The reference generator drew every learned tensor from one seeded stream, in state-dict order
(`torch.manual_seed(seed)`; conv weight randn/sqrt(fan_in), conv bias 0.1*randn, norm weight 1+0.2*randn,
norm bias 0.2*randn, BN running_mean 0.2*randn, running_var rand+0.5; num_batches_tracked 0). This script
checks that this recipe reproduces each stored state dict bit for bit, then keeps only the recipe
(key, shape, kind), a per-tensor float64 checksum, the inputs and the outputs: 4.5 MB -> ~1 MB.
tests/test_dcae.py rebuilds the weights with the same recipe and checks the checksums first.

    python tests/golden/dcae/compact.py /work/shared/reference/dcae/golden tests/golden/dcae
"""
import math
import re
import sys
from pathlib import Path

import torch


def kind_of(key: str, t: torch.Tensor) -> str:
    """Which distribution the reference drew `key` from (see module docstring)."""
    name = key.rsplit(".", 1)[1]
    if t.dtype != torch.float32:
        return "count"  # BatchNorm num_batches_tracked (int64 zero)
    if t.ndim >= 2:
        return "conv_weight"
    if name in ("running_mean", "running_var"):
        return name
    # 1-D weight/bias of a norm: '.norm.' inside ConvLayers, the bare trms2d of blocks.pt, and the decoder
    # project_out norm (op_list.0 of decoder.project_out / of the shortcuts.pt dec_project_out block).
    is_norm = (".norm." in key or key.startswith("trms2d_c6.")
               or re.match(r"(decoder\.project_out|dec_project_out_\w+)\.op_list\.0\.", key) is not None)
    return ("norm_" + name) if is_norm else "conv_bias"


def draw(kind: str, shape) -> torch.Tensor:
    """One draw of the reference's re-randomisation, from the global torch RNG."""
    if kind == "count":
        return torch.zeros(shape, dtype=torch.int64)
    if kind == "conv_weight":
        return torch.randn(shape) / math.sqrt(math.prod(shape[1:]))
    if kind == "running_mean":
        return torch.randn(shape) * 0.2
    if kind == "running_var":
        return torch.rand(shape) + 0.5
    if kind == "norm_weight":
        return 1 + 0.2 * torch.randn(shape)
    if kind == "norm_bias":
        return 0.2 * torch.randn(shape)
    return 0.1 * torch.randn(shape)  # conv_bias


def main(src: Path, dst: Path):
    for f in ["tiny_in", "tiny_sana", "shortcuts", "blocks"]:
        d = torch.load(src / f"{f}.pt", map_location="cpu", weights_only=False)
        torch.manual_seed(d["seed"])
        recipe, sums = [], []
        for k, v in d["state_dict"].items():
            kind = kind_of(k, v)
            g = draw(kind, tuple(v.shape))
            assert torch.equal(g, v), f"{f}: recipe does not reproduce {k}"
            recipe.append((k, tuple(v.shape), kind))
            sums.append(v.double().sum().item())
        out = {k: d[k] for k in d if k != "state_dict"}
        out["weights"] = recipe
        out["weights_sum"] = torch.tensor(sums, dtype=torch.float64)
        torch.save(out, dst / f"{f}.pt")
        print(f, (dst / f"{f}.pt").stat().st_size)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
