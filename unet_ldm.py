"""unet_ldm.py: the denoising UNet of Latent Diffusion Models, with its diffusion loss and samplers.

Paper: Robin Rombach, Andreas Blattmann, Dominik Lorenz, Patrick Esser, Bjoern Ommer,
"High-Resolution Image Synthesis with Latent Diffusion Models", CVPR 2022, arXiv:2112.10752.

Official code matched: CompVis/latent-diffusion@a506df5756472e2ebaf9078affdde2c4f1502cd4
  ldm/modules/diffusionmodules/openaimodel.py  UNetModel, ResBlock, AttentionBlock, QKVAttentionLegacy,
                                               Downsample, Upsample, TimestepEmbedSequential
  ldm/modules/attention.py                     SpatialTransformer, BasicTransformerBlock, CrossAttention,
                                               FeedForward, GEGLU
  ldm/modules/diffusionmodules/util.py         timestep_embedding, make_beta_schedule, make_ddim_timesteps,
                                               make_ddim_sampling_parameters, GroupNorm32
  ldm/models/diffusion/ddpm.py                 LatentDiffusion (register_schedule, q_sample, p_losses, p_sample)
  ldm/models/diffusion/ddim.py                 DDIMSampler (make_schedule, p_sample_ddim, sample)
  ldm/modules/encoders/modules.py              ClassEmbedder
  configs/latent-diffusion/*.yaml, scripts/    CONFIGS (sampling settings from sample_diffusion.py, txt2img.py
                                               and latent_imagenet_diffusion.ipynb)
Golden tensors of that code: tests/golden/unet_ldm/.

Map from the paper to this file
  Sec. 3.2, Eq. 1-2   L_LDM = E ||eps - eps_theta(z_t, t)||^2                     -> LatentDiffusion.p_losses
                      z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps (DDPM Eq. 4)  -> LatentDiffusion.q_sample
                      the time-conditional UNet eps_theta (App. E.2.1: ADM's)     -> UNetModel, ResBlock,
                                                                                   AttentionBlock, Down/Upsample
  Sec. 3.3            cross-attention softmax(Q K^T / sqrt(d)) V, Q from the UNet
                      features, K and V from tau_theta(y)                      -> CrossAttention, SpatialTransformer
                      tau_theta for classes: one embedding layer (App. E.2.1)     -> ClassEmbedder (cin256-v2)
  Sec. 3.3, Eq. 3     conditional objective E ||eps - eps_theta(z_t, t, tau_theta(y))||^2 -> p_losses with cond
  Sec. 4.3.1, App. D.4  classifier-free guidance e_uncond + s (e_cond - e_uncond) -> LatentDiffusion.guided_eps
                      (Ho & Salimans Sec. 3.2: (1 + w) e_cond - w e_uncond, i.e. s = 1 + w)
  (DDIM, Song et al.) DDIM sampling on a timestep sub-sequence, eta             -> ddim_schedule, ddim_step
  (DDPM, Ho et al.)   ancestral sampling                                        -> ddpm_sample
  App. E.1            hyper-parameters of the released models (Tab. 12-15)     -> CONFIGS
Suggested reading order: timestep_embedding, ResBlock, CrossAttention -> SpatialTransformer, UNetModel,
LatentDiffusion (register_schedule, q_sample, p_losses), make_ddim_timesteps -> ddim_step, CONFIGS.

Conditioning (the `conditioning` preset key)
  None     unconditional (celebahq, ffhq, lsun_churches): labels are ignored.
  "class"  cin256-v2: ClassEmbedder(label) -> context (B, 1, context_dim) -> cross-attention. The last
           embedding row is the null class used by classifier-free guidance (ImageNet: index 1000).
  "label"  the UNet's own `num_classes` path: label_emb(y) is added to the time embedding (no released
           LDM config uses it; kept because the official UNetModel has it and a golden case covers it).
  "text"   txt2img: a PRECOMPUTED text context tensor batch["context"] (B, L, context_dim), e.g. the
           BERTEmbedder output of the official txt2img model; no text encoder ships with this file.
           sample(..., context=(n, L, D), uc_context=(n, L, D) for cfg != 1).

Left out / differs from the official code
  * Left out (no released configuration uses them): use_new_attention_order (QKVAttention), n_embed /
    predict_codebook_ids, dims != 2, conv_resample=False, TransposedUpsample, num_heads_upsample != num_heads,
    use_fp16 (autocast instead), the concat / hybrid / adm conditioning keys, learn_logvar, x0 parameterisation,
    the PLMS sampler, the BERT text encoder and the autoencoder (ae_kl.py / ae_vq.py; train.py --ae composes them).
  * DDPM with steps < T: the official loop always runs all T steps; fewer steps respace the chain as IDDPM does.
  * DDIM draws its noise only when eta > 0 (the official sampler draws it every step and multiplies by 0):
    same result, a different global-RNG stream.
  * cin256-v2's ucg_rate 0.1: its training code is not released (see CONFIGS).
  * LatentDiffusion's own defaults for sampling (DDIM, 200 steps, eta 0) are txt2img.py's; the presets set
    their script's values; sample(cfg=1.0) by default (the repository's contract; the scripts guide with 3.0
    for cin256-v2 and 5.0 for txt2img). tiny and demo are not official presets.
  * load_official reads a released model.ckpt (a full Lightning checkpoint) with torch.load(weights_only=True):
    read_checkpoint admits Lightning's pickled callback classes as empty stand-ins (torch >= 2.6), so neither
    pickle nor pytorch_lightning is needed.
"""
import math
import os
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# =============================================================================================
# Building blocks of the time-conditional UNet (Sec. 3.2; App. E.2.1: the ADM UNet of Dhariwal & Nichol 2021)
# =============================================================================================
def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal embedding of the (integer or fractional) timestep t, as the official util.py computes it.

    Quirks kept on purpose (each changes the output): frequencies exp(-ln(P) i / half) for
    i < half (divided by `half`, not `half - 1`), the COSINE half first, an odd `dim` padded with one zero
    column, and everything in float32 whatever the model dtype."""
    half = dim // 2
    # Transformer sinusoid (Vaswani et al. 2017, Sec. 3.5); DDPM Sec. 4 gives t to the shared network this way
    # freqs (half,): geometric from 1 down towards 1/max_period
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]  # (B, 1) * (1, half) -> (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, half) x 2 -> (B, 2 * half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)  # (B, dim - 1) -> (B, dim)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (official util.GroupNorm32), so bf16/fp16 activations normalise stably."""

    def forward(self, x):
        # mean/variance over a group are reductions that lose precision (or overflow) in half precision;
        # the result is cast back so the rest of the block keeps running in the model's dtype
        return super().forward(x.float()).type(x.dtype)


def normalization(channels):
    """The official `normalization()`: ALWAYS 32 groups, eps 1e-5. With 32 channels every group is one channel,
    which is why a per-channel bias (the time embedding in a ResBlock without scale-shift) added right before
    such a norm is cancelled exactly: `tiny` keeps >= 64 channels where embeddings are added."""
    # DDPM Sec. 4: a U-Net with group normalisation throughout
    return GroupNorm32(32, channels)


def zero_module(module):
    """Zero-initialise the last layer of every residual branch (ADM), so each block starts as the identity."""
    # detach(): zero in place without recording an autograd op on a leaf parameter
    # why zero: the residual branch adds exactly 0 at init, so a deep UNet starts as a short, stable
    # identity path and each block learns its contribution from there (gradients still reach the zeroed layer)
    for p in module.parameters():
        p.detach().zero_()
    return module


