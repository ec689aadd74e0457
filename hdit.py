"""HDiT: the Hourglass Diffusion Transformer, in one file.

Paper: Katherine Crowson, Stefan Andreas Baumann, Alex Birch, Tanishq Mathew Abraham, Daniel Z. Kaplan,
Enrico Shippole, "Scalable High-Resolution Pixel-Space Image Synthesis with Hourglass Diffusion
Transformers", ICML 2024, arXiv:2401.11605. EDM = Karras et al. 2022, arXiv:2206.00364.

Official code matched: crowsonkb/k-diffusion @ 4601bf085320592473f681a62808ed873d17fad5
  k_diffusion/models/image_transformer_v2.py  (ImageTransformerDenoiserModelV2: "image_transformer_v2" = HDiT)
  k_diffusion/models/axial_rope.py            (make_axial_pos)
  k_diffusion/layers.py                       (Denoiser, FourierFeatures)
  k_diffusion/sampling.py                     (get_sigmas_karras, Euler, DPM++(2M), DPM++(2M) SDE, DPM++(3M) SDE)
  k_diffusion/utils.py, config.py, train.py   (noise-level densities, stratified uniforms, EMA warm-up, recipe)
Golden tensors made by that code: tests/golden/hdit/ (tests/test_hdit.py checks them).

Map from the papers to this file (HDiT section numbers are those of the ICML 2024 text = arXiv v2)
  HDiT Sec. 4.1, App. E.4  hourglass levels, Pixel-UnShuffle token merge / split -> TokenMerge, TokenSplit,
                                                                              HDiT.forward
  HDiT Sec. 4.1, Eq. (2)   skip merge by a learnable lerp (ablated in Table 2) -> TokenSplit.fac
  HDiT Sec. 4.2, App. E.3  AdaRMSNorm (Eq. (9)) + mapping network (Fig. 12)  -> AdaRMSNorm, MappingNetwork
  HDiT Sec. 4.2, App. E.1  cosine-similarity attention (Swin v2), Eq. (7)    -> scale_for_cosine_sim
  HDiT Sec. 4.2, App. E.2  axial RoPE on half of each head (Fig. 11)         -> make_axial_pos, AxialRoPE,
                                                                              apply_rotary_emb
  HDiT Sec. 4.2, Fig. 5    GEGLU feed-forward, zero-initialised output projections -> LinearGEGLU,
                                                                              FeedForwardBlock
  HDiT Sec. 4.3            neighborhood attention at high resolution, global at low -> neighborhood_attention*,
                                                                              SelfAttentionBlock
  HDiT Sec. 5.2, Table 1   shifted-window attention (step B1), which NA (B2) beat -> apply_window_attention
  HDiT App. C, Eq. (5)     soft-min-SNR loss weighting                        -> loss_weighting
  EDM Table 1, Eq. (7), (8)  preconditioning, denoiser, training loss      -> HDiT.get_scalings, denoise,
                                                                              loss_per_sample
  EDM Eq. (5), Alg. 1 (Euler: without lines 6-8); DPM-Solver++  Karras schedule, Euler, DPM++
                                                                           -> get_sigmas_karras, sample_*, HDiT.sample
  HDiT Sec. 5.1, Table 7   the paper's sampler: DPM++(3M) SDE, 50 steps     -> sample_dpmpp_3m_sde
  simple diffusion (Hoogeboom et al. 2023), HDiT Sec. 3.1 / Table 7: shifted, interpolated cosine noise levels
                                                                           -> cosine_interpolated_sigma, sample_sigma
Suggested reading order: TokenMerge / TokenSplit and HDiT.forward (the hourglass), AdaRMSNorm and MappingNetwork,
SelfAttentionBlock with scale_for_cosine_sim, AxialRoPE and neighborhood_attention_reference, then HDiT.denoise,
loss_per_sample with loss_weighting, sample_sigma, and last get_sigmas_karras with sample_dpmpp_2m_sde.

The network keeps the official module tree, so the official state dict loads with no renames. Tensors inside
blocks are channels-last, (B, h, w, C), as in the official code.

Left out / differs from the official code
  * NATTEN (a CUDA extension): a pure-PyTorch gather reference, a flex_attention fast path (CUDA) and, on CPU or
    without flex_attention, masked dense SDPA up to 64x64 tokens (neighborhood_attention dispatches).
  * flash-attn 2 and torch.compile of the small kernels: PyTorch SDPA does the dense attention instead.
  * The non-leaky augmentation pipeline (augmentation.py): `aug_cond` is zeros unless the batch carries an
    "aug_cond" (B, 9) tensor, so CIFAR-10 / MNIST train without their configs' augment_prob 0.12, and
    hdit_ffhq1024 without the paper's (HDiT Table 7: augmentation probability 0.12).
  * The DCT frequency loss scales (`loss_scales != 1`) and the loglogistic, loguniform, v-diffusion and
    split-lognormal noise-level densities: no HDiT config uses them (create rejects them).
  * The Brownian-tree noise of the official SDE samplers (torchsde): i.i.d. Gaussian noise per step, which
    has the same law for a fixed step sequence. A single-step SDE run returns the denoised estimate (both
    official SDE loops raise UnboundLocalError there).
  * HDiT.sample runs each sampler as the official train.py (DPM++(2M) SDE: eta 0, heun) or with sampling.py's
    defaults; other eta / churn values go through the sample_* functions. clip_denoised is ours, on only in the
    pixel-space "demo" preset; the official never clamps.
  * Noise levels are always stratified (the official turns stratification off only with --gns).
  * hdit_imagenet256 / hdit_ffhq1024: the repo ships no JSON. Sizes, sigma range [1e-3, 1e3], AdamW (lr 5e-4,
    betas (0.9, 0.95), eps 1e-8, weight decay 1e-2), EMA 0.9999 and batch 256 follow HDiT Table 7; the EMA
    warm-up power 0.6667 (load_config's default) is assumed. Table 7 also lists mapping width 768, but the
    paper's parameter counts (557M, 85M) come out only with width 256, which the presets keep (768 gives 598M
    and 104M).
  * tiny and demo are ours (CI and the CPU demo), not official configurations.
Kept though no paper run uses them, because official configs or goldens do: shifted-window and "none" attention,
mapping_cond_dim, the karras / snr weightings, the euler / dpmpp_2m / dpmpp_3m_sde samplers, lognormal noise levels.
"""
import functools
import json
import math
import os
import zipfile

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------------------------------------
# Small kernels (official: image_transformer_v2.py "Kernels"). All compute in at least float32.
# ----------------------------------------------------------------------------------------------------------

def rms_norm(x, scale, eps):
    """RMSNorm over the last dim: x * scale / sqrt(mean(x^2) + eps), statistics in >= float32."""
    # Statistics in >= float32: mean(x^2) of bf16 activations under autocast would lose precision.
    dtype = torch.promote_types(torch.promote_types(x.dtype, scale.dtype), torch.float32)
    mean_sq = torch.mean(x.to(dtype) ** 2, dim=-1, keepdim=True)
    scale = scale.to(dtype) * torch.rsqrt(mean_sq + eps)
    # The official multiplies in x's dtype (the scale is cast down, not x up).
    return x * scale.to(x.dtype)


def scale_for_cosine_sim(q, k, scale, eps):
    """Cosine-similarity attention (Swin v2; HDiT App. E.1, Eq. (7), with the scale 1/tau learned directly, init
    10): q, k -> sqrt(scale) * q / |q| (eps on the SUM of squares).

    q . k then equals scale * cos(q, k), which is why attention later runs with scale=1.0.
    """
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), torch.promote_types(scale.dtype, torch.float32))
    sum_sq_q = torch.sum(q.to(dtype) ** 2, dim=-1, keepdim=True)
    sum_sq_k = torch.sum(k.to(dtype) ** 2, dim=-1, keepdim=True)
    # sqrt on each side, so the product q . k carries the full learnable per-head scale (init 10).
    sqrt_scale = torch.sqrt(scale.to(dtype))
    scale_q = sqrt_scale * torch.rsqrt(sum_sq_q + eps)
    scale_k = sqrt_scale * torch.rsqrt(sum_sq_k + eps)
    return q * scale_q.to(q.dtype), k * scale_k.to(k.dtype)


class LinearGEGLU(nn.Linear):
    """HDiT Sec. 4.2, Fig. 5, GEGLU (Shazeer 2020): one bias-free Linear to 2*d_ff; first half = value, second =
    gate."""

    def __init__(self, in_features, out_features, bias=False):
        # One fused matmul for value and gate: weight (2*d_ff, in), the layout of the official checkpoint.
        super().__init__(in_features, out_features * 2, bias=bias)
        self.out_features = out_features

    def forward(self, x):
        x = F.linear(x, self.weight, self.bias)  # (..., in) -> (..., 2*d_ff)
        x, gate = x.chunk(2, dim=-1)  # (..., 2*d_ff) -> 2 x (..., d_ff)
        return x * F.gelu(gate)  # exact (erf) GELU, as the official


class RMSNorm(nn.Module):
    """RMSNorm with a learnable per-feature scale (init 1)."""

    def __init__(self, shape, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(shape))

    def forward(self, x):
        return rms_norm(x, self.scale, self.eps)


class AdaRMSNorm(nn.Module):
    """HDiT Sec. 4.2, App. E.3, Eq. (9): RMSNorm whose scale is g = 1 + Linear(cond); the Linear is
    zero-initialised (starts as RMSNorm)."""

    def __init__(self, features, cond_features, eps=1e-6):
        super().__init__()
        self.eps = eps
        # Maps the shared conditioning vector to a per-channel scale offset: (B, cond_features) -> (B, features).
        self.linear = nn.Linear(cond_features, features, bias=False)
        # Zero init: scale 1 + 0, so at step 0 every block sees a plain RMSNorm whatever sigma / class is.
        nn.init.zeros_(self.linear.weight)

    def forward(self, x, cond):
        # cond (B, mapping_width) -> (B, 1, 1, C): one scale per sample, broadcast over the token grid.
        return rms_norm(x, self.linear(cond)[:, None, None, :] + 1, self.eps)


