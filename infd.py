"""INFD: Image Neural Field Diffusion Models.

Yinbo Chen, Oliver Wang, Richard Zhang, Eli Shechtman, Xiaolong Wang, Michael Gharbi.
"Image Neural Field Diffusion Models", CVPR 2024, arXiv:2406.07480.

Official code matched: github.com/yinboc/infd @ b79aafe6f597c2e4b74cb87fc0ef5d2719d01906
  models/infd.py, models/infd_base.py        -> INFD (encode_z / decode_z / loss / disc loss)
  models/vqgan/model.py, quantizer.py        -> Encoder, Decoder(give_pre_end), ResnetBlock, AttnBlock,
                                                 VectorQuantizer, SimpleRendererNet, FixresOriginalTail
  models/renderers/wrappers.py               -> CLIFRenderer (ConcatWrapper), FixresRenderer (FixresWrapper)
  models/vqgan/discriminator.py              -> NLayerDiscriminator (PatchGAN)
  utils/geometry.py                          -> make_coord_grid, make_coord_cell_grid, liif_query
                                                 (convert_liif_feat_coord_cell)
  datasets/wrapper_cae.py                    -> sample_patch (the multi-scale random-crop sampler)
  gen_samples.py:render_output_patchwise     -> INFD.render (tiled any-resolution rendering)
  trainers/infd_trainer.py + cfgs/*.yaml     -> hparams, disc_start, loss weights

Paper -> code map (the paper's method, named by its parts; section numbers are not cited here: not verified)
  Image neural field autoencoder: E (Encoder + 1x1 conv) maps the image, resampled to the FIXED encoder
      resolution, to the latent z; the VQ layer (VectorQuantizer) and D (1x1 conv + Decoder without its RGB tail)
      map z to the feature map phi; the renderer R maps (phi, query coordinates, cell) to RGB.
  Convolutional local image function (CLIF): each query pixel takes the nearest feature of phi (q_feat), its
      relative coordinate and its pixel size (cell), both in units of phi's half pixel (liif_query, as LIIF,
      arXiv 2012.09161); the whole query GRID goes through a small CNN (RendererNet), so neighbouring queries
      share information (LIIF decodes each query alone with an MLP).
  Training on crops of a randomly downsampled ground truth: the image LANCZOS-downsampled to a random size r in
      [P, min(size, 4P)], cropped to P x P (sample_patch); loss = L1 + LPIPS + adaptive-weight hinge GAN
      (+ VQ loss) on the rendered patch (INFD.loss).
  Latent diffusion on z (pre-quantisation): NOT in this file; train any diffusion file of the repository on our
      latents with `train.py --ae` (the official one is an openai UNet).
  High-resolution rendering (official gen_samples.py): the query grid in padded tiles (INFD.render).
Reading order: liif_query, RendererNet, CLIFRenderer, sample_patch, INFD.loss, INFD.render.

Deliberately left out: the diffusion UNet `z_dm` / `z_dm_ema` of the official dm checkpoints (load_official drops
them, see there), the unused options of the official code (z_gaussian KL latents, conditional dm, hrft loader,
downsampled L1/LPIPS, scale-conditioned discriminator, SimpleRendererNetLarger, LinearAttention, the renderer's
Fourier features). Differs: encode() resamples other sizes with antialiased bicubic (the official data pipeline uses
PIL LANCZOS); under DDP the official uses SyncBatchNorm in D and all-reduces the adaptive-weight gradients, here
each rank uses its own; a checkpoint without disc.* loads as loss=None; the tiny preset is ours.

Conventions (official): images in [-1, 1]; coordinates in [-1, 1] are pixel CENTRES, last dim (y, x) = (row, col);
`cell` is the full pixel size (2/H, 2/W). decode(z) renders at the encoder resolution; render(z, size) at any size.
"""
import copy
import os
import warnings
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image


# =============================================================================================================
# Building blocks of the encoder / decoder (the VQGAN / LDM autoencoder body)
# =============================================================================================================
# Copied from ae_kl.Normalize
def Normalize(in_channels):
    """GroupNorm with 32 groups and eps 1e-6: every channel count must be a multiple of 32."""
    return nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


# Copied from ae_kl.nonlinearity
def nonlinearity(x):
    """swish / SiLU, x * sigmoid(x) (the official writes it out; F.silu is the same function, fused)."""
    return F.silu(x)


# Copied from ae_kl.Upsample
class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv (the official resamp_with_conv=True path)."""

    def __init__(self, in_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(x)


# Copied from ae_kl.Downsample
class Downsample(nn.Module):
    """3x3 stride-2 conv after an ASYMMETRIC zero pad (right and bottom by 1), as the official code does.

    This is not `Conv2d(padding=1)`: the taps sit one pixel further down-right. Output size floor(n / 2).
    """

    def __init__(self, in_channels):
        super().__init__()
        # no padding inside the conv: the pad is done by hand in forward
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x):
        x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0)  # (B, C, H, W) -> (B, C, H+1, W+1)
        return self.conv(x)  # (B, C, H+1, W+1) -> (B, C, H//2, W//2)


# Copied from ae_kl.ResnetBlock
class ResnetBlock(nn.Module):
    """norm -> swish -> conv3x3 -> norm -> swish -> dropout -> conv3x3, plus a (1x1-projected) skip."""

    def __init__(self, in_channels, out_channels=None, dropout=0.0):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            # the official default conv_shortcut=False: a 1x1 "network in network" projection of the skip
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x):
        h = self.conv1(nonlinearity(self.norm1(x)))
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


# Copied from ae_kl.AttnBlock
class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, 1x1 convs for q, k, v and the output projection.

    The official computes softmax(q k^T * C^-0.5) v with bmm; F.scaled_dot_product_attention with one head
    of dimension C and its default scale C^-0.5 is the same function (flash / memory-efficient kernels).
    """

    def __init__(self, in_channels):
        super().__init__()
        self.norm = Normalize(in_channels)
        # 1x1 convs (not Linear) so that the state-dict keys and shapes are the official ones
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        B, C, H, W = q.shape
        # one head: (B, C, H, W) -> (B, 1, H*W, C) for each of q, k, v
        q, k, v = (t.reshape(B, 1, C, H * W).transpose(2, 3) for t in (q, k, v))
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), weights softmax(q k^T / sqrt(C))
        h = h.transpose(2, 3).reshape(B, C, H, W)  # (B, 1, HW, C) -> (B, C, H, W)
        return x + self.proj_out(h)


# Copied from ae_kl.make_attn
def make_attn(in_channels, attn_type="vanilla"):
    """"vanilla" -> AttnBlock; "none" -> Identity (no keys; VQ vq-f4-noattn). "linear" is not supported."""
    if attn_type == "vanilla":
        return AttnBlock(in_channels)
    if attn_type == "none":
        return nn.Identity()
    raise ValueError(f"attn_type must be 'vanilla' or 'none', got {attn_type!r}")