class TimestepEmbedSequential(nn.Sequential):
    """nn.Sequential that hands the time embedding to ResBlocks and the context to SpatialTransformers."""

    def forward(self, x, emb, context=None):
        # one container for every block type, so UNetModel.forward can treat all blocks alike;
        # layers that need neither emb nor context (convs, Up/Downsample, AttentionBlock) get x only
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour x2, then (use_conv) a 3x3 conv. Key: `conv`."""

    def __init__(self, channels, use_conv, out_channels=None):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """3x3 conv with stride 2 (use_conv), else 2x2 average pooling. Key: `op`."""

    def __init__(self, channels, use_conv, out_channels=None):
        super().__init__()
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x):
        return self.op(x)  # (B, C, H, W) -> (B, C', H/2, W/2)


class ResBlock(nn.Module):
    """Residual block conditioned on the time(+label) embedding `emb`.

    h = conv(SiLU(GN(x)));  h = h + Linear(SiLU(emb))            (default), or
                            h = GN(h) * (1 + scale) + shift       (use_scale_shift_norm, lsun_churches);
    h = conv(dropout(SiLU(GN(h)))); out = skip(x) + h.  With up/down (resblock_updown) the input is resampled
    between the in_layers' norm+SiLU and their conv, and the skip path resamples x the same way."""

    def __init__(self, channels, emb_channels, dropout=0.0, out_channels=None, use_scale_shift_norm=False,
                 up=False, down=False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        # in_layers = [GN, SiLU, conv3x3]; forward() slices it to resample between SiLU and conv (resblock_updown)
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:  # parameter-free resampling (use_conv=False)
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        # scale-shift needs two vectors (scale, shift) per channel
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        # out_layers[0] is the GN that scale-shift modulates; the zeroed last conv makes the block start as skip(x)
        self.out_layers = nn.Sequential(normalization(out_channels), nn.SiLU(), nn.Dropout(p=dropout),
                                        zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        # the official 3x3 `use_conv` skip variant is unused by every config: 1x1 conv when channels change
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        if self.updown:
            h = self.in_layers[:-1](x)  # GN + SiLU at the input resolution
            h, x = self.h_upd(h), self.x_upd(x)  # (B, C, H, W) -> (B, C, 2H, 2W) or (B, C, H/2, W/2)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        # the time embedding is one vector per sample: project it to this block's width and broadcast it over H, W
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]  # (B, C') -> (B, C', 1, 1)
        # ADM FiLM: t modulates the normalised features; the default instead adds emb as a bias before the GN
        # ADM Sec. 3.1 AdaGN(h, y) = y_s GroupNorm(h) + y_b; (1 + scale) makes y_s = 1 when scale = 0
        if self.use_scale_shift_norm:
            # (B, 2C', 1, 1) -> 2 x (B, C', 1, 1)
            scale, shift = emb_out.chunk(2, dim=1)  # scale is the FIRST half (official order)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            # the bias enters BEFORE out_layers' GroupNorm (see normalization() on why it needs > 32 channels)
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h  # (B, C', H', W'); 1x1 conv on x when C != C'


class AttentionBlock(nn.Module):
    """Self-attention over all positions (unconditional configs; `use_spatial_transformer=False`).

    Official quirks kept: `qkv`/`proj_out` are Conv1d (weights (3C, C, 1)); QKVAttentionLegacy groups the 3C
    channels PER HEAD first ([head][q|k|v][d]); scaling (q d^-1/4)(k d^-1/4) = q k / sqrt(d), which is what
    scaled_dot_product_attention applies."""

    def __init__(self, channels, num_heads=1, num_head_channels=-1):
        super().__init__()
        # num_head_channels (celebahq/ffhq: 32) fixes the head width, so wider levels get more heads
        self.num_heads = num_heads if num_head_channels == -1 else channels // num_head_channels
        self.norm = normalization(channels)
        # q, k, v from one 1x1 Conv1d: weight (3C, C, 1), the official checkpoint layout
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x):
        b, c, *spatial = x.shape
        # flatten space so that attention sees all H*W positions as one sequence of length T
        x = x.reshape(b, c, -1)  # (B, C, H, W) -> (B, C, T)
        # pre-norm: GroupNorm on the input only, the residual below adds the un-normalised x
        qkv = self.qkv(self.norm(x))
        t, d = qkv.shape[-1], c // self.num_heads
        # legacy order [head][q|k|v][d]: reshape to (B*heads, 3d, T) BEFORE splitting into q, k, v
        q, k, v = qkv.reshape(b * self.num_heads, 3 * d, t).split(d, dim=1)  # (B, 3C, T) -> 3 x (B*heads, d, T)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B*heads, d, T) -> (B*heads, T, d)
        h = F.scaled_dot_product_attention(q, k, v)  # (B*heads, T, d), softmax(q k^T / sqrt(d)) v
        h = h.transpose(1, 2).reshape(b, c, t)  # (B*heads, T, d) -> (B, C, T)
        # residual around attention; proj_out is zero-initialised, so the block is the identity at init
        return (x + self.proj_out(h)).reshape(b, c, *spatial)  # (B, C, T) -> (B, C, H, W)