# ----------------------------------------------------------------------------------------------------------
# Axial rotary position embeddings (HDiT Sec. 4.2, App. E.2; official axial_rope.py + AxialRoPE in
# image_transformer_v2.py)
# ----------------------------------------------------------------------------------------------------------

def make_axial_pos(h, w, device=None):
    """(h*w, 2) cell-centre positions (y, x), row-major; the longer side spans [-1, 1].

    Always float32 (the official passes no dtype), also in a float64 model.
    """
    # Non-square grids: the shorter side spans a proportionally shorter range, so tokens are equally
    # spaced along y and x and RoPE distances mean the same thing on both axes.
    aspect = w / h
    y_max, x_max = (1.0 / aspect, 1.0) if aspect > 1 else (1.0, aspect) if aspect < 1 else (1.0, 1.0)
    y_edges = torch.linspace(-y_max, y_max, h + 1, device=device)  # (h + 1,) cell edges
    x_edges = torch.linspace(-x_max, x_max, w + 1, device=device)  # (w + 1,)
    y_pos = (y_edges[:-1] + y_edges[1:]) / 2  # (h,) cell centres
    x_pos = (x_edges[:-1] + x_edges[1:]) / 2  # (w,)
    grid = torch.stack(torch.meshgrid(y_pos, x_pos, indexing="ij"), dim=-1)  # (h, w, 2)
    return grid.view(h * w, 2)  # (h, w, 2) -> (h*w, 2)


