"""DC-AE: Deep Compression Autoencoder for Efficient High-Resolution Diffusion Models.

Junyu Chen, Han Cai, Junsong Chen, Enze Xie, Shang Yang, Haotian Tang, Muyang Li, Yao Lu, Song Han.
ICLR 2025, arXiv:2410.10733.

Official code matched (golden tensors and the official key lists in tests/golden/dcae/):
mit-han-lab/efficientvit @ de7d7733cc0329f391b33f1f459271562ec27bd5,
  efficientvit/models/efficientvit/dc_ae.py   (DCAE, Encoder, Decoder, DCAEConfig, build_* helpers)
  efficientvit/models/nn/ops.py               (ConvLayer, ResidualBlock, ResBlock, LiteMLA, GLUMBConv,
                                               EfficientViTBlock, the up/down-sample layers and shortcuts)
  efficientvit/models/nn/norm.py, triton_rms_norm.py (TritonRMSNorm2d), act.py
  efficientvit/ae_model_zoo.py                (the released configurations)

Map from the paper to this file
  Sec. 3.1 "Motivation"                why residual autoencoding: high-compression AEs are hard to optimise.
  Residual Autoencoding, Fig. 4        ChannelAveragingShortcut (space-to-channel, then channel averaging),
                                       ChannelDuplicatingShortcut (channel duplication, then channel-to-space),
                                       build_downsample / build_upsample (learned branch + shortcut), the same
                                       shortcuts at the latent (Encoder.project_out, Decoder.project_in).
  Decoupled High-Resolution            DCAE.trainable_modules, optimizer_groups(phase), loss: phase 1 low-res
  Adaptation (three phases)            full training (L1 + LPIPS), phase 2 high-res latent adaptation (middle
                                       layers), phase 3 low-res local refinement (decoder head, + PatchGAN).
  official code only                   ResBlock and EfficientViT stages (LiteMLA + GLUMBConv), TRMSNorm2d,
                                       Encoder, Decoder; CONFIGS = the releases of ae_model_zoo.py + tiny.
  Reading order: ChannelAveragingShortcut, ChannelDuplicatingShortcut, build_downsample / build_upsample,
  Encoder, Decoder, LiteMLA, EfficientViTBlock, DCAE.trainable_modules, DCAE.loss, CONFIGS, load_official.

State-dict names follow the official ones, except that the official `OpSequential.op_list` container is an
`nn.Sequential` here, so load_official's whole rename table is one rule: ".op_list." -> ".".

Left out / differs
  - No official training code is released (no AE trainer, loss or discriminator). The three phases follow
    the paper's text; the phase 2/3 module lists are our reading of "middle layers" / "decoder head" (the
    paper publishes none), see DCAE.trainable_modules.
  - `double_latent`, `use_quant_conv`, `pretrained_path` are config fields without modules in every release;
    double_latent=True and *_match_channel=False (no release uses them) raise ValueError.
  - The Triton RMSNorm kernel: TRMSNorm2d computes the same math in PyTorch (float32 accumulation).
  - Diffusers' AutoencoderDC naming (load_official takes the efficientvit naming of the HF checkpoints).
  - Chosen here, by no official source: the loss L1 + LPIPS-VGG (weights 1 and 1) + LDM's hinge PatchGAN
    (taming's NLayerDiscriminator, ndf 64, 3 layers; adaptive weight times disc_weight 0.5 as in LDM's
    configs); disc_start 0 (phase 3 is the GAN phase); before disc_start the PatchGAN does not run at all
    (taming runs it and multiplies its loss by 0, which still moves its BatchNorm statistics); L1 and LPIPS
    in float32. PHASE_HPARAMS are lr / weight decay / betas of the paper's appendix as a third-party reading
    reports them (not checked against the paper text here); where that reading names none we use AdamW's
    default betas (phase 2) and no weight decay (phase 3). The tiny preset and its lr 5e-4 are ours. The
    -mix and f128c512-in scale factors come from diffusers' conversion script (the repo README gives only
    f32c32-in and f64c128-in; dc_ae.py gives SANA's).
"""
import copy
import json
import os
import warnings
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------------------
# Basic layers: norm, activation, conv
# --------------------------------------------------------------------------------------------------------------


class TRMSNorm2d(nn.LayerNorm):
    """RMSNorm over the channel dim of a (B, C, H, W) map, with weight and bias (official TritonRMSNorm2d).

    y = x / sqrt(mean_c(x^2) + eps) * weight[c] + bias[c]. No mean subtraction, eps inside the sqrt. It
    subclasses nn.LayerNorm only to get the same parameters (weight, bias of shape (C,), eps 1e-5) as the
    official class; the Triton kernel accumulates in float32, so half inputs are upcast here too.
    """

    def forward(self, x):
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # float32 math, as the kernel
        # the mean runs over the channels only: each pixel is normalised on its own
        rrms = torch.rsqrt(xf.pow(2).mean(dim=1, keepdim=True) + self.eps)  # (B, 1, H, W)
        # per-channel affine after the normalisation; cast back so the layer returns the caller's dtype
        return (xf * rrms * self.weight[:, None, None] + self.bias[:, None, None]).to(x.dtype)


def no_autocast(device):
    """Autocast off on `device` (tensors keep their own dtype inside); devices without autocast (meta) get
    the harmless CPU switch, since torch.autocast raises for device types it does not know."""
    return torch.autocast(device.type if device.type in ("cuda", "cpu", "xpu", "mps") else "cpu", enabled=False)


def build_norm(name, channels):
    """Official build_norm for the names DC-AE uses: 'trms2d', 'bn2d' (BatchNorm2d defaults) or None."""
    if name is None:
        return None
    if name == "trms2d":
        return TRMSNorm2d(channels)
    if name == "bn2d":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"unknown norm {name!r} (expected 'trms2d', 'bn2d' or None)")


def build_act(name):
    """Official build_act for the names the DC-AE releases use."""
    if name is None:
        return None
    # factories, not instances: every call must return a fresh module (each layer owns its act)
    acts = {"relu": nn.ReLU, "silu": nn.SiLU}
    if name not in acts:
        raise ValueError(f"unknown activation {name!r} (expected one of {sorted(acts)} or None)")
    return acts[name]()


class ConvLayer(nn.Module):
    """conv (zero 'same' padding k//2) -> optional norm -> optional act (official ops.ConvLayer)."""

    def __init__(self, in_ch, out_ch, kernel_size=3, stride=1, groups=1, bias=False, norm=None, act=None):
        super().__init__()
        # padding k//2 keeps H, W for odd k at stride 1 and gives exactly H/2 at stride 2 (even H)
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, groups=groups, bias=bias)
        # None entries register no module, so the state-dict names match the official ones
        self.norm = build_norm(norm, out_ch)
        self.act = build_act(act)

    def forward(self, x):
        x = self.conv(x)  # (B, C_in, H, W) -> (B, C_out, H/stride, W/stride)
        if self.norm is not None:
            x = self.norm(x)
        if self.act is not None:
            x = self.act(x)
        return x


class ResidualBlock(nn.Module):
    """main(x) + shortcut(x); just main(x) when shortcut is None (official ops.ResidualBlock, no pre/post ops).

    DC-AE uses it twice: with an identity shortcut around ResBlock / LiteMLA / GLUMBConv, and with the
    residual-autoencoding shortcuts (paper Fig. 4) around the learned down/up-sampling layers.
    """

    def __init__(self, main, shortcut):
        super().__init__()
        self.main = main
        self.shortcut = shortcut

    def forward(self, x):
        if self.shortcut is None:
            return self.main(x)
        return self.main(x) + self.shortcut(x)  # both branches (B, C_out, H', W'): shapes must agree


# --------------------------------------------------------------------------------------------------------------
# Residual Autoencoding (Fig. 4): parameter-free space<->channel shortcuts
# --------------------------------------------------------------------------------------------------------------