class CrossAttention(nn.Module):
    """Sec. 3.3: Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V, Q = W_Q phi(z_t), K = W_K tau(y), V = W_V tau(y).
    Without a context it is self-attention. to_q/k/v have no bias; to_out.0 has one (to_out.1 is Dropout)."""

    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64, dropout=0.0):
        super().__init__()
        inner_dim, context_dim = dim_head * heads, context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        # K and V are projected from context_dim to the same inner width as Q, so Q K^T is defined for any context
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x, context=None):
        # Q from the image tokens (B, N, query_dim), K and V from tau_theta(y) (B, L, context_dim)
        # why K, V from the context: each image position (query) picks which conditioning tokens to read,
        # so the condition can act differently at every location; the output keeps the query's shape (B, N, .)
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)  # (B, N, h*d), (B, L, h*d) x 2
        # split heads on the last dim as (h d): (B, N, h*d) -> (B, h, N, d)
        q, k, v = (z.unflatten(-1, (self.heads, -1)).transpose(1, 2) for z in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d), scale d^-1/2 as the official
        return self.to_out(out.transpose(1, 2).flatten(2))  # (B, h, N, d) -> (B, N, h*d) -> (B, N, query_dim)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): proj -> [value | gate] on the last dim, value * gelu(gate) (exact erf GELU)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)  # (B, N, 2 * dim_out) -> 2 x (B, N, dim_out); value FIRST
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP with GEGLU, width 4x (keys ff.net.0.proj, ff.net.2)."""

    def __init__(self, dim, mult=4, dropout=0.0):
        super().__init__()
        # GEGLU widens dim -> 2 x (4 dim) (value and gate), the Linear maps 4 dim back to dim
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention on the context (Sec. 3.3), GEGLU MLP.
    Attributes are registered in the official order (attn1, ff, attn2, norm1..3) so state_dict() order matches."""

    def __init__(self, dim, n_heads, d_head, context_dim=None, dropout=0.0):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head, dropout=dropout)  # self-attention
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context=None):
        # pre-norm residuals (LayerNorm before each sublayer): self-attn, cross-attn on tau_theta(y), MLP
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x  # no context -> self-attention again (official)
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Sec. 3.3: the cross-attention layer of the conditional UNet. Image features become H*W tokens,
    pass `depth` BasicTransformerBlocks, and return as a residual: x + proj_out(blocks(proj_in(GN(x)))).
    App. E.2.1, Tab. 16 draws it with LayerNorm and (self-attn, MLP, cross-attn); the code uses GN and
    (self-attn, cross-attn, MLP)."""

    def __init__(self, in_channels, n_heads, d_head, depth=1, dropout=0.0, context_dim=None):
        super().__init__()
        inner_dim = n_heads * d_head
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6)  # attention.Normalize: eps 1e-6, not GroupNorm32's 1e-5
        self.proj_in = nn.Conv2d(in_channels, inner_dim, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner_dim, n_heads, d_head, context_dim=context_dim, dropout=dropout) for _ in range(depth)])
        # zero-initialised: the SpatialTransformer starts as the identity on x
        self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, 1))

    def forward(self, x, context=None):
        b, c, h, w = x.shape
        x_in = x
        x = self.proj_in(self.norm(x))  # (B, C, H, W) -> (B, inner, H, W)
        # tokens for the transformer: every spatial position becomes one token of width inner_dim
        x = x.flatten(2).transpose(1, 2)  # (B, inner, H, W) -> (B, H*W, inner)
        # each block attends from the H*W image tokens to the L context tokens (L = 1 for cin256-v2)
        for block in self.transformer_blocks:
            x = block(x, context=context)
        # back to a feature map so the conv layers of the UNet can continue
        x = x.transpose(1, 2).reshape(b, -1, h, w)  # (B, H*W, inner) -> (B, inner, H, W)
        return self.proj_out(x) + x_in  # (B, inner, H, W) -> (B, C, H, W), then residual


# =============================================================================================
# The network eps_theta(z_t, t, y) (Sec. 3.2-3.3)
# =============================================================================================
class UNetModel(nn.Module):
    """The official openaimodel.UNetModel with the same constructor arguments and state_dict keys.

    Encoder levels (one per channel_mult entry) of num_res_blocks ResBlocks (+ attention where the current
    DOWNSAMPLING FACTOR ds is in attention_resolutions), a Downsample between levels; a middle ResBlock,
    attention, ResBlock; decoder levels of num_res_blocks + 1 ResBlocks, each eating one skip (concatenated
    AFTER h), with an Upsample closing every level but the first. Attention is the plain AttentionBlock, or with
    use_spatial_transformer the SpatialTransformer that cross-attends to `context` (Sec. 3.3)."""

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2, num_classes=None,
                 use_checkpoint=False, use_fp16=False, num_heads=-1, num_head_channels=-1, num_heads_upsample=-1,
                 use_scale_shift_norm=False, resblock_updown=False, use_new_attention_order=False,
                 use_spatial_transformer=False, transformer_depth=1, context_dim=None, n_embed=None, legacy=True):
        super().__init__()
        if dims != 2 or not conv_resample or use_new_attention_order or n_embed is not None:
            raise ValueError("unet_ldm: dims != 2, conv_resample=False, use_new_attention_order and n_embed are not supported")
        if num_heads_upsample not in (-1, num_heads):
            raise ValueError("unet_ldm: num_heads_upsample != num_heads is not supported")
        if use_spatial_transformer and context_dim is None:
            raise ValueError("unet_ldm: use_spatial_transformer needs context_dim (the width of the cross-attention context)")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("unet_ldm: set num_heads or num_head_channels")
        if channel_mult[0] != 1:
            raise ValueError(f"unet_ldm: channel_mult[0] must be 1 (the output conv reads model_channels), got {channel_mult}")
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.model_channels, self.num_classes, self.context_dim = model_channels, num_classes, context_dim
        self.channel_mult = tuple(channel_mult)
        self.use_checkpoint = use_checkpoint  # activation checkpointing while training (no numerical effect)
        # ADM: an MLP widens the model_channels sinusoid to 4 * model_channels, shared by every ResBlock
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, time_embed_dim), nn.SiLU(),
                                        nn.Linear(time_embed_dim, time_embed_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)  # added to the time embedding

        def attention(ch):
            """AttentionBlock or SpatialTransformer for `ch` channels, heads as the official code derives them."""
            # fixed num_heads (cin256: 1, txt2img: 8): head width grows with ch; else the head count grows
            if num_head_channels == -1:
                heads, dim_head = num_heads, ch // num_heads
            else:
                heads, dim_head = ch // num_head_channels, num_head_channels
            if use_spatial_transformer:
                return SpatialTransformer(ch, heads, dim_head, depth=transformer_depth, context_dim=context_dim)
            return AttentionBlock(ch, num_heads=heads)  # `legacy` changes nothing numerically here

        def resblock(ch, out, **kw):
            return ResBlock(ch, time_embed_dim, dropout, out_channels=out, use_scale_shift_norm=use_scale_shift_norm, **kw)

        # ---- encoder; input_blocks[0] is a bare 3x3 conv: z_t (B, in_channels, H, W) -> (B, model_channels, H, W)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        # input_block_chans: every block's output width (the decoder pops them as skips); ds: downsampling factor
        input_block_chans, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                # attention_resolutions are factors ds, not pixel sizes: [8, 4, 2] on a 64x64 latent = 8, 16, 32 px
                # ADM Sec. 3: attention at 32, 16 and 8 px, where DDPM Sec. 4 used 16x16 only
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                # (B, ch, H, W) -> (B, ch, H/2, W/2); resblock_updown: ADM Sec. 3's BigGAN residual blocks
                down = resblock(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, out_channels=ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                input_block_chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(resblock(ch, ch), attention(ch), resblock(ch, ch))
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            # num_res_blocks + 1: the extra block per level consumes the skip saved after each Downsample
            for i in range(num_res_blocks + 1):
                # input width = h's ch + the popped skip's channels (forward() concatenates them on dim 1)
                layers = [resblock(ch + input_block_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                # Upsample closes every level except level 0 (full resolution)
                if level and i == num_res_blocks:
                    layers.append(resblock(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        # zeroed output conv: eps_theta = 0 at init; it reads model_channels because channel_mult[0] == 1
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1)))

    def _run(self, block, h, emb, context):
        """One block, with activation checkpointing when training with use_checkpoint."""
        # recompute activations in backward (memory for compute); never active at eval or under no_grad
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)

    def forward(self, x, timesteps, context=None, y=None):
        """x (B, C, H, W), timesteps (B,) int or float, context (B, L, context_dim), y (B,) int64 -> eps (B, C, H, W)."""
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("unet_ldm: pass y (B,) labels if and only if the model was built with num_classes")
        # t -> sinusoid (B, model_channels) -> MLP (B, 4 model_channels): one embedding shared by every ResBlock
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)  # (B, 4 mc) + (B, 4 mc)
        # hs: every input block's output (B, C_i, H_i, W_i), consumed LIFO as U-Net skips
        hs, h = [], x
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            hs.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            # the skip concatenation: the decoder gets the encoder's features at the same resolution back, so fine
            # spatial detail lost by downsampling need not pass through the bottleneck; concatenated, not added, so the
            # next ResBlock learns how to mix the two (hence its input width ch + skip channels)
            h = torch.cat([h, hs.pop()], dim=1)  # (B, C, H, W) + (B, C_skip, H, W) -> (B, C + C_skip, H, W)
            h = self._run(block, h, emb, context)
        # eps has the input's shape: the network predicts the noise that was added to every element of z_t
        return self.out(h)  # (B, model_channels, H, W) -> (B, out_channels, H, W) = eps


class ClassEmbedder(nn.Module):
    """tau_theta for class labels (Sec. 3.3; App. E.2.1: a single learnable embedding layer), one token per image.
    label (B,) -> context (B, 1, embed_dim). The last row (ImageNet: 1000) is the null class for guidance."""

    def __init__(self, embed_dim, n_classes=1000):
        super().__init__()
        # n_classes includes the null row (cin256-v2: 1000 ImageNet classes + 1)
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def forward(self, labels):
        # the context tokens: a sequence of L vectors the UNet cross-attends to; for a class label L = 1
        return self.embedding(labels[:, None])  # (B,) -> (B, 1) -> (B, 1, embed_dim)


# =============================================================================================
# The diffusion model: schedule, loss (Sec. 3.2, Eq. 1-3), samplers (DDIM, DDPM), guidance
# =============================================================================================
def make_beta_schedule(linear_start, linear_end, timesteps=1000):
    """The LDM "linear" schedule: linear in sqrt(beta), i.e. beta_t = linspace(sqrt(b0), sqrt(b1), T)^2 (float64).
    (The official option literally named "sqrt_linear" is the plain linspace of betas: names are swapped.)"""
    # cin256 / faces: 0.0015 -> 0.0195; txt2img: 0.00085 -> 0.012 (DDPM Sec. 4: linear 1e-4 -> 0.02 in pixel space)
    # a small beta at t = 0 keeps the first steps close to the data; the end value makes abar_T small
    return torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2  # (T,) float64


def make_ddim_timesteps(num_ddim_steps, num_timesteps=1000, discretize="uniform"):
    """DDIM's timestep sub-sequence tau (DDIM Sec. 4.2), shifted by +1 like the official code (t = 0 is never used).
    "uniform" = the WHOLE list range(0, T, T // S) + 1: exactly S steps only when T // S divides T evenly enough
    (S = 20 -> 1, 51, ..., 951; S = 150 -> 167 steps, 1 .. 997); "quad" = int(linspace(0, sqrt(0.8 T), S)^2) + 1."""
    if not 1 <= num_ddim_steps <= num_timesteps:
        raise ValueError(f"unet_ldm: DDIM steps must be in 1..{num_timesteps}, got {num_ddim_steps}")
    if discretize == "quad":
        return (torch.linspace(0, math.sqrt(num_timesteps * 0.8), num_ddim_steps, dtype=torch.float64) ** 2).long() + 1
    if discretize != "uniform":
        raise ValueError(f"unet_ldm: DDIM discretize must be 'uniform' or 'quad', got {discretize!r}")
    # the list ends at T whenever the stride T // S divides T - 1: the official code then indexes abar[T] and fails
    works = lambda s: (num_timesteps - 1) % (num_timesteps // s) != 0  # noqa: E731
    if not works(num_ddim_steps):
        near = [max((s for s in range(1, num_ddim_steps) if works(s)), default=None),
                min((s for s in range(num_ddim_steps + 1, num_timesteps + 1) if works(s)), default=None)]
        raise ValueError(f"unet_ldm: {num_ddim_steps} uniform DDIM steps would reach t = {num_timesteps} (the official "
                         f"code fails there); nearest step counts that work: {[s for s in near if s]}")
    # why +1 (official: 'to get the final alpha values right'): unshifted, the smallest step would be t = 0 with
    # abar_prev = abar_0 = abar_t, a step that leaves x unchanged; shifted, the last step goes from t = 1 to abar_0
    return torch.arange(0, num_timesteps, num_timesteps // num_ddim_steps) + 1  # (S',) int64, ascending


def ddpm_timesteps(steps, num_timesteps=1000):
    """The kept steps of an ancestral chain, ascending. steps = T is the official LDM loop (every t); fewer steps
    respace the chain as IDDPM's respace.space_timesteps(T, [steps]) does (float stride, Python's round)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"unet_ldm: DDPM steps must be in 1..{num_timesteps}, got {steps}")
    stride, idx, kept = (num_timesteps - 1) / max(steps - 1, 1), 0.0, []
    for _ in range(steps):
        kept.append(round(idx))
        idx += stride
    return torch.tensor(kept)