# Copied from ae_kl.Encoder
class Encoder(nn.Module):
    """E of LDM Sec. 3.1: x (B, in_channels, H, W) -> (B, 2*z_channels or z_channels, H/f, W/f), f = 2^(L-1).

    Level i has num_res_blocks ResnetBlocks (each followed by an AttnBlock when the level's nominal
    resolution `resolution // 2^i` is in attn_resolutions: the configured resolution decides, not the
    input size), then a Downsample except at the last level. Then the mid block (res, attn, res).
    """

    def __init__(self, *, ch, ch_mult, num_res_blocks, attn_resolutions, in_channels, resolution,
                 z_channels, double_z=True, dropout=0.0, attn_type="vanilla"):
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        curr_res = resolution
        in_ch_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(block_in, block_out, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type))
            down = nn.Module()  # a plain container, so that keys read down.<i>.block.<j>...
            down.block, down.attn = block, attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in)
                curr_res = curr_res // 2
            self.down.append(down)
        # middle: resnet, attention (always, unless attn_type "none"), resnet
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout=dropout)
        self.mid.attn_1 = make_attn(block_in, attn_type)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout=dropout)
        self.norm_out = Normalize(block_in)
        # double_z: mean and log-variance of the posterior (KL); z itself (VQ)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)  # (B, in_channels, H, W) -> (B, ch, H, W)
        for i_level, down in enumerate(self.down):
            for i_block in range(self.num_res_blocks):
                h = down.block[i_block](h)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)  # (B, C, h, w) -> (B, C, h/2, w/2)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(nonlinearity(self.norm_out(h)))


class Decoder(nn.Module):
    """VQGAN decoder with give_pre_end=True: conv_in -> mid -> levels from the lowest resolution up, each with
    num_res_blocks+1 ResnetBlocks (+ Upsample except at level 0). It stops BEFORE the RGB tail: the output is the
    feature map phi (B, ch*ch_mult[0], 4h, 4w) that the renderer reads. `up[i]` is level i (0 = highest
    resolution, run last), as in the official state dict."""
    # D (a VQGAN decoder body): unlike a VQGAN, it outputs a feature map phi, not RGB, so that the
    # renderer R can turn phi into pixels at any query resolution

    def __init__(self, ch, ch_mult, num_res_blocks, z_channels):
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        self.up = nn.ModuleList()
        # build from the coarsest level (i = L-1) to the finest; each level has one block MORE than the encoder's
        for i_level in reversed(range(len(ch_mult))):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, ch * ch_mult[i_level]))
                block_in = ch * ch_mult[i_level]
            level.attn = nn.ModuleList()
            # no Upsample at level 0: phi stays at R = h * 2^(L-1), the encoder input resolution
            if i_level != 0:
                level.upsample = Upsample(block_in)
            self.up.insert(0, level)  # prepend: up[i] is level i

    def forward(self, z):
        h = self.conv_in(z)  # (B, z_channels, h, w) -> (B, ch*ch_mult[-1], h, w)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        # coarse -> fine: up[-1] (lowest resolution) first, up[0] last
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)  # (B, C, h, w) -> (B, C, 2h, 2w)
        # phi (B, ch*ch_mult[0], h*f, w*f) at the encoder resolution: no norm_out / conv_out (give_pre_end)
        return h


class VectorQuantizer(nn.Module):
    """VQ layer before the decoder (taming `VectorQuantizer`, legacy=True): nearest codebook vector per position.
    loss = mean((sg(z_q) - z)^2) + beta * mean((z_q - sg(z))^2) -- the legacy version puts beta on the CODEBOOK term
    (a known taming bug, kept by the official code); straight-through z_q = z + sg(z_q - z)."""

    def __init__(self, n_embed, e_dim, beta=0.25):
        super().__init__()
        self.beta = beta
        # codebook (n_embed, e_dim): e_dim = z_channels (3), so z_q lives in the same space as z
        self.embedding = nn.Embedding(n_embed, e_dim)
        # taming's init: tiny uniform codes, so early nearest-neighbour assignments are near-random
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)

    def forward(self, z):
        B, C, H, W = z.shape
        z = z.permute(0, 2, 3, 1).contiguous()  # (B, C, H, W) -> (B, H, W, C)
        # (B, H, W, C) -> (B*H*W, C), order (b, y, x)
        z_flat = z.view(-1, C)
        e = self.embedding.weight
        # |z - e|^2 = |z|^2 + |e|^2 - 2 z.e, written as the official code (same argmin ties)
        d = z_flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z_flat @ e.t()  # (B*H*W, n_embed)
        indices = d.argmin(1)  # (B*H*W,)
        z_q = self.embedding(indices).view(z.shape)  # (B*H*W, C) -> (B, H, W, C)
        # VQ loss (legacy weighting, see the class docstring): commitment + beta * codebook
        loss = torch.mean((z_q.detach() - z) ** 2) + self.beta * torch.mean((z_q - z.detach()) ** 2)
        z_q = z + (z_q - z).detach()  # straight-through estimator
        return z_q.permute(0, 3, 1, 2).contiguous(), loss, indices  # (B, H, W, C) -> (B, C, H, W)


# =============================================================================================================
# Coordinates and the CLIF renderer
# =============================================================================================================
def make_coord_grid(shape, range=(-1, 1), device="cpu"):
    """Pixel-centre coordinates of a grid: (s_1, ..., s_k) -> (s_1, ..., s_k, k); coordinate i runs along tensor
    axis i (so [..., 0] is y / rows, [..., 1] is x / columns). `range` = (min, max) or one pair per axis."""
    axes = []
    for i, s in enumerate(shape):
        lo, hi = range[i] if isinstance(range[0], (list, tuple)) else range
        # pixel i covers [lo + i*(hi-lo)/s, lo + (i+1)*(hi-lo)/s]: its centre has the +0.5 offset
        axes.append(lo + (hi - lo) * ((0.5 + torch.arange(s, device=device)) / s))  # centres of s equal cells
    # indexing='ij' keeps axis order (row, col), the (y, x) convention: k x (s_1, ..., s_k) -> (s_1, ..., s_k, k)
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def make_coord_cell_grid(shape, range=(-1, 1), device="cpu", bs=None):
    """make_coord_grid plus `cell` = the full pixel size per axis ((max - min) / s_i); with `bs`, both are
    expanded to (bs, *shape, k)."""
    coord = make_coord_grid(shape, range, device)
    cell = torch.ones_like(coord)
    for i, s in enumerate(shape):
        lo, hi = range[i] if isinstance(range[0], (list, tuple)) else range
        # the cell is constant over the grid: one pixel's extent, e.g. 2/H for the default [-1, 1] range
        cell[..., i] *= (hi - lo) / s
    if bs is not None:
        coord = coord.unsqueeze(0).expand(bs, *coord.shape)  # (*shape, k) -> (bs, *shape, k)
        cell = cell.unsqueeze(0).expand(bs, *cell.shape)  # (*shape, k) -> (bs, *shape, k)
    return coord, cell


