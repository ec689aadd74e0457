"""DiT: Scalable Diffusion Models with Transformers.

William Peebles, Saining Xie. ICCV 2023. arXiv:2212.09748.

Matches the official code, facebookresearch/DiT@ed81ce2229091fd4ecc9a223645f95cf379d582b:
  * models.py                      -> PatchEmbed .. DiT, get_2d_sincos_pos_embed, CONFIGS (= DiT_models)
    (PatchEmbed / Attention / Mlp come from timm there; written out here with timm's parameter names)
  * diffusion/gaussian_diffusion.py,
    diffusion/respace.py,
    diffusion/diffusion_utils.py,
    diffusion/__init__.py           -> GaussianDiffusion and the helper functions above it
  * train.py / sample.py            -> DiT.loss, DiT.sample, HPARAMS
The diffusion is the one of "Improved Denoising Diffusion Probabilistic Models" (Nichol & Dhariwal 2021,
arXiv:2102.09672, "IDDPM" below) that DiT trains with unchanged: linear betas, eps-prediction, learned
variance interpolation and the hybrid loss L_simple + L_vlb. Also cited by number below: DDPM (Ho et al. 2020,
arXiv:2006.11239), DDIM (Song et al. 2021, arXiv:2010.02502), ADM (Dhariwal & Nichol 2021, arXiv:2105.05233).

Paper -> code map
  Sec. 3.2 "Patchify" (Fig. 4)                    PatchEmbed, get_2d_sincos_pos_embed (fixed, ViT-style)
  Sec. 3.2 "DiT block design", adaLN-Zero (Fig. 3) modulate, DiTBlock (Fig. 5: the conditioning ablation)
  Sec. 3.2 conditioning on t and c; App. A         TimestepEmbedder, LabelEmbedder (+ null class for CFG)
  Sec. 3.2 "Transformer decoder"                   FinalLayer, DiT.unpatchify
  Sec. 3.2 "Model size" (Table 1), patch 2/4/8     CONFIGS
  Sec. 3.1 diffusion formulation, learned          GaussianDiffusion (DDPM Eq. 4-15, IDDPM Sec. 3.1)
    Sigma_theta, L_simple + L_vlb
  Sec. 3.1 classifier-free guidance                DiT.forward_with_cfg, DiT.sample
  Sec. 4 training set-up (AdamW 1e-4, no wd,       HPARAMS
    batch 256, EMA 0.9999)
Suggested reading order: modulate -> DiTBlock, PatchEmbed + get_2d_sincos_pos_embed, TimestepEmbedder,
LabelEmbedder, FinalLayer, DiT.forward, then GaussianDiffusion (q_sample, p_mean_variance, training_losses,
p_sample) with space_timesteps, and DiT.sample.

Left out / differs from the official code
  * Left out: cond_fn (classifier guidance), progress bars and per-step yields, the loss types other than
    MSE + learned range (RESCALED_MSE, KL, RESCALED_KL), mean types other than EPSILON, the cosine schedule,
    rescale_learned_sigmas (all unused by DiT), calc_bpd_loop / ddim_reverse_sample, sample_ddp.py and FID,
    the VAE (latents come from an autoencoder file + train.py --ae).
  * Kept although DiT's scripts never use them (the official classes have them): learn_sigma=False (FIXED_LARGE
    variance, L_simple only) and sampler "ddim" (GaussianDiffusion.ddim_sample_loop; it respaces with str(steps)
    like the DDPM path; IDDPM's "ddimN" striding is GaussianDiffusion("ddimN")).
  * cfg_all_channels (not official): the official forward_with_cfg guides eps channels 0-2 only, which would leave
    most channels of a wider latent (--ae dcae, 32 channels) unguided.
  * The presets "tiny" and "demo" are not in the paper; "demo" samples pixels and so clips x0 (clip_denoised).
  * sample(cfg=1.0) by default (the repository's contract); the official sample.py guides with 4.0.

Rename table for official checkpoints: none (timm's names inside the blocks: attn.qkv, attn.proj, mlp.fc1,
mlp.fc2; x_embedder.proj). load_official also takes train.py checkpoints ("ema" preferred).
"""
import math
import os
import zipfile
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------------
# Building blocks (Sec. 3.2)
# ---------------------------------------------------------------------------------------------------
def modulate(x, shift, scale):
    """adaLN: scale and shift the normalised tokens with per-sample vectors regressed from c (Sec. 3.2)."""
    # x (N, T, D); shift, scale (N, D) -> broadcast over the T tokens
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """Patchify (Sec. 3.2, Fig. 4): p x p patches -> linear embedding, as timm's PatchEmbed (a strided Conv2d)."""

    def __init__(self, input_size, patch_size, in_channels, hidden_size):
        super().__init__()
        self.input_size = input_size
        # kernel = stride = p: non-overlapping p x p patches, i.e. one Linear per flattened patch (Fig. 4)
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        # timm asserts the exact input size; the fixed pos_embed only fits that grid.
        if x.ndim != 4 or x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"DiT expects input (N, C, {self.input_size}, {self.input_size}), got {tuple(x.shape)}")
        # (N, C, H, W) -> (N, D, H/p, W/p)
        x = self.proj(x)
        # (N, D, h, w) -> (N, T = h*w, D), row-major tokens
        return x.flatten(2).transpose(1, 2)