def _randn(shape, generator, device):
    """Gaussian noise from `generator` (on its own device) or the global RNG, moved to `device`."""
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


# The sampler names LatentDiffusion.sample takes (sample.py --help lists them).
SAMPLERS = ("ddim", "ddpm")


class LatentDiffusion(nn.Module):
    """eps_theta plus everything around it: the schedule, q_sample, L_simple, conditioning, DDIM/DDPM sampling.
    The contract of this repository (README "Model file contract") is implemented at the end of the class."""

    def __init__(self, unet, conditioning=None, n_classes=None, cond_stage_trainable=True, ucg_rate=0.0,
                 linear_start=0.0015, linear_end=0.0195, timesteps=1000, loss_type="l2", l_simple_weight=1.0,
                 original_elbo_weight=0.0, logvar_init=0.0, clip_denoised=False, sample_steps=200, sample_eta=0.0,
                 sampler="ddim", hparams=None):
        super().__init__()
        if conditioning not in (None, "class", "label", "text"):
            raise ValueError(f"unet_ldm: conditioning must be None, 'class', 'label' or 'text', got {conditioning!r}")
        if loss_type not in ("l2", "l1"):
            raise ValueError(f"unet_ldm: loss_type must be 'l2' or 'l1', got {loss_type!r}")
        self.unet = unet
        self.conditioning, self.ucg_rate, self.loss_type = conditioning, ucg_rate, loss_type
        self.l_simple_weight, self.original_elbo_weight = l_simple_weight, original_elbo_weight
        self.clip_denoised, self.sample_steps, self.sample_eta, self.sampler = clip_denoised, sample_steps, sample_eta, sampler
        self.hparams = dict(hparams or {})
        self.cond_stage_trainable = cond_stage_trainable
        if conditioning == "class":  # cin256-v2: ClassEmbedder -> cross-attention context
            self.cond_stage_model = ClassEmbedder(unet.context_dim, n_classes)
            # cin256-v2 trains the embedding table jointly with the UNet (cond_stage_trainable=True)
            self.cond_stage_model.requires_grad_(cond_stage_trainable)
            self.null_class = n_classes - 1
        elif conditioning == "label":  # the UNet's label_emb
            self.null_class = unet.num_classes - 1
        self.num_timesteps, self.linear_start, self.linear_end = timesteps, linear_start, linear_end
        self.logvar_init = logvar_init
        self.register_schedule()

    # ---------------------------------------------------------------- schedule (DDPM.register_schedule)
    def register_schedule(self, device=None):
        """All official schedule buffers: computed in float64, stored as float32 (non-persistent: rebuilt from
        linear_start / linear_end, so checkpoints hold only weights)."""
        betas = make_beta_schedule(self.linear_start, self.linear_end, self.num_timesteps)
        # DDPM notation: alpha_t = 1 - beta_t, abar_t = prod_{s<=t} alpha_s (Ho et al. Sec. 2)
        alphas = 1.0 - betas
        # abar_t is what q_sample and both samplers use: the signal fraction left after t noising steps
        ac = torch.cumprod(alphas, dim=0)  # abar_t
        # abar_{t-1} with abar_{-1} = 1, for the posterior q(x_{t-1} | x_t, x_0) (DDPM Eq. 6-7)
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])  # (1,) + (T-1,) -> (T,)
        posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)  # beta tilde (v_posterior = 0)
        bufs = dict(
            betas=betas, alphas_cumprod=ac, alphas_cumprod_prev=ac_prev, sqrt_alphas_cumprod=ac.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1.0 - ac).sqrt(), log_one_minus_alphas_cumprod=(1.0 - ac).log(),
            # x0 = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps inverts DDPM Eq. 4 (used by ddpm_sample)
            sqrt_recip_alphas_cumprod=(1.0 / ac).sqrt(), sqrt_recipm1_alphas_cumprod=(1.0 / ac - 1).sqrt(),
            posterior_variance=posterior_variance,
            # log of beta tilde, clamped because beta tilde_0 = 0 (abar_{-1} = 1)
            posterior_log_variance_clipped=posterior_variance.clamp(min=1e-20).log(),
            # posterior mean mu_tilde = coef1 x_0 + coef2 x_t (DDPM Eq. 7)
            posterior_mean_coef1=betas * ac_prev.sqrt() / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac))
        for name, value in bufs.items():
            self.register_buffer(name, value.float().to(device), persistent=False)
        # VLB weights of L_simple (eps parameterisation), computed from the float32 buffers like the official code
        # lvlb_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t)), DDPM Eq. 12's weight; unused while elbo weight is 0
        lvlb = self.betas ** 2 / (2 * self.posterior_variance * alphas.float().to(device) * (1 - self.alphas_cumprod))
        lvlb[0] = lvlb[1]  # posterior_variance[0] = 0
        self.register_buffer("lvlb_weights", lvlb, persistent=False)
        # logvar_t of the loss: a plain constant tensor in the official code (learn_logvar=False); a
        # non-persistent buffer here so that it follows the model's device and stays out of checkpoints
        self.register_buffer("logvar", torch.full((self.num_timesteps,), float(self.logvar_init), device=device),
                             persistent=False)

    # ---------------------------------------------------------------- conditioning (Sec. 3.3)
    def get_learned_conditioning(self, labels=None, context=None):
        """tau_theta(y): class -> ClassEmbedder tokens (B, 1, D); label -> the labels; text -> the given
        context (B, L, context_dim); unconditional -> None."""
        # cin256-v2: (B,) -> (B, 1, 512), one context token per image
        if self.conditioning == "class":
            return self.cond_stage_model(labels)
        if self.conditioning == "label":
            # raw ints: the UNet adds label_emb(y) to the time embedding instead of cross-attending
            return labels
        if self.conditioning == "text":
            if context is None or context.dim() != 3 or context.shape[-1] != self.unet.context_dim:
                got = None if context is None else tuple(context.shape)
                raise ValueError(f"unet_ldm: text conditioning needs context (B, L, {self.unet.context_dim}), got {got}")
            return context
        return None

    def apply_model(self, x_noisy, t, cond):
        """eps_theta(z_t, t, cond): cond goes to cross-attention (class/text) or to label_emb (label)."""
        if self.conditioning in ("class", "text"):
            return self.unet(x_noisy, t, context=cond)
        if self.conditioning == "label":
            return self.unet(x_noisy, t, y=cond)
        return self.unet(x_noisy, t)

    # ---------------------------------------------------------------- loss (Sec. 3.2, Eq. 1-2)
    def q_sample(self, x_start, t, noise):
        """z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps (float32 coefficients)."""
        # per-sample coefficients (B,) broadcast to (B, 1, 1, 1) over C, H, W
        # DDPM Eq. 4: q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), reparameterised with eps
        return (self.sqrt_alphas_cumprod[t][:, None, None, None] * x_start
                + self.sqrt_one_minus_alphas_cumprod[t][:, None, None, None] * noise)

    def p_losses(self, x_start, cond, t, noise):
        """The official LatentDiffusion.p_losses for eps prediction, in float32:
        loss = l_simple_weight * mean_b(L_simple / exp(logvar_t) + logvar_t) + elbo_weight * mean_b(lvlb_t L_simple),
        L_simple = mean_{C,H,W} (eps - eps_theta)^2 (|.| for loss_type l1). Released configs: weights 1 and 0,
        logvar = 0, so loss = mean L_simple (Eq. 2)."""
        # Eq. 1-2: noise z_0 to a random t, then regress the added noise eps
        x_noisy = self.q_sample(x_start, t, noise)
        model_output = self.apply_model(x_noisy, t, cond).float()
        err = model_output - noise.float()
        # DDPM Eq. 14 (L_simple): Eq. 12 without its per-t weight; LDM Eq. 2 is the same loss on latents z
        loss_simple = (err.abs() if self.loss_type == "l1" else err ** 2).mean(dim=(1, 2, 3))
        logvar_t = self.logvar[t]
        loss = self.l_simple_weight * (loss_simple / torch.exp(logvar_t) + logvar_t).mean()
        # VLB term: the same per-sample error reweighted per t (DDPM Eq. 12); weight 0 in the released configs
        loss_vlb = (self.lvlb_weights[t] * loss_simple).mean()
        loss = loss + self.original_elbo_weight * loss_vlb
        logs = {"loss_simple": loss_simple.mean().detach(), "loss_vlb": loss_vlb.detach(), "loss": loss.detach()}
        return loss, logs

    # ---------------------------------------------------------------- guidance and samplers
    def guided_eps(self, x, t, cond, uncond, scale):
        """Classifier-free guidance with ONE model call on [uncond; cond] (official order):
        e = e_uncond + s (e_cond - e_uncond)."""
        # doubling the batch runs the conditional and unconditional predictions in one forward pass
        x_in, t_in = torch.cat([x, x]), torch.cat([t, t])  # (B, ...) -> (2B, ...)
        # uncond first, as the official DDIMSampler concatenates [unconditional_conditioning, c]
        c_in = torch.cat([uncond, cond])  # (B, L, D) x 2 -> (2B, L, D); labels (B,) -> (2B,)
        e_uncond, e_cond = self.apply_model(x_in, t_in, c_in).chunk(2)  # (2B, C, H, W) -> 2 x (B, C, H, W)
        # s > 1 extrapolates away from the unconditional prediction (Ho & Salimans Sec. 3.2, with s = 1 + w)
        # what cfg mixes: the two noise predictions of the same x_t; scale 1 gives e_cond, 0 gives e_uncond
        return e_uncond + scale * (e_cond - e_uncond)

    def eps(self, x, t, cond, uncond=None, scale=1.0):
        """eps_theta, guided when an unconditional input is given and scale != 1 (else one plain call)."""
        if uncond is None or scale == 1.0:
            return self.apply_model(x, t, cond)
        return self.guided_eps(x, t, cond, uncond, scale)

    def ddim_schedule(self, steps, eta):
        """DDIMSampler.make_schedule: timesteps and per-step alpha, alpha_prev, sigma (float32 results;
        sigma computed in float64 from the float32 alphas, as the official numpy/torch mix does)."""
        ts = make_ddim_timesteps(steps, self.num_timesteps).to(self.alphas_cumprod.device)
        ac = self.alphas_cumprod
        # DDIM only needs abar at the kept steps: it jumps from one kept timestep to the previous one
        alphas = ac[ts]  # (S,) abar at the kept steps
        # (1,) + (S-1,) -> (S,): abar of the previous kept step
        alphas_prev = torch.cat([ac[:1], ac[ts[:-1]]])  # the last step uses abar_0 = 0.9985, not 1
        # eta = 0: deterministic DDIM; eta = 1: DDPM-like posterior noise on the sub-sequence
        a, ap = alphas.double(), alphas_prev.double()
        sigmas = eta * ((1 - ap) / (1 - a) * (1 - a / ap)).sqrt()  # DDIM Eq. 16
        return dict(timesteps=ts, alphas=alphas, alphas_prev=alphas_prev, sigmas=sigmas.float(),
                    sqrt_one_minus_alphas=(1.0 - alphas).sqrt())

    def ddim_step(self, x, cond, uncond, index, sched, scale=1.0, noise=None):
        """DDIMSampler.p_sample_ddim (DDIM Eq. 12) at position `index` of the schedule -> (x_prev, pred_x0)."""
        b = x.shape[0]
        t = sched["timesteps"][index].expand(b)  # the DDPM timestep the UNet sees, (B,) int64
        e_t = self.eps(x, t, cond, uncond, scale).float()
        # DDIM's alpha_t is DDPM's abar_t: a_t, a_prev are cumulative products
        a_t = sched["alphas"][index]
        a_prev, sigma_t = sched["alphas_prev"][index], sched["sigmas"][index]
        # DDIM Eq. 12: sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma_t^2) eps + sigma_t z, x0_hat from inverting q_sample
        # term 1, predicted x0: solve z_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps for x0 with eps = e_t
        pred_x0 = (x - sched["sqrt_one_minus_alphas"][index] * e_t) / a_t.sqrt()
        # term 2, direction pointing to x_t: re-adds the predicted noise at the previous step's level, leaving
        # sigma_t^2 of the variance for fresh noise so the marginal at t_prev keeps variance 1 - a_prev
        dir_xt = (1.0 - a_prev - sigma_t ** 2).sqrt() * e_t  # direction pointing to x_t
        # x0 scaled to the previous step's signal level, plus the direction term
        x_prev = a_prev.sqrt() * pred_x0 + dir_xt
        if noise is not None:  # sigma_t = 0 (eta = 0) is deterministic DDIM (DDIM Sec. 4.1)
            # term 3, random noise: sigma_t z with z ~ N(0, I); eta = 1: the DDPM posterior variance on the sub-sequence
            x_prev = x_prev + sigma_t * noise
        return x_prev, pred_x0

    def ddim_sample(self, cond, uncond, shape, steps, eta=0.0, scale=1.0, x_T=None, generator=None):
        """DDIMSampler.sample: from x_T ~ N(0, I) down the DDIM timesteps (descending) -> (x_0, last pred_x0)."""
        device = self.alphas_cumprod.device
        sched = self.ddim_schedule(steps, eta)
        x = _randn(shape, generator, device) if x_T is None else x_T.float()  # x_T: (n, C, H, W)
        pred_x0 = x
        # index runs S' - 1 .. 0 over the whole official list: from the largest DDIM timestep down to t = 1
        for index in reversed(range(len(sched["timesteps"]))):
            # noise only when stochastic (eta > 0), so eta = 0 draws nothing from the RNG inside the loop
            noise = _randn(shape, generator, device) if eta > 0 else None
            x, pred_x0 = self.ddim_step(x, cond, uncond, index, sched, scale, noise)
        return x, pred_x0

    def ddpm_sample(self, cond, uncond, shape, steps, scale=1.0, generator=None, clip_denoised=False):
        """Ancestral sampling (LatentDiffusion.p_sample_loop): x_{t-1} = mu(x_t, x0_hat) + sigma_t z, x0_hat clipped
        to [-1, 1] only with clip_denoised (pixel space; LatentDiffusion forces it off). steps = T is the official
        chain; fewer steps respace it (ddpm_timesteps, betas recomputed from abar of the kept steps)."""
        device = self.alphas_cumprod.device
        ts = ddpm_timesteps(steps, self.num_timesteps).flip(0).to(device)  # (S,) descending
        # abar in float64 (as register_schedule computes it), so that steps = T gives the official float32 buffers
        ac = torch.cumprod(1 - make_beta_schedule(self.linear_start, self.linear_end, self.num_timesteps), 0)[ts.cpu()].to(device)
        ac_prev = torch.cat([ac[1:], ac.new_ones(1)])  # (S-1,) + (1,) -> (S,); 1 after the last step
        # respaced beta = 1 - abar_t / abar_prev (IDDPM Sec. 4); the official betas when steps = T
        beta = 1 - ac / ac_prev
        var = (beta * (1 - ac_prev) / (1 - ac)).float()  # beta tilde
        logvar = var.clamp(min=1e-20).log()
        # DDPM Eq. 7 posterior-mean coefficients on the respaced chain
        coef1 = (beta * ac_prev.sqrt() / (1 - ac)).float()
        coef2 = ((1 - ac_prev) * (1 - beta).sqrt() / (1 - ac)).float()
        x = _randn(shape, generator, device)  # x_T ~ N(0, I), (n, C, H, W)
        # ancestral sampling: each step draws from the posterior q(x_prev | x_t, x0) with x0 replaced by x0_hat
        for i, step in enumerate(ts):
            t = step.expand(shape[0])  # () -> (n,)
            e = self.eps(x, t, cond, uncond, scale).float()
            # x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), written as sqrt(1/abar) x - sqrt(1/abar - 1) eps
            x0 = self.sqrt_recip_alphas_cumprod[step] * x - self.sqrt_recipm1_alphas_cumprod[step] * e
            if clip_denoised:
                x0 = x0.clamp(-1.0, 1.0)
            mean = coef1[i] * x0 + coef2[i] * x  # mu tilde(x_t, x0_hat), DDPM Eq. 7
            # sigma_t^2 = beta tilde (DDPM Sec. 3.2); no noise on the last step (DDPM Algorithm 2)
            x = mean + (0.5 * logvar[i]).exp() * _randn(shape, generator, device) if i < steps - 1 else mean
        return x

    # ---------------------------------------------------------------- the repository contract
    def optimizer_groups(self, phase=None):
        """One AdamW group: the UNet, plus the ClassEmbedder when it trains (official cond_stage_trainable)."""
        params = list(self.unet.parameters())
        if self.conditioning == "class" and self.cond_stage_trainable:
            params += list(self.cond_stage_model.parameters())
        return {"model": params}

    def _check_x(self, x):
        u = self.unet
        if x.dim() != 4 or x.shape[1] != u.in_channels:
            raise ValueError(f"unet_ldm: batch['x'] must be (B, {u.in_channels}, H, W), got {tuple(x.shape)}")
        down = 2 ** (len(u.channel_mult) - 1)
        if x.shape[-1] % down or x.shape[-2] % down:
            raise ValueError(f"unet_ldm: H and W must be divisible by {down} (the UNet downsamples {down}x), got {tuple(x.shape[-2:])}")

    def loss(self, group, batch, step=0):
        """L_LDM (Eq. 2, or its conditional form Eq. 3) on batch["x"] (pixels or scaled latents).
        Randomness from the global torch RNG, in this order: t ~ U{0..T-1} (B,), eps ~ N(0, I), then the
        label-dropout coin flips (class/label conditioning with ucg_rate > 0; dropped labels -> null class)."""
        if group != "model":
            raise ValueError(f"unet_ldm: the only optimizer group is 'model', got {group!r}")
        x0 = batch["x"].float()
        self._check_x(x0)
        b = x0.shape[0]
        # one t per sample: the loss is a Monte Carlo estimate of the expectation over t, eps and z_0
        t = torch.randint(0, self.num_timesteps, (b,), device=x0.device)  # (B,); DDPM Algorithm 1, t 0-indexed
        noise = torch.randn_like(x0)  # eps ~ N(0, I), (B, C, H, W)
        labels = batch.get("y")
        if self.conditioning in ("class", "label"):
            if labels is None:
                raise ValueError("unet_ldm: class-conditional model needs batch['y'] (B,) int64")
            if self.ucg_rate > 0:  # classifier-free guidance training: the null class replaces some labels
                # why drop labels: one network then also learns the unconditional eps (null class), which cfg needs
                drop = torch.rand(b, device=x0.device) < self.ucg_rate  # (B,) bool
                labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        cond = self.get_learned_conditioning(labels, batch.get("context"))
        return self.p_losses(x0, cond, t, noise)

    @torch.no_grad()
    def sample(self, n, labels=None, steps=None, cfg=1.0, sampler=None, generator=None, eta=None, context=None,
               uc_context=None, clip_denoised=None):
        """n samples (n, C, H, W) in the model's space. labels (n,) int64 (class/label conditioning; random
        classes when None), steps (default: the preset's, 200 DDIM steps), cfg = guidance scale against the null
        class (1 = none), sampler "ddim" (uniform timesteps, eta: default 0) or "ddpm" (ancestral).
        Text conditioning: context (n, L, context_dim) and, for cfg != 1, uc_context (the empty prompt's).
        clip_denoised: clip x0 to [-1, 1] in DDPM steps (None = the preset's setting, off for the latent presets)."""
        u, device = self.unet, self.alphas_cumprod.device
        steps = self.sample_steps if steps is None else steps
        sampler = sampler or self.sampler
        eta = self.sample_eta if eta is None else eta
        # the model's space: latents for the LDM presets (decode with the autoencoder), pixels for tiny / demo
        shape = (n, u.out_channels, u.image_size, u.image_size)
        cond = uncond = None
        if self.conditioning in ("class", "label"):
            n_real = self.null_class  # real classes are 0 .. null_class - 1
            if labels is None:
                gen_dev = generator.device if generator is not None else device
                labels = torch.randint(0, n_real, (n,), generator=generator, device=gen_dev)
            labels = torch.as_tensor(labels, device=device).long()
            if labels.shape != (n,) or labels.min() < 0 or labels.max() > self.null_class:
                raise ValueError(f"unet_ldm: labels must be ({n},) in 0..{self.null_class} (the null class), got {labels.tolist()}")
            cond = self.get_learned_conditioning(labels)
            # the unconditional branch of guidance: the same batch with every label set to the null class
            uncond = self.get_learned_conditioning(torch.full_like(labels, self.null_class))
        elif self.conditioning == "text":
            cond = self.get_learned_conditioning(context=context)
            if cfg != 1.0:
                if uc_context is None:
                    raise ValueError("unet_ldm: text guidance (cfg != 1) needs uc_context, the context of the empty prompt")
                uncond = self.get_learned_conditioning(context=uc_context)
        # both samplers start from x_T ~ N(0, I) and return z_0 in the model's space (latents: decode them separately)
        if sampler == "ddim":
            return self.ddim_sample(cond, uncond, shape, steps, eta, cfg, generator=generator)[0]
        if sampler == "ddpm":
            clip = self.clip_denoised if clip_denoised is None else clip_denoised
            return self.ddpm_sample(cond, uncond, shape, steps, cfg, generator=generator, clip_denoised=clip)
        raise ValueError(f"unet_ldm: sampler must be 'ddim' or 'ddpm', got {sampler!r}")