# The per-query inputs of CLIF; relative coordinate and cell are what let one phi be
# rendered at any resolution (the LIIF-style local query, as the official convert_liif_feat_coord_cell)
def liif_query(phi, coord, cell):
    """The CLIF inputs of each query point (official `convert_liif_feat_coord_cell`):
      q_feat    the NEAREST feature of phi (grid_sample 'nearest': rounds half to even at exact ties; a query
                outside [-1, 1] gets zeros);
      rel_coord (query - centre of that feature pixel) * (H, W): in units of HALF a feature pixel, in [-1, 1];
      rel_cell  cell * (H, W): 2 at native resolution, 1 at 2x, 0.5 at 4x.
    phi (B, C, H, W), coord / cell (B, ..., 2) -> (B, ..., C), (B, ..., 2), (B, ..., 2)."""
    B, _, H, W = phi.shape
    query_shape = coord.shape[1:-1]
    # coordinates stay in float32 (or wider) whatever phi's dtype, as in the official code: in bf16 a 1024-pixel
    # axis keeps only 642 distinct values and border queries round outside [-1, 1]
    dtype = torch.promote_types(torch.promote_types(phi.dtype, coord.dtype), torch.float32)
    # (B, ..., 2) -> (B, 1, N, 2): a 1 x N "image" of sample points
    coord, cell = coord.to(dtype).reshape(B, 1, -1, 2), cell.to(dtype).reshape(B, 1, -1, 2)
    # grid_sample wants (x, y) order, ours is (y, x): flip the last dim. 'nearest' copies values, so sampling
    # phi in `dtype` and casting back is exact
    q_feat = F.grid_sample(phi.to(dtype), coord.flip(-1), mode="nearest", align_corners=False).to(phi.dtype)
    # pixel centres of phi itself; sampling them with the same 'nearest' rule gives the centre of the chosen feature
    feat_coord = make_coord_grid((H, W), device=phi.device).to(dtype)  # (H, W, 2) pixel centres of phi
    feat_coord = feat_coord.permute(2, 0, 1).unsqueeze(0).expand(B, -1, -1, -1)  # (H, W, 2) -> (B, 2, H, W)
    q_coord = F.grid_sample(feat_coord, coord.flip(-1), mode="nearest", align_corners=False)  # (B, 2, 1, N)
    # multiply by (H, W): a feature pixel has width 2/H, so the offset becomes units of half a feature pixel
    scale = torch.tensor([H, W], dtype=coord.dtype, device=coord.device)
    rel_coord = (coord - q_coord.permute(0, 2, 3, 1)) * scale
    # rel_cell: query pixel size relative to a feature pixel (lets CLIF know the output scale)
    rel_cell = cell * scale  # (B, 1, N, 2)
    q_feat = q_feat.permute(0, 2, 3, 1).reshape(B, *query_shape, -1)  # (B, C, 1, N) -> (B, ..., C)
    # (B, 1, N, 2) -> (B, ..., 2): back to the query grid shape
    return q_feat, rel_coord.reshape(B, *query_shape, 2), rel_cell.reshape(B, *query_shape, 2)


# The "C" of CLIF: convolutions over the query grid share information between neighbouring
# queries, where LIIF decodes each query on its own with an MLP
class RendererNet(nn.Module):
    """The CLIF CNN (official `simple_renderer_net`, kernel_size 3): conv -> 2 ResnetBlocks -> GroupNorm, swish -> conv
    to RGB, on the query grid. No tanh / clamp. Receptive field: 6 stacked 3x3 convs = 13 x 13 queries (radius 6), plus
    the GroupNorm statistics, which are taken over the WHOLE rendered grid (see INFD.render)."""

    def __init__(self, in_channels, hidden_channels, normalize=True, out_channels=3):
        super().__init__()
        # first conv lifts C + 4 input channels to the hidden width; all convs are 3x3 on the QUERY grid, not on phi
        self.model = nn.ModuleList([nn.Conv2d(in_channels, hidden_channels, 3, padding=1),
                                    ResnetBlock(hidden_channels, hidden_channels),
                                    ResnetBlock(hidden_channels, hidden_channels)])
        self.norm_out = Normalize(hidden_channels)
        self.conv_out = nn.Conv2d(hidden_channels, out_channels, 3, padding=1)
        # official option normalize=False: every GroupNorm is an identity (no state-dict keys)
        if not normalize:
            for block in self.model[1:]:
                block.norm1, block.norm2 = nn.Identity(), nn.Identity()
            self.norm_out = nn.Identity()

    def forward(self, x):
        for layer in self.model:  # [conv_in, res, res], the official ModuleList: (B, C + 4, h, w) -> (B, hidden, h, w)
            x = layer(x)
        return self.conv_out(nonlinearity(self.norm_out(x)))  # (B, 3, h, w)


class CLIFRenderer(nn.Module):
    """Convolutional local image function (official `renderer_concat_wrapper`):
    rgb = CNN(cat[q_feat, rel_coord, rel_cell]) on the (B, h, w) query grid. Queries must form a 2-D grid.
    The official wrapper's Fourier-feature options (co_pe_dim / ce_pe_dim) are left out: no config uses them."""

    def __init__(self, z_dec_channels, hidden_channels, normalize=True):
        super().__init__()
        self.net = RendererNet(z_dec_channels + 4, hidden_channels, normalize)  # + (dy, dx) + (cell_y, cell_x)

    def forward(self, phi, coord, cell):
        if coord.dim() != 4 or coord.shape[-1] != 2 or cell.shape != coord.shape:
            raise ValueError(f"coord and cell must be query grids (B, h, w, 2), got {tuple(coord.shape)} and "
                             f"{tuple(cell.shape)}")
        # each query looks up phi independently; spatial context comes only from the CNN over the query grid
        q_feat, rel_coord, rel_cell = liif_query(phi, coord, cell)
        # (B, h, w, C + 2 + 2) -> (B, C + 4, h, w): channel order q_feat, rel_coord (dy, dx), rel_cell (cy, cx)
        layout = torch.cat([q_feat, rel_coord.to(q_feat.dtype), rel_cell.to(q_feat.dtype)], dim=-1).permute(0, 3, 1, 2)
        return self.net(layout)  # (B, 3, h, w)

    def last_layer_weight(self):
        # W for the adaptive GAN weight (INFD._adaptive_weight)
        return self.net.conv_out.weight


