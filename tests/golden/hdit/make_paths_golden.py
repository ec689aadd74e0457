"""How tests/golden/hdit/paths.pt.gz was made (run once; not a test): the official k-diffusion functions on the
paths a user runs end to end, which the forward/step goldens do not cover (issue 14):

  * get_sigmas_karras for every preset's (sigma_min, sigma_max) at step counts that divide nothing;
  * every sampler HDiT.sample offers, called the way HDiT.sample calls it (initial noise and SDE noise drawn from
    one seeded CPU generator, in that order), with a fixed nonlinear stand-in denoiser (test_hdit.py defines the
    same function), at 1, 2, 7, 13 and 50 steps;
  * utils.stratified_uniform for shards (k, K) and config.make_sample_density with overrides, under
    utils.enable_stratified(k, K).

Run with the official source at crowsonkb/k-diffusion@4601bf0 on PYTHONPATH, in a venv holding its sampling
dependencies (torchsde, torchdiffeq, scipy, tqdm, safetensors, jsonmerge):
    PYTHONPATH=/path/to/k-diffusion python tests/golden/hdit/make_paths_golden.py
Only k_diffusion.utils, .sampling and .config are imported; the modules config.py imports but make_sample_density
does not use are stubbed.
"""
import gzip
import importlib
import io
import math
import sys
import types
from pathlib import Path

import torch

for name in ("augmentation", "layers", "models"):  # imported by config.py, unused by make_sample_density
    sys.modules[f"k_diffusion.{name}"] = types.ModuleType(f"k_diffusion.{name}")
package = types.ModuleType("k_diffusion")
package.__path__ = [str(Path(importlib.util.find_spec("k_diffusion").origin).parent)]
sys.modules["k_diffusion"] = package
utils = importlib.import_module("k_diffusion.utils")
sampling = importlib.import_module("k_diffusion.sampling")
config = importlib.import_module("k_diffusion.config")


def toy_denoiser(x, sigma):
    """A fixed nonlinear D(x, sigma) in EDM form (sigma_data 0.5), so multistep corrections matter."""
    s = sigma[:, None, None, None]
    c_skip, c_out, c_in = 0.25 / (s ** 2 + 0.25), s * 0.5 / (s ** 2 + 0.25) ** 0.5, 1 / (s ** 2 + 0.25) ** 0.5
    return c_skip * x + c_out * torch.tanh(1.5 * c_in * x + 0.3 * torch.cos(3 * c_in * x))


out = {"sigmas": {}, "samples": {}, "x_T": {}, "stratified": {}, "density": {}}
for smin, smax in [(1e-2, 160.0), (1e-3, 1e3), (1e-2, 80.0)]:
    for n in (1, 2, 3, 7, 13, 50, 100):
        out["sigmas"][(smin, smax, n)] = sampling.get_sigmas_karras(n, smin, smax, rho=7.0)

SHAPE, SEED, SMIN, SMAX = (2, 1, 8, 8), 0, 1e-2, 80.0
CALLS = {  # sampler name in HDiT.SAMPLERS -> how HDiT.sample calls the official function (eta, solver)
    "euler": lambda x, s, ns: sampling.sample_euler(toy_denoiser, x, s, disable=True),
    "dpmpp_2m": lambda x, s, ns: sampling.sample_dpmpp_2m(toy_denoiser, x, s, disable=True),
    "dpmpp_2m_sde": lambda x, s, ns: sampling.sample_dpmpp_2m_sde(toy_denoiser, x, s, eta=0.0, solver_type="heun",
                                                                   noise_sampler=ns, disable=True),
    "dpmpp_2m_sde_eta0.5": lambda x, s, ns: sampling.sample_dpmpp_2m_sde(toy_denoiser, x, s, eta=0.5,
                                                                          solver_type="heun", noise_sampler=ns,
                                                                          disable=True),
    "dpmpp_3m_sde": lambda x, s, ns: sampling.sample_dpmpp_3m_sde(toy_denoiser, x, s, eta=1.0, noise_sampler=ns,
                                                                   disable=True),
}
for name, call in CALLS.items():
    for n in (1, 2, 7, 13, 50):
        if "sde" in name and n == 1:
            continue  # both official SDE loops raise UnboundLocalError (h unset) on a single step
        sigmas = sampling.get_sigmas_karras(n, SMIN, SMAX, rho=7.0)
        g = torch.Generator().manual_seed(SEED)
        x = torch.randn(SHAPE, generator=g) * sigmas[0]
        out["x_T"][n] = x.clone()
        out["samples"][(name, n)] = call(x, sigmas, lambda s, s_next: torch.randn(SHAPE, generator=g))

for k, K in [(0, 1), (0, 2), (1, 2), (0, 4), (3, 4), (5, 8)]:
    torch.manual_seed(123)
    out["stratified"][(k, K)] = utils.stratified_uniform([4], k, K)

BASE = {"sigma_data": 0.5, "sigma_min": 1e-2, "sigma_max": 160.0, "input_size": [256, 256]}
DENSITIES = {
    "cosine_interpolated": {"type": "cosine-interpolated"},
    "cosine_interpolated_overrides": {"type": "cosine-interpolated", "min_value": 1e-2, "max_value": 80.0,
                                      "image_d": 64, "noise_d_low": 16, "noise_d_high": 128},
    "lognormal_mean_std": {"type": "lognormal", "mean": -1.2, "std": 1.2},
    "lognormal_loc_scale": {"type": "lognormal", "loc": -0.5, "scale": 1.0},
}
for name, density in DENSITIES.items():
    fn = config.make_sample_density({**BASE, "sigma_sample_density": density})
    for k, K in [(0, 1), (1, 2), (3, 4)]:
        torch.manual_seed(7)
        with utils.enable_stratified(k, K):
            out["density"][(name, k, K)] = fn([6], device="cpu")
out["config"] = {"base": BASE, "densities": DENSITIES, "shape": SHAPE, "seed": SEED, "sigma_min": SMIN,
                 "sigma_max": SMAX, "k_diffusion": "4601bf085320592473f681a62808ed873d17fad5",
                 "torch": torch.__version__, "math.pi": math.pi}
buf = io.BytesIO()
torch.save(out, buf)
with gzip.open(Path(__file__).with_name("paths.pt.gz"), "wb", compresslevel=9) as f:
    f.write(buf.getvalue())