# =============================================================================================
# Presets: the released configs (configs/latent-diffusion/*.yaml, App. E.1), tiny, demo
# =============================================================================================
# hparams: AdamW as the official configure_optimizers builds it (torch default weight_decay 0.01, no
# clipping = Lightning's default), EMA 0.9999 (LitEma; celebahq/ffhq/churches train with use_ema, the DDPM default).
# cin256-v2 and txt2img set use_ema: False: train.py always keeps an EMA copy, so "no EMA" is ema_decay 0.0
# (the copy then equals the weights, and sample.py's default `ema` is the trained model, as officially).
# Sampling (sampler, sample_steps, sample_eta) follows the official scripts: sample_diffusion.py for the
# unconditional models (DDIM, --custom_steps 50, --eta 1.0), txt2img.py (DDIM 200 steps, eta 0), the
# cin256-v2 notebook latent_imagenet_diffusion.ipynb (DDIM 20 steps, eta 0). x0 is never clipped (latents).
# lr: the official main.py uses lr = base_learning_rate * batch_size * n_gpus * accumulate (scale_lr);
# the unconditional face configs were trained that way (2e-6 * 48 = 9.6e-5, 2e-6 * 42 = 8.4e-5), the churches
# config says "set to target_lr by starting main.py with '--scale_lr False'" (5e-5 as given), and the cin256-v2 /
# txt2img base rates (1e-4 / 5e-5) are used unscaled too (scaling by their batches, 1200 / 680, would give > 0.03).
_OPT = dict(betas=(0.9, 0.999), weight_decay=0.01, ema_decay=0.9999, grad_clip=0.0)
CONFIGS = {
    # class-conditional ImageNet 256 on VQ-f4 latents 64x64x3, cross-attention on 1 class token. 400,920,579 UNet
    # + 512,512 ClassEmbedder params.
    "cin256-v2": dict(
        image_size=64, in_channels=3, out_channels=3, model_channels=192, attention_resolutions=[8, 4, 2],
        num_res_blocks=2, channel_mult=[1, 2, 3, 5], num_heads=1, use_spatial_transformer=True,
        transformer_depth=1, context_dim=512,
        conditioning="class", n_classes=1001, cond_stage_trainable=True, linear_start=0.0015, linear_end=0.0195,
        # label dropout for guidance: the released model has a trained null row (1000) but the code that trained
        # it is not in the repo; 0.1 is the ucg_rate default of the later ClassEmbedder (stablediffusion repo).
        ucg_rate=0.1, sample_steps=20, hparams=dict(_OPT, lr=1e-4, batch_size=1200, ema_decay=0.0)),
    # unconditional CelebA-HQ 256 on VQ-f4 latents, AttentionBlocks of 32 channels/head. 274,056,163 params.
    "celebahq-ldm-vq-4": dict(
        image_size=64, in_channels=3, out_channels=3, model_channels=224, attention_resolutions=[8, 4, 2],
        num_res_blocks=2, channel_mult=[1, 2, 3, 4], num_head_channels=32,
        linear_start=0.0015, linear_end=0.0195, sample_steps=50, sample_eta=1.0,
        hparams=dict(lr=2e-6 * 48, batch_size=48, **_OPT)),
    # unconditional FFHQ 256: the same network. 274,056,163 params.
    "ffhq-ldm-vq-4": dict(
        image_size=64, in_channels=3, out_channels=3, model_channels=224, attention_resolutions=[8, 4, 2],
        num_res_blocks=2, channel_mult=[1, 2, 3, 4], num_head_channels=32,
        linear_start=0.0015, linear_end=0.0195, sample_steps=50, sample_eta=1.0,
        hparams=dict(lr=2e-6 * 42, batch_size=42, **_OPT)),
    # unconditional LSUN-Churches 256 on KL-f8 latents 32x32x4: scale-shift norm, ResBlock up/down, L1 loss,
    # 10k-step linear warm-up (LambdaLinearScheduler). 294,966,916 params.
    "lsun_churches-ldm-kl-8": dict(
        image_size=32, in_channels=4, out_channels=4, model_channels=192, attention_resolutions=[1, 2, 4, 8],
        num_res_blocks=2, channel_mult=[1, 2, 2, 4, 4], num_heads=8, use_scale_shift_norm=True, resblock_updown=True,
        linear_start=0.0015, linear_end=0.0155, loss_type="l1", sample_steps=50, sample_eta=1.0,
        hparams=dict(lr=5e-5, batch_size=96, warmup_steps=10000, **_OPT)),
    # the 1.45B text-to-image model's UNet (KL-f8 latents x 0.18215), cross-attention on a precomputed
    # BERT context (B, 77, 1280). 872,300,484 params.
    "txt2img-1p4B": dict(
        image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
        num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
        transformer_depth=1, context_dim=1280, use_checkpoint=True, legacy=False,
        conditioning="text", linear_start=0.00085, linear_end=0.012,
        hparams=dict(_OPT, lr=5e-5, batch_size=680, ema_decay=0.0)),
    # CI / smoke tests: cin256-like (ClassEmbedder + SpatialTransformer) but tiny; 64 channels wherever the time
    # embedding is added (see normalization()). 1,415,011 params at in_channels 3, 4 classes;
    # 1.14 GFLOPs per forward at 32x32.
    "tiny": dict(
        image_size=32, in_channels=3, out_channels=3, model_channels=64, attention_resolutions=[2],
        num_res_blocks=1, channel_mult=[1, 1], num_heads=2, use_spatial_transformer=True, transformer_depth=1,
        context_dim=32, conditioning="class", n_classes=5, ucg_rate=0.1, sample_steps=50,
        hparams=dict(lr=2e-4, batch_size=16, betas=(0.9, 0.999), weight_decay=0.01, ema_decay=0.999, grad_clip=0.0)),
    # CPU demo: pixel-space 32x32 shapes with 4 classes (train.py --config demo). Levels at
    # 32/16/8 pixels with 32/64/64 channels; 32 channels are enough at level 0 because use_scale_shift_norm makes the
    # embedding a per-channel SCALE, which GroupNorm cannot cancel. Cross-attention on the class token at 8x8 (and
    # in the middle block); 0.53 GFLOPs per forward, 1.59 per training sample.
    # 1,491,459 params at in_channels 3, 4 classes.
    "demo": dict(
        image_size=32, in_channels=3, out_channels=3, model_channels=32, attention_resolutions=[4],
        num_res_blocks=1, channel_mult=[1, 2, 2], num_heads=2, use_spatial_transformer=True, transformer_depth=1,
        context_dim=64, use_scale_shift_norm=True, conditioning="class", n_classes=5, ucg_rate=0.1,
        # pixel space: ancestral DDPM with x0 clipped to [-1, 1] (the official pixel-space DDPM default): an
        # undertrained eps is amplified ~84x in x0 at t = 999
        sampler="ddpm", sample_steps=250, clip_denoised=True,
        hparams=dict(lr=1e-3, batch_size=16, betas=(0.9, 0.999), weight_decay=0.01, ema_decay=0.995, grad_clip=1.0,
                     warmup_steps=100)),
}