class OriginalTail(nn.Module):
    """Ablation `fixres_original_tail` (cfgs/models/ae-d4vq-oritail.yaml): the original VQGAN decoder tail."""

    def __init__(self, in_channels, out_channels=3):
        super().__init__()
        self.norm_out = Normalize(in_channels)
        self.conv_out = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    # no queries: the output grid IS phi's grid (R x R), so this renderer cannot change resolution
    def forward(self, x):
        return self.conv_out(nonlinearity(self.norm_out(x)))  # (B, C, R, R) -> (B, 3, R, R)


class FixresRenderer(nn.Module):
    """Official `renderer_fixres_wrapper`: ignores coord and cell, renders phi's own grid (phi resolution only)."""

    def __init__(self, z_dec_channels):
        super().__init__()
        self.net = OriginalTail(z_dec_channels)

    def forward(self, phi, coord=None, cell=None):
        return self.net(phi)  # (B, C, R, R) -> (B, 3, R, R): the output size is fixed by phi

    def last_layer_weight(self):
        # same role as CLIFRenderer.last_layer_weight (adaptive GAN weight)
        return self.net.conv_out.weight


# =============================================================================================================
# Training data: random-scale ground truth, fixed P x P crop, its coordinates and cell
# =============================================================================================================
def to_tensor(img):
    """PIL RGB -> (3, H, W) in [-1, 1], computed as torchvision ToTensor + Normalize(0.5, 0.5) (same bits)."""
    # (H, W, 3) uint8 -> (3, H, W) in [0, 1] -> [-1, 1], the image convention of the whole file
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    return (x - 0.5) / 0.5


# Supervising a fixed-size P x P crop at a random scale r keeps the memory per step constant while
# the renderer is trained on many output resolutions (and on mixed-resolution data)
def sample_patch(img, rng, resize_inp, resize_gt_lb, resize_gt_ub, final_crop_gt, p_whole=0.0, p_max=0.0):
    """Official BaseWrapperCAE.process on a square PIL image, with `rng` (random.Random) in place of the global
    `random` (same call sequence, so random.Random(s) reproduces random.seed(s)). Returns
      inp      the whole image LANCZOS-resized to resize_inp (the encoder input),
      gt       a final_crop_gt^2 crop of the image LANCZOS-resized to a random r x r (multi-scale GT),
      gt_coord its pixel centres in the [-1, 1] frame of the whole image, (P, P, 2),
      gt_cell  (2/r, 2/r) per query, (P, P, 2)."""
    if img.size[0] != img.size[1]:
        raise ValueError(f"sample_patch needs a square image, got {img.size[0]}x{img.size[1]}")
    size = img.size[0]
    # the encoder always sees the whole image at the fixed size resize_inp (the fixed encoder resolution)
    inp = to_tensor(img.resize((resize_inp, resize_inp), Image.LANCZOS))  # (3, resize_inp, resize_inp)
    # each branch draws from rng only when reached, mirroring the official short-circuit order
    # the whole image at the crop size (official draws this first)
    if rng.random() < p_whole:
        r = final_crop_gt
    elif rng.random() < p_max:  # the largest scale available
        r = min(size, resize_gt_ub)
    else:  # uniform integer scale, inclusive
        r = rng.randint(resize_gt_lb, min(size, resize_gt_ub))
    gt = to_tensor(img.resize((r, r), Image.LANCZOS))  # (3, r, r)
    p = final_crop_gt
    # randint is inclusive on both ends: r - p + 1 possible offsets per axis
    ii, jj = rng.randint(0, r - p), rng.randint(0, r - p)  # top-left corner (row, column)
    gt = gt[:, ii: ii + p, jj: jj + p]  # (3, r, r) -> (3, P, P)
    # range = the crop's extent as a fraction [ii/r, (ii+p)/r] of the image: every scale r shares one [-1, 1] frame
    # (P, P, 2) pixel centres of the crop, (y, x) order
    coord = 2 * make_coord_grid((p, p), range=[[ii / r, (ii + p) / r], [jj / r, (jj + p) / r]]) - 1  # [0,1] -> [-1,1]
    # one pixel of the r x r image spans 2/r in the [-1, 1] frame; the same for every query of the crop
    cell = torch.tensor([2 / r, 2 / r], dtype=torch.float32).view(1, 1, 2).expand(p, p, -1)  # (2,) -> (P, P, 2)
    return {"inp": inp, "gt": gt, "gt_coord": coord, "gt_cell": cell}


# =============================================================================================================
# The adversarial part of the loss: PatchGAN discriminator, LPIPS
# =============================================================================================================
# Copied from ae_kl.weights_init
def weights_init(m):
    """taming-transformers' init: conv weights ~ N(0, 0.02), biases kept; BatchNorm gamma ~ N(1, 0.02), beta 0."""
    classname = m.__class__.__name__
    if classname.find("Conv") != -1:
        nn.init.normal_(m.weight.data, 0.0, 0.02)
    elif classname.find("BatchNorm") != -1:
        nn.init.normal_(m.weight.data, 1.0, 0.02)
        nn.init.constant_(m.bias.data, 0)