def get_1d_sincos_pos_embed(embed_dim, pos):
    """1-D sin-cos table (Vaswani et al. / MAE): [sin(pos * omega_m)] ++ [cos(pos * omega_m)], float64."""
    # omega_m = 1 / 10000^(m / (D/4)), m < D/4, with D the full width (embed_dim = D/2 here)
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0))
    out = pos.reshape(-1, 1).double() * omega[None]  # (M,) x (D/4,) -> (M, D/4)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, D/2): sin FIRST here


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """Fixed 2-D position embedding (Sec. 3.2: "standard ViT frequency-based positional embeddings").

    Returns (G*G, D) float64, row k = r*G + s for token row r, column s. Quirk of the official code
    (np.meshgrid's default 'xy' indexing): features [0, D/2) encode the COLUMN s, [D/2, D) the ROW r.
    """
    coords = torch.arange(grid_size, dtype=torch.float64)
    # each (G, G): [r, s] -> s and -> r
    grid_col, grid_row = torch.meshgrid(coords, coords, indexing="xy")
    # pos.reshape(-1) inside flattens the (G, G) grids row-major, so row k = r*G + s
    emb_first = get_1d_sincos_pos_embed(embed_dim // 2, grid_col)  # (G*G, D/2) encodes the column
    emb_second = get_1d_sincos_pos_embed(embed_dim // 2, grid_row)  # (G*G, D/2) encodes the row
    return torch.cat([emb_first, emb_second], dim=1)


class TimestepEmbedder(nn.Module):
    """t -> D: 256-dim frequency embedding then a two-layer SiLU MLP (App. A; ADM's method, Sec. 4)."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size, bias=True), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, bias=True))
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """[cos(t f), sin(t f)] (cos FIRST), f_m = exp(-ln(max_period) m / half); float32 like the official code
        (the arguments reach ~1000 rad, where float64 would move the outputs by ~1e-5)."""
        half = dim // 2
        # (half,) geometric frequencies f_m = max_period^(-m/half): from 1 down to just above 1/max_period
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]  # (N, 1) * (1, half) -> (N, half)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:  # odd width: one zero column
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))  # (N,) -> (N, D)


class LabelEmbedder(nn.Module):
    """Class label -> D, with label dropout for classifier-free guidance (Sec. 3.2; CFG: Sec. 3.1).

    Row `num_classes` of the table is the learned null embedding; it exists when dropout_prob > 0.
    """

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        # CFG needs one extra learned "null" row; with no dropout the table has exactly num_classes rows (official)
        use_cfg_embedding = dropout_prob > 0
        # (num_classes [+ 1 null], D)
        self.embedding_table = nn.Embedding(num_classes + int(use_cfg_embedding), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        """Replace each label by the null class with probability dropout_prob (global torch RNG)."""
        if force_drop_ids is None:
            # per-sample Bernoulli(dropout_prob) mask: 10% of labels dropped, so one network also learns p(x)
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            # caller-chosen mask (sample.py style): 1 = drop
            drop_ids = force_drop_ids == 1
        # (N,): dropped labels -> null index num_classes
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (N,) -> (N, D)


class Attention(nn.Module):
    """Multi-head self-attention, timm's `Attention(dim, heads, qkv_bias=True)` (no q/k norm, no dropout)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        # q, k, v in one matmul: (N, T, D) -> (N, T, 3D)
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        # merges the H heads: (N, T, D) -> (N, T, D)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x):
        N, T, D = x.shape  # T = number of patch tokens
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, D // self.num_heads)  # (N, T, 3D) -> (N, T, 3, H, D/H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # -> 3 x (N, H, T, D/H)
        # softmax(q k^T / sqrt(D/H)) v, (N, H, T, D/H)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(N, T, D)  # (N, H, T, D/H) -> (N, T, D)
        return self.proj(x)


class Mlp(nn.Module):
    """Pointwise feed-forward, timm's `Mlp` with GELU (tanh approximation, as the official `approx_gelu`)."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim, bias=True)

    def forward(self, x):
        # (N, T, D) -> (N, T, 4D) -> (N, T, D)
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero block (Sec. 3.2, Fig. 3 right).

    LayerNorm without affine; scale/shift (gamma, beta) AND a residual gate alpha are regressed from c.
    The regression Linear is zero-initialised (zero_adaLN), so every block starts as the identity: the
    "-Zero" of adaLN-Zero, the best of the four conditioning designs in Fig. 5.
    """

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        # no affine: gamma/beta are regressed from c by adaLN_modulation instead of learned per channel (Sec. 3.2)
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)  # same, for the MLP branch
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))  # hidden width 4D (mlp_ratio 4)
        # index 1 in the state dict because index 0 is the parameter-free SiLU
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        self.zero_adaLN()

    def zero_adaLN(self):
        """adaLN-Zero: gamma = beta = alpha = 0 for any c, so the block starts as the identity (Sec. 3.2)."""
        nn.init.constant_(self.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.adaLN_modulation[-1].bias, 0)

    def forward(self, x, c):
        # (N, D) -> 6 x (N, D), in the official order
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        # x + alpha1 * Attn(LN(x) * (1 + gamma1) + beta1): "1 +" so a zero regression output leaves plain LN
        # gate_msa.unsqueeze(1): (N, D) -> (N, 1, D), one gate per channel shared by all T tokens
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        # x + alpha2 * MLP(LN(x) * (1 + gamma2) + beta2); alpha = 0 at init, so the residual branch starts off
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """Transformer decoder (Sec. 3.2): adaLN (shift, scale; no gate) then Linear to p*p*Cout per token."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        # per token: one p x p x Cout patch
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        # 2D outputs (shift, scale) only: the decoder has no residual branch, hence no gate alpha
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        # (N, 2D) -> 2 x (N, D), shift first
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, D) -> (N, T, p*p*Cout)


# The sampler names DiT.sample takes (sample.py --help lists them): ancestral DDPM (the paper's) and DDIM.
SAMPLERS = ("ddpm", "ddim")


# ---------------------------------------------------------------------------------------------------
# The network (Sec. 3.2, Fig. 3 left)
# ---------------------------------------------------------------------------------------------------
class DiT(nn.Module):
    """Diffusion Transformer: noised latent x_t, timestep t, class y -> (eps, v) (learned sigma)."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True,
                 cfg_all_channels=False, clip_denoised=False):
        super().__init__()
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.num_classes, self.learn_sigma = num_classes, learn_sigma
        self.out_channels = in_channels * 2 if learn_sigma else in_channels  # eps (+ v)
        # cfg_all_channels False: the official 3-channel quirk (forward_with_cfg). clip_denoised: clip x0 to [-1, 1]
        # while sampling; the official DiT samples latents and does not (sample.py), pixel presets do.
        self.cfg_all_channels, self.clip_denoised = cfg_all_channels, clip_denoised
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)  # (N, C, I, I) -> (N, T, D)
        self.t_embedder = TimestepEmbedder(hidden_size)  # (N,) -> (N, D)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)  # (N,) -> (N, D)
        # T = (I/p)^2 tokens: halving p quadruples T and so at least quadruples the Gflops (Sec. 3.2, Fig. 4)
        num_patches = (input_size // patch_size) ** 2
        # Fixed sin-cos table, stored as a frozen Parameter (so it is in the official state dict):
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        # depth N blocks of width d (Table 1); the token count T stays the same through all of them
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)  # (N, T, D) -> (N, T, p*p*Cout)
        self.initialize_weights()
        # The process DiT trains with: 1000 linear-beta steps, no respacing (train.py: create_diffusion("")).
        self.diffusion = GaussianDiffusion("", learn_sigma=learn_sigma)
        self.hparams = dict(HPARAMS)

    def initialize_weights(self):
        """Official init: xavier Linears, N(0, .02) embeddings, and ZERO adaLN / final layer (adaLN-Zero)."""
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                # official _basic_init: every nn.Linear first; the specific layers below then override it
                nn.init.xavier_uniform_(module.weight)
                nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)
        grid = int(self.x_embedder.input_size // self.patch_size)  # G = I/p tokens per side
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid).float()
        self.pos_embed.data.copy_(pos_embed.unsqueeze(0))  # (T, D) -> (1, T, D)
        # the patch conv initialised like a Linear
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))  # (D, C, p, p) -> (D, C*p*p)
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)  # N(0, 0.02^2), official init
        # timestep MLP: both Linear weights N(0, 0.02^2) (mlp[1] is the SiLU); biases stay 0 from _basic_init
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero again: _basic_init re-drew the blocks' regressions (kept, so the RNG stream is the official one)
        for block in self.blocks:
            block.zero_adaLN()
        # final adaLN and Linear zero too: the untrained model outputs exactly 0
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.constant_(layer.weight, 0)
            nn.init.constant_(layer.bias, 0)

    def unpatchify(self, x):
        """(N, T, p*p*Cout) -> (N, Cout, H, W); feature index f = (i*p + j)*Cout + ch inside each patch."""
        c, p = self.out_channels, self.patch_size
        # h = w = sqrt(T) = I/p (square grids only)
        h = w = int(x.shape[1] ** 0.5)
        # (N, T, p*p*C) -> (N, h, w, p, p, C)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)  # -> (N, C, h, p, w, p)
        return x.reshape(x.shape[0], c, h * p, w * p)  # -> (N, C, H, W)

    def forward(self, x, t, y):
        """x (N, C, H, W) latents, t (N,) timestep indices of the 1000-step process, y (N,) labels."""
        x = self.x_embedder(x) + self.pos_embed
        # (N, D): conditioning = t_emb + y_emb
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)
        # (N, Cout, H, W): [0:C] eps, [C:2C] variance value v
        return self.unpatchify(x)

    def forward_with_cfg(self, x, t, y, cfg_scale):
        """Classifier-free guidance (Sec. 3.1): eps = eps(x|null) + s (eps(x|c) - eps(x|null)).

        Batch layout as the official sample.py: x = cat([z, z]), y = cat([labels, null]). Faithful quirks:
        only the FIRST half of x is used (duplicated), and only output channels 0..2 are guided (the
        official code hard-codes 3 "for exact reproducibility"; App. A: the paper guided 3 of the 4 latent
        channels); the rest (eps channel 3 and v) passes through unguided. self.cfg_all_channels guides all
        `in_channels` eps channels (the obvious variant).
        """
        # (N, C, H, W) -> (N/2, C, H, W): the z of cat([z, z])
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)  # (N/2, C, H, W) -> (N, C, H, W)
        model_out = self.forward(combined, t, y)
        # as official models.py: eps, rest = model_out[:, :3], model_out[:, 3:]
        n_guided = self.in_channels if self.cfg_all_channels else 3
        # (N, n_guided, H, W), (N, Cout - n_guided, H, W)
        eps, rest = model_out[:, :n_guided], model_out[:, n_guided:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)  # 2 x (N/2, n_guided, H, W)
        # Sec. 3.1: eps(x, null) + s (eps(x, c) - eps(x, null)); s = 1 would give the plain conditional eps
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)

    # ----- contract -------------------------------------------------------------------------------
    def optimizer_groups(self, phase=None):
        """One AdamW over every trainable parameter (pos_embed is frozen and left out)."""
        return {"model": [p for p in self.parameters() if p.requires_grad]}

    def loss(self, group, batch, step):
        """Hybrid loss L_simple + L_vlb (IDDPM Sec. 3.1; the weighting is explained in training_losses).

        As the official train.py: t ~ U{0..999}, then eps ~ N(0, I), then label dropout in train mode,
        all from the global torch RNG in that order. Returns the batch mean (float32) and detached logs.
        """
        if group != "model":
            raise ValueError(f"dit has one optimizer group 'model', got {group!r}")
        x_start = batch["x"].float()
        # one uniform t per sample: an unbiased one-term estimate of the sum over t in L_vlb (DDPM Eq. 5)
        t = torch.randint(0, self.diffusion.num_timesteps, (x_start.shape[0],), device=x_start.device)
        terms = self.diffusion.training_losses(self, x_start, t, model_kwargs=dict(y=batch["y"]))
        logs = {"mse": terms["mse"].mean().detach(), "vb": terms["vb"].mean().detach()}
        # (N,) -> scalar: mean over the batch
        return terms["loss"].mean(), logs

    @torch.no_grad()
    def sample(self, n, labels=None, steps=None, cfg=1.0, sampler=None, generator=None, eta=0.0,
               clip_denoised=None):
        """n latents (n, C, H, W) by ancestral DDPM with the learned variance ("ddpm", 250 respaced steps,
        the official sample.py) or DDIM ("ddim", eta = 0 by default). cfg > 1: the official doubled batch
        with the null label and forward_with_cfg; only the conditional half is returned.
        Initial noise, random labels and per-step noise come from `generator` (None = global RNG).
        clip_denoised: clip the predicted x0 to [-1, 1] (None = the preset's setting, off for the paper's)."""
        sampler = sampler or "ddpm"
        clip_denoised = self.clip_denoised if clip_denoised is None else clip_denoised
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}: dit offers 'ddpm' and 'ddim'")
        # 250 respaced DDPM steps: the paper's setting for all reported FIDs (Sec. 4; official sample.py default)
        steps = 250 if steps is None else int(steps)
        device = self.pos_embed.device
        diffusion = GaussianDiffusion(str(steps), learn_sigma=self.learn_sigma)  # respaced chain, e.g. "250"
        # z = x_T ~ N(0, I), drawn before the random classes (sample_ddp.py's order)
        z = torch.randn(n, self.in_channels, self.input_size, self.input_size, generator=generator, device=device)
        if labels is None:
            labels = torch.randint(0, self.num_classes, (n,), generator=generator, device=device)
        labels = torch.as_tensor(labels, device=device).long().reshape(-1)
        if labels.shape[0] != n or int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
            raise ValueError(f"labels must be {n} class indices in [0, {self.num_classes}), got {labels.tolist()}")
        # sample.py: x = cat([z, z]), y = cat([labels, null])
        if cfg > 1.0:
            if self.y_embedder.embedding_table.num_embeddings == self.num_classes:
                raise ValueError("dit: cfg > 1 needs the null class, but this model was built with "
                                 "class_dropout_prob 0 (no null embedding); sample with cfg=1")
            x = torch.cat([z, z], dim=0)  # (n, C, H, W) -> (2n, C, H, W)
            y = torch.cat([labels, torch.full_like(labels, self.num_classes)], dim=0)
            model_fn = partial(self.forward_with_cfg, cfg_scale=cfg)
        else:
            x, y, model_fn = z, labels, self.forward
        was_training = self.training
        self.eval()  # no label dropout while sampling
        try:
            step_fn = diffusion.p_sample if sampler == "ddpm" else partial(diffusion.ddim_sample, eta=eta)
            # p_sample_loop / ddim_sample_loop: i = T'-1 .. 0 of the respaced chain
            for i in reversed(range(diffusion.num_timesteps)):
                t = torch.full((x.shape[0],), i, device=device, dtype=torch.long)  # (n,), or (2n,) under CFG
                x = step_fn(model_fn, x, t, clip_denoised=clip_denoised, model_kwargs=dict(y=y),
                            generator=generator)["sample"]
        finally:
            self.train(was_training)
        return x[:n]  # the conditional half under CFG