# constructor arguments of the official UNetModel (everything else in a preset belongs to LatentDiffusion)
UNET_KEYS = ("image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks", "attention_resolutions",
             "dropout", "channel_mult", "conv_resample", "dims", "num_classes", "use_checkpoint", "use_fp16",
             "num_heads", "num_head_channels", "num_heads_upsample", "use_scale_shift_norm", "resblock_updown",
             "use_new_attention_order", "use_spatial_transformer", "transformer_depth", "context_dim", "n_embed",
             "legacy")
LDM_KEYS = ("conditioning", "n_classes", "cond_stage_trainable", "ucg_rate", "linear_start", "linear_end", "timesteps",
            "loss_type", "l_simple_weight", "original_elbo_weight", "logvar_init", "clip_denoised", "sample_steps",
            "sample_eta", "sampler", "hparams")


def _resolve(config):
    """A CONFIGS name, a preset-like dict, or the official UNetModel kwargs (a key file's first line) -> dict.
    Bare official kwargs that equal a preset's UNet part take that preset's diffusion settings; otherwise the
    conditioning is inferred: num_classes -> 'label', context_dim -> 'text', else unconditional."""
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"unet_ldm: unknown preset {config!r}; choose from {', '.join(CONFIGS)}")
        return dict(CONFIGS[config])
    if not isinstance(config, dict):
        raise ValueError(f"unet_ldm: config must be a preset name or a dict, got {type(config).__name__}")
    cfg = dict(config)
    unknown = [k for k in cfg if k not in UNET_KEYS and k not in LDM_KEYS]
    if unknown:
        raise ValueError(f"unet_ldm: unknown config keys {unknown}")
    if not any(k in cfg for k in LDM_KEYS):
        unet_part = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}
        for preset in CONFIGS.values():
            if {k: v for k, v in preset.items() if k in UNET_KEYS} == unet_part:
                return {**preset, **cfg}
        cfg["conditioning"] = "label" if cfg.get("num_classes") else ("text" if cfg.get("context_dim") else None)
    return cfg