# Copied from ae_kl.NLayerDiscriminator
class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator of pix2pix (Isola et al. 2017) as taming-transformers builds it: one logit per patch.

    main = [conv s2 (bias), lrelu] + (n_layers - 1) x [conv s2 (no bias), BN, lrelu]
           + [conv s1 (no bias), BN, lrelu] + [conv s1 -> 1 channel (bias)], kernel 4, padding 1.
    A 256 input gives 30x30 logits for n_layers 3.
    """

    def __init__(self, input_nc=3, ndf=64, n_layers=3):
        super().__init__()
        kw, padw = 4, 1
        sequence = [nn.Conv2d(input_nc, ndf, kernel_size=kw, stride=2, padding=padw), nn.LeakyReLU(0.2, True)]
        nf_mult = 1
        for n in range(1, n_layers):  # gradually increase the number of filters, halve the size each time
            nf_mult_prev, nf_mult = nf_mult, min(2 ** n, 8)
            sequence += [nn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kernel_size=kw, stride=2, padding=padw,
                                   bias=False),
                         nn.BatchNorm2d(ndf * nf_mult), nn.LeakyReLU(0.2, True)]
        nf_mult_prev, nf_mult = nf_mult, min(2 ** n_layers, 8)
        sequence += [nn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kernel_size=kw, stride=1, padding=padw,
                               bias=False),
                     nn.BatchNorm2d(ndf * nf_mult), nn.LeakyReLU(0.2, True)]
        sequence += [nn.Conv2d(ndf * nf_mult, 1, kernel_size=kw, stride=1, padding=padw)]  # patch logits
        self.main = nn.Sequential(*sequence)

    def forward(self, x):
        return self.main(x)  # (B, C, H, W) -> (B, 1, H', W')


# Copied from ae_kl.build_lpips
def build_lpips(pretrained=True):
    """Frozen LPIPS-VGG (Zhang et al. 2018) from the lpips package, in eval mode.

    pretrained=False: random VGG16 backbone (tests only: no download), drawn from a fixed seed without
    touching the global RNG, so every process builds the same network. pretrained=True needs the
    torchvision VGG16 file; when it cannot be downloaded this raises one clear error naming the file.
    """
    import lpips  # here, not at the top: the networks alone need neither lpips nor torchvision
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's "pretrained is deprecated" notices
        torch.manual_seed(0)
        try:
            net = lpips.LPIPS(net="vgg", pnet_rand=not pretrained, verbose=False)
        except Exception as e:  # any download failure (URLError, socket, HTTP, partial file...)
            if not pretrained:
                raise
            folder = f"{torch.hub.get_dir()}/checkpoints"
            raise FileNotFoundError(
                f"LPIPS needs the ImageNet VGG16 weights 'vgg16-397923af.pth' and could not download them "
                f"({type(e).__name__}: {e}). Put the file (https://download.pytorch.org/models/"
                f"vgg16-397923af.pth) into {folder}/ ($TORCH_HOME/hub/checkpoints/, TORCH_HOME defaults to "
                f"~/.cache/torch), or pass lpips_pretrained=False (random backbone: tests only).") from None
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


_LPIPS_CACHE = {}  # one frozen LPIPS per (pretrained, device) and process: building VGG16 takes seconds


# Copied from ae_kl.get_lpips
def get_lpips(pretrained, device):
    """The process-wide frozen LPIPS for `device` (frozen, so models can share it)."""
    key = (bool(pretrained), str(device))
    if key not in _LPIPS_CACHE:
        cpu = _LPIPS_CACHE.get((bool(pretrained), "cpu")) or build_lpips(pretrained)
        _LPIPS_CACHE[(bool(pretrained), "cpu")] = cpu
        _LPIPS_CACHE[key] = cpu if str(device) == "cpu" else copy.deepcopy(cpu).to(device)
    return _LPIPS_CACHE[key]


# =============================================================================================================
# The INFD autoencoder
# =============================================================================================================
class INFD(nn.Module):
    """Image neural field autoencoder. Submodule names = the official state-dict names (encoder.0 / encoder.1,
    quantizer, decoder.0 / decoder.1, renderer.net, disc.main), so load_official needs no renames.

    encode(x) -> z * scale_factor   (z = pre-quantisation latent, the diffusion space)
    decode(z) -> image at the encoder resolution; render(z, size) -> image at any size (tiled, official defaults)
    decode_z(z) -> phi (quantiser + decoder, official name); render_phi(phi, coord, cell) -> RGB at given queries."""

    def __init__(self, resolution=256, in_channels=3, ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, z_channels=3,
                 n_embed=8192, vq_beta=0.25, renderer="clif", renderer_hidden=256, renderer_normalize=True,
                 disc_ndf=64, disc_layers=3, l1_weight=1.0, perc_weight=1.0,
                 quant_weight=1.0, gan_weight=0.75, adaptive_gan_weight=True, disc_start=0, max_scale=4,
                 p_whole=0.0, p_max=0.0, patch_size=256, patch_padding=8, scale_factor=0.0, lpips_pretrained=True,
                 loss=True, hparams=None):
        super().__init__()
        if in_channels != 3:
            raise ValueError(f"INFD renders RGB images: in_channels must be 3, got {in_channels}")
        # f = total downsampling of the encoder: 2^(number of Downsample layers) = 2^(L-1); 4 for ae-d4vq
        f = 2 ** (len(ch_mult) - 1)
        if resolution % f:
            raise ValueError(f"image_size {resolution} is not divisible by the encoder's downsampling factor {f}")
        self.resolution, self.f, self.z_channels = resolution, f, z_channels
        self.loss_cfg = dict(l1=l1_weight, perc=perc_weight, quant=quant_weight, gan=gan_weight,
                             adaptive=adaptive_gan_weight, disc_start=disc_start)
        self.sampler_cfg = dict(max_scale=max_scale, p_whole=p_whole, p_max=p_max)
        # render tiling defaults (official gen_samples CLI: patch 256, padding 8), see render
        self.patch_size, self.patch_padding = patch_size, patch_padding
        self.hparams = dict(hparams or {})
        # E: image at the fixed encoder resolution -> z (B, z_channels, R/f, R/f); then an extra 1x1 conv (encoder.1)
        # (no attention inside the levels, only in the mid block; double_z=False: a plain VQ latent)
        self.encoder = nn.Sequential(Encoder(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=(),
                                             in_channels=in_channels, resolution=resolution, z_channels=z_channels,
                                             double_z=False),
                                     nn.Conv2d(z_channels, z_channels, 1))
        self.quantizer = VectorQuantizer(n_embed, z_channels, vq_beta)
        # D: 1x1 conv (decoder.0), then the VQGAN decoder without its tail -> phi (B, ch*ch_mult[0], R, R)
        self.decoder = nn.Sequential(nn.Conv2d(z_channels, z_channels, 1),
                                     Decoder(ch, ch_mult, num_res_blocks, z_channels))
        # phi has the width of the finest decoder level: 128 channels for ae-d4vq
        phi_channels = ch * ch_mult[0]
        if renderer == "clif":
            self.renderer = CLIFRenderer(phi_channels, renderer_hidden, renderer_normalize)
        elif renderer == "fixres":
            self.renderer = FixresRenderer(phi_channels)
        else:
            raise ValueError(f"unknown renderer {renderer!r} (choose 'clif' or 'fixres')")
        # PatchGAN D with taming's N(0, 0.02) init (the adversarial loss); loss=None: inference only, no D
        self.disc = None if loss is None else NLayerDiscriminator(in_channels, disc_ndf, disc_layers)
        if self.disc is not None:
            self.disc.apply(weights_init)
        # Latent scale for diffusion (contract): 0 = not measured yet (treated as 1 by encode / decode, with a warning)
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))
        self._scale_checked = False
        # LPIPS (get_lpips) is frozen and not a submodule: out of state_dict() (the official has it as perc_loss.*,
        # which load_official drops), built at the first loss() call, so rendering never needs the VGG16 download
        self.lpips_pretrained = lpips_pretrained

    # ---------------------------------------------------------------- autoencoder
    def encode_z(self, x):
        """Image in [-1, 1] at the encoder resolution -> z (pre-quantisation), official `encode_z`."""
        # (B, 3, R, R) -> (B, z_channels, R/f, R/f)
        return self.encoder(x)

    def decode_z(self, z):
        """z -> phi through the VQ layer and the decoder (official `decode_z`: the quantiser IS applied, also to
        diffusion samples, as gen_samples.py does)."""
        # same shape as z: (B, z_channels, R/f, R/f)
        z_q, _, _ = self.quantizer(z)
        # (B, z_channels, R/f, R/f) -> phi (B, ch*ch_mult[0], R, R)
        return self.decoder(z_q)

    def render_phi(self, phi, coord, cell):
        """Renderer R on explicit queries: phi (B, C, H, W), coord / cell (B, h, w, 2) -> (B, 3, h, w)."""
        return self.renderer(phi, coord, cell)

    def _scale(self):
        """scale_factor, or 1 while it is 0 ("not measured"); one host sync per model, for the warning."""
        if not self._scale_checked and not self.scale_factor.is_meta:
            self._scale_checked = True
            if float(self.scale_factor) == 0:
                warnings.warn("INFD scale_factor is not measured (0): encode/decode use 1 (train.py --ae measures it)")
        return torch.where(self.scale_factor == 0, torch.ones_like(self.scale_factor), self.scale_factor)

    def encode(self, x, sample=True):
        """Contract: x (B, 3, H, W) in [-1, 1] -> z * scale_factor, z (B, z_channels, R/f, R/f). The encoder works
        at its fixed resolution R: other sizes are resampled first (bicubic, antialiased; the official data
        pipeline uses PIL LANCZOS). Deterministic: `sample` is accepted, as by the other autoencoders, and ignored."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"encode expects images (B, 3, H, W), got {tuple(x.shape)}")
        if tuple(x.shape[-2:]) != (self.resolution, self.resolution):
            # the encoder is fully convolutional but trained only at R: resample to R rather than encoding another size
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic", align_corners=False,
                              antialias=True)
        # (B, 3, R, R) -> (B, z_channels, R/f, R/f)
        return self.encode_z(x) * self._scale()

    def decode(self, z):
        """Contract: z * scale_factor -> image (B, 3, R, R) at the encoder resolution (render(z, R))."""
        return self.render(z, self.resolution)

    @torch.no_grad()
    def render(self, z, size, patch_size=None, patch_padding=None):
        """Any-resolution rendering, exactly as the official gen_samples.render_output_patchwise:
        phi = decode_z(z / scale_factor); the size x size query grid (pixel centres over [-1, 1], cell 2/size)
        is cut into patch_size tiles (row-major; the last ones may be smaller), each rendered with up to
        `patch_padding` extra queries on every side (clamped at the image border), and only its centre is kept.
        Defaults = official CLI (256, 8); patch_size 0 -> one tile (whole image). Padding 8 > the CNN's
        receptive-field radius 6, so without normalisation tiles equal a whole render; the renderer's GroupNorm
        takes its statistics over each rendered window, so with it tiles differ slightly (test_tiling_*)."""
        if z.dim() != 4 or z.shape[1] != self.z_channels:
            raise ValueError(f"render expects latents (B, {self.z_channels}, h, w), got {tuple(z.shape)}")
        H, W = (size, size) if isinstance(size, int) else tuple(size)
        p = self.patch_size if patch_size is None else patch_size
        pad = self.patch_padding if patch_padding is None else patch_padding
        # undo encode's scaling before the VQ layer: the codebook lives in raw z space
        phi = self.decode_z(z / self._scale())  # (B, ch*ch_mult[0], R, R)
        B = phi.shape[0]
        # float32 queries even under bf16 autocast (liif_query keeps them so; the official never casts them)
        coord, cell = make_coord_cell_grid((H, W), device=phi.device, bs=B)  # (B, H, W, 2) each
        # why tiles: the CLIF CNN runs on the full query grid, so its activations grow with H*W (renders go far
        # above the encoder resolution); the padding gives border queries their convolutional context
        # patch_size 0 / None from the caller: one whole tile
        if not p or p <= 0:
            return self.render_phi(phi, coord, cell)  # CLIF: (B, 3, H, W)
        out = None
        # each tile (y0, x0) renders rows [y0 - pt, y0 + yl + pb) x cols [x0 - pl, x0 + xl + pr) of the global grid
        # official outer loop: rows ("x0" there)
        for y0 in range(0, H, p):
            yl = min(p, H - y0)
            # padding clamped at the image border
            pt, pb = min(pad, y0), min(pad, H - (y0 + yl))
            for x0 in range(0, W, p):
                xl = min(p, W - x0)
                pl, pr = min(pad, x0), min(pad, W - (x0 + xl))
                # slice the GLOBAL query grid: each tile keeps the whole-image coordinate frame
                # coord[win] / cell[win]: (B, H, W, 2) -> (B, yl+pt+pb, xl+pl+pr, 2)
                win = (slice(None), slice(y0 - pt, y0 + yl + pb), slice(x0 - pl, x0 + xl + pr))
                tile = self.render_phi(phi, coord[win].contiguous(), cell[win].contiguous())  # (B, 3, h+pads, w+pads)
                if out is None:
                    # allocated lazily to take the renderer's output channels and dtype
                    out = tile.new_zeros(B, tile.shape[1], H, W)  # (B, 3, H, W)
                # crop the padding: (B, 3, yl+pt+pb, xl+pl+pr) -> (B, 3, yl, xl)
                out[:, :, y0: y0 + yl, x0: x0 + xl] = tile[:, :, pt: pt + yl, pl: pl + xl]  # keep the centre
        return out

    # ---------------------------------------------------------------- training
    def data_transform(self, image_size):
        """Contract hook for train.py: f(PIL image, random.Random) -> {"x", "gt", "gt_coord", "gt_cell"}.
        Official ae_ffhq settings with P = image_size: x = the whole image LANCZOS-resized to P (the encoder input),
        gt = a P x P crop of the image resized to r ~ U{P .. min(size, max_scale * P)} (1024/256 = 4 officially).
        Non-square images are centre-cropped to a square first (official image_folder), never resized to one size:
        a folder may mix sizes, and larger images give larger scales."""
        cfg = self.sampler_cfg

        # data pipeline: encoder input at the fixed resolution P + a random-scale P x P ground-truth crop
        def transform(img, rng):
            w, h = img.size
            # the centre square keeps the scale 1:1 with the original pixels (no aspect distortion)
            s = min(w, h)
            if w != h:
                img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            # a small image: upsample to P (the scale range is then just r = P)
            if s < image_size:
                img, s = img.resize((image_size, image_size), Image.LANCZOS), image_size
            # r ~ U{P .. min(s, max_scale * P)}: resize_gt_lb = P, final crop = P
            d = sample_patch(img, rng, image_size, image_size, cfg["max_scale"] * image_size, image_size,
                             cfg["p_whole"], cfg["p_max"])
            return {"x": d["inp"], "gt": d["gt"], "gt_coord": d["gt_coord"], "gt_cell": d["gt_cell"]}
        return transform

    def optimizer_groups(self, phase=None):
        """{"ae": encoder + quantizer + decoder + renderer, "disc": discriminator} (official: one Adam each for
        encoder, decoder(+quantizer), renderer -- the same as one Adam -- and disc)."""
        if self.disc is None:
            raise ValueError("this INFD was built with loss=None (inference only): no losses, no optimizer groups")
        # the renderer is trained jointly with E and D: phi only has to be meaningful to R
        ae = [p for m in (self.encoder, self.quantizer, self.decoder, self.renderer) for p in m.parameters()]
        return {"ae": ae, "disc": list(self.disc.parameters())}

    def _targets(self, batch):
        """The ground-truth patch and its queries; without them (a batch from the default transform) the whole
        image x at its own resolution (official vis_ae_whole)."""
        x = batch["x"]
        if "gt" in batch:
            # patch training: gt and its coordinates come from sample_patch
            return batch["gt"], batch["gt_coord"], batch["gt_cell"]
        coord, cell = make_coord_cell_grid(x.shape[-2:], device=x.device, bs=x.shape[0])  # (B, H, W, 2) each
        return x, coord, cell

    def _adaptive_weight(self, nll, g_loss):
        """Taming / official: ||d nll/dW|| / (||d g/dW|| + 1e-4), clamped to [0, 1e4], W = renderer's last conv.
        (Official DDP averages both gradients over ranks first; here each rank uses its own.)"""
        w = self.renderer.last_layer_weight()
        # gradients of both terms w.r.t. the same weight, in float32 for a stable norm ratio
        nll_grad = torch.autograd.grad(nll, w, retain_graph=True)[0].float()
        g_grad = torch.autograd.grad(g_loss, w, retain_graph=True)[0].float()
        return torch.clamp(nll_grad.norm() / (g_grad.norm() + 1e-4), 0.0, 1e4).detach()

    def loss(self, group, batch, step):
        """One call per group per step (contract). "ae": quant + L1 + LPIPS + gan_weight * w_adapt * (-D(pred));
        "disc": hinge loss on gt vs a no-grad re-render (official INFD.forward modes 'loss' / 'disc_loss').
        The GAN terms start at step >= disc_start (official gan_start_after_iters = 0: from the first step)."""
        if self.disc is None:
            raise ValueError("this INFD was built with loss=None (inference only): no losses, no optimizer groups")
        x = batch["x"]
        gt, coord, cell = self._targets(batch)
        lc = self.loss_cfg
        use_gan = step >= lc["disc_start"]
        if group == "ae":
            z = self.encode_z(x)  # (B, z_channels, R/f, R/f)
            z_q, quant_loss, _ = self.quantizer(z)  # z_q same shape as z
            pred = self.render_phi(self.decoder(z_q), coord, cell)  # (B, 3, P, P)
            # losses in float32 even under mixed precision
            pred32, gt32 = pred.float(), gt.float()
            # pixel (L1) + perceptual (LPIPS) reconstruction terms on the rendered patch vs the gt crop
            l1 = (pred32 - gt32).abs().mean()
            perc = get_lpips(self.lpips_pretrained, x.device)(pred32, gt32).float().mean()  # (B, 1, 1, 1) -> scalar
            nll = lc["l1"] * l1 + lc["perc"] * perc
            loss = lc["quant"] * quant_loss.float() + nll
            # images are in [-1, 1]: halving maps the error to the [0, 1] scale for PSNR
            mse = ((gt32 - pred32.detach()) / 2).pow(2).mean(dim=(1, 2, 3))  # (B,)
            logs = {"l1": l1.detach(), "lpips": perc.detach(), "quant": quant_loss.detach().float(),
                    "psnr": (-10 * torch.log10(mse)).mean()}
            # adversarial term: the GAN loss on rendered patches pushes CLIF outputs to photorealistic detail
            if use_gan:
                # generator hinge term: raise D's logit on the rendered patch
                g_loss = -self.disc(pred).float().mean()  # (B, 1, h', w') logits -> scalar
                weight = torch.tensor(lc["gan"], device=x.device)
                if lc["adaptive"] and self.training and torch.is_grad_enabled():
                    # balance GAN vs reconstruction gradients at the renderer's last layer (taming VQGAN)
                    weight = weight * self._adaptive_weight(nll, g_loss)
                loss = loss + weight * g_loss
                logs.update(gan_g=g_loss.detach(), gan_weight=weight.detach())
            return loss, logs
        if group == "disc":
            # before disc_start: no discriminator forward (no BatchNorm update), zero gradients
            if not use_gan:
                # touch every disc parameter so DDP / the optimiser see gradients (all zero) for the group
                zero = sum(p.sum() for p in self.disc.parameters()) * 0.0
                return zero.float(), {"disc": zero.detach().float()}
            with torch.no_grad():
                # fake sample from the current AE without gradients: only D is updated in this group
                pred = self.render_phi(self.decode_z(self.encode_z(x)), coord, cell)  # (B, 3, P, P)
            logits_real, logits_fake = self.disc(gt).float(), self.disc(pred).float()  # (B, 1, h', w') each
            # D hinge loss: push real logits above +1 and fake logits below -1
            loss = (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean()) / 2  # hinge
            return loss, {"disc": loss.detach(), "logits_real": logits_real.detach().mean(),
                          "logits_fake": logits_fake.detach().mean()}
        raise ValueError(f"unknown loss group {group!r} (INFD has 'ae' and 'disc')")