class ChannelAveragingShortcut(nn.Module):
    """Down-sampling shortcut of residual autoencoding (Fig. 4): space-to-channel, then channel averaging.

    The learned down-sampling layer beside it only learns a residual on top of this parameter-free map, which
    the paper proposes against the optimisation difficulty of high-compression autoencoders (Sec. 3.1).
    Official PixelUnshuffleChannelAveragingDownSampleLayer, matched here: pixel_unshuffle(r) puts pixel
    (h*r+i, w*r+j) of channel c into channel c*r^2 + i*r + j, then output channel o is the mean of the
    g = C*r^2/C_out CONSECUTIVE channels o*g ... o*g+g-1. For the usual C -> 2C block (r = 2, g = 2) that is
    a 1x2 average pool inside each channel followed by a 2x1 space-to-channel (efficientvit issue #141).
    The paper's equation (space-to-channel, then split into two groups and average) pairs channel o with
    o + 2C instead, i.e. input channel c with channel c + C/2 at the same pixel. The two are NOT a channel
    permutation of each other:
        x = arange(8).view(1, 2, 2, 2)            channel 0 = [[0, 1], [2, 3]], channel 1 = [[4, 5], [6, 7]]
        code  (2 -> 4 channels): [0.5, 2.5, 4.5, 6.5]   neighbouring pixels of one channel
        paper (2 -> 4 channels): [2, 3, 4, 5]           channel 0 and channel 1 at the same pixel
    It matters: the released weights' learned branches were trained next to the code's map (the paper's
    would change every down block's output), and the code never mixes channels (it loses horizontal detail
    within a channel) where the paper's keeps every pixel but superposes two channels. We match the code.
    With r = 1 (encoder output, Encoder.project_out) it only averages groups of g consecutive channels.
    """

    def __init__(self, in_ch, out_ch, factor):
        super().__init__()
        if (in_ch * factor**2) % out_ch != 0:
            raise ValueError(f"averaging shortcut: in_ch*factor^2={in_ch * factor**2} not divisible by {out_ch}")
        # parameter-free: nothing in the state dict (as in the official key lists)
        self.factor, self.out_ch = factor, out_ch
        # g = space-to-channel values per output channel; the mean (not a sum) keeps the input's magnitude,
        # so stacking shortcuts over many down blocks does not blow the activations up
        self.group_size = in_ch * factor**2 // out_ch

    def forward(self, x):
        # why this makes high compression trainable (Sec. 3.1): space-to-channel is lossless and parameter-free, so
        # each down block starts as an information-preserving map and its learned branch only fits a residual (as
        # ResNet shortcuts do for depth); without it every block must learn the rearrangement from scratch, which
        # gets harder the more blocks (the higher the compression) there are
        x = F.pixel_unshuffle(x, self.factor)  # (B, C, H, W) -> (B, C*r*r, h, w), h = H/r
        B, _, h, w = x.shape
        # consecutive channels form one group: (B, C*r*r, h, w) -> (B, C_out, g, h, w) -> mean over g
        return x.view(B, self.out_ch, self.group_size, h, w).mean(dim=2)


class ChannelDuplicatingShortcut(nn.Module):
    """Up-sampling shortcut of residual autoencoding (Fig. 4): channel duplication, then channel-to-space.

    Official ChannelDuplicatingPixelUnshuffleUpSampleLayer, matched here: every input channel is repeated
    R = C_out*r^2/C_in times CONSECUTIVELY (repeat_interleave: channel k of the repeated map is input channel
    k // R), then pixel_shuffle(r). For the usual 2C -> C block, output channel c at (2h+i, 2w+j) is input
    channel 2c+i at (h, w) for both columns j: the transpose of ChannelAveragingShortcut's pattern (averaging
    a duplicated map returns the map). The paper's text does channel-to-space first, then concatenates two
    copies; that is a different map, not a permutation:
        x = arange(4).view(1, 4, 1, 1)
        code  (4 -> 2 channels): channel 0 = [[0, 0], [1, 1]], channel 1 = [[2, 2], [3, 3]]
        paper (4 -> 2 channels): channel 0 = channel 1 = [[0, 1], [2, 3]]
    We match the code (the released decoders were trained with it).
    """

    def __init__(self, in_ch, out_ch, factor):
        super().__init__()
        if (out_ch * factor**2) % in_ch != 0:
            raise ValueError(f"duplicating shortcut: out_ch*factor^2={out_ch * factor**2} not divisible by {in_ch}")
        # parameter-free, like the averaging shortcut
        self.factor = factor
        # R copies per input channel give exactly the out_ch*r^2 channels that channel-to-space consumes
        self.repeats = out_ch * factor**2 // in_ch

    def forward(self, x):
        # decoder mirror of the averaging shortcut: a fixed, parameter-free channel-to-space map, so the learned
        # up-sampling branch beside it also only learns a residual
        x = x.repeat_interleave(self.repeats, dim=1)  # (B, C, h, w) -> (B, C*R, h, w)
        return F.pixel_shuffle(x, self.factor)  # (B, C*R, h, w) -> (B, C*R/(r*r), h*r, w*r)


# --------------------------------------------------------------------------------------------------------------
# Learned down/up-sampling layers (the "main" branch of the residual-autoencoding blocks)
# --------------------------------------------------------------------------------------------------------------