def create(config="tiny", **overrides):
    """Build a LatentDiffusion from a preset name or dict. Generic overrides from train.py:
    image_size (H = W of pixels or latents), in_channels (also sets out_channels: eps has the input's shape),
    num_classes (labels in the data: the ClassEmbedder / label_emb gets num_classes + 1 rows, the extra last row
    being the null class for guidance; ignored by unconditional and text models). Any other key replaces the
    preset entry (UNet or diffusion argument). NOTE: inside a config DICT, `num_classes` is the official UNetModel
    argument (rows of label_emb), not the data's label count."""
    cfg = _resolve(config)
    data_classes = overrides.pop("num_classes", None)
    if "in_channels" in overrides:
        overrides.setdefault("out_channels", overrides["in_channels"])
    for k in overrides:
        if k not in UNET_KEYS and k not in LDM_KEYS:
            raise ValueError(f"unet_ldm: unknown override {k!r}")
    cfg.update(overrides)
    conditioning = cfg.get("conditioning")
    if data_classes is not None:
        if int(data_classes) < 1:
            raise ValueError(f"unet_ldm: num_classes must be >= 1, got {data_classes}")
        if conditioning == "class":
            # +1: the appended last row is the null class used by guidance
            cfg["n_classes"] = int(data_classes) + 1
        elif conditioning == "label":
            cfg["num_classes"] = int(data_classes) + 1
    if conditioning == "class" and not cfg.get("n_classes"):
        raise ValueError("unet_ldm: class conditioning needs n_classes (or create(..., num_classes=N))")
    if conditioning == "class" and not cfg.get("use_spatial_transformer"):
        raise ValueError("unet_ldm: class conditioning through cross-attention needs use_spatial_transformer=True")
    if conditioning == "label" and not cfg.get("num_classes"):
        raise ValueError("unet_ldm: label conditioning needs num_classes")
    unet_kw = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if k in UNET_KEYS}
    ldm_kw = {k: v for k, v in cfg.items() if k in LDM_KEYS}
    for k in ("image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks", "attention_resolutions"):
        if k not in unet_kw:
            raise ValueError(f"unet_ldm: config is missing the UNet argument {k!r}")
    if unet_kw["model_channels"] % 32:
        raise ValueError(f"unet_ldm: model_channels must be a multiple of 32 (GroupNorm with 32 groups), got {unet_kw['model_channels']}")
    # 2^(levels - 1): one Downsample between consecutive levels
    down = 2 ** (len(unet_kw.get("channel_mult", (1, 2, 4, 8))) - 1)
    if unet_kw["image_size"] % down:
        raise ValueError(f"unet_ldm: image_size {unet_kw['image_size']} is not divisible by {down}, the UNet's downsampling")
    model = LatentDiffusion(UNetModel(**unet_kw), **ldm_kw)
    model.config = {**unet_kw, **ldm_kw}
    return model