# =============================================================================================================
# Presets, create, load_official
# =============================================================================================================
# Official training settings (cfgs/trainers/ae.yaml, ae_ffhq.yaml): Adam lr 3.6e-5, betas (0.5, 0.9), no weight
# decay, no gradient clipping (grad_clip 0: off), global batch 8 (BaseTrainer splits it over the GPUs),
# 1M iterations; no EMA for the autoencoder (decay 0 -> ema == weights). The tiny preset's lr 2e-4 is ours.
AE_HPARAMS = dict(lr=3.6e-5, betas=(0.5, 0.9), weight_decay=0.0, grad_clip=0.0, batch_size=8, ema_decay=0.0)

CONFIGS = {
    # cfgs/models/ae-d4vq.yaml: 60.76M params without LPIPS (official count 75.48M incl. 14.72M LPIPS);
    # encoder 22.34M, decoder 32.96M, renderer 2.67M, disc 2.77M. scale_factor 1: the official diffusion model
    # is trained on the raw pre-quantisation z.
    "ae-d4vq": dict(resolution=256, ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, z_channels=3, n_embed=8192,
                    renderer="clif", renderer_hidden=256, gan_weight=0.75, adaptive_gan_weight=True, scale_factor=1.0,
                    hparams=AE_HPARAMS),
    # cfgs/models/ae-d4vq-oritail.yaml (ablation: fixed-resolution VQGAN tail instead of CLIF): 58.09M params.
    "ae-d4vq-oritail": dict(resolution=256, ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, z_channels=3, n_embed=8192,
                            renderer="fixres", gan_weight=0.75, adaptive_gan_weight=True, scale_factor=1.0,
                            hparams=AE_HPARAMS),
    # The golden-file architecture (ch 32, ch_mult (2, 1, 1), 1 res block, 32 codes, renderer width 32) with a
    # smaller discriminator: 0.56M params (0.52M AE + 0.04M disc). Fast on CPU at 32x32.
    "tiny": dict(resolution=32, ch=32, ch_mult=(2, 1, 1), num_res_blocks=1, z_channels=3, n_embed=32,
                 renderer="clif", renderer_hidden=32, disc_ndf=16, disc_layers=2, gan_weight=0.75,
                 adaptive_gan_weight=True, scale_factor=0.0, hparams=dict(AE_HPARAMS, lr=2e-4, batch_size=8)),
}
# the AE inside cfgs/dm_ffhq.yaml (its UNet is not part of this file)
CONFIGS["dm_ffhq"] = dict(CONFIGS["ae-d4vq"])