# ---------------------------------------------------------------------------------------------------
# The Gaussian diffusion DiT trains and samples with (IDDPM, arXiv:2102.09672)
# ---------------------------------------------------------------------------------------------------
def linear_beta_schedule(num_timesteps=1000):
    """DDPM's linear betas, scaled so any T gives the same curve as T = 1000 (IDDPM code). float64."""
    scale = 1000 / num_timesteps  # 1 for T = 1000
    # beta_1 = 1e-4 .. beta_T = 0.02 (DDPM Sec. 4; DiT Sec. 4); DiT does not use IDDPM's cosine schedule
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps, section_counts):
    """Which original steps a respaced process keeps (IDDPM Sec. 4, respace.py), e.g. "250" or "10,15,20".

    Each section is walked with a FLOAT stride and Python's round (half-to-even), exactly as the official
    code: "250" over 1000 steps gives 0, 4, 8, ..., 999 with three gaps of 5. "ddimN" picks a uniform
    integer stride that yields exactly N steps.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim"):])
            for i in range(1, num_timesteps):
                if len(range(0, num_timesteps, i)) == desired_count:
                    return set(range(0, num_timesteps, i))
            raise ValueError(f"cannot create exactly {desired_count} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]  # "10,15,20" -> [10, 15, 20]
    size_per = num_timesteps // len(section_counts)  # original steps per section
    # the first `extra` sections get one step more
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        # float stride so the first AND last step of each section are kept
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))  # Python round: half to even
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)  # original step indices to keep


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    # closed form for diagonal Gaussians: (log s2 - log s1 + (s1 + (m1 - m2)^2) / s2 - 1) / 2, s = variance
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + ((mean1 - mean2) ** 2) * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """Phi(x) via the tanh approximation (the official code does not use erf)."""
    # sqrt(2/pi) and 0.044715: the same constants as the tanh approximation of GELU
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x_0 | x_1) of DDPM's discrete decoder (DDPM Sec. 3.3, Eq. 13): a Gaussian integrated
    over the bin [x - 1/255, x + 1/255] (data assumed in [-1, 1]; DiT applies it to latents as-is),
    with the edge bins extended to -inf / +inf. Arguments of the logs are clamped at 1e-12."""
    # 1/255 is half a bin: 8-bit values 0..255 mapped to [-1, 1] have bin width 2/255
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)  # 1 / sigma
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    # log Phi(+) for the lowest bin, log(1 - Phi(-)) for the highest, log(Phi(+) - Phi(-)) elsewhere
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def mean_flat(x):
    """Mean over all but the batch dimension: (N, C, H, W) -> (N,)."""
    return x.mean(dim=list(range(1, x.ndim)))