# =============================================================================================
# Official checkpoints
# =============================================================================================
# Rename table, official LatentDiffusion state_dict -> ours:
#   model.diffusion_model.<k>   -> unet.<k>              (LatentDiffusion.model is a DiffusionWrapper)
#   cond_stage_model.<k>        -> cond_stage_model.<k>  (ClassEmbedder; cin256-v2 only)
#   model_ema.diffusion_model<k without dots> -> unet.<k>   only with use_ema=True (LitEma's flattened names)
# Skipped with a note: first_stage_model.* (the autoencoder: load it with ae_vq.py / ae_kl.py), the BERT
# cond_stage_model of txt2img, the 12 schedule buffers (recomputed; compared with ours), scale_factor, logvar,
# model_ema.decay / num_updates. A bare UNetModel state dict (no prefix, as the reference key files list it)
# is accepted too.
UNET_PREFIX, COND_PREFIX, EMA_PREFIX = "model.diffusion_model.", "cond_stage_model.", "model_ema."
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")


def convert_official(sd, model, use_ema=False):
    """Official state dict -> (our state dict, notes about what was skipped)."""
    notes, out = [], {}
    bare = not any(k.startswith(UNET_PREFIX) for k in sd)
    own = set(model.state_dict())
    unet_keys = [k for k in own if k.startswith("unet.")]
    if use_ema:
        # LitEma names: 'model_ema.diffusion_model' + the UNet key with its dots removed
        flat = {EMA_PREFIX + "diffusion_model" + k[len("unet."):].replace(".", ""): k for k in unet_keys}
        missing = [k for k in flat if k not in sd]
        if missing:
            raise ValueError(f"unet_ldm: use_ema=True but the checkpoint lacks EMA weights, e.g. {missing[:3]}")
    skipped = {}
    for k, v in sd.items():
        if k.startswith("unet.") and k in own:  # our own names (a train.py checkpoint's "ema" / "model")
            out[k] = v
        elif bare and not k.startswith((COND_PREFIX, EMA_PREFIX, "first_stage_model.")) and k not in SCHEDULE_BUFFERS:
            out["unet." + k] = v
        elif k.startswith(UNET_PREFIX) and not use_ema:
            out["unet." + k[len(UNET_PREFIX):]] = v
        elif k.startswith(COND_PREFIX) and model.conditioning == "class":
            out[k] = v
        elif use_ema and k in flat:
            out[flat[k]] = v
        else:
            # 'first_stage_model.a.b' -> 'first_stage_model'
            group = k.split(".")[0] if not k.startswith(EMA_PREFIX) else "model_ema"
            skipped[group] = skipped.get(group, 0) + 1
    for group, count in skipped.items():
        notes.append(f"skipped {count} '{group}' entries"
                     + (" (the autoencoder: load it with ae_vq.py / ae_kl.py)" if group == "first_stage_model" else ""))
    # schedule buffers are not loaded: recomputed from the preset, the checkpoint's betas only checked
    betas = make_beta_schedule(model.linear_start, model.linear_end, model.num_timesteps).float()
    if "betas" in sd and sd["betas"].device.type != "meta":  # a checkpoint of another schedule is a config mismatch
        if sd["betas"].shape != betas.shape or not torch.allclose(sd["betas"].float().cpu(), betas, rtol=1e-5, atol=1e-8):
            raise ValueError(f"unet_ldm: checkpoint buffer 'betas' differs from the preset's schedule "
                             f"(linear_start {model.linear_start}, linear_end {model.linear_end})")
    return out, notes


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


def load_official(path_or_state_dict, config, use_ema=False, verbose=True):
    """Load a released LDM checkpoint (model.ckpt with a "state_dict", or the dict itself) strictly.
    config: a CONFIGS name or the official UNetModel kwargs (a key file's first line). The model is built on
    the meta device and takes the checkpoint's tensors (assign=True): no random init of ~1e9 parameters."""
    sd = read_checkpoint(path_or_state_dict)
    # meta tensors: no memory and no init; load_state_dict(assign=True) then adopts the checkpoint's tensors
    with torch.device("meta"):
        model = create(config)
    ours, notes = convert_official(sd, model, use_ema)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.items()}
    if expected != got:
        missing = [k for k in expected if k not in got][:5]
        extra = [k for k in got if k not in expected][:5]
        shapes = [f"{k} {got[k]} != {expected[k]}" for k in expected if k in got and got[k] != expected[k]][:5]
        raise ValueError(f"unet_ldm: checkpoint does not match config: missing {missing}, unexpected {extra}, shapes {shapes}")
    model.load_state_dict(ours, strict=True, assign=True)
    dev = next(iter(ours.values())).device
    model.register_schedule(device=dev if dev.type != "meta" else None)  # buffers were created on meta
    if verbose:
        for note in notes:
            print(f"unet_ldm.load_official: {note}")
    return model