def create(config="tiny", **overrides):
    """Contract: a CONFIGS name (or a dict of INFD arguments) + overrides. image_size -> the encoder resolution,
    in_channels must be 3, num_classes is ignored (unconditional autoencoder)."""
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"unknown INFD preset {config!r}; presets: {', '.join(CONFIGS)}")
        config = CONFIGS[config]
    kw = dict(config)
    overrides = dict(overrides)
    overrides.pop("num_classes", None)
    if "image_size" in overrides:
        overrides["resolution"] = overrides.pop("image_size")
    hp = dict(kw.get("hparams") or {}, **overrides.pop("hparams", {}))
    # train.py --set lr=... etc. land in hparams, not in the constructor
    for key in list(overrides):
        if key in ("lr", "betas", "weight_decay", "ema_decay", "warmup_steps", "grad_clip", "batch_size"):
            hp[key] = overrides.pop(key)
    kw.update(overrides, hparams=hp)
    return INFD(**kw)


# Official model arguments that are not architecture (ignored when building from an official spec).
VQF4 = dict(ch=128, ch_mult=[1, 2, 4], num_res_blocks=2, z_channels=3, resolution=256)  # encoder/decoder_vqf4 defaults
# official prefixes load_official drops (see there)
DROPPED = ("perc_loss.", "z_dm.", "z_dm_ema.")