class GaussianDiffusion:
    """The (possibly respaced) discrete Gaussian diffusion of DiT's create_diffusion(timestep_respacing).

    Official: SpacedDiffusion(GaussianDiffusion) with EPSILON mean, LEARNED_RANGE variance (FIXED_LARGE
    if learn_sigma=False) and LossType.MSE. "" or None keeps all 1000 steps (training); "250" keeps 250
    (sampling). The respaced process has betas'_i = 1 - abar[map[i]] / abar[map[i-1]] (abar[map[-1]] := 1)
    and the model always sees the ORIGINAL step index timestep_map[t].
    Arrays are computed in float64 (numpy) as the official code; like its _extract_into_tensor, each
    coefficient is rounded to float32 before use. Per-device float32 copies are cached (no host sync).
    """

    def __init__(self, timestep_respacing="", learn_sigma=True, diffusion_steps=1000):
        base_alphas_cumprod = np.cumprod(1.0 - linear_beta_schedule(diffusion_steps))  # (1000,) abar_t
        if not timestep_respacing:
            timestep_respacing = [diffusion_steps]
        use_timesteps = space_timesteps(diffusion_steps, timestep_respacing)  # set of kept original indices
        self.timestep_map, betas, last_alpha_cumprod = [], [], 1.0
        for i, alpha_cumprod in enumerate(base_alphas_cumprod):
            if i in use_timesteps:
                # beta'_i = 1 - abar[map[i]] / abar[map[i-1]]: the respaced chain keeps abar exactly at the kept steps
                betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)  # respaced index -> original step
        # the official posterior_log_variance_clipped is empty then (IndexError)
        if len(betas) < 2:
            raise ValueError(f"respacing {timestep_respacing!r} keeps {len(betas)} step; DiT needs at least 2")
        self.learn_sigma = learn_sigma
        self.num_timesteps = len(betas)
        b = self.betas = np.array(betas, dtype=np.float64)
        alphas = 1.0 - b  # alpha_t = 1 - beta_t
        ac = self.alphas_cumprod = np.cumprod(alphas)  # abar_t
        ac_prev = self.alphas_cumprod_prev = np.append(1.0, ac[:-1])  # abar_{t-1}, abar_{-1} = 1
        # coefficients of DDPM Eq. 4 (q_sample) and of x_0 from eps (DDPM Eq. 15, p_mean_variance); each (T',)
        self.sqrt_alphas_cumprod = np.sqrt(ac)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ac)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1)
        # Posterior q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I) (DDPM Eq. 6-7)
        self.posterior_variance = b * (1.0 - ac_prev) / (1.0 - ac)  # beta~_t; 0 at t = 0
        # log(beta~_t) with t = 0 replaced by t = 1 (beta~_0 = 0 would give -inf)
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        # mu~_t = coef1 x_0 + coef2 x_t (DDPM Eq. 7)
        self.posterior_mean_coef1 = b * np.sqrt(ac_prev) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)
        # log beta_t: the upper end of the learned-variance interpolation (DDPM Sec. 3.2: beta_t, beta~_t bound it)
        self.log_betas = np.log(b)
        # FIXED_LARGE (learn_sigma=False): sigma_t^2 = beta_t, with beta~_1 at t = 0 (official p_mean_variance)
        self.fixed_large_log_variance = np.log(np.append(self.posterior_variance[1], b[1:]))
        self._cache = {}

    def _extract(self, name, t, ndim):
        """arr[t] as float32 on t's device, shaped (N, 1, 1, 1) (official _extract_into_tensor)."""
        # one cached tensor per table and device
        key = (name, t.device)
        if key not in self._cache:
            arr = self.timestep_map if name == "timestep_map" else getattr(self, name)
            dtype = torch.long if name == "timestep_map" else torch.float32
            self._cache[key] = torch.as_tensor(np.asarray(arr), dtype=dtype).to(t.device)
        # gather: (T',)[t] with t (N,) -> (N,)
        out = self._cache[key][t]
        return out.reshape(out.shape + (1,) * (ndim - 1))  # (N,) -> (N, 1, 1, 1)

    # ----- forward process ------------------------------------------------------------------------
    def q_sample(self, x_start, t, noise):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM Eq. 4, reparameterised)."""
        return (self._extract("sqrt_alphas_cumprod", t, x_start.ndim) * x_start
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.ndim) * noise)

    def q_posterior_mean(self, x_start, x_t, t):
        """mu~_t(x_t, x_0) = coef1 x_0 + coef2 x_t (DDPM Eq. 7)."""
        return (self._extract("posterior_mean_coef1", t, x_t.ndim) * x_start
                + self._extract("posterior_mean_coef2", t, x_t.ndim) * x_t)

    # ----- reverse process p(x_{t-1} | x_t) -------------------------------------------------------
    def p_mean_variance(self, model_fn, x, t, clip_denoised=True, model_kwargs=None, model_output=None):
        """Mean and log-variance of p_theta(x_{t-1} | x_t) from the network output.

        eps parameterisation (DDPM Eq. 11: mu~_t at x_0 = (x_t - sqrt(1-abar) eps) / sqrt(abar)) and the learned
        variance interpolation (IDDPM Sec. 3.1; ADM Eq. 1): Sigma = exp(v' log beta_t + (1 - v') log beta~_t),
        v' = (v + 1) / 2 so the raw output v in [-1, 1] spans [beta~_t, beta_t] (no clamp: it may extrapolate).
        `t` indexes THIS (possibly respaced) process; the network is called with timestep_map[t].
        """
        if model_output is None:
            model_output = model_fn(x, self._extract("timestep_map", t, 1), **(model_kwargs or {}))  # ndim 1: (N,)
        # diffusion math in float32 (bf16 autocast safe)
        model_output = model_output.float()
        # input channels of x_t (latent or pixel)
        C = x.shape[1]
        if self.learn_sigma:
            # (N, 2C, H, W) -> 2 x (N, C, H, W): eps FIRST
            eps, v = torch.split(model_output, C, dim=1)
            # interpolation range: min_log = log beta~_t (t = 0 uses beta~_1), max_log = log beta_t
            min_log = self._extract("posterior_log_variance_clipped", t, x.ndim)
            max_log = self._extract("log_betas", t, x.ndim)
            frac = (v + 1) / 2  # v in [-1, 1] -> v' in [0, 1]
            model_log_variance = frac * max_log + (1 - frac) * min_log  # v' log beta_t + (1 - v') log beta~_t
        else:
            eps = model_output
            # (N, 1, 1, 1) -> (N, C, H, W), the same shape as in the learned case
            model_log_variance = self._extract("fixed_large_log_variance", t, x.ndim).expand_as(x)
        # x_0-hat = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps, i.e. DDPM Eq. 4 solved for x_0 (DDPM Eq. 15)
        pred_xstart = (self._extract("sqrt_recip_alphas_cumprod", t, x.ndim) * x
                       - self._extract("sqrt_recipm1_alphas_cumprod", t, x.ndim) * eps)
        if clip_denoised:
            # only with clip_denoised (pixel presets)
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean = self.q_posterior_mean(pred_xstart, x, t)  # plug x_0-hat into DDPM Eq. 7 (= Eq. 11)
        return {"mean": mean, "log_variance": model_log_variance, "pred_xstart": pred_xstart, "eps": eps}

    def _noise_like(self, x, noise, generator):
        return noise if noise is not None else torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    def p_sample(self, model_fn, x, t, clip_denoised=True, model_kwargs=None, noise=None, generator=None):
        """One ancestral step x_{t-1} = mu + sigma z (no noise at t = 0; z is drawn regardless, as official)."""
        out = self.p_mean_variance(model_fn, x, t, clip_denoised, model_kwargs)
        noise = self._noise_like(x, noise, generator)
        # the final step (t = 0) returns the mean mu_theta(x_1) without noise
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))  # (N,) -> (N, 1, 1, 1)
        # sigma = exp(log variance / 2); the mask zeroes the noise term at t = 0
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"], "mean": out["mean"],
                "log_variance": out["log_variance"]}

    def ddim_sample(self, model_fn, x, t, clip_denoised=True, model_kwargs=None, eta=0.0, noise=None,
                    generator=None):
        """One DDIM step (DDIM Eq. 12). The learned variance is unused. Official detail: eps is
        RE-DERIVED from the (possibly clipped) x_0-hat, so clipping changes the direction too."""
        out = self.p_mean_variance(model_fn, x, t, clip_denoised, model_kwargs)
        # eps = (x_t / sqrt(abar_t) - x_0-hat) / sqrt(1/abar_t - 1): DDPM Eq. 4 solved for eps
        eps = ((self._extract("sqrt_recip_alphas_cumprod", t, x.ndim) * x - out["pred_xstart"])
               / self._extract("sqrt_recipm1_alphas_cumprod", t, x.ndim))
        alpha_bar = self._extract("alphas_cumprod", t, x.ndim)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x.ndim)
        # sigma_t(eta) of DDIM Eq. 16: eta = 0 deterministic DDIM, eta = 1 the DDPM posterior variance
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        # drawn even for eta = 0, as official
        noise = self._noise_like(x, noise, generator)
        # DDIM Eq. 12: sqrt(abar_{t-1}) x_0-hat + sqrt(1 - abar_{t-1} - sigma^2) eps, plus sigma z below
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))  # (N,) -> (N, 1, 1, 1)
        return {"sample": mean_pred + nonzero_mask * sigma * noise, "pred_xstart": out["pred_xstart"]}

    # ----- training loss --------------------------------------------------------------------------
    def vb_terms_bpd(self, model_output, x_start, x_t, t):
        """L_t in bits per dimension (DDPM Eq. 5): KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0,
        the discretised decoder NLL -log p(x_0|x_1) for t = 0 (clip_denoised=False)."""
        true_mean = self.q_posterior_mean(x_start, x_t, t)
        true_log_variance = self._extract("posterior_log_variance_clipped", t, x_t.ndim)  # log beta~_t, (N, 1, 1, 1)
        out = self.p_mean_variance(None, x_t, t, clip_denoised=False, model_output=model_output)
        # KL and NLL come in nats; / ln 2 gives bits, and mean_flat makes them per dimension (bpd)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        # log_scales = log sigma = log variance / 2
        decoder_nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(self, model_fn, x_start, t, model_kwargs=None, noise=None):
        """Hybrid loss L_hybrid = L_simple + lambda L_vlb (IDDPM Sec. 3.1) per sample.

        IDDPM's lambda = 0.001 on the one-sample estimate T * L_t of L_vlb gives exactly L_t for T = 1000,
        so the official code (LossType.MSE) adds the single-t term unscaled: per sample mse + vb, with vb
        in BITS (L_t / ln 2; the code's unit, not the paper's nats). That is what DiT trains with.
        Stop-gradient (IDDPM Sec. 3.1): the vb term sees eps detached, so L_vlb trains only the
        variance v, and L_simple only eps.
        """
        if noise is None:
            noise = torch.randn_like(x_start)  # eps ~ N(0, I), shaped like x_0
        # reparameterised x_t ~ q(x_t | x_0); the same noise is the eps target of L_simple
        x_t = self.q_sample(x_start, t, noise)
        # the network sees the original step index timestep_map[t] (identity when not respaced); output float32
        model_output = model_fn(x_t, self._extract("timestep_map", t, 1), **(model_kwargs or {})).float()
        # input channels of x_t (latent or pixel)
        C = x_t.shape[1]
        terms = {"x_t": x_t, "model_output": model_output}
        if self.learn_sigma:
            # (N, 2C, H, W) -> 2 x (N, C, H, W)
            eps, v = torch.split(model_output, C, dim=1)
            frozen_out = torch.cat([eps.detach(), v], dim=1)  # stop-gradient on the mean
            terms["vb"] = self.vb_terms_bpd(frozen_out, x_start, x_t, t)
        else:
            eps = model_output
            # FIXED_LARGE: no variance to learn, so L_vlb is dropped and only L_simple trains
            terms["vb"] = torch.zeros_like(t, dtype=torch.float32)
        # L_simple (DDPM Eq. 14): target = noise (EPSILON)
        terms["mse"] = mean_flat((noise - eps) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"]
        return terms


# ---------------------------------------------------------------------------------------------------
# Presets (Table 1 sizes x patch sizes 2/4/8 of Sec. 3.2) and training defaults (Sec. 4)
# ---------------------------------------------------------------------------------------------------
# shared by every paper model: 256 px -> 32x32x4 latents, ImageNet's 1000 classes, 10% label dropout
_COMMON = dict(input_size=32, in_channels=4, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000,
               learn_sigma=True)
# Table 1: depth N, hidden size d and heads of the S / B / L / XL models
_SIZES = {"S": dict(depth=12, hidden_size=384, num_heads=6), "B": dict(depth=12, hidden_size=768, num_heads=12),
          "L": dict(depth=24, hidden_size=1024, num_heads=16), "XL": dict(depth=28, hidden_size=1152, num_heads=16)}
# params (model.parameters(), incl. the frozen pos_embed, as train.py logs) at input_size 32 (256 px);
# Gflops: one forward at 256 px, multiply-adds counted once (as the paper's Gflops), measured by
# tests/test_dit.py::test_config_sizes on the meta device.
CONFIGS = {
    "DiT-S/2": dict(_COMMON, **_SIZES["S"], patch_size=2),     # 32,963,360 params, 6.06 Gflops
    "DiT-S/4": dict(_COMMON, **_SIZES["S"], patch_size=4),     # 32,945,024 params, 1.41 Gflops
    "DiT-S/8": dict(_COMMON, **_SIZES["S"], patch_size=8),     # 33,148,160 params, 0.36 Gflops
    "DiT-B/2": dict(_COMMON, **_SIZES["B"], patch_size=2),     # 130,512,416 params, 23.01 Gflops
    "DiT-B/4": dict(_COMMON, **_SIZES["B"], patch_size=4),     # 130,475,648 params, 5.57 Gflops
    "DiT-B/8": dict(_COMMON, **_SIZES["B"], patch_size=8),     # 130,881,536 params, 1.42 Gflops
    "DiT-L/2": dict(_COMMON, **_SIZES["L"], patch_size=2),     # 458,102,816 params, 80.70 Gflops
    "DiT-L/4": dict(_COMMON, **_SIZES["L"], patch_size=4),     # 458,053,760 params, 19.70 Gflops
    "DiT-L/8": dict(_COMMON, **_SIZES["L"], patch_size=8),     # 458,594,816 params, 5.01 Gflops
    "DiT-XL/2": dict(_COMMON, **_SIZES["XL"], patch_size=2),   # 675,129,632 params, 118.62 Gflops
    "DiT-XL/4": dict(_COMMON, **_SIZES["XL"], patch_size=4),   # 675,074,432 params, 29.04 Gflops
    "DiT-XL/8": dict(_COMMON, **_SIZES["XL"], patch_size=8),   # 675,683,072 params, 7.39 Gflops
    # not in the paper: a CPU-sized model for tests and demos (8x8x4 latents by default; the golden
    # files' config): 183,200 params, 0.0017 Gflops
    "tiny": dict(_COMMON, input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10),
    # not in the paper: the README's CPU demo, 32x32 RGB pixels of the built-in `shapes` data (64 tokens)
    # pixels, so sampling clips x0 to [-1, 1] (as improved-diffusion's pixel-space sampler does)
    "demo": dict(_COMMON, input_size=32, in_channels=3, patch_size=4, hidden_size=128, depth=6, num_heads=4,
                 num_classes=4, clip_denoised=True),
}

# Official train.py: AdamW(lr=1e-4, weight_decay=0), global batch 256, EMA 0.9999, no warm-up and no gradient
# clipping (grad_clip 0.0 = off in train.py).
HPARAMS = dict(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, ema_decay=0.9999, warmup_steps=0, grad_clip=0.0,
               batch_size=256)

# Where a preset trains differently from the paper: a CPU demo of minutes needs a larger lr with warm-up, a short
# EMA and a small batch (the paper's EMA 0.9999 would still be the initial weights after 2,000 steps).
PRESET_HPARAMS = {"demo": dict(lr=1.5e-3, warmup_steps=200, ema_decay=0.995, grad_clip=1.0, batch_size=32)}

_KWARGS = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
           "class_dropout_prob", "num_classes", "learn_sigma", "cfg_all_channels", "clip_denoised")


def _resolve_config(config, overrides):
    """CONFIGS name or kwargs dict + overrides -> validated DiT constructor kwargs."""
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"unknown dit preset {config!r}; choose one of {', '.join(CONFIGS)}")
        kwargs = dict(CONFIGS[config])
    elif isinstance(config, dict):
        kwargs = dict(config)
    else:
        raise ValueError(f"dit config must be a CONFIGS name or a dict, got {type(config).__name__}")
    overrides = dict(overrides)
    # generic name (train.py) -> DiT's name
    if "image_size" in overrides:
        overrides["input_size"] = overrides.pop("image_size")
    kwargs.update(overrides)
    unknown = sorted(set(kwargs) - set(_KWARGS))
    if unknown:
        raise ValueError(f"unknown dit argument(s) {unknown}; known: {', '.join(_KWARGS)}")
    size, p = kwargs.get("input_size", 32), kwargs.get("patch_size", 2)  # DiT's constructor defaults
    width, heads = kwargs.get("hidden_size", 1152), kwargs.get("num_heads", 16)
    if size % p:
        raise ValueError(f"dit patch size {p} does not divide image size {size}")
    if width % heads:
        raise ValueError(f"dit hidden size {width} is not divisible by {heads} heads")
    return kwargs


def create(config="tiny", **overrides):
    """A freshly initialised DiT: `config` a CONFIGS name or constructor kwargs; overrides may use the
    generic names image_size (-> input_size), in_channels, num_classes, or any constructor argument."""
    model = DiT(**_resolve_config(config, overrides))
    model.hparams.update(PRESET_HPARAMS.get(config, {}) if isinstance(config, str) else {})
    return model


# Copied from ae_kl.read_checkpoint
def read_checkpoint(path_or_state_dict):
    """A checkpoint (a dict, or a path read with torch.load(weights_only=True)) -> its flat {key: tensor}.

    Lightning `.ckpt` files (the LDM and Stable Diffusion releases) also pickle their callbacks' classes
    (pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint): those pytorch_lightning.* / lightning.* names,
    and only those, are admitted as empty stand-in classes (torch >= 2.6 lists them without unpickling), so
    neither pickle nor Lightning is needed. Any other global weights_only refuses stays refused.
    Wrappers are opened outside-in, at each level the first present of
      "ema", "model_ema"   EMA weights (train.py, DiT, k-diffusion), preferred
      "state_dict"         Lightning (LDM), efficientvit
      "model", "sd"        raw weights (train.py, DiT, k-diffusion); INFD nests model -> sd
    (a wrapper is a dict keyed by names: efficientvit's "ema", {decay: weights}, is passed over). DDP's
    `module.` and torch.compile's `_orig_mod.` prefixes are dropped, entries that are not tensors skipped."""
    ckpt = path_or_state_dict
    if isinstance(ckpt, (str, os.PathLike)):
        scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)  # torch >= 2.6
        try:
            refused = scan(ckpt) if scan and zipfile.is_zipfile(ckpt) else []
            unsafe = [g for g in refused if not g.startswith(("pytorch_lightning.", "lightning."))]
            if unsafe:
                raise RuntimeError(f"refused unsafe globals {unsafe[:3]} (only Lightning's classes are stubbed)")
            stubs = [type(g.rpartition(".")[2], (), {"__module__": g.rpartition(".")[0]}) for g in refused]
            with torch.serialization.safe_globals(stubs):
                ckpt = torch.load(ckpt, map_location="cpu", weights_only=True)
        except Exception as e:  # missing file, bad header, refused pickle: one line names it
            lines = (str(e).strip() or "-").splitlines()
            why = next((s.strip() for s in lines if "GLOBAL" in s), lines[0]).split(". Please use")[0]  # the culprit
            fix = " (torch >= 2.6 reads Lightning checkpoints)" if "lightning" in why and not scan else ""
            raise ValueError(f"cannot read checkpoint {str(path_or_state_dict)!r}: {type(e).__name__}: {why}{fix}") \
                from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"a checkpoint must be a dict or a path, got {type(ckpt).__name__}")
    for _ in range(3):  # INFD's model -> sd is the deepest; a bound, so a cyclic pickle cannot loop
        inner = [ckpt[k] for k in ("ema", "model_ema", "state_dict", "model", "sd") if isinstance(ckpt.get(k), dict)
                 and all(isinstance(name, str) for name in ckpt[k])]
        if not inner:
            break
        ckpt = inner[0]
    return {k.replace("_orig_mod.", "").removeprefix("module."): v for k, v in ckpt.items() if torch.is_tensor(v)}