class ConvPixelUnshuffleDownsample(nn.Module):
    """3x3 conv C_in -> C_out/4, then pixel_unshuffle(2) (official ConvPixelUnshuffleDownSampleLayer)."""

    def __init__(self, in_ch, out_ch, factor=2):
        super().__init__()
        if out_ch % factor**2 != 0:
            raise ValueError(f"ConvPixelUnshuffle: out channels {out_ch} not divisible by {factor**2}")
        self.factor = factor
        # C_out/4 channels at full resolution: pixel_unshuffle(2) then multiplies them by 4, landing on C_out
        self.conv = ConvLayer(in_ch, out_ch // factor**2, 3, bias=True)

    def forward(self, x):
        x = self.conv(x)  # (B, C_in, H, W) -> (B, C_out/4, H, W)
        # space-to-channel keeps every conv output value (a stride-2 conv drops 3 of 4 positions)
        return F.pixel_unshuffle(x, self.factor)  # -> (B, C_out, H/2, W/2)


class ConvPixelShuffleUpsample(nn.Module):
    """3x3 conv C_in -> 4*C_out, then pixel_shuffle(2) (official ConvPixelShuffleUpSampleLayer)."""

    def __init__(self, in_ch, out_ch, factor=2):
        super().__init__()
        self.factor = factor
        # the conv runs at the low input resolution (the cheap side); pixel_shuffle trades its 4x channels for 2x2 space
        self.conv = ConvLayer(in_ch, out_ch * factor**2, 3, bias=True)

    def forward(self, x):
        x = self.conv(x)  # (B, C_in, h, w) -> (B, 4*C_out, h, w)
        # channel-to-space: each input pixel's 4*C_out values fill its 2x2 output block
        return F.pixel_shuffle(x, self.factor)  # -> (B, C_out, 2h, 2w)


class InterpolateConvUpsample(nn.Module):
    """Nearest x2 interpolation, then 3x3 conv (official InterpolateConvUpSampleLayer; the SANA AE uses it)."""

    def __init__(self, in_ch, out_ch, factor=2):
        super().__init__()
        self.factor = factor
        self.conv = ConvLayer(in_ch, out_ch, 3, bias=True)

    def forward(self, x):
        # nearest x2 copies each pixel into a 2x2 block; the 3x3 conv then mixes the copies
        x = F.interpolate(x, scale_factor=self.factor, mode="nearest")  # (B, C, h, w) -> (B, C, 2h, 2w)
        return self.conv(x)


def build_downsample(block_type, in_ch, out_ch, shortcut):
    """Encoder down-sampling block: learned layer (+ averaging shortcut, Fig. 4) (official build_downsample_block)."""
    if block_type == "Conv":
        # plain 3x3 stride-2 conv (SANA AE); ConvPixelUnshuffle (in/mix releases) keeps all pixels in channels
        main = ConvLayer(in_ch, out_ch, 3, stride=2, bias=True)
    elif block_type == "ConvPixelUnshuffle":
        main = ConvPixelUnshuffleDownsample(in_ch, out_ch)
    else:
        raise ValueError(f"unknown downsample_block_type {block_type!r} (expected 'Conv' or 'ConvPixelUnshuffle')")
    if shortcut is None:
        return main
    if shortcut != "averaging":
        raise ValueError(f"unknown downsample shortcut {shortcut!r} (expected 'averaging' or None)")
    # residual autoencoding: the learned layer only learns the residual on top of space-to-channel
    return ResidualBlock(main, ChannelAveragingShortcut(in_ch, out_ch, 2))


def build_upsample(block_type, in_ch, out_ch, shortcut):
    """Decoder up-sampling block: learned layer (+ duplicating shortcut, Fig. 4) (official build_upsample_block)."""
    if block_type == "ConvPixelShuffle":
        main = ConvPixelShuffleUpsample(in_ch, out_ch)
    elif block_type == "InterpolateConv":
        # SANA AE; it keeps the default duplicating shortcut around this layer
        main = InterpolateConvUpsample(in_ch, out_ch)
    else:
        raise ValueError(f"unknown upsample_block_type {block_type!r} (expected 'ConvPixelShuffle' or 'InterpolateConv')")
    if shortcut is None:
        return main
    if shortcut != "duplicating":
        raise ValueError(f"unknown upsample shortcut {shortcut!r} (expected 'duplicating' or None)")
    # residual autoencoding: the learned layer only learns the residual on top of channel-to-space
    return ResidualBlock(main, ChannelDuplicatingShortcut(in_ch, out_ch, 2))


# --------------------------------------------------------------------------------------------------------------
# Stage blocks: ResBlock (high-resolution stages) and EfficientViT block (low-resolution stages)
# --------------------------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """conv3x3 (bias) -> act -> conv3x3 (no bias) -> norm (official ops.ResBlock as dc_ae.build_block builds it)."""

    def __init__(self, channels, norm, act):
        super().__init__()
        self.conv1 = ConvLayer(channels, channels, 3, bias=True, norm=None, act=act)
        self.conv2 = ConvLayer(channels, channels, 3, bias=False, norm=norm, act=None)

    def forward(self, x):
        # no activation after the final norm: build_block's identity skip adds this branch to x as it is
        return self.conv2(self.conv1(x))


class GLUMBConv(nn.Module):
    """Gated MBConv feed-forward of the EfficientViT block (official ops.GLUMBConv, expand ratio 4).

    1x1 conv C -> 8C (bias) + act, depthwise 3x3 (bias, no act), split into (value, gate) halves,
    value * act(gate), 1x1 conv 4C -> C (no bias) + norm.
    """

    def __init__(self, channels, norm, act, expand_ratio=4):
        super().__init__()
        # mid = 4C; the first conv produces 2*mid = 8C so the GLU split leaves 4C value and 4C gate channels
        mid = round(channels * expand_ratio)
        self.inverted_conv = ConvLayer(channels, 2 * mid, 1, bias=True, norm=None, act=act)
        # depthwise 3x3: the local spatial mixing that linear attention lacks (EfficientViT, Cai et al.)
        self.depth_conv = ConvLayer(2 * mid, 2 * mid, 3, groups=2 * mid, bias=True, norm=None, act=None)
        self.glu_act = build_act(act)
        self.point_conv = ConvLayer(mid, channels, 1, bias=False, norm=norm, act=None)

    def forward(self, x):
        x = self.depth_conv(self.inverted_conv(x))  # (B, C, H, W) -> (B, 8C, H, W)
        x, gate = x.chunk(2, dim=1)  # (B, 8C, H, W) -> 2 x (B, 4C, H, W): value first, gate second
        # gated linear unit: act(gate) scales each value channel per pixel, a data-dependent filter
        return self.point_conv(x * self.glu_act(gate))  # (B, 4C, H, W) -> (B, C, H, W)


class LiteMLA(nn.Module):
    """Multi-scale ReLU linear attention (official ops.LiteMLA; EfficientViT, Cai et al. 2023).

    qkv = 1x1 conv; each scale s adds an aggregated copy (depthwise s x s conv, then a 1x1 conv grouped per
    head and per q/k/v); channels are grouped per head as [q (dim), k (dim), v (dim)], first the heads of
    the plain qkv, then those of each scale. Attention per head-group with ReLU kernels:
        out_n = sum_m v_m (k_m . q_n) / (sum_m k_m . q_n + eps)
    computed as (v k^T) q when the token count H*W > dim (linear cost) and as v (k^T q) otherwise, like the
    official code (the two are the same function). This is not softmax attention, so
    F.scaled_dot_product_attention does not apply.
    Precision, as the official code under bf16/fp16 autocast: autocast is off inside `attention`, so its
    matmuls run in qkv's own dtype (bf16 stays bf16; the linear branch upcasts an fp16 qkv to float32 first),
    and the normalising division is always float32 (linear: the product is upcast before dividing;
    quadratic: the N x N map is upcast, normalised and cast back before v @ map).
    """

    def __init__(self, in_ch, out_ch, heads=None, heads_ratio=1.0, dim=8, use_bias=False,
                 norm=(None, "bn2d"), act=(None, None), scales=(5,), eps=1e-15):
        super().__init__()
        # heads, heads_ratio, use_bias, act: the official signature (a golden case sets them); DC-AE uses the defaults
        use_bias = use_bias if isinstance(use_bias, (tuple, list)) else (use_bias, use_bias)
        # heads = C / dim (dim = 32 in DC-AE): e.g. 1024 channels -> 32 heads
        heads = int(in_ch // dim * heads_ratio) if heads is None else heads
        if heads < 1:
            raise ValueError(f"LiteMLA: {in_ch} channels give 0 heads of dim {dim} (EfficientViT stages need >= {dim})")
        self.dim, self.eps = dim, eps
        # total_dim = C for heads_ratio 1: q, k, v of all heads from one 1x1 conv with 3C outputs
        total_dim = heads * dim
        self.qkv = ConvLayer(in_ch, 3 * total_dim, 1, bias=use_bias[0], norm=norm[0], act=act[0])
        # multi-scale aggregation: depthwise s x s, then 1x1 with groups = 3*heads (one q/k/v slice of one head each)
        self.aggreg = nn.ModuleList([
            nn.Sequential(
                nn.Conv2d(3 * total_dim, 3 * total_dim, s, padding=s // 2, groups=3 * total_dim, bias=use_bias[0]),
                nn.Conv2d(3 * total_dim, 3 * total_dim, 1, groups=3 * heads, bias=use_bias[0]),
            )
            for s in scales
        ])
        # proj sees (1 + S) head groups: the plain qkv's and each scale's outputs, concatenated
        self.proj = ConvLayer(total_dim * (1 + len(scales)), out_ch, 1, bias=use_bias[1], norm=norm[1], act=act[1])

    def attention(self, qkv, quadratic=None):
        """ReLU linear attention on the (multi-scale) qkv map (B, 3*G*dim, H, W) -> (B, G*dim, H, W).

        quadratic=None picks the branch like the official forward (tokens H*W <= dim -> quadratic)."""
        B, _, H, W = qkv.shape  # N = H*W tokens
        if quadratic is None:
            # cost: linear branch O(N dim^2), quadratic O(N^2 dim); pick the smaller (same result)
            quadratic = H * W <= self.dim
        half = (torch.float16, torch.bfloat16)
        with no_autocast(qkv.device):
            if not quadratic and qkv.dtype == torch.float16:
                qkv = qkv.float()  # official: fp16 (range 65504) would overflow the linear branch's sums
            # each head group's channels are contiguous [q, k, v] (class docstring), so one reshape separates the head
            # groups and flattens the H x W grid into the token axis N
            qkv = qkv.reshape(B, -1, 3 * self.dim, H * W)  # (B, 3*G*dim, H, W) -> (B, G, 3*dim, N)
            q, k, v = qkv.split(self.dim, dim=2)  # 3 x (B, G, dim, N)
            # ReLU instead of softmax's exp: the similarity factorises, so the matmuls can be reordered
            # non-negative q, k also make every k_m . q_n >= 0: the normaliser is a sum of non-negative weights, so
            # out_n is a weighted average of the v_m, as softmax attention's is
            q, k = F.relu(q), F.relu(k)
            if not quadratic:
                # (v k^T) q never forms the N x N map; the row of ones added to v also yields sum_m k_m . q_n
                # why the ones row gives the normaliser: the padded row of (v k^T) is sum_m k_m^T, so the same row of
                # (v k^T) q is sum_m k_m . q_n; numerator and denominator come out of one pair of matmuls
                v = F.pad(v, (0, 0, 0, 1), mode="constant", value=1.0)  # (B, G, dim+1, N)
                out = (v @ k.transpose(-1, -2)) @ q  # (B, G, dim+1, dim) @ (B, G, dim, N) -> (B, G, dim+1, N)
                # the division in float32 (as the official code): both rows are sums over all N tokens, which half
                # precision rounds coarsely (bf16 keeps 8 mantissa bits); a small denominator amplifies that error
                out = out.float() if out.dtype in half else out
                # eps only guards a query whose ReLU weights are all zero (0 / 0); it is far below any real sum
                out = out[:, :, :-1] / (out[:, :, -1:] + self.eps)  # (B, G, dim, N)
            else:
                # few tokens: the explicit N x N map, normalised over the keys by the same sum_m k_m . q_n
                att = k.transpose(-1, -2) @ q  # (B, G, N_key, N_query)
                att32 = att.float() if att.dtype in half else att
                att = (att32 / (att32.sum(dim=2, keepdim=True) + self.eps)).to(att.dtype)
                out = v @ att  # (B, G, dim, N_key) @ (B, G, N_key, N) -> (B, G, dim, N)
        # undo the head split: head groups back to channels, tokens back to the H x W grid, for the 1x1 proj
        return out.reshape(B, -1, H, W)  # (B, G, dim, N) -> (B, G*dim, H, W)

    def forward(self, x):
        qkv = self.qkv(x)  # (B, C, H, W) -> (B, 3*heads*dim, H, W)
        # multi-scale: each aggregation mixes nearby tokens' q/k/v, giving extra head groups (EfficientViT)
        qkv = torch.cat([qkv] + [op(qkv) for op in self.aggreg], dim=1)  # -> (B, 3*heads*dim*(1+S), H, W)
        # G = heads*(1+S) head groups, each attended independently; back in qkv's dtype, as the official forward
        out = self.attention(qkv).to(qkv.dtype)  # (B, G*dim, H, W)
        return self.proj(out)  # (B, G*dim, H, W) -> (B, C_out, H, W)


class EfficientViTBlock(nn.Module):
    """x + LiteMLA(x), then x + GLUMBConv(x) (official ops.EfficientViTBlock; dim 32, expand 4)."""

    def __init__(self, channels, norm, act, scales=(), dim=32, heads_ratio=1.0, expand_ratio=4):
        super().__init__()
        attn = LiteMLA(channels, channels, heads_ratio=heads_ratio, dim=dim, norm=(None, norm), scales=scales)
        # LiteMLA = global context mixing (token mixer); norm only after its output projection, no pre-norm
        self.context_module = ResidualBlock(attn, nn.Identity())
        # GLUMBConv = local mixing + channel FFN
        self.local_module = ResidualBlock(GLUMBConv(channels, norm, act, expand_ratio), nn.Identity())

    def forward(self, x):
        return self.local_module(self.context_module(x))


def build_block(block_type, channels, norm, act):
    """One stage block (official dc_ae.build_block): 'ResBlock', 'EViT_GLU' (scales ()), 'EViTS5_GLU' (scales (5,))."""
    if block_type == "ResBlock":
        # identity skip around the two convs (the high-resolution stages, where attention is too costly)
        return ResidualBlock(ResBlock(channels, norm, act), nn.Identity())
    if block_type == "EViT_GLU":  # single-scale linear attention (the in/mix releases)
        return EfficientViTBlock(channels, norm, act, scales=())
    if block_type == "EViTS5_GLU":  # + one 5x5 aggregation scale (the SANA AE)
        return EfficientViTBlock(channels, norm, act, scales=(5,))
    raise ValueError(f"unknown block_type {block_type!r} (expected 'ResBlock', 'EViT_GLU' or 'EViTS5_GLU')")


def _per_stage(value, i):
    """Config fields may be one value or a per-stage list (official convention)."""
    return value[i] if isinstance(value, (list, tuple)) else value


def build_stage(width, depth, block_type, norm, act):
    """`depth` blocks at `width` channels; block_type may be a per-block list (official build_stage_main; no
    release uses that, kept so every official config builds)."""
    if isinstance(block_type, (list, tuple)) and len(block_type) != depth:
        raise ValueError(f"per-block block_type list {block_type} does not have depth {depth} entries")
    return [build_block(_per_stage(block_type, d), width, norm, act) for d in range(depth)]


# --------------------------------------------------------------------------------------------------------------
# The network: encoder and decoder
# --------------------------------------------------------------------------------------------------------------


def _check_lists(cfg, fields, what):
    """One-line ValueErrors for config combinations the official code asserts on (or silently breaks)."""
    n = len(cfg["width_list"])
    if len(cfg["depth_list"]) != n:
        raise ValueError(f"{what}: width_list and depth_list lengths differ ({n} vs {len(cfg['depth_list'])})")
    for f in fields:
        if isinstance(cfg[f], (list, tuple)) and len(cfg[f]) != n:
            raise ValueError(f"{what}: per-stage {f} has {len(cfg[f])} entries, expected {n}")
    # depth_list[0] == 0 makes project_in jump to width_list[1], which must then exist
    if cfg["depth_list"][0] == 0 and n < 2:
        raise ValueError(f"{what}: depth_list[0] == 0 needs at least 2 stages")


class Encoder(nn.Module):
    """project_in -> stages 0..N-1 (blocks, then a down-sampling block) -> project_out (official dc_ae.Encoder).

    Spatial compression f = 2^(N-1). When depth_list[0] == 0 (all in/mix releases) project_in is itself a
    down-sampling layer straight to width_list[1], without shortcut, and width_list[0] is never built.
    project_out = 3x3 conv to the latent + the averaging shortcut with factor 1 (residual autoencoding at
    the latent: latent channel o = mean of feature channels o*g ... o*g+g-1).
    """

    def __init__(self, cfg):
        super().__init__()
        _check_lists(cfg, ["block_type", "norm", "act"], "encoder")
        if cfg["double_latent"]:
            raise ValueError("encoder.double_latent=True is not supported (no DC-AE release uses it)")
        if not cfg["downsample_match_channel"]:
            raise ValueError("encoder.downsample_match_channel=False is not supported (no DC-AE release uses it)")
        if cfg["out_norm"] is not None:
            raise ValueError("encoder.out_norm must be None (the official builder cannot build it either)")
        widths, depths = cfg["width_list"], cfg["depth_list"]
        n = len(widths)
        if depths[0] > 0:
            self.project_in = ConvLayer(cfg["in_channels"], widths[0], 3, bias=True)
        else:
            # no shortcut: 3 RGB channels * 4 do not average into width_list[1] channels in general
            self.project_in = build_downsample(cfg["downsample_block_type"], cfg["in_channels"], widths[1], None)
        stages = []
        for i in range(n):
            blocks = build_stage(widths[i], depths[i], _per_stage(cfg["block_type"], i),
                                 _per_stage(cfg["norm"], i), _per_stage(cfg["act"], i))
            # the last stage has no down-sampling: n stages -> n-1 halvings -> f = 2^(n-1)
            if i < n - 1 and depths[i] > 0:
                # the down-sampling block (+ averaging shortcut) ends the stage, h -> h/2
                blocks.append(build_downsample(cfg["downsample_block_type"], widths[i], widths[i + 1],
                                               cfg["downsample_shortcut"]))
            stages.append(nn.Sequential(*blocks))  # an empty stage is an empty Sequential (identity)
        self.stages = nn.ModuleList(stages)
        # official OpSequential([norm=None, act, conv]) drops the None entries: the conv is main.0 (or main.1 after an act)
        out = [m for m in (build_act(cfg["out_act"]),) if m is not None]
        main = nn.Sequential(*out, ConvLayer(widths[-1], cfg["latent_channels"], 3, bias=True))
        if cfg["out_shortcut"] is None:
            self.project_out = main
        elif cfg["out_shortcut"] == "averaging":
            # residual autoencoding at the latent: conv(x) + channel-group mean of x (factor 1)
            # factor 1: no spatial change; the shortcut gives the latent a fixed summary of the last features, so the
            # conv only learns a residual on it (the same residual-autoencoding idea as the down blocks)
            self.project_out = ResidualBlock(main, ChannelAveragingShortcut(widths[-1], cfg["latent_channels"], 1))
        else:
            raise ValueError(f"unknown encoder out_shortcut {cfg['out_shortcut']!r} (expected 'averaging' or None)")

    def steps(self):
        """The modules in execution order (empty stages skipped, as the official forward does)."""
        return [self.project_in] + [s for s in self.stages if len(s) > 0] + [self.project_out]

    def forward(self, x):
        for step in self.steps():
            x = step(x)
        return x  # (B, in_channels, H, W) -> (B, latent_channels, H/f, W/f)


class Decoder(nn.Module):
    """project_in -> stages N-1..0 (an up-sampling block, then blocks) -> project_out (official dc_ae.Decoder).

    project_in = 3x3 conv from the latent + the duplicating shortcut with factor 1 (residual autoencoding at
    the latent). Stage i is stored at stages[i] (encoder order) and run in reverse; it starts with an
    up-sampling block from width_list[i+1]. project_out = out_norm -> out_act (ReLU in every release, even
    SANA's SiLU decoder) -> 3x3 conv, or an up-sampling layer without shortcut when depth_list[0] == 0.
    """

    def __init__(self, cfg):
        super().__init__()
        _check_lists(cfg, ["block_type", "norm", "act"], "decoder")
        if not cfg["upsample_match_channel"]:
            raise ValueError("decoder.upsample_match_channel=False is not supported (no DC-AE release uses it)")
        widths, depths = cfg["width_list"], cfg["depth_list"]
        n = len(widths)
        # mirrors the encoder's project_out
        proj = ConvLayer(cfg["latent_channels"], widths[-1], 3, bias=True)
        if cfg["in_shortcut"] is None:
            self.project_in = proj
        elif cfg["in_shortcut"] == "duplicating":
            # residual autoencoding at the latent: conv(z) + z's channels repeated to width_list[-1] (factor 1)
            self.project_in = ResidualBlock(proj, ChannelDuplicatingShortcut(cfg["latent_channels"], widths[-1], 1))
        else:
            raise ValueError(f"unknown decoder in_shortcut {cfg['in_shortcut']!r} (expected 'duplicating' or None)")
        stages = []
        for i in range(n):
            blocks = []
            if i < n - 1 and depths[i] > 0:
                # the up-sampling block (+ duplicating shortcut) starts the stage, h -> 2h
                blocks.append(build_upsample(cfg["upsample_block_type"], widths[i + 1], widths[i],
                                             cfg["upsample_shortcut"]))
            blocks += build_stage(widths[i], depths[i], _per_stage(cfg["block_type"], i),
                                  _per_stage(cfg["norm"], i), _per_stage(cfg["act"], i))
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        # channels reaching the head: widths[0] only if stage 0 was built
        c = widths[0] if depths[0] > 0 else widths[1]
        head = [build_norm(cfg["out_norm"], c), build_act(cfg["out_act"])]
        if depths[0] > 0:
            head.append(ConvLayer(c, cfg["in_channels"], 3, bias=True))
        else:
            # the last x2 up-sampling is the output layer itself (mirror of the encoder's project_in)
            head.append(build_upsample(cfg["upsample_block_type"], c, cfg["in_channels"], None))
        # official OpSequential drops None entries: with norm and act the final layer is index 2
        self.project_out = nn.Sequential(*[m for m in head if m is not None])

    def steps(self):
        """The modules in execution order: project_in, stages N-1 ... 0 (non-empty), project_out."""
        return [self.project_in] + [s for s in reversed(self.stages) if len(s) > 0] + [self.project_out]

    def forward(self, z):
        for step in self.steps():
            z = step(z)
        return z  # (B, latent_channels, h, w) -> (B, in_channels, h*f, w*f)


# --------------------------------------------------------------------------------------------------------------
# Training losses (decoupled high-resolution adaptation): L1 + LPIPS, + PatchGAN in phase 3
# --------------------------------------------------------------------------------------------------------------


# The paper's phase 3 adds a GAN loss; the official repo ships no discriminator or loss, so we use the
# standard PatchGAN + hinge loss + adaptive weight of the LDM autoencoders (taming-transformers), copied
# from this project's ae_kl.py.

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


# Copied from ae_kl.hinge_d_loss
def hinge_d_loss(logits_real, logits_fake):
    """Hinge loss of the discriminator (taming-transformers): 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_rec))])."""
    return 0.5 * (torch.mean(F.relu(1.0 - logits_real)) + torch.mean(F.relu(1.0 + logits_fake)))


# Copied from ae_kl.calculate_adaptive_weight
def calculate_adaptive_weight(nll_loss, g_loss, last_layer, disc_weight):
    """VQGAN Eq. 7: lambda = ||grad_W L_rec|| / (||grad_W L_GAN|| + delta), W = the decoder's last layer.

    delta = 1e-4 as in the taming-transformers / LDM code (the VQGAN paper writes 1e-6). Clamped to [0, 1e4],
    detached, times disc_weight. torch.autograd.grad touches no .grad field (safe under DDP and autocast) and
    keeps the graph for the real backward. Without a graph (no_grad, evaluation) the taming code falls into its
    except-branch and uses 0; so do we.
    """
    if not (torch.is_grad_enabled() and nll_loss.requires_grad and g_loss.requires_grad):
        return torch.zeros((), device=nll_loss.device)
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    d_weight = torch.norm(nll_grads.float()) / (torch.norm(g_grads.float()) + 1e-4)  # delta 1e-4, see above
    d_weight = torch.clamp(d_weight, 0.0, 1e4).detach()
    return d_weight * disc_weight


_LPIPS_CACHE = {}  # one frozen LPIPS per (pretrained, device) and process: building VGG16 takes seconds


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


# Copied from ae_kl.get_lpips
def get_lpips(pretrained, device):
    """The process-wide frozen LPIPS for `device` (frozen, so models can share it)."""
    key = (bool(pretrained), str(device))
    if key not in _LPIPS_CACHE:
        cpu = _LPIPS_CACHE.get((bool(pretrained), "cpu")) or build_lpips(pretrained)
        _LPIPS_CACHE[(bool(pretrained), "cpu")] = cpu
        _LPIPS_CACHE[key] = cpu if str(device) == "cpu" else copy.deepcopy(cpu).to(device)
    return _LPIPS_CACHE[key]


# --------------------------------------------------------------------------------------------------------------
# DC-AE: the model, its phases and its losses
# --------------------------------------------------------------------------------------------------------------

# Optimiser defaults per phase: the paper's appendix as a third-party reading reports it (see "Chosen here").
PHASE_HPARAMS = {
    1: {"lr": 6.4e-5, "weight_decay": 0.1, "betas": (0.9, 0.999)},  # low-res full training
    2: {"lr": 1.6e-5, "weight_decay": 1e-3, "betas": (0.9, 0.999)},  # high-res latent adaptation
    3: {"lr": 5.4e-5, "weight_decay": 0.0, "betas": (0.5, 0.9)},  # low-res local refinement (GAN)
}


class DCAE(nn.Module):
    """Deep Compression Autoencoder: encoder + decoder (official dc_ae.DCAE) + the 3-phase training losses.

    encode(x) = encoder(x) * scale_factor, decode(z) = decoder(z / scale_factor) (the official DCAE never
    scales; the factor is the latent-diffusion convention). `disc` (PatchGAN) only trains in phase 3 but
    exists in every phase, so checkpoints of every phase have the same keys; with loss=None (inference,
    load_official) there is no `disc` and no LPIPS. LPIPS is kept outside the state dict.
    """

    def __init__(self, cfg, train_cfg):
        super().__init__()
        self.cfg, self.train_cfg = cfg, train_cfg
        self.encoder = Encoder(cfg["encoder"])
        self.decoder = Decoder(cfg["decoder"])
        self.in_channels, self.latent_channels = cfg["in_channels"], cfg["latent_channels"]
        # one x2 per stage transition: 6 stages -> f32, 7 -> f64, 8 -> f128 (official spatial_compression_ratio)
        self.spatial_compression_ratio = 2 ** (len(cfg["decoder"]["width_list"]) - 1)
        self.disc = None if train_cfg["loss"] is None else NLayerDiscriminator(
            cfg["in_channels"], train_cfg["disc_ndf"], train_cfg["disc_layers"]).apply(weights_init)
        # 0 = "not measured yet" (train.py --ae measures it); encode/decode then use 1, with a warning
        self.register_buffer("scale_factor", torch.tensor(float(train_cfg["scale_factor"])))
        self._scale_checked = False
        # LPIPS lives outside the module (get_lpips): not in state_dict() / parameters(), built at first loss
        self.phase = 1
        self._first_trainable = 0  # index into _steps() of the first module that trains (phases 2/3 skip autograd before it)

    # ---- contract: encode / decode ----------------------------------------------------------------------------

    def _scale(self):
        """scale_factor, or 1 while it is 0 ("not measured"); one host sync per model, for the warning."""
        if not self._scale_checked and not self.scale_factor.is_meta:
            self._scale_checked = True
            if float(self.scale_factor) == 0:
                warnings.warn("DC-AE scale_factor is not measured (0): encode/decode use 1 (train.py --ae measures it)")
        # torch.where, not a Python if: no host sync on every encode/decode
        return torch.where(self.scale_factor == 0, torch.ones_like(self.scale_factor), self.scale_factor)

    def _check_images(self, x):
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected images (B, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        # each stage transition halves H and W, so sizes must be multiples of f or a pixel_unshuffle fails
        f = self.spatial_compression_ratio
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the compression factor {f}")

    def encode(self, x, sample=True):
        """Images in [-1, 1] (B, C, H, W) -> scaled latents (B, latent_channels, H/f, W/f). DC-AE is
        deterministic (no posterior): `sample` is accepted, as by the other autoencoders, and ignored."""
        self._check_images(x)
        # the factor brings latents near unit variance for the diffusion model (LDM convention)
        return self.encoder(x) * self._scale()  # (B, C, H, W) -> (B, latent, H/f, W/f)

    def decode(self, z):
        """Scaled latents -> images (B, C, H*f, W*f), roughly in [-1, 1]."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"expected latents (B, {self.latent_channels}, h, w), got shape {tuple(z.shape)}")
        return self.decoder(z / self._scale())  # (B, latent, h, w) -> (B, C, h*f, w*f)

    def forward(self, x):
        """Reconstruction decode(encode(x)) (the official forward also returns a dummy loss and info dict)."""
        return self.decoder(self.encoder(x))  # (B, C, H, W) -> unscaled latent -> (B, C, H, W)

    # ---- Decoupled high-resolution adaptation: which parameters train in which phase ---------------------------

    def trainable_modules(self, phase):
        """Modules whose parameters train in `phase` (1, 2 or 3).

        PHASE NOTES (the paper gives no module list; the official trainer is not released):
          1  low-resolution full training: the whole encoder and decoder.
          2  high-resolution latent adaptation, "tune the middle layers" around the latent: the encoder's
             last `adapt_stages` non-empty stages + project_out, and the decoder's project_in + its first
             `adapt_stages` executed non-empty stages (default 1 each: the deepest EViT stages).
          3  low-resolution local refinement, "only tune the decoder head": the decoder's project_out
             (out norm + final conv / up-sampling layer) + its last `head_stages` executed non-empty stages
             (default 1), so the latent space of phase 2 stays fixed. The discriminator trains too.
        """
        enc = [s for s in self.encoder.stages if len(s) > 0]  # encoder order
        dec = [s for s in reversed(self.decoder.stages) if len(s) > 0]  # decoder execution order
        # phase 1: everything trains, at low resolution where full training is affordable
        if phase == 1:
            return [self.encoder, self.decoder]
        if phase == 2:
            # the generalisation penalty at high resolution is closed where it arises (around the latent),
            # at a fraction of the memory of full high-resolution training
            k = self.train_cfg["adapt_stages"]
            return enc[len(enc) - k:] + [self.encoder.project_out, self.decoder.project_in] + dec[:k]
        if phase == 3:
            # the GAN loss sharpens local detail; the latent space of phase 2 stays fixed
            k = self.train_cfg["head_stages"]
            # at low resolution the GAN's extra passes stay cheap, and local detail does not need the large image
            return dec[len(dec) - k:] + [self.decoder.project_out]
        raise ValueError(f"unknown phase {phase!r} (expected 1, 2 or 3)")

    def _steps(self):
        """Encoder then decoder modules in execution order (for the no-autograd frozen prefix)."""
        return self.encoder.steps() + self.decoder.steps()

    def _check_trainable(self):
        if self.disc is None:
            raise ValueError("this DC-AE was built with loss=None (inference only): no losses, no optimizer groups")

    def optimizer_groups(self, phase=None):
        """Set the phase, freeze everything outside it, return exactly the trainable parameters.

        Phases 1-2: {"ae": [...]}; phase 3: {"ae": decoder head, "disc": PatchGAN}. Frozen parameters get
        requires_grad=False and frozen BatchNorms stay in eval mode (their running stats do not move either).
        """
        self._check_trainable()
        phase = 1 if phase is None else int(phase)
        modules = self.trainable_modules(phase)
        self.phase = phase
        # freeze all first, then unfreeze the phase's modules: what is not listed stays frozen
        for p in self.parameters():
            p.requires_grad_(False)
        for m in modules:
            for p in m.parameters():
                p.requires_grad_(True)
        # phase 3 (local refinement): the PatchGAN trains with the decoder head, as its own 'disc' group
        if phase == 3:
            for p in self.disc.parameters():
                p.requires_grad_(True)
        steps = self._steps()
        # everything before this step can run under no_grad in _reconstruct (no activations kept)
        self._first_trainable = next(i for i, s in enumerate(steps) if any(p.requires_grad for p in s.parameters()))
        self.train(self.training)  # re-apply the frozen-BatchNorm rule below
        # the PatchGAN is left out of 'ae' even when it trains: each group gets its own optimiser and loss
        ae = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("disc.")]
        return {"ae": ae, "disc": list(self.disc.parameters())} if phase == 3 else {"ae": ae}

    def train(self, mode=True):
        super().train(mode)
        for m in self.modules():
            # a frozen BatchNorm must not update its running statistics either
            if isinstance(m, nn.BatchNorm2d) and not any(p.requires_grad for p in m.parameters()):
                m.eval()
        return self

    @property
    def hparams(self):
        """Optimiser defaults of the current phase (set by optimizer_groups), then the preset's own."""
        return {**PHASE_HPARAMS[self.phase], **self.train_cfg["hparams"]}

    # ---- losses ---------------------------------------------------------------------------------------------------

    def _reconstruct(self, x):
        """decoder(encoder(x)); the frozen modules before the first trainable one run without autograd
        (phase 2: the early encoder; phase 3: the encoder and most of the decoder) -- the memory saving
        the paper reports for phase 2."""
        steps = self._steps()
        # the frozen prefix holds no trainable parameter, so no gradient has to pass through it: skip its graph
        with torch.no_grad():
            for step in steps[: self._first_trainable]:
                x = step(x)
        for step in steps[self._first_trainable:]:
            x = step(x)
        return x

    def _lpips_loss(self, x_hat, x):
        """Mean LPIPS-VGG distance in float32 (LPIPS is frozen and shared; gradients flow to x_hat only)."""
        net = get_lpips(self.train_cfg["lpips_pretrained"], x.device)
        with no_autocast(x.device):
            return net(x_hat.float(), x.float()).mean()  # (B, 1, 1, 1) per-image distances -> scalar

    def _last_layer(self):
        """Weight of the decoder's final conv (where LDM's adaptive GAN weight compares gradient norms)."""
        last = self.decoder.project_out[-1]  # ConvLayer, or an up-sampling layer whose .conv is a ConvLayer
        # up-sampling layers wrap a ConvLayer (.conv.conv is the nn.Conv2d); a bare ConvLayer's .conv is the Conv2d
        return last.conv.conv.weight if isinstance(last.conv, ConvLayer) else last.conv.weight

    def loss(self, group, batch, step):
        """One loss per optimizer group. "ae": L1 + LPIPS (+ adaptive-weight hinge GAN loss in phase 3);
        "disc" (phase 3 only): hinge loss of the PatchGAN on real vs. reconstructed images."""
        self._check_trainable()
        x = batch["x"]
        self._check_images(x)
        tc = self.train_cfg
        # the GAN term belongs to phase 3 only (low-resolution local refinement)
        gan_on = self.phase == 3 and step >= tc["disc_start"]
        if group == "ae":
            x_hat = self._reconstruct(x)
            # float32 loss math so bf16 autocast does not round small reconstruction errors away
            l1 = (x_hat.float() - x.float()).abs().mean()
            # lpips_weight 0 skips the VGG entirely; a Python float, so no host sync
            lp = self._lpips_loss(x_hat, x) if tc["lpips_weight"] else torch.zeros((), device=x.device)
            # the reconstruction objective of every phase: L1 + LPIPS
            rec = tc["l1_weight"] * l1 + tc["lpips_weight"] * lp
            logs = {"l1": l1.detach(), "lpips": lp.detach(), "rec": rec.detach()}
            if not gan_on:
                return rec, logs
            # generator term: the discriminator runs with detached weights, so this loss gives its parameters
            # (the "disc" group) no gradient
            params = {n: p.detach() for n, p in self.disc.named_parameters()}
            logits_fake = torch.func.functional_call(self.disc, params, (x_hat,), strict=False).float()
            g_loss = -logits_fake.mean()  # hinge generator loss: raise D's patch logits on reconstructions
            # L_rec + lambda * L_GAN, lambda balancing the two gradients at the decoder's last layer (LDM)
            d_weight = calculate_adaptive_weight(rec, g_loss, self._last_layer(), tc["disc_weight"])
            loss = rec + d_weight * g_loss
            logs.update(g_loss=g_loss.detach(), d_weight=d_weight.detach())
            return loss, logs
        if group == "disc":
            if self.phase != 3:
                raise ValueError(f"the 'disc' group only exists in phase 3 (current phase {self.phase})")
            if not gan_on:
                # before disc_start no discriminator forward, so its BatchNorm statistics stay put (as infd.py);
                # a zero touching every parameter gives DDP and the optimiser all-zero gradients for the group
                zero = sum(p.sum() for p in self.disc.parameters()) * 0.0
                return zero.float(), {"d_loss": zero.detach().float()}
            # the discriminator step needs no gradient through the autoencoder
            with torch.no_grad():
                x_hat = self._reconstruct(x)
            logits_real = self.disc(x.detach()).float()  # (B, C, H, W) -> (B, 1, H', W') patch logits
            logits_fake = self.disc(x_hat).float()
            d_loss = hinge_d_loss(logits_real, logits_fake)
            logs = {"d_loss": d_loss.detach(), "logits_real": logits_real.mean().detach(),
                    "logits_fake": logits_fake.mean().detach()}
            return d_loss, logs
        raise ValueError(f"unknown optimizer group {group!r} (expected 'ae' or 'disc')")


# --------------------------------------------------------------------------------------------------------------
# Presets: the released configurations (efficientvit ae_model_zoo) + tiny
# --------------------------------------------------------------------------------------------------------------

# Official DCAEConfig / EncoderConfig / DecoderConfig defaults (dc_ae.py); every field is kept so a resolved
# config equals the official dataclasses.asdict(cfg) in tests/golden/dcae/keys/*.txt.
ENCODER_DEFAULTS = {
    "width_list": (128, 256, 512, 512, 1024, 1024), "depth_list": (2, 2, 2, 2, 2, 2), "block_type": "ResBlock",
    "norm": "trms2d", "act": "silu", "downsample_block_type": "ConvPixelUnshuffle", "downsample_match_channel": True,
    "downsample_shortcut": "averaging", "out_norm": None, "out_act": None, "out_shortcut": "averaging",
    "double_latent": False,
}
DECODER_DEFAULTS = {
    "in_shortcut": "duplicating", "width_list": (128, 256, 512, 512, 1024, 1024), "depth_list": (2, 2, 2, 2, 2, 2),
    "block_type": "ResBlock", "norm": "trms2d", "act": "silu", "upsample_block_type": "ConvPixelShuffle",
    "upsample_match_channel": True, "upsample_shortcut": "duplicating", "out_norm": "trms2d", "out_act": "relu",
}
DCAE_DEFAULTS = {"in_channels": 3, "latent_channels": 32, "use_quant_conv": False, "pretrained_path": None,
                 "pretrained_source": "dc-ae", "scaling_factor": None}

# Our training options: none is in the official code (no trainer is released); see "Chosen here" above.
# loss=None builds the network only (no PatchGAN, no LPIPS): inference and load_official.
# disc_ndf / disc_layers: taming's PatchGAN width and depth (64, 3; the tiny preset narrows it).
# adapt_stages / head_stages: how many stages phases 2 / 3 tune (the paper ablates this, lists no modules).
TRAIN_DEFAULTS = {
    "loss": True, "scale_factor": 0.0, "lpips_pretrained": True, "l1_weight": 1.0, "lpips_weight": 1.0,
    "disc_weight": 0.5, "disc_start": 0, "disc_ndf": 64, "disc_layers": 3,
    "adapt_stages": 1, "head_stages": 1, "hparams": {},
}


def _in_mix(latent, n_stages, scale_factor):
    """dc-ae-f{32,64,128}c{latent}-{in,mix}-1.0: ResBlock x3 then EViT_GLU stages, BN+ReLU in the decoder ResBlock stages."""
    # ResBlocks in the 3 highest-resolution stages, EfficientViT blocks in the low-resolution ones
    # f = 2^(n_stages-1): 6 -> f32, 7 -> f64, 8 -> f128; deeper stages reuse the wide channel counts
    widths = [128, 256, 512, 512, 1024, 1024, 2048, 2048][:n_stages]
    blocks = ["ResBlock"] * 3 + ["EViT_GLU"] * (n_stages - 3)
    return {
        "latent_channels": latent,
        # depth 0 at stage 0: the full-resolution stage is skipped; attention only in the low-resolution stages
        "encoder": {"width_list": widths, "depth_list": [0, 4, 8] + [2] * (n_stages - 3), "block_type": blocks},
        "decoder": {"width_list": widths, "depth_list": [0, 5, 10] + [2] * (n_stages - 3), "block_type": blocks,
                    "norm": ["bn2d"] * 3 + ["trms2d"] * (n_stages - 3), "act": ["relu"] * 3 + ["silu"] * (n_stages - 3)},
        "scale_factor": scale_factor,
    }


_SANA = {
    "latent_channels": 32,
    "encoder": {"width_list": [128, 256, 512, 512, 1024, 1024], "depth_list": [2, 2, 2, 3, 3, 3],
                "block_type": ["ResBlock"] * 3 + ["EViTS5_GLU"] * 3, "downsample_block_type": "Conv"},
    "decoder": {"width_list": [128, 256, 512, 512, 1024, 1024], "depth_list": [3, 3, 3, 3, 3, 3],
                "block_type": ["ResBlock"] * 3 + ["EViTS5_GLU"] * 3, "upsample_block_type": "InterpolateConv"},
    "scaling_factor": 0.41407,
}

# scale factors: repo README (f32c32-in 0.3189, f64c128-in 0.2889), dc_ae_f32c32 (sana 0.41407), diffusers'
# conversion script (the -mix models and f128c512-in). Params: official AE parameters (= the key files' counts;
# our PatchGAN adds 2.77 M at ndf 64). GFLOPs: encode + decode of one 512x512 image, FlopCounterMode on the
# meta device (2 FLOPs per MAC; test_dcae.py::test_config_params_and_flops re-measures them).
CONFIGS = {
    "dc-ae-f32c32-in-1.0": _in_mix(32, 6, 0.3189),  # 323.36 M params, 4855 GFLOPs (enc 2085 + dec 2769)
    "dc-ae-f32c32-mix-1.0": _in_mix(32, 6, 0.4552),  # 323.36 M params, 4855 GFLOPs (same architecture as -in)
    "dc-ae-f64c128-in-1.0": _in_mix(128, 7, 0.2889),  # 676.90 M params, 4902 GFLOPs
    "dc-ae-f64c128-mix-1.0": _in_mix(128, 7, 0.4538),  # 676.90 M params, 4902 GFLOPs
    "dc-ae-f128c512-in-1.0": _in_mix(512, 8, 0.4883),  # 1120.68 M params, 4916 GFLOPs
    "dc-ae-f128c512-mix-1.0": _in_mix(512, 8, 0.3620),  # 1120.68 M params, 4916 GFLOPs
    # SANA's AE: Conv down, InterpolateConv up, EViTS5_GLU, trms2d + silu everywhere
    "dc-ae-f32c32-sana-1.0": _SANA,  # 312.25 M params, 3387 GFLOPs (enc 1295 + dec 2092)
    # tiny: in/mix-style f8c16 for CPU tests at 32x32 (EViT stages at 8x8 = linear and 4x4 = quadratic branch)
    "tiny": {
        "latent_channels": 16,
        "encoder": {"width_list": [16, 32, 64, 64], "depth_list": [0, 1, 1, 1],
                    "block_type": ["ResBlock", "ResBlock", "EViT_GLU", "EViT_GLU"]},
        "decoder": {"width_list": [16, 32, 64, 64], "depth_list": [0, 1, 1, 1],
                    "block_type": ["ResBlock", "ResBlock", "EViT_GLU", "EViT_GLU"],
                    "norm": ["bn2d", "bn2d", "trms2d", "trms2d"], "act": ["relu", "relu", "silu", "silu"]},
        "disc_ndf": 16, "hparams": {"lr": 5e-4},
    },  # 0.580 M AE params (+0.175 M PatchGAN), 0.063 GFLOPs at 32x32
}
# short aliases (the -in-1.0 models)
CONFIGS["f32c32"] = CONFIGS["dc-ae-f32c32-in-1.0"]
CONFIGS["f64c128"] = CONFIGS["dc-ae-f64c128-in-1.0"]
CONFIGS["f128c512"] = CONFIGS["dc-ae-f128c512-in-1.0"]


def resolve_config(spec):
    """Preset/dict -> (official cfg with every DCAEConfig field, our training options).

    Accepts our preset dicts, the official cfg dict, or the key files' {"cfg": {...}} line. Top-level
    in_channels / latent_channels propagate to encoder and decoder, like the official OmegaConf interpolation.
    Dotted keys ("encoder.depth_list") override one field of a sub-config.
    """
    spec = copy.deepcopy(spec)
    if "cfg" in spec and isinstance(spec["cfg"], dict):
        # key-file format: the official cfg nested under "cfg"; explicit top-level keys win
        spec = {**spec.pop("cfg"), **spec}
    cfg = dict(DCAE_DEFAULTS)
    train_cfg = copy.deepcopy(TRAIN_DEFAULTS)
    enc, dec = {}, {}
    for k, v in spec.items():
        if k in ("encoder", "decoder"):
            (enc if k == "encoder" else dec).update(v)
        elif "." in k and k.split(".", 1)[0] in ("encoder", "decoder"):
            part, field = k.split(".", 1)
            (enc if part == "encoder" else dec)[field] = v
        elif k in DCAE_DEFAULTS:
            cfg[k] = v
        elif k in TRAIN_DEFAULTS:
            train_cfg[k] = v
        else:
            raise ValueError(f"unknown DC-AE config key {k!r}")
    # reject typos early: an unknown key would otherwise be silently ignored
    for sub, defaults in ((enc, ENCODER_DEFAULTS), (dec, DECODER_DEFAULTS)):
        unknown = set(sub) - set(defaults) - {"in_channels", "latent_channels"}
        if unknown:
            raise ValueError(f"unknown encoder/decoder config keys {sorted(unknown)}")
    # the sub-configs always follow the top-level channels (official "${..in_channels}" interpolation)
    cfg["encoder"] = {"in_channels": cfg["in_channels"], "latent_channels": cfg["latent_channels"],
                      **{k: enc.get(k, v) for k, v in ENCODER_DEFAULTS.items()}}
    cfg["decoder"] = {"in_channels": cfg["in_channels"], "latent_channels": cfg["latent_channels"],
                      **{k: dec.get(k, v) for k, v in DECODER_DEFAULTS.items()}}
    if not spec.get("scale_factor") and cfg["scaling_factor"]:
        train_cfg["scale_factor"] = cfg["scaling_factor"]  # official field (SANA) when the preset names none
    return cfg, train_cfg


def create(config="tiny", **overrides):
    """Build a DC-AE from a CONFIGS name or a config dict (official kwargs accepted), with overrides.

    Generic train.py arguments: image_size (only checked: divisible by the compression factor; the model
    is fully convolutional), in_channels (image channels), num_classes (ignored: unconditional).
    """
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"unknown DC-AE preset {config!r}; known: {sorted(CONFIGS)}")
        spec = copy.deepcopy(CONFIGS[config])
    elif isinstance(config, dict):
        spec = copy.deepcopy(config)
    else:
        raise ValueError(f"config must be a preset name or a dict, got {type(config).__name__}")
    image_size = overrides.pop("image_size", None)
    overrides.pop("num_classes", None)
    spec.update(overrides)
    cfg, train_cfg = resolve_config(spec)
    model = DCAE(cfg, train_cfg)
    f = model.spatial_compression_ratio
    if image_size is not None and int(image_size) % f != 0:
        raise ValueError(f"image_size {image_size} is not divisible by the DC-AE compression factor {f}")
    return model


# --------------------------------------------------------------------------------------------------------------
# Official checkpoints
# --------------------------------------------------------------------------------------------------------------

def official_to_ours(key):
    """The whole rename table, official (efficientvit) -> ours: OpSequential.op_list is an nn.Sequential here."""
    return key.replace(".op_list.", ".")


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
    """Load an official DC-AE checkpoint (efficientvit naming, e.g. HF mit-han-lab/dc-ae-f32c32-in-1.0), strict.

    config: a CONFIGS name ("dc-ae-f32c32-in-1.0", ...) or the official cfg dict (as in the key files). The
    model is built with loss=None (no PatchGAN), so every key but our `scale_factor` (the preset's) must match.
    """
    model = create(config, loss=None)
    if isinstance(path_or_state_dict, (str, os.PathLike)) and str(path_or_state_dict).endswith(".safetensors"):
        path_or_state_dict = read_safetensors(path_or_state_dict)  # {key: tensor}; torch files: read_checkpoint
    # official names -> ours (".op_list." -> "."), tensors untouched
    sd = {official_to_ours(k): v for k, v in read_checkpoint(path_or_state_dict).items()}
    ours = model.state_dict()
    sd.setdefault("scale_factor", ours["scale_factor"])
    # strict key and shape match, checked before load_state_dict for a readable one-line error
    missing, unexpected = sorted(set(ours) - set(sd)), sorted(set(sd) - set(ours))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match DC-AE config: missing {missing[:5]} ({len(missing)}), "
                         f"unexpected {unexpected[:5]} ({len(unexpected)})")
    bad = [k for k in ours if tuple(ours[k].shape) != tuple(sd[k].shape)]
    if bad:
        raise ValueError(f"checkpoint shapes differ from the config: {[(k, tuple(sd[k].shape)) for k in bad[:5]]}")
    model.load_state_dict(sd, strict=True)
    return model