def official_to_create(spec):
    """Official INFD constructor kwargs (first line of tests/golden/infd/keys/*.txt.gz, or `{'name', 'args'}`) -> our
    INFD arguments."""
    spec = spec.get("args", spec) if "encoder" not in spec else spec
    enc = dict(VQF4, **(spec["encoder"].get("args") or {}))
    dec = dict(VQF4, **(spec["decoder"].get("args") or {}))
    if {k: enc[k] for k in VQF4 if k != "resolution"} != {k: dec[k] for k in VQF4 if k != "resolution"}:
        raise ValueError("encoder and decoder specs differ; this file builds symmetric autoencoders only")
    if not spec.get("quantizer", False) or spec.get("z_gaussian", False):
        raise ValueError("only the VQ autoencoder (quantizer: true, z_gaussian: false) is implemented")
    r = spec["renderer"]
    kw = dict(resolution=enc["resolution"], ch=enc["ch"], ch_mult=tuple(enc["ch_mult"]),
              num_res_blocks=enc["num_res_blocks"], z_channels=enc["z_channels"], n_embed=spec["n_embed"],
              vq_beta=spec.get("vq_beta", 0.25), gan_weight=(spec.get("loss_cfg") or {}).get("gan_g_loss", 1.0),
              adaptive_gan_weight=spec.get("adaptive_gan_weight", False), scale_factor=1.0, hparams=AE_HPARAMS)
    if r["name"] == "renderer_concat_wrapper":
        net = r["args"]["net"].get("args", {})
        if net.get("kernel_size", 3) != 3 or any(r["args"].get(k) is not None for k in ("co_pe_dim", "ce_pe_dim")):
            raise ValueError("only kernel_size 3 renderers without Fourier features (co/ce_pe_dim) are implemented")
        kw.update(renderer="clif", renderer_hidden=net["hidden_channels"], renderer_normalize=net.get("normalize", True))
    elif r["name"] == "renderer_fixres_wrapper":
        kw.update(renderer="fixres")
    else:
        raise ValueError(f"unsupported official renderer {r['name']!r}")
    return kw


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


def load_official(path_or_state_dict, config="ae-d4vq", **overrides):
    """Official checkpoint (`{'model': {'sd': ...}}` as BaseTrainer saves it, or a bare state dict) -> INFD, strict.
    Rename table: none (our module names are the official ones), except
      perc_loss.*        dropped: LPIPS is rebuilt from the lpips package (same VGG-LPIPS weights), kept out of
                         our state dict;
      z_dm.*, z_dm_ema.* dropped: the diffusion UNet of dm checkpoints is not part of this file (train or load a
                         diffusion model separately; it runs on encode()'s latents with scale_factor 1);
      scale_factor       added (ours): 1.0, the official diffusion model works on the raw z.
    A checkpoint without disc.* gives a model built with loss=None (inference only).
    `config`: a CONFIGS name or the official constructor kwargs (keys/*.txt first line)."""
    sd = {k: v for k, v in read_checkpoint(path_or_state_dict).items() if not k.startswith(DROPPED)}
    kw = official_to_create(config) if isinstance(config, dict) else dict(CONFIGS[config])
    kw.update(overrides)
    if not any(k.startswith("disc.") for k in sd):
        kw["loss"] = None
    model = create(kw)
    sd.setdefault("scale_factor", torch.tensor(1.0))
    mine = model.state_dict()
    missing, unexpected = sorted(set(mine) - set(sd)), sorted(set(sd) - set(mine))
    if missing or unexpected:
        raise ValueError(f"official checkpoint does not fit INFD config: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    bad = [k for k in mine if tuple(mine[k].shape) != tuple(sd[k].shape)]
    if bad:
        raise ValueError(f"official checkpoint shapes differ from the config: {[(k, tuple(sd[k].shape)) for k in bad[:5]]}")
    model.load_state_dict(sd, strict=True)
    return model