def load_official(path_or_state_dict, config="DiT-XL/2", **overrides):
    """An official DiT checkpoint (DiT-XL-2-256x256.pt, ...) or one of ours, loaded strict (no renames).

    `config` is a CONFIGS name or the official constructor kwargs (first line of a keys/*.txt file).
    input_size follows the checkpoint's pos_embed when the preset's does not match (the 512 px model is
    "DiT-XL/2" with input_size 64, official sample.py derives it from --image-size). The model is built on
    the meta device and the tensors are assigned (fast, no throw-away init); returned in eval() mode.
    """
    sd = read_checkpoint(path_or_state_dict)
    kwargs = _resolve_config(config, overrides)
    pe = sd.get("pos_embed")
    p = kwargs.get("patch_size", 2)
    if pe is not None and pe.ndim == 3 and "input_size" not in overrides:
        side = math.isqrt(pe.shape[1])  # G = sqrt(T) tokens per side
        if side * side == pe.shape[1] and side * p != kwargs.get("input_size"):
            # (1, T, D): T = (input_size / p)^2
            kwargs["input_size"] = side * p
    # meta device: shapes only (no memory, no init); load_state_dict(assign=True) installs the tensors
    with torch.device("meta"):
        model = DiT(**kwargs)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}  # name -> shape
    got = {k: tuple(v.shape) for k, v in sd.items()}
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    wrong = [f"{k} {got[k]} != {expected[k]}" for k in expected if k in got and got[k] != expected[k]]
    if missing or unexpected or wrong:
        raise ValueError(f"checkpoint does not match dit config {config if isinstance(config, str) else kwargs}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong[:5]}")
    # requires_grad stays the module's (pos_embed frozen)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()