def downscale_pos(pos):
    """Positions of the merged grid: mean of each 2x2 block, averaged in (dy, dx) order like the official."""
    *b, h, w, e = pos.shape
    # A merged token sits at the centre of its 2x2 children, so positions stay consistent across levels.
    pos = pos.reshape(*b, h // 2, 2, w // 2, 2, e)  # (h, w, 2) -> (h/2, 2, w/2, 2, 2)
    pos = pos.movedim(-4, -3).reshape(*b, h // 2, w // 2, 4, e)  # -> (h/2, w/2, (dy dx), 2)
    return torch.mean(pos, dim=-2)  # (h/2, w/2, 2)


class AxialRoPE(nn.Module):
    """HDiT Sec. 4.2, App. E.2, Fig. 11: axial RoPE on the first half of every head; y uses d_head/8 frequencies
    (a quarter of the head), x the next d_head/8.

    Frequencies are log-spaced from pi to 10*pi (excluded) and interleaved across heads (each head gets its own
    ladder), stored as a persistent buffer `freqs` (n_heads, d_head // 8) like the official checkpoint.
    """

    def __init__(self, dim, n_heads):
        super().__init__()
        # dim = d_head // 2 is the rotated part: dim // 2 rotation pairs, half for y and half for x, hence
        # dim // 4 = d_head // 8 frequencies per axis and head.
        n = n_heads * dim // 4
        freqs = torch.linspace(math.log(math.pi), math.log(10.0 * math.pi), n + 1)[:-1].exp()  # (n,) float32
        # view(dim // 4, n_heads).T interleaves the ladder: head j gets freqs j, j + n_heads, j + 2 n_heads, ...
        self.register_buffer("freqs", freqs.view(dim // 4, n_heads).T.contiguous())  # (n_heads, dim // 4)

    def forward(self, pos):
        """pos (..., 2) -> theta (..., n_heads, d_head // 4): [y * freqs[head], x * freqs[head]]."""
        # (..., 1, 1) * (nh, f) -> (..., nh, f)
        theta_h = pos[..., None, 0:1] * self.freqs.to(pos.dtype)
        theta_w = pos[..., None, 1:2] * self.freqs.to(pos.dtype)  # (..., nh, f)
        return torch.cat((theta_h, theta_w), dim=-1)  # (..., nh, 2f)


def apply_rotary_emb(x, theta, conj=False):
    """Rotate pairs (i, i + d) of x by theta, d = theta.shape[-1]; dims >= 2d pass through unchanged.

    "Half-split" pairs, not interleaved neighbours; computed in >= float32, returned in x's dtype.
    """
    dtype = torch.promote_types(torch.promote_types(x.dtype, theta.dtype), torch.float32)
    d = theta.shape[-1]
    x1, x2, x3 = x[..., :d].to(dtype), x[..., d:2 * d].to(dtype), x[..., 2 * d:]
    cos, sin = torch.cos(theta.to(dtype)), torch.sin(theta.to(dtype))
    # conj=True rotates by -theta (the inverse): sin is odd, cos is even.
    sin = -sin if conj else sin
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    return torch.cat((y1.to(x.dtype), y2.to(x.dtype), x3), dim=-1)


# ----------------------------------------------------------------------------------------------------------
# Neighborhood attention (HDiT Sec. 4.3), NATTEN semantics, dilation 1, odd kernel K. Layout (B, heads, H, W, e).
# Query (i, j) attends to the K x K keys starting at (clamp(i - K//2, 0, H - K), clamp(j - K//2, 0, W - K)):
# the window is centred on the query but shifted INWARD at the borders (never padded, never truncated).
# ----------------------------------------------------------------------------------------------------------

def neighborhood_index(h, w, kernel_size, device=None):
    """(h, w, K*K) flat key index r*w + c of every neighbour, neighbour a*K + b (row-major), like NATTEN."""
    if kernel_size % 2 != 1 or h < kernel_size or w < kernel_size:
        raise ValueError(f"neighborhood attention needs an odd kernel no larger than the token grid; got kernel "
                         f"{kernel_size} on a {h}x{w} grid")
    offsets = torch.arange(kernel_size, device=device)
    # Rows and columns are clamped independently: the K x K window is an outer product of two ranges.
    rows = (torch.arange(h, device=device) - kernel_size // 2).clamp(0, h - kernel_size)[:, None] + offsets
    cols = (torch.arange(w, device=device) - kernel_size // 2).clamp(0, w - kernel_size)[:, None] + offsets
    # (h, 1, K, 1) * w + (1, w, 1, K) -> (h, w, K, K)
    flat = rows[:, None, :, None] * w + cols[None, :, None, :]
    return flat.reshape(h, w, kernel_size * kernel_size)


def neighborhood_attention_reference(q, k, v, kernel_size, scale=None):
    """Readable reference: gather each query's K*K keys and values, softmax over them. O(N K^2) work instead of
    O(N^2), the linear cost HDiT Sec. 4.3 / App. A rely on at high resolution. scale: logit scale, None =
    1/sqrt(e) as SDPA (HDiT passes 1.0: cosine-sim attention has already put its learnable scale into q and k)."""
    b, nh, h, w, e = q.shape
    scale = e ** -0.5 if scale is None else scale
    index = neighborhood_index(h, w, kernel_size, q.device).view(-1)
    # (B, nh, H, W, e) -> (B, nh, H*W*K*K, e) -> (B, nh, H, W, K*K, e)
    k_n = k.reshape(b, nh, h * w, e)[:, :, index].view(b, nh, h, w, kernel_size ** 2, e)
    v_n = v.reshape(b, nh, h * w, e)[:, :, index].view(b, nh, h, w, kernel_size ** 2, e)
    # (B, nh, H, W, K*K) logits, what NATTEN's na2d_qk returns
    logits = torch.einsum("bnhwe,bnhwke->bnhwk", q, k_n) * scale
    attn = torch.softmax(logits, dim=-1).to(v.dtype)
    return torch.einsum("bnhwk,bnhwke->bnhwe", attn, v_n)


def neighborhood_mask(h, w, kernel_size, device=None):
    """(h*w, h*w) bool, True where key (column) lies in the query's (row) neighbourhood; K*K per row."""
    index = neighborhood_index(h, w, kernel_size, device).view(h * w, -1)
    mask = torch.zeros(h * w, h * w, dtype=torch.bool, device=device)
    return mask.scatter_(1, index, True)


@functools.lru_cache(maxsize=16)
def _cached_mask(h, w, kernel_size, device):
    return neighborhood_mask(h, w, kernel_size, device)


def neighborhood_attention_dense(q, k, v, kernel_size, scale=None):
    """Brute force: dense SDPA over all H*W keys with the boolean neighbourhood mask. O(N^2), but one fused
    kernel: on CPU the fastest of the three for small grids (see neighborhood_attention)."""
    b, nh, h, w, e = q.shape
    mask = _cached_mask(h, w, kernel_size, str(q.device))
    flat = [t.reshape(b, nh, h * w, e) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*flat, attn_mask=mask, scale=scale)
    return out.view(b, nh, h, w, e)


@functools.lru_cache(maxsize=64)
def neighborhood_block_mask(h, w, kernel_size, device, block_size=128):
    """flex_attention BlockMask of the neighbourhood rule over row-major tokens (cached per grid and device).

    Same rule written as NATTEN's own flex backend does: centre = clamp(i, K//2, H-1-K//2), key row r allowed
    iff |centre - r| <= K//2 (and the same for columns). Blocks of `block_size` tokens with no allowed pair
    are skipped entirely, which is what makes this faster than dense attention.
    """
    from torch.nn.attention.flex_attention import create_block_mask
    r = kernel_size // 2

    def mask_mod(b, head, q_idx, kv_idx):
        q_row, q_col, k_row, k_col = q_idx // w, q_idx % w, kv_idx // w, kv_idx % w
        # Clamping the centre to [r, n-1-r] equals clamping the window start to [0, n-K] (neighborhood_index).
        c_row, c_col = q_row.clamp(r, h - 1 - r), q_col.clamp(r, w - 1 - r)
        return ((c_row - k_row).abs() <= r) & ((c_col - k_col).abs() <= r)

    # None, None: one mask for every batch element and head (the rule depends only on token positions).
    return create_block_mask(mask_mod, None, None, h * w, h * w, device=device, BLOCK_SIZE=block_size)


_FLEX_COMPILED = None


def neighborhood_attention_flex(q, k, v, kernel_size, scale=None):
    """Fast path: torch.nn.attention.flex_attention with the block mask above, compiled on CUDA (eager on CPU,
    forward only, which only the tests use)."""
    from torch.nn.attention.flex_attention import flex_attention
    global _FLEX_COMPILED
    b, nh, h, w, e = q.shape
    neighborhood_index(h, w, kernel_size)  # the same one-line error for a kernel that does not fit
    # Compiled once and cached module-wide: eager flex_attention is an unfused reference, compile fuses it.
    if q.is_cuda and _FLEX_COMPILED is None:
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    attend = _FLEX_COMPILED if q.is_cuda else flex_attention
    block_mask = neighborhood_block_mask(h, w, kernel_size, str(q.device))
    flat = [t.reshape(b, nh, h * w, e) for t in (q, k, v)]
    return attend(*flat, block_mask=block_mask, scale=scale).view(b, nh, h, w, e)


# On CPU, and on CUDA without flex_attention (torch < 2.5), grids of up to this many tokens use the masked dense
# kernel: (h*w)^2 logits instead of h*w*K^2, but in one fused SDPA call, while the gather's backward is a slow
# scatter-add. Past 64x64 the quadratic mask (16M entries there) and logits take over.
DENSE_MAX_TOKENS = 64 * 64


def neighborhood_attention(q, k, v, kernel_size, scale=None):
    """Dispatch (all three compute the same thing): the flex fast path on CUDA when torch has it; otherwise the
    masked dense kernel for grids up to DENSE_MAX_TOKENS tokens and the gather reference above that."""
    if q.is_cuda and _has_flex_attention():
        return neighborhood_attention_flex(q, k, v, kernel_size, scale)
    if q.shape[2] * q.shape[3] <= DENSE_MAX_TOKENS:
        return neighborhood_attention_dense(q, k, v, kernel_size, scale)
    return neighborhood_attention_reference(q, k, v, kernel_size, scale)


@functools.lru_cache(maxsize=1)
def _has_flex_attention():
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------------
# Shifted-window attention (Swin): the official supports it; HDiT Sec. 4.3 reports NA works better (Sec. 5.2,
# Table 1: step B1, Swin, FID 55.93; step B2, NA, 51.07).
# Note the official rolls by +shift (Swin rolls by -shift); the masks below follow the official.
# ----------------------------------------------------------------------------------------------------------

def make_shifted_window_masks(n_h_w, n_w_w, w_h, w_w, shift, device=None):
    """(n_h_w, n_w_w, w_h, w_w, w_h, w_w) bool, True = may attend. Tokens rolled in from the far edge sit at
    in-window coordinates < shift of the first window row / column and must not mix with the others."""
    # Six broadcast index grids: window row, window column, query row, query column, key row, key column.
    ph, pw, qh, qw, kh, kw = torch.meshgrid(
        *[torch.arange(n, device=device) for n in (n_h_w, n_w_w, w_h, w_w, w_h, w_w)], indexing="ij")
    # With the official +shift roll only the first window row / column holds wrapped-around tokens.
    top, left = ph == 0, pw == 0
    # query and key on the same side of the row seam / of the column seam
    same_rows, same_cols = (qh < shift) == (kh < shift), (qw < shift) == (kw < shift)
    # top-left window: both seams; left column: the column seam; top row: the row seam; others: none
    return (left & top & same_cols & same_rows) | (left & ~top & same_cols) | (~left & top & same_rows) | (~left & ~top)


def apply_window_attention(window_size, window_shift, q, k, v):
    """q, k, v (B, heads, H, W, e) -> (B, heads, H, W, e); attention inside ws x ws windows after a roll."""
    b, nh, h, w, e = q.shape
    if h % window_size or w % window_size:
        raise ValueError(f"shifted-window attention needs the token grid ({h}x{w}) divisible by the window "
                         f"size {window_size}")
    n_h, n_w, ws = h // window_size, w // window_size, window_size

    def to_windows(x):
        x = torch.roll(x, shifts=(window_shift, window_shift), dims=(-3, -2))  # element (i, j) -> (i+s, j+s)
        # (B, nh, H, W, e) -> (B, nh, nH, ws, nW, ws, e) -> (B, nh, nH, nW, ws, ws, e) -> (B, nh, nH, nW, ws*ws, e)
        x = x.reshape(b, nh, n_h, ws, n_w, ws, e).permute(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(b, nh, n_h, n_w, ws * ws, e)

    # (nH, nW, ws, ws, ws, ws) -> (nH, nW, ws*ws, ws*ws), broadcast over (B, nh); scale 1.0: cosine-sim logits.
    mask = make_shifted_window_masks(n_h, n_w, ws, ws, window_shift, device=q.device).reshape(n_h, n_w, ws * ws, -1)
    out = F.scaled_dot_product_attention(to_windows(q), to_windows(k), to_windows(v), mask, scale=1.0)
    # (B, nh, nH, nW, ws*ws, e) -> (B, nh, nH, nW, ws, ws, e) -> (B, nh, H, W, e), then undo the roll
    out = out.reshape(b, nh, n_h, n_w, ws, ws, e).permute(0, 1, 2, 4, 3, 5, 6).reshape(b, nh, h, w, e)
    return torch.roll(out, shifts=(-window_shift, -window_shift), dims=(-3, -2))


# ----------------------------------------------------------------------------------------------------------
# Transformer blocks (HDiT Sec. 4.2, Fig. 4)
# ----------------------------------------------------------------------------------------------------------

class SelfAttentionBlock(nn.Module):
    """Pre-norm attention block: AdaRMSNorm -> qkv -> cosine-sim scale -> axial RoPE -> attention -> out_proj.

    `kind` is "global", "neighborhood" (kernel_size) or "shifted-window" (window_size, window_shift); the
    official has three classes with identical parameters, merged here because only step 5 differs.
    """

    def __init__(self, d_model, d_head, cond_features, kind="global", kernel_size=7, window_size=None,
                 window_shift=0, dropout=0.0):
        super().__init__()
        self.d_head, self.n_heads, self.kind = d_head, d_model // d_head, kind
        self.kernel_size, self.window_size, self.window_shift = kernel_size, window_size, window_shift
        self.norm = AdaRMSNorm(d_model, cond_features)
        self.qkv_proj = nn.Linear(d_model, d_model * 3, bias=False)
        # learnable per-head logit scale, init 10
        self.scale = nn.Parameter(torch.full([self.n_heads], 10.0))
        # RoPE rotates only the first half of each head (d_head // 2 dims); the rest is position-free.
        self.pos_emb = AxialRoPE(d_head // 2, self.n_heads)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        # zero-init residual branch (no adaLN-Zero gate, HDiT Sec. 4.2)
        nn.init.zeros_(self.out_proj.weight)

    def forward(self, x, pos, cond):
        skip = x
        b, h, w, c = x.shape
        # (B, H, W, C) -> (B, H, W, 3C), features ordered (t, head, e) -> 3 x (B, nh, H, W, e)
        qkv = self.qkv_proj(self.norm(x, cond))
        q, k, v = qkv.view(b, h, w, 3, self.n_heads, self.d_head).permute(3, 0, 4, 1, 2, 5)
        q, k = scale_for_cosine_sim(q, k, self.scale[:, None, None, None], 1e-6)
        if self.kind == "global":
            # Official quirk: the global block casts pos to qkv's dtype before the RoPE product (bf16 under
            # autocast); the local blocks keep float32 positions.
            pos = pos.to(qkv.dtype)
        theta = self.pos_emb(pos).movedim(-2, -4)  # (H, W, nh, e/4) -> (nh, H, W, e/4)
        # theta has e/4 angles, so dims [0, e/2) of each head are rotated and [e/2, e) pass through (App. E.2).
        # v is not rotated: position only enters through the q . k logits.
        q, k = apply_rotary_emb(q, theta), apply_rotary_emb(k, theta)
        # Scale 1.0 everywhere: cosine-sim attention has already put its learnable scale into q and k.
        if self.kind == "global":
            # (B, nh, H, W, e) -> (B, nh, H*W, e) -> attention -> (B, nh, H, W, e)
            flat = [t.reshape(b, self.n_heads, h * w, self.d_head) for t in (q, k, v)]
            x = F.scaled_dot_product_attention(*flat, scale=1.0).view(b, self.n_heads, h, w, self.d_head)
        elif self.kind == "neighborhood":
            x = neighborhood_attention(q, k, v, self.kernel_size, scale=1.0)
        else:
            x = apply_window_attention(self.window_size, self.window_shift, q, k, v)
        x = x.permute(0, 2, 3, 1, 4).reshape(b, h, w, c)  # (B, nh, H, W, e) -> (B, H, W, nh*e)
        return self.out_proj(self.dropout(x)) + skip


class FeedForwardBlock(nn.Module):
    """Pre-norm GEGLU feed-forward: AdaRMSNorm -> LinearGEGLU -> dropout -> zero-init down_proj -> + skip."""

    def __init__(self, d_model, d_ff, cond_features, dropout=0.0):
        super().__init__()
        self.norm = AdaRMSNorm(d_model, cond_features)
        self.up_proj = LinearGEGLU(d_model, d_ff, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)
        # Zero-init output: the block starts as the identity, like the attention block's out_proj.
        nn.init.zeros_(self.down_proj.weight)

    def forward(self, x, cond):
        x_ff = self.up_proj(self.norm(x, cond))  # (B, H, W, C) -> (B, H, W, d_ff)
        return self.down_proj(self.dropout(x_ff)) + x


class TransformerLayer(nn.Module):
    """One layer = attention block (absent for attention type "none") then feed-forward block."""

    def __init__(self, width, d_ff, cond_features, attn, index, dropout=0.0):
        super().__init__()
        kind = attn["type"]
        if kind != "none":
            # Shifted window (window_size required, as officially): odd layer indices shift by half a window
            # (up levels count on from depth).
            shift = attn["window_size"] // 2 if kind == "shifted-window" and index % 2 == 1 else 0
            self.self_attn = SelfAttentionBlock(width, attn.get("d_head", 64), cond_features, kind,
                                                kernel_size=attn.get("kernel_size", 7),
                                                window_size=attn.get("window_size"), window_shift=shift,
                                                dropout=dropout)
        self.ff = FeedForwardBlock(width, d_ff, cond_features, dropout=dropout)
        self.grad_checkpointing = False

    def _forward(self, x, pos, cond):
        if hasattr(self, "self_attn"):
            x = self.self_attn(x, pos, cond)
        return self.ff(x, cond)

    def forward(self, x, pos, cond):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            # Activation checkpointing: one extra forward per layer in backward instead of storing its activations.
            return torch.utils.checkpoint.checkpoint(self._forward, x, pos, cond, use_reentrant=False)
        return self._forward(x, pos, cond)


class Level(nn.ModuleList):
    """A run of layers at one token resolution."""

    def forward(self, x, pos, cond):
        for layer in self:
            x = layer(x, pos, cond)
        return x


# ----------------------------------------------------------------------------------------------------------
# Conditioning: Fourier features of the noise level + class embedding + augmentation -> mapping network
# ----------------------------------------------------------------------------------------------------------

class FourierFeatures(nn.Module):
    """Random Fourier features (official layers.FourierFeatures): cat(cos 2*pi*x W^T, sin 2*pi*x W^T).

    W ~ N(0, std^2) is a persistent buffer (NOT learned, but in the checkpoint: load it, never redraw it).
    """

    def __init__(self, in_features, out_features, std=1.0):
        super().__init__()
        # (out/2, in) Gaussian frequencies; drawn at init, then fixed (official default std 1).
        self.register_buffer("weight", torch.randn([out_features // 2, in_features]) * std)

    def forward(self, x):
        f = 2 * math.pi * x @ self.weight.T  # (B, in) -> (B, out/2)
        return torch.cat([f.cos(), f.sin()], dim=-1)  # cos first -> (B, out)


class MappingFeedForwardBlock(nn.Module):
    """Mapping-network residual block: RMSNorm -> GEGLU -> dropout -> zero-init Linear -> + skip."""

    def __init__(self, d_model, d_ff, dropout=0.0):
        super().__init__()
        self.norm = RMSNorm(d_model)
        self.up_proj = LinearGEGLU(d_model, d_ff, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)
        # zero-init: each mapping block starts as the identity
        nn.init.zeros_(self.down_proj.weight)

    def forward(self, x):
        return self.down_proj(self.dropout(self.up_proj(self.norm(x)))) + x


class MappingNetwork(nn.Module):
    """HDiT Sec. 4.2, App. E.3, Fig. 12: the shared conditioning MLP; its output `cond` drives every AdaRMSNorm."""

    def __init__(self, n_layers, d_model, d_ff, dropout=0.0):
        super().__init__()
        self.in_norm = RMSNorm(d_model)
        self.blocks = nn.ModuleList([MappingFeedForwardBlock(d_model, d_ff, dropout) for _ in range(n_layers)])
        self.out_norm = RMSNorm(d_model)

    def forward(self, x):
        x = self.in_norm(x)
        for block in self.blocks:
            x = block(x)
        return self.out_norm(x)


# ----------------------------------------------------------------------------------------------------------
# Token merge / split (HDiT Sec. 4.1, App. E.4). Packing order (dy, dx, c): feature (dy*pw + dx)*C + c.
# NOTE: this is NOT F.pixel_unshuffle's order (c*ph*pw + dy*pw + dx), so official weights need this order.
# ----------------------------------------------------------------------------------------------------------

class TokenMerge(nn.Module):
    """Patching / downsampling: pack each ph x pw block of tokens into one, then a bias-free Linear (a Linear on
    the packed features is a stride-p conv, i.e. ViT-style patch embedding)."""

    def __init__(self, in_features, out_features, patch_size=(2, 2)):
        super().__init__()
        self.h, self.w = patch_size
        self.proj = nn.Linear(in_features * self.h * self.w, out_features, bias=False)

    def forward(self, x):
        *b, h, w, c = x.shape
        # (..., H, W, C) -> (..., H/ph, ph, W/pw, pw, C) -> (..., H/ph, W/pw, ph, pw, C) -> (..., H/ph, W/pw, ph*pw*C)
        x = x.reshape(*b, h // self.h, self.h, w // self.w, self.w, c).movedim(-4, -3)
        return self.proj(x.reshape(*b, h // self.h, w // self.w, self.h * self.w * c))


class TokenSplitWithoutSkip(nn.Module):
    """Unpatching: bias-free Linear to ph*pw*out features, unpacked in (dy, dx, c) order."""

    def __init__(self, in_features, out_features, patch_size=(2, 2)):
        super().__init__()
        self.h, self.w = patch_size
        self.proj = nn.Linear(in_features, out_features * self.h * self.w, bias=False)

    def forward(self, x):
        x = self.proj(x)
        *b, h, w, f = x.shape
        # (..., h, w, ph*pw*C) -> (..., h, w, ph, pw, C) -> (..., h, ph, w, pw, C) -> (..., h*ph, w*pw, C)
        x = x.reshape(*b, h, w, self.h, self.w, f // (self.h * self.w)).movedim(-3, -4)
        return x.reshape(*b, h * self.h, w * self.w, f // (self.h * self.w))


class TokenSplit(nn.Module):
    """Upsampling + skip merge by a learnable lerp (HDiT Sec. 4.1): lerp(skip, up, fac) = (1 - fac) skip + fac up.

    The paper's Eq. (2) writes f * skip + (1 - f) * upsampled; the code's learnable `fac` (init 0.5) weights the
    upsampled branch. We follow the code.
    """

    def __init__(self, in_features, out_features, patch_size=(2, 2)):
        super().__init__()
        self.h, self.w = patch_size
        self.proj = nn.Linear(in_features, out_features * self.h * self.w, bias=False)
        # One scalar shared by all channels, init 0.5: skip and upsampled branch mixed equally.
        self.fac = nn.Parameter(torch.ones(1) * 0.5)

    def forward(self, x, skip):
        x = self.proj(x)
        *b, h, w, f = x.shape
        # (..., h, w, ph*pw*C) -> (..., h, w, ph, pw, C) -> (..., h, ph, w, pw, C) -> (..., h*ph, w*pw, C)
        x = x.reshape(*b, h, w, self.h, self.w, f // (self.h * self.w)).movedim(-3, -4)
        x = x.reshape(*b, h * self.h, w * self.w, f // (self.h * self.w))
        # lerp(skip, x, fac) = skip + fac * (x - skip); fac is cast so bf16 activations stay bf16.
        return torch.lerp(skip, x, self.fac.to(x.dtype))


# ----------------------------------------------------------------------------------------------------------
# Training noise levels (official utils.rand_cosine_interpolated, config.make_sample_density)
# ----------------------------------------------------------------------------------------------------------

def cosine_interpolated_sigma(u, image_d, noise_d_low, noise_d_high, sigma_data, min_value=1e-3,
                              max_value=1e3):
    """u in [0, 1) -> sigma. The cosine log-SNR schedule shifted for the resolution (Hoogeboom et al. 2023,
    simple diffusion) at noise_d_low and noise_d_high, interpolated with weight u. u=0 -> max_value."""
    # log-SNR at the smallest sigma (large)
    lo = -2 * math.log(min_value / sigma_data)
    # log-SNR at the largest sigma (negative)
    hi = -2 * math.log(max_value / sigma_data)

    # Cosine schedule logSNR(t) = -2 log tan(pi t / 2), truncated to [hi, lo] through the atan bounds a, b,
    # then shifted by 2 log(noise_d / image_d) (simple diffusion's resolution-shifted cosine).
    def logsnr_shifted(noise_d):
        shift = 2 * math.log(noise_d / image_d)
        a = math.atan(math.exp(-(hi - shift) / 2))
        b = math.atan(math.exp(-(lo - shift) / 2))
        return -2 * torch.log(torch.tan(a + u * (b - a))) + shift  # (n,) log-SNR

    # Interpolate from the schedule shifted for noise_d_low (32) to the unshifted one (noise_d_high = image_d).
    logsnr = torch.lerp(logsnr_shifted(noise_d_low), logsnr_shifted(noise_d_high), u)
    # log-SNR = -2 log(sigma / sigma_data) -> sigma, (n,)
    return sigma_data * torch.exp(-logsnr / 2)


def stratified_uniform(n, group=0, groups=1, device=None):
    """n uniforms for part `group` of a global batch of n * groups samples cut into `groups` parts (ranks x
    gradient-accumulation steps), as k-diffusion's utils.stratified_uniform: part k takes strata k, k + groups,
    ... of the n * groups equal strata of [0, 1), so one global batch holds exactly one sample per stratum."""
    if not 0 <= group < groups:
        raise ValueError(f"stratified sampling: shard {group} is not in [0, {groups})")
    offsets = torch.arange(group, n * groups, groups, dtype=torch.float32, device=device)
    return (offsets + torch.rand(n, device=device)) / (n * groups)


# sigma_sample_density types and the keys each takes (k-diffusion config.make_sample_density). The official's
# loglogistic, loguniform, v-diffusion / cosine and split-lognormal densities are left out: no HDiT config uses them.
DENSITY_KEYS = {"cosine-interpolated": {"min_value", "max_value", "image_d", "noise_d_low", "noise_d_high"},
                "lognormal": {"mean", "std", "loc", "scale"}}


# ----------------------------------------------------------------------------------------------------------
# Samplers (official sampling.py). `denoiser(x, sigma_vector)` returns the denoised estimate D(x, sigma).
# sigmas are a float32 schedule ending in 0; the step arithmetic runs on Python floats (float64), no host syncs.
# ----------------------------------------------------------------------------------------------------------

def get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0, device="cpu"):
    """EDM Eq. (5): n levels from sigma_max to sigma_min, plus a final 0 (float32)."""
    # rho = 7 (EDM's choice) puts the steps densely near sigma_min, where fine detail is decided.
    ramp = torch.linspace(0, 1, n)  # (n,) in [0, 1]
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho  # (n,), sigma_max -> sigma_min
    # The trailing 0 makes the last step return the denoised estimate itself.
    return torch.cat([sigmas, sigmas.new_zeros([1])]).to(device)  # (n,) -> (n + 1,)


def _sigma_list(sigmas):
    return [float(s) for s in sigmas.cpu()] if torch.is_tensor(sigmas) else [float(s) for s in sigmas]


def sample_euler(denoiser, x, sigmas):
    """Euler's method on the probability-flow ODE: EDM (Karras et al. 2022) Algorithm 1 without lines 6-8 (its
    2nd-order correction), as EDM Sec. 2 describes it. k-diffusion calls it Algorithm 2 (Euler steps), S_churn = 0."""
    s = _sigma_list(sigmas)
    for i in range(len(s) - 1):
        denoised = denoiser(x, x.new_full([x.shape[0]], s[i]))  # sigma as a (B,) vector
        d = (x - denoised) / s[i]  # ODE derivative dx/dsigma
        x = x + d * (s[i + 1] - s[i])  # Euler step from s[i] to s[i + 1]
    return x


def sample_dpmpp_2m(denoiser, x, sigmas):
    """DPM-Solver++(2M) (Lu et al. 2022) in t = -log sigma; first and last steps are first order."""
    s = _sigma_list(sigmas)
    old_denoised = None
    for i in range(len(s) - 1):
        denoised = denoiser(x, x.new_full([x.shape[0]], s[i]))
        if s[i + 1] == 0:
            x = denoised  # final step to sigma 0
        else:
            h = math.log(s[i]) - math.log(s[i + 1])  # t_next - t
            if old_denoised is None:
                d = denoised  # first step: no history, first order
            else:
                r = (math.log(s[i - 1]) - math.log(s[i])) / h  # h_last / h
                # Second order: extrapolate the denoised estimate linearly in t = -log sigma from the last two steps.
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            # Exponential-integrator step in data-prediction form: x' = (sigma'/sigma) x + (1 - e^-h) d.
            x = (s[i + 1] / s[i]) * x - math.expm1(-h) * d
        old_denoised = denoised
    return x


def sample_dpmpp_2m_sde(denoiser, x, sigmas, eta=1.0, noise_sampler=None, solver_type="midpoint"):
    """DPM-Solver++(2M) SDE with the official defaults (eta 1, midpoint); the official train.py's demo grids and
    FID use eta 0 with "heun", which is deterministic and what HDiT.sample runs."""
    s = _sigma_list(sigmas)
    noise_sampler = noise_sampler or (lambda sigma, sigma_next: torch.randn_like(x))
    old_denoised, h_last = None, None
    for i in range(len(s) - 1):
        denoised = denoiser(x, x.new_full([x.shape[0]], s[i]))
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i]) - math.log(s[i + 1])
            eta_h = eta * h
            # First-order part; with eta > 0 the extra exp(-eta h) removes what the injected noise below adds back.
            x = s[i + 1] / s[i] * math.exp(-eta_h) * x + (-math.expm1(-h - eta_h)) * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + ((-math.expm1(-h - eta_h)) / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:  # midpoint
                    x = x + 0.5 * (-math.expm1(-h - eta_h)) * (1 / r) * (denoised - old_denoised)
            if eta:
                # Noise std sigma' sqrt(1 - e^(-2 eta h)) keeps the marginal at noise level sigma'.
                x = x + noise_sampler(s[i], s[i + 1]) * s[i + 1] * math.sqrt(-math.expm1(-2 * eta_h))
            h_last = h
        old_denoised = denoised
    return x


def sample_dpmpp_3m_sde(denoiser, x, sigmas, eta=1.0, s_noise=1.0, noise_sampler=None):
    """DPM-Solver++(3M) SDE (k-diffusion): third-order multistep in the denoised space plus SDE noise. The HDiT
    paper samples every reported model with it, 50 steps (Sec. 5.1, Table 7)."""
    s = _sigma_list(sigmas)
    noise_sampler = noise_sampler or (lambda sigma, sigma_next: torch.randn_like(x))
    denoised_1 = denoised_2 = None
    h = h_1 = h_2 = None
    for i in range(len(s) - 1):
        denoised = denoiser(x, x.new_full([x.shape[0]], s[i]))
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i]) - math.log(s[i + 1])
            h_eta = h * (eta + 1)
            # exp(-h_eta) = (s[i+1] / s[i]) * exp(-eta h): the same first-order part as the 2M SDE.
            x = math.exp(-h_eta) * x + (-math.expm1(-h_eta)) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            # Third order needs two earlier denoised estimates; the second step falls back to second order.
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
            if eta:
                x = x + noise_sampler(s[i], s[i + 1]) * s[i + 1] * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
        # shift the history: the two newest estimates
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1  # and their step sizes
    return x


SAMPLERS = {"euler": sample_euler, "dpmpp_2m": sample_dpmpp_2m, "dpmpp_2m_sde": sample_dpmpp_2m_sde,
            "dpmpp_3m_sde": sample_dpmpp_3m_sde}


# ----------------------------------------------------------------------------------------------------------
# The model: network (official ImageTransformerDenoiserModelV2) + Denoiser + loss + sampling
# ----------------------------------------------------------------------------------------------------------

LOSS_WEIGHTINGS = ("karras", "snr", "soft-min-snr")


def loss_weighting(sigma, sigma_data, weighting):
    """Per-sample weight of the F-space MSE (official layers.Denoiser); soft-min-SNR is HDiT App. C, Eq. (5).

    soft-min-snr: (sigma*sd)^2 / (sigma^2 + sd^2)^2 = SNR / (1 + SNR)^2, SNR = sd^2 / sigma^2; in denoised
    space this is ||D - x0||^2 / (sigma^2 + sd^2), the paper's 1 / (sigma^2 + gamma^-1) with gamma = sd^-2,
    i.e. gamma = 4 at sigma_data 0.5, the value App. C uses (Min-SNR's 5 changed to 4).
    """
    # karras: weight 1 in F space, which is EDM's lambda(sigma) = 1 / c_out^2 in denoised space (EDM Sec. 5).
    if weighting == "karras":
        return torch.ones_like(sigma)
    if weighting == "snr":
        # snr: in denoised space this is 1 / sigma^2 = SNR / sigma_data^2, plain SNR weighting (HDiT App. C, Eq. (3)).
        return sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    if weighting == "soft-min-snr":
        return (sigma * sigma_data) ** 2 / (sigma ** 2 + sigma_data ** 2) ** 2
    raise ValueError(f"unknown loss_weighting {weighting!r}; expected karras, snr or soft-min-snr")


class HDiT(nn.Module):
    """Hourglass Diffusion Transformer with EDM preconditioning (official ImageTransformerDenoiserModelV2
    wrapped in layers.Denoiser). `forward` is the raw network F(c_in x, sigma); `denoise` is D(x, sigma)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        widths, depths, d_ffs, attns = cfg["widths"], cfg["depths"], cfg["d_ffs"], cfg["self_attns"]
        drops, mw = cfg["dropout_rate"], cfg["mapping_width"]
        # labels in the data; 0 = unconditional
        self.num_classes = cfg["num_classes"]
        self.sigma_data = cfg["sigma_data"]
        self.hparams = dict(cfg["hparams"])
        self.image_size = tuple(cfg["input_size"])
        self.in_channels = cfg["in_channels"]
        # Sampling only: clamp every denoised estimate to [-1, 1]. The official samplers never clamp; only the
        # pixel-space demo preset turns it on (never for latents).
        self.clip_denoised = cfg["clip_denoised"]

        # Patchify: (B, H, W, C_in) -> (B, H/p, W/p, width_0), a ViT-style patch embedding.
        self.patch_in = TokenMerge(cfg["in_channels"], widths[0], cfg["patch_size"])
        # Fourier features of c_noise = log(sigma) / 4
        self.time_emb = FourierFeatures(1, mw)
        self.time_in_proj = nn.Linear(mw, mw, bias=False)
        # the 9 augmentation parameters (zeros when not augmenting)
        self.aug_emb = FourierFeatures(9, mw)
        self.aug_in_proj = nn.Linear(mw, mw, bias=False)
        # Row `num_classes` is the dropped / unconditional class used for classifier-free guidance.
        self.class_emb = nn.Embedding(self.num_classes + 1, mw) if self.num_classes else None
        self.mapping_cond_in_proj = (nn.Linear(cfg["mapping_cond_dim"], mw, bias=False)
                                     if cfg["mapping_cond_dim"] else None)
        # Noise level, augmentation and class embeddings are summed, then one shared mapping network (App. E.3).
        self.mapping = MappingNetwork(cfg["mapping_depth"], mw, cfg["mapping_d_ff"], cfg["mapping_dropout_rate"])

        # Every level but the last gets a down level and a mirrored up level at the same resolution (HDiT Sec. 4.1);
        # the last (coarsest) level is mid_level.
        self.down_levels, self.up_levels = nn.ModuleList(), nn.ModuleList()
        for i, (width, depth, d_ff, attn, drop) in enumerate(zip(widths, depths, d_ffs, attns, drops)):
            layer = functools.partial(TransformerLayer, width, d_ff, mw, attn, dropout=drop)
            if i < len(widths) - 1:
                self.down_levels.append(Level([layer(j) for j in range(depth)]))
                self.up_levels.append(Level([layer(j + depth) for j in range(depth)]))  # indices depth..2*depth-1
            else:
                self.mid_level = Level([layer(j) for j in range(depth)])
        # merges[i] / splits[i] link level i and i + 1: 2x2 merges, so each level has 1/4 of the tokens.
        self.merges = nn.ModuleList([TokenMerge(a, b) for a, b in zip(widths[:-1], widths[1:])])
        # splits[i] undoes merges[i]: width_{i+1} -> width_i on a 2x larger grid, lerp-merged with the skip.
        self.splits = nn.ModuleList([TokenSplit(b, a) for a, b in zip(widths[:-1], widths[1:])])
        # final norm: pre-norm blocks leave the residual stream unnormalised
        self.out_norm = RMSNorm(widths[0])
        # Unpatchify: (B, H/p, W/p, width_0) -> (B, H, W, out_channels).
        self.patch_out = TokenSplitWithoutSkip(widths[0], cfg["out_channels"], cfg["patch_size"])
        # the network starts at exactly 0: D = c_skip * x
        nn.init.zeros_(self.patch_out.proj.weight)

    # --- the network --------------------------------------------------------------------------------------

    def forward(self, x, sigma, aug_cond=None, class_cond=None, mapping_cond=None):
        """Raw network F: x (B, C, H, W) already scaled by c_in, sigma (B,) the RAW noise level."""
        x = x.movedim(-3, -1)  # (B, C, H, W) -> (B, H, W, C)
        x = self.patch_in(x)  # -> (B, H/p, W/p, width_0)
        # (h*w, 2) -> (h, w, 2): positions of the first level's token grid.
        pos = make_axial_pos(x.shape[-3], x.shape[-2], device=x.device).view(x.shape[-3], x.shape[-2], 2)

        # Mapping network input: noise level + augmentation + class (+ optional extra conditioning).
        if class_cond is None and self.class_emb is not None:
            raise ValueError("class_cond must be given for a class-conditional HDiT (num_classes > 0)")
        if mapping_cond is None and self.mapping_cond_in_proj is not None:
            raise ValueError("mapping_cond must be given when mapping_cond_dim > 0")
        # EDM Table 1: c_noise(sigma) = ln(sigma) / 4, computed inside the network as the official does.
        c_noise = torch.log(sigma) / 4
        cond = self.time_in_proj(self.time_emb(c_noise[..., None]))  # (B,) -> (B, 1) -> (B, mw)
        aug_cond = x.new_zeros([x.shape[0], 9]) if aug_cond is None else aug_cond
        cond = cond + self.aug_in_proj(self.aug_emb(aug_cond))  # (B, 9) -> (B, mw)
        if self.class_emb is not None:
            cond = cond + self.class_emb(class_cond)  # (B,) -> (B, mw)
        if self.mapping_cond_in_proj is not None:
            cond = cond + self.mapping_cond_in_proj(mapping_cond)  # (B, mapping_cond_dim) -> (B, mw)
        cond = self.mapping(cond)

        # Hourglass (HDiT Sec. 4.1, Fig. 3): down levels with merges, the middle level, up levels with lerp skips.
        skips, poses = [], []
        for down_level, merge in zip(self.down_levels, self.merges):
            x = down_level(x, pos, cond)
            # kept for the matching up level's lerp skip (TokenSplit), which also reuses this level's positions
            skips.append(x)
            poses.append(pos)
            x = merge(x)  # (B, h, w, C_i) -> (B, h/2, w/2, C_{i+1})
            pos = downscale_pos(pos)  # (h, w, 2) -> (h/2, w/2, 2)
        x = self.mid_level(x, pos, cond)
        for up_level, split, skip, pos in reversed(list(zip(self.up_levels, self.splits, skips, poses))):
            x = split(x, skip)  # (B, h/2, w/2, C_{i+1}) -> (B, h, w, C_i)
            x = up_level(x, pos, cond)

        x = self.patch_out(self.out_norm(x))  # (B, h, w, width_0) -> (B, H, W, C)
        return x.movedim(-1, -3)  # (B, H, W, C) -> (B, C, H, W)

    # --- EDM preconditioning (Karras et al. 2022, Table 1; official layers.Denoiser) -----------------------

    def get_scalings(self, sigma):
        """c_skip, c_out, c_in for (B,) sigma, in float32 or better."""
        # >= float32: sigma ** 2 reaches 1e6 at sigma_max 1e3, beyond float16 range (max 65504).
        sigma = sigma.to(torch.promote_types(sigma.dtype, torch.float32))
        sd2 = self.sigma_data ** 2
        # EDM Table 1, derived in EDM Sec. 5: c_in and c_out give F a unit-variance input and training target,
        # c_skip amplifies F's errors as little as possible.
        # -> 1 as sigma -> 0, -> 0 as sigma -> inf
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2) ** 0.5  # -> sigma_data as sigma -> inf
        # input std is sqrt(sigma^2 + sigma_data^2)
        c_in = 1 / (sigma ** 2 + sd2) ** 0.5
        return c_skip, c_out, c_in

    def denoise(self, x, sigma, **cond):
        """D(x, sigma) = c_skip x + c_out F(c_in x, sigma)."""
        c_skip, c_out, c_in = [c[:, None, None, None] for c in self.get_scalings(sigma)]  # (B,) -> (B,1,1,1)
        # EDM Eq. (7). F receives the raw sigma; forward computes c_noise from it.
        out = self(x * c_in, sigma, **cond)
        return out.to(c_out.dtype) * c_out + x * c_skip

    def loss_per_sample(self, x0, noise, sigma, **cond):
        """Official Denoiser.loss: weighted MSE between F and its target (B,) in float32."""
        c_skip, c_out, c_in = [c[:, None, None, None] for c in self.get_scalings(sigma)]  # each (B, 1, 1, 1)
        # Variance-exploding corruption of EDM: x = x0 + sigma * n, n ~ N(0, I).
        x_noisy = x0 + noise * sigma[:, None, None, None].to(x0.dtype)  # (B,) -> (B, 1, 1, 1)
        model_output = self(x_noisy * c_in, sigma, **cond).to(c_out.dtype)
        # EDM Eq. (8): F is regressed onto this effective training target.
        target = (x0 - c_skip * x_noisy) / c_out  # the F that makes D(x_noisy) = x0
        mse = ((model_output - target) ** 2).flatten(1).mean(1)  # (B, C, H, W) -> (B,)
        return mse * loss_weighting(sigma.to(mse.dtype), self.sigma_data, self.cfg["loss_weighting"])

    def sample_sigma(self, n, device, shard=(0, 1)):
        """Training noise levels of micro-batch part `shard` = (k, K) of the global batch (k-diffusion's
        make_sample_density under enable_stratified_accelerate): the config's sigma_sample_density at stratified
        uniforms from the global RNG."""
        density = self.cfg["sigma_sample_density"]
        u = stratified_uniform(n, *shard, device=device)
        if density["type"] == "cosine-interpolated":
            # the resolution d of simple diffusion's shift
            d = max(self.image_size)
            # The official widens the density's range to at least [1e-3, 1e3], whatever the sampling sigma range.
            return cosine_interpolated_sigma(u, density.get("image_d", d), density.get("noise_d_low", 32),
                                             density.get("noise_d_high", d), self.sigma_data,
                                             density.get("min_value", min(self.cfg["sigma_min"], 1e-3)),
                                             density.get("max_value", max(self.cfg["sigma_max"], 1e3)))
        # EDM Table 1's log-normal ln(sigma) ~ N(P_mean, P_std^2), by the inverse normal CDF of the stratified uniforms.
        loc, scale = density.get("mean", density.get("loc")), density.get("std", density.get("scale"))
        u = u * (1 - 2e-7) + 1e-7
        return (loc + scale * torch.erfinv(2 * u - 1) * math.sqrt(2)).exp()

    # --- the contract ---------------------------------------------------------------------------------------

    def optimizer_groups(self, phase=None):
        """One AdamW ("model") with the official 4 parameter groups (official param_groups): the mapping
        network and every AdaRMSNorm linear train at lr / 3; only `.weight`s of linears decay.
        Each dict carries `lr_scale` (lr = base lr * lr_scale) and `weight_decay` only where it is 0."""
        groups = {name: [] for name in ("wd", "no_wd", "mapping_wd", "mapping_no_wd")}
        for name, p in self.named_parameters():
            # every parameter lands in exactly one group
            groups[official_param_group(name)].append(p)
        scale = self.cfg["mapping_lr_scale"]
        return {"model": [{"params": groups["wd"], "lr_scale": 1.0},
                          {"params": groups["no_wd"], "lr_scale": 1.0, "weight_decay": 0.0},
                          {"params": groups["mapping_wd"], "lr_scale": scale},
                          {"params": groups["mapping_no_wd"], "lr_scale": scale, "weight_decay": 0.0}]}

    def loss(self, group, batch, step):
        """Diffusion loss for one micro-batch: label dropout for CFG, noise, sigma from the config's density.
        batch["shard"] = (k, K): this micro-batch is part k of the K parts of the global batch (ranks x
        gradient-accumulation steps); the noise-level strata are spread over the K parts. Absent: (0, 1)."""
        if group != "model":
            raise ValueError(f"HDiT has one optimizer group 'model', got {group!r}")
        x0 = batch["x"]
        if x0.dim() != 4 or tuple(x0.shape[1:]) != (self.in_channels, *self.image_size):
            raise ValueError(f"batch['x'] must be (B, {self.in_channels}, {self.image_size[0]}, "
                             f"{self.image_size[1]}), got {tuple(x0.shape)}")
        b = x0.shape[0]
        cond = {"aug_cond": batch.get("aug_cond")}
        if self.class_emb is not None:
            y = batch["y"]
            # Label dropout for CFG: dropped labels become the null row `num_classes` of class_emb.
            drop = torch.rand(b, device=x0.device) < self.cfg["cond_dropout_rate"]  # (B,) bool
            cond["class_cond"] = torch.where(drop, torch.full_like(y, self.num_classes), y)  # (B,)
        # Same RNG order as the official train.py: label dropout, noise, noise levels.
        noise = torch.randn_like(x0)
        sigma = self.sample_sigma(b, x0.device, tuple(int(v) for v in batch.get("shard", (0, 1))))
        # Targets in float32 whatever the data dtype, as the official Denoiser; the network itself may run in bf16.
        loss = self.loss_per_sample(x0.float(), noise.float(), sigma, **cond).mean()
        return loss, {"sigma_mean": sigma.mean().detach()}

    @torch.no_grad()
    def sample(self, n, labels=None, steps=None, cfg=1.0, sampler=None, generator=None, clip_denoised=None):
        """n samples (n, C, H, W) in the model's space. Karras schedule from the config's sigma_max to sigma_min.

        labels: (n,) int64 or None (random classes for a class-conditional model). cfg: guidance scale,
        1 = none, ignored by unconditional models. sampler: "euler", "dpmpp_2m", "dpmpp_2m_sde" (eta 0, heun:
        the official train.py's demo/FID sampler, the default), "dpmpp_3m_sde" (eta 1, the official default).
        clip_denoised: clamp each denoised estimate to [-1, 1] (None = the preset's setting, off but for "demo").
        Initial noise, random labels and SDE noise come from `generator` (None = global RNG), in that order.
        """
        sampler = sampler or self.cfg["sampler"]
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}")
        steps = steps or self.cfg["sample_steps"]
        clip_denoised = self.clip_denoised if clip_denoised is None else clip_denoised
        device = next(self.parameters()).device
        gen_device = generator.device if generator is not None else device
        sigmas = get_sigmas_karras(steps, self.cfg["sigma_min"], self.cfg["sigma_max"])
        shape = (n, self.in_channels, *self.image_size)
        # x ~ N(0, sigma_max^2 I), drawn on the generator's device so a CPU generator gives device-independent samples.
        x = torch.randn(shape, generator=generator, device=gen_device).to(device) * float(sigmas[0])
        extra = {}
        if self.class_emb is not None:
            if labels is None:
                labels = torch.randint(0, self.num_classes, (n,), generator=generator, device=gen_device)
            labels = labels.to(device)
            if labels.shape != (n,) or labels.min() < 0 or labels.max() >= self.num_classes:
                raise ValueError(f"labels must be (n,) in [0, {self.num_classes}), got {tuple(labels.shape)}")
            extra["class_cond"] = labels
        denoiser = self._cfg_denoiser(extra, cfg)
        if clip_denoised:
            unclipped = denoiser
            denoiser = lambda x, sigma: unclipped(x, sigma).clamp(-1, 1)  # noqa: E731
        kwargs = {}
        if sampler in ("dpmpp_2m_sde", "dpmpp_3m_sde"):
            kwargs = {"eta": 0.0, "solver_type": "heun"} if sampler == "dpmpp_2m_sde" else {"eta": 1.0}
            # i.i.d. noise per step from `generator` stands in for the official Brownian tree.
            kwargs["noise_sampler"] = lambda s, s_next: torch.randn(shape, generator=generator,
                                                                    device=gen_device).to(device)
        return SAMPLERS[sampler](denoiser, x, sigmas, **kwargs)

    def _cfg_denoiser(self, extra, cfg):
        """D(x, sigma) with classifier-free guidance as the official train.py: one batched call on
        [uncond; cond], then uncond + (cond - uncond) * cfg."""
        if "class_cond" not in extra or cfg == 1.0:
            return lambda x, sigma: self.denoise(x, sigma, **extra).float()
        labels = extra["class_cond"]
        # The null label is the dropped-class row that training saw with probability cond_dropout_rate.
        null = torch.full_like(labels, self.num_classes)

        def denoiser(x, sigma):
            # One batched forward on 2n samples: (n, C, H, W) -> (2n, C, H, W), null labels first.
            out = self.denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), class_cond=torch.cat([null, labels]))
            uncond, cond = out.float().chunk(2)  # (2n, ...) -> 2 x (n, ...)
            # cfg 1: plain conditional; cfg > 1 pushes away from uncond
            return uncond + (cond - uncond) * cfg

        return denoiser

    def set_grad_checkpointing(self, enabled=True):
        """Recompute each layer in backward (train.py --grad-checkpoint)."""
        for m in self.modules():
            if isinstance(m, TransformerLayer):
                m.grad_checkpointing = enabled


def official_param_group(name):
    """Which of the official 4 AdamW groups a parameter belongs to (official tag_param/apply_wd rules):
    'mapping' = inside `mapping` or an AdaRMSNorm linear; 'wd' = `.weight` of a Linear (not embeddings)."""
    # Matched by name prefix / suffix exactly as the official tagging, so the groups equal the official optimizer's.
    mapping = name.startswith("mapping.") or name.endswith("norm.linear.weight")
    no_wd = (name.endswith("scale") or name.endswith("fac") or name.startswith("time_in_proj")
             or name.startswith("aug_in_proj") or name.startswith("class_emb")
             or name.startswith("mapping_cond_in_proj"))
    return ("mapping_" if mapping else "") + ("no_wd" if no_wd else "wd")


# ----------------------------------------------------------------------------------------------------------
# Presets. Keys follow the official k-diffusion JSON "model" section; `num_classes` = labels in the DATA
# (the embedding gets num_classes + 1 rows), 0 = unconditional.
# ----------------------------------------------------------------------------------------------------------

def _na(k=7, d_head=64):
    return {"type": "neighborhood", "d_head": d_head, "kernel_size": k}


def _glob(d_head=64):
    return {"type": "global", "d_head": d_head}


def _swin(ws=8, d_head=64):
    return {"type": "shifted-window", "d_head": d_head, "window_size": ws}


# Official train.py / configs: AdamW lr 5e-4, betas (0.9, 0.95), eps 1e-8, constant lr, gradient norm clipped at
# 1.0 (train.py: accelerator.clip_grad_norm_(..., 1.)), EMA with the "inverse" warm-up decay
# min(0.9999, 1 - (1 + step) ** -ema_power), ema_power 0.6667 unless a config says otherwise (load_config default).
_HP = dict(lr=5e-4, betas=(0.9, 0.95), weight_decay=1e-4, ema_decay=0.9999, ema_power=0.6667, grad_clip=1.0,
           warmup_steps=0)

DEFAULTS = dict(
    in_channels=3, out_channels=None, input_size=(256, 256), patch_size=(4, 4), num_classes=0,
    mapping_width=256, mapping_depth=2, mapping_d_ff=None, mapping_cond_dim=0, mapping_dropout_rate=0.0,
    d_ffs=None, self_attns=None, dropout_rate=0.0, mapping_lr_scale=1 / 3,
    sigma_data=0.5, sigma_min=1e-2, sigma_max=160.0, loss_weighting="soft-min-snr",
    sigma_sample_density={"type": "cosine-interpolated"}, cond_dropout_rate=0.1,
    sampler="dpmpp_2m_sde", sample_steps=50, clip_denoised=False, hparams=_HP,
)

CONFIGS = {
    # HDiT Sec. 5.4 / Table 7, ImageNet-256 class-conditional (keys/hdit_imagenet256.txt): 557,416,522 params
    # (Table 7: 557M), 395 GFLOPs forward = 198 G multiply-adds (Table 7: 198 GFLOP/forward).
    "hdit_imagenet256": dict(widths=[384, 768, 1536], depths=[2, 2, 16], self_attns=[_na(), _na(), _glob()],
                             num_classes=1000, sigma_min=1e-3, sigma_max=1e3,
                             hparams={**_HP, "weight_decay": 1e-2, "batch_size": 256}),
    # HDiT Sec. 5.3 / Table 7, FFHQ-1024 unconditional (keys/hdit_ffhq1024.txt): 85,079,300 params (Table 7: 85M),
    # 412 GFLOPs forward = 206 G multiply-adds (Table 7: 206 GFLOP/forward). Global attention at 32x32 and 16x16
    # (Sec. 4.3, footnote 1).
    "hdit_ffhq1024": dict(input_size=(1024, 1024), widths=[128, 256, 384, 768, 1024], depths=[2] * 5,
                          self_attns=[_na(), _na(), _na(), _glob(), _glob()], dropout_rate=[0, 0, 0, 0, 0.1],
                          sigma_min=1e-3, sigma_max=1e3, hparams={**_HP, "weight_decay": 1e-2, "batch_size": 256}),
    # FFHQ-1024 without its two outermost levels: the same widths / attention per token grid at 256x256
    # (64x64 NA, 32x32 global, 16x16 global): Sec. 4.1's rule (innermost level 16x16 tokens) and Sec. 4.3,
    # footnote 1 (FFHQ: global attention at 32x32 and 16x16). No paper run; kept
    # for the README's FFHQ-256 command. 79,009,258 params, 163 GFLOPs forward.
    "hdit_ffhq256": dict(input_size=(256, 256), widths=[384, 768, 1024], depths=[2, 2, 2],
                         self_attns=[_na(), _glob(), _glob()], dropout_rate=[0, 0, 0.1], sigma_min=1e-3,
                         sigma_max=1e3, hparams={**_HP, "weight_decay": 1e-2, "batch_size": 256}),
    # Official configs/config_oxford_flowers.json (ema power 0.75; batch 32 as the k-diffusion README's command):
    # 22,361,274 params, 23.3 GFLOPs forward.
    "oxford_flowers": dict(widths=[128, 256, 512], depths=[2, 2, 4], self_attns=[_na(), _na(), _glob()],
                           dropout_rate=[0.0, 0.0, 0.1],
                           hparams={**_HP, "weight_decay": 1e-3, "ema_power": 0.75, "batch_size": 32}),
    # Official configs/config_oxford_flowers_shifted_window.json: 22,361,274 params, 23.5 GFLOPs.
    "oxford_flowers_shifted_window": dict(widths=[128, 256, 512], depths=[2, 2, 4],
                                          self_attns=[_swin(), _swin(), _glob()], dropout_rate=[0.0, 0.0, 0.1],
                                          hparams={**_HP, "weight_decay": 1e-3, "ema_power": 0.75, "batch_size": 32}),
    # Official configs/config_cifar10_transformer.json (ema power 0.6667; batch 64, train.py's default; its
    # augment_prob 0.12 is left out): 20,981,809 params, 3.9 GFLOPs forward.
    "cifar10_transformer": dict(input_size=(32, 32), patch_size=(2, 2), widths=[256, 512], depths=[2, 4],
                                self_attns=[_glob(), _glob()], dropout_rate=0.05, num_classes=10, sigma_max=80.0,
                                hparams={**_HP, "batch_size": 64}),
    # Official configs/config_mnist_transformer.json (one level: only mid_level; as CIFAR-10 above):
    # 9,187,360 params, 0.69 GFLOPs.
    "mnist_transformer": dict(in_channels=1, input_size=(28, 28), widths=[256], depths=[8],
                              self_attns=[_glob()], dropout_rate=0.05, num_classes=10, sigma_data=0.6162,
                              sigma_max=80.0, hparams={**_HP, "batch_size": 64}),
    # Tests / CI smoke runs: 2 levels (NA k3 then global), patch 2 so 8x8 latents still give a 4x4 NA grid.
    # 116,775 params at 3x32x32 with 4 classes, 0.02 GFLOPs forward.
    "tiny": dict(input_size=(32, 32), patch_size=(2, 2), widths=[32, 64], depths=[1, 1],
                 self_attns=[_na(3, 16), _glob(32)], mapping_width=32, mapping_depth=1, sigma_max=80.0,
                 sample_steps=20, hparams={**_HP, "lr": 1e-3, "batch_size": 8}),
    # CPU demo (`python train.py --model hdit --data shapes`): 32x32 pixels, patch 4 -> 8x8 tokens with NA k5,
    # then 4x4 global. 1,844,089 params (4 classes), 0.1 GFLOPs forward. EMA 0.995 (not 0.9999): a run of a few
    # thousand steps must not average in its first, blurry weights.
    # Pixel space, so its samples clamp each denoised estimate to [-1, 1] (clip_denoised, as dit.py's demo).
    "demo": dict(input_size=(32, 32), patch_size=(4, 4), widths=[96, 192], depths=[2, 2],
                 self_attns=[_na(5, 32), _glob(32)], mapping_width=96, mapping_depth=1, sigma_max=80.0,
                 sample_steps=30, clip_denoised=True,
                 hparams={**_HP, "lr": 1e-3, "ema_decay": 0.995, "batch_size": 32}),
}


def _resolve(config, overrides):
    """CONFIGS name / dict + overrides -> full constructor config (defaults filled the way load_config does)."""
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"unknown HDiT config {config!r}; choose from {sorted(CONFIGS)}")
        config = CONFIGS[config]
    elif isinstance(config, dict) and "levels" in config:
        config = config_from_official(config)
    cfg = {**DEFAULTS, **config}
    # Contract names -> ours: image_size (H = W), in_channels, num_classes (1 = unlabelled folder -> uncond).
    overrides = dict(overrides)
    if "image_size" in overrides:
        size = overrides.pop("image_size")
        cfg["input_size"] = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    if "num_classes" in overrides:
        overrides["num_classes"] = 0 if overrides["num_classes"] <= 1 else overrides["num_classes"]
    unknown = set(overrides) - set(cfg) - {"widths", "depths"}
    if unknown:
        raise ValueError(f"unknown HDiT option(s) {sorted(unknown)}")
    cfg.update(overrides)
    cfg["hparams"] = dict(cfg["hparams"])
    n = len(cfg["widths"])  # number of hourglass levels
    cfg["out_channels"] = cfg.get("out_channels") or cfg["in_channels"]
    cfg["patch_size"] = tuple(cfg["patch_size"]) if isinstance(cfg["patch_size"], (list, tuple)) \
        else (cfg["patch_size"],) * 2
    cfg["input_size"] = tuple(cfg["input_size"])
    # Official default d_ff = 3 * width, as HDiT Sec. 5.2 sets it for GEGLU (the up projection has 6 * width outputs).
    cfg["mapping_d_ff"] = cfg["mapping_d_ff"] or 3 * cfg["mapping_width"]
    cfg["d_ffs"] = cfg["d_ffs"] or [3 * w for w in cfg["widths"]]
    # Default: neighborhood attention on every level but the innermost, which is global (HDiT Sec. 4.3, footnote 1).
    cfg["self_attns"] = cfg["self_attns"] or [_na()] * (n - 1) + [_glob()]
    if not isinstance(cfg["dropout_rate"], (list, tuple)):
        cfg["dropout_rate"] = [cfg["dropout_rate"]] * n  # one rate per level
    _validate(cfg)
    return cfg


def _validate(cfg):
    """One-line ValueErrors for shapes the network cannot take."""
    n = len(cfg["widths"])
    for key in ("depths", "d_ffs", "self_attns", "dropout_rate"):
        if len(cfg[key]) != n:
            raise ValueError(f"HDiT config: {key} has {len(cfg[key])} entries for {n} levels")
    if cfg["loss_weighting"] not in LOSS_WEIGHTINGS:
        raise ValueError(f"unknown loss_weighting {cfg['loss_weighting']!r}; expected one of {LOSS_WEIGHTINGS}")
    density = dict(cfg["sigma_sample_density"])
    kind = density.pop("type", None)
    if kind not in DENSITY_KEYS:
        raise ValueError(f"sigma_sample_density type {kind!r} is not supported; hdit offers {sorted(DENSITY_KEYS)}")
    if set(density) - DENSITY_KEYS[kind]:
        raise ValueError(f"sigma_sample_density {kind}: unknown key(s) {sorted(set(density) - DENSITY_KEYS[kind])}; "
                         f"it takes {sorted(DENSITY_KEYS[kind])}")
    if kind == "lognormal" and not ({"mean", "loc"} & set(density) and {"std", "scale"} & set(density)):
        raise ValueError("sigma_sample_density lognormal needs mean (or loc) and std (or scale)")
    (H, W), (ph, pw) = cfg["input_size"], cfg["patch_size"]
    if H % ph or W % pw:
        raise ValueError(f"image size {H}x{W} is not divisible by the patch size {ph}x{pw}")
    h, w = H // ph, W // pw  # token grid after patching
    for i, (width, attn) in enumerate(zip(cfg["widths"], cfg["self_attns"])):
        if attn["type"] not in ("global", "neighborhood", "shifted-window", "none"):
            raise ValueError(f"level {i}: unknown attention type {attn['type']!r}")
        if attn["type"] != "none" and width % attn.get("d_head", 64):
            raise ValueError(f"level {i}: width {width} is not divisible by d_head {attn.get('d_head', 64)}")
        if attn["type"] == "neighborhood" and (h < attn.get("kernel_size", 7) or w < attn.get("kernel_size", 7)):
            raise ValueError(f"level {i}: neighborhood kernel {attn.get('kernel_size', 7)} does not fit the {h}x{w} "
                             f"token grid of a {H}x{W} input (use a larger image or a smaller kernel)")
        if attn["type"] == "shifted-window" and "window_size" not in attn:
            raise ValueError(f"level {i}: shifted-window attention needs a window_size")
        if attn["type"] == "shifted-window" and (h % attn["window_size"] or w % attn["window_size"]):
            raise ValueError(f"level {i}: window {attn['window_size']} does not tile the {h}x{w} token grid")
        if i < n - 1:
            if h % 2 or w % 2:
                raise ValueError(f"level {i}: token grid {h}x{w} of a {H}x{W} input cannot be merged 2x2")
            # each 2x2 merge halves the grid for the next level
            h, w = h // 2, w // 2


def create(config="tiny", **overrides):
    """Build an HDiT. config: a CONFIGS name, a dict in CONFIGS' format, or the official constructor kwargs
    (a keys file's first line). train.py's image_size / in_channels / num_classes map onto input_size,
    in_channels and num_classes (num_classes <= 1 means unconditional: no class embedding)."""
    return HDiT(_resolve(config, overrides))


# ----------------------------------------------------------------------------------------------------------
# Official checkpoints
# ----------------------------------------------------------------------------------------------------------

_ATTN_TYPES = {"GlobalAttentionSpec": "global", "NeighborhoodAttentionSpec": "neighborhood",
               "ShiftedWindowAttentionSpec": "shifted-window", "NoAttentionSpec": "none"}


def config_from_official(kwargs):
    """Official ImageTransformerDenoiserModelV2 kwargs (a keys file's JSON or a golden file's `config`)
    -> our config dict. The official num_classes is already data classes + 1."""
    levels, mapping = kwargs["levels"], kwargs["mapping"]
    attns = []
    for lv in levels:
        spec = dict(lv["self_attn"])
        attns.append({"type": _ATTN_TYPES[spec.pop("__class__")], **spec})
    js = kwargs.get("_k_diffusion_model_json") or kwargs.get("json_config") or {}
    den = kwargs.get("denoiser") or {}
    cfg = dict(widths=[lv["width"] for lv in levels], depths=[lv["depth"] for lv in levels],
               d_ffs=[lv["d_ff"] for lv in levels], self_attns=attns,
               dropout_rate=[lv.get("dropout", 0.0) for lv in levels],
               mapping_width=mapping["width"], mapping_depth=mapping["depth"], mapping_d_ff=mapping["d_ff"],
               mapping_dropout_rate=mapping.get("dropout", 0.0), in_channels=kwargs["in_channels"],
               out_channels=kwargs["out_channels"], patch_size=tuple(kwargs["patch_size"]),
               num_classes=max(kwargs.get("num_classes", 0) - 1, 0), mapping_cond_dim=kwargs.get("mapping_cond_dim", 0))
    for key in ("sigma_data", "sigma_min", "sigma_max", "loss_weighting", "sigma_sample_density"):
        if key in js:
            cfg[key] = js[key]
    if "input_size" in js:
        cfg["input_size"] = tuple(js["input_size"])
    # k-diffusion's load_config defaults: sigma_data 1.0, loss_weighting "karras".
    cfg["sigma_data"] = den.get("sigma_data", cfg.get("sigma_data", 1.0))
    cfg["loss_weighting"] = den.get("weighting", cfg.get("loss_weighting", "karras"))
    return cfg


# Copied from dcae.read_safetensors
def read_safetensors(path):
    """The released weights are `.safetensors` files; the format is simple enough to read without the
    safetensors package: an 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape,
    data_offsets: [begin, end]}} (offsets relative to the end of the header), then the raw little-endian bytes."""
    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
    data = bytearray(open(path, "rb").read())
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path} is not a safetensors file (unreadable header)") from None
    header.pop("__metadata__", None)
    sd = {}
    for name, info in header.items():
        if info["dtype"] not in dtypes:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        dtype, (begin, end) = dtypes[info["dtype"]], (8 + n + o for o in info["data_offsets"])
        flat = torch.frombuffer(data, dtype=dtype, offset=begin, count=(end - begin) // dtype.itemsize) \
            if end > begin else torch.empty(0, dtype=dtype)
        sd[name] = flat.reshape(info["shape"]).clone()
    return sd


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


def load_official(path_or_state_dict, config):
    """Load an official k-diffusion HDiT checkpoint strictly. Our module tree is the official one, so no key
    needs renaming."""
    if isinstance(path_or_state_dict, (str, os.PathLike)) and str(path_or_state_dict).endswith(".safetensors"):
        path_or_state_dict = read_safetensors(path_or_state_dict)  # {key: tensor}; torch files: read_checkpoint
    sd = read_checkpoint(path_or_state_dict)
    model = create(config)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
             if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        raise ValueError(f"checkpoint does not match HDiT config: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, wrong shape {wrong[:5]}")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, strict=True)
    return model
