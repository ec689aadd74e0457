"""LDM VQ autoencoder (VQ-reg first stage, a VQGAN whose quantizer is absorbed into the decoder).

Papers: Robin Rombach, Andreas Blattmann, Dominik Lorenz, Patrick Esser, Bjoern Ommer, "High-Resolution Image
Synthesis with Latent Diffusion Models", CVPR 2022, arXiv 2112.10752, Sec. 3.1 (VQ-reg) and App. G (Eq. 25);
Patrick Esser, Robin Rombach, Bjoern Ommer, "Taming Transformers for High-Resolution Image Synthesis", CVPR 2021,
arXiv 2012.09841, Sec. 3.1 (VQGAN: Eq. 4-7, quantizer, perceptual + patch-GAN loss, adaptive weight).

Official code matched (tests/test_ae_vq.py on the goldens in tests/golden/ae_vq/):
    CompVis/latent-diffusion @ a506df5756472e2ebaf9078affdde2c4f1502cd4
        ldm/models/autoencoder.py              VQModel (encode, encode_to_prequant, decode, forward,
                                               training_step, configure_optimizers), VQModelInterface
        ldm/modules/diffusionmodules/model.py  Encoder, Decoder and their blocks (the same code as ae_kl.py)
        ldm/modules/losses/vqperceptual.py     VQLPIPSWithDiscriminator (ldm variant: pixel_loss, perplexity)
    CompVis/taming-transformers @ 3ba01b241669f5ade541ce990f7650a3b8f65318
        taming/modules/vqvae/quantize.py       VectorQuantizer2 (legacy beta placement, straight-through)
        taming/modules/losses/vqperceptual.py  VQLPIPSWithDiscriminator (the loss the released configs name)
        taming/modules/discriminator/model.py  NLayerDiscriminator, weights_init

Map from the papers to this file:
    LDM Sec. 3.1 encoder E / decoder D                             Encoder, Decoder (copied from ae_kl.py)
    VQ-VAE Eq. 1-2 / VQGAN Eq. 2: z_q = argmin_k ||z - e_k||, straight-through    VectorQuantizer
    VQ-VAE Eq. 3 / VQGAN Eq. 4: codebook + commitment loss (legacy beta)          VectorQuantizer.forward
    VQGAN Eq. 5-7 / LDM App. G Eq. 25: L1 + LPIPS + PatchGAN, adaptive weight     VQLPIPSWithDiscriminator
    LDM Sec. 3.1 "quantization absorbed by the decoder": diffuse on h before quantization
                                                                   VQModel.encode / decode (VQModelInterface)
Reading order: VectorQuantizer, measure_perplexity, VQLPIPSWithDiscriminator.forward, VQModel (the blocks
copied from ae_kl.py are read there).

The blocks marked `# Copied from ae_kl.X` are character-for-character copies of ae_kl.py (a test checks it).

Deliberately left out / changed:
    * `remap` / `unknown_index` (index remapping, unused by LDM), the Gumbel and EMA quantizers, the
      conditional discriminator, ActNorm: a ValueError if a config asks for them.
    * The official's broken paths: the released yamls name the taming loss, which has no
      `predicted_indices` argument, so VQModel.training_step raises TypeError there; the ldm loss misses
      `exists`. We implement the intended behaviour: the taming loss numbers plus the ldm variant's perplexity
      / cluster-usage logs (and `pixel_loss="l2"`), always given the indices.
    * LPIPS: the lpips package, frozen, eval mode, built lazily, kept out of state_dict() (as ae_kl.py).
    * Official kwargs whose lossconfig is torch.nn.Identity (LDM's first_stage_config) build loss=None; a dict
      config without disc_start gets 250001; the tiny preset and its batch of 12 are ours.
    * The autoencoder step gives the discriminator no gradient (Lightning's toggle_optimizer).
    * The submodule the official calls `loss` is `loss_fn` ("loss" is the contract method); the official
      `VQModel.encode/decode` are `encode_quant/decode_quant` here, because `encode/decode` are the contract's
      (VQModelInterface semantics times scale_factor).
"""
import copy
import os
import warnings
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------------
# Building blocks of the encoder and decoder (ldm/modules/diffusionmodules/model.py), copied from ae_kl.py
# ----------------------------------------------------------------------------------------------------------


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


# Copied from ae_kl.Decoder
class Decoder(nn.Module):
    """D of LDM Sec. 3.1: z (B, z_channels, h, w) -> (B, out_ch, h*f, w*f), the mirror image of the Encoder.

    conv_in, mid block, then levels L-1 .. 0 with num_res_blocks + 1 ResnetBlocks (and AttnBlocks at the
    resolutions in attn_resolutions) and an Upsample except at level 0. `up` is indexed like the official
    (built with insert(0, ...)): up[0] is the HIGHEST resolution level, which runs last. No tanh at the end.
    """

    def __init__(self, *, ch, out_ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels,
                 dropout=0.0, attn_type="vanilla"):
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout=dropout)
        self.mid.attn_1 = make_attn(block_in, attn_type)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout=dropout)
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(block_in, block_out, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                up.upsample = Upsample(block_in)
                curr_res = curr_res * 2
            self.up.insert(0, up)  # prepend: keeps the official key numbering
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z):
        h = self.conv_in(z)  # (B, z_channels, h, w) -> (B, ch*ch_mult[-1], h, w)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = up.block[i_block](h)
                if len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if i_level != 0:
                h = up.upsample(h)  # (B, C, h, w) -> (B, C, 2h, 2w)
        return self.conv_out(nonlinearity(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------------------
# The PatchGAN discriminator, GAN losses, adaptive weight and LPIPS (taming-transformers), copied from ae_kl.py
# ----------------------------------------------------------------------------------------------------------


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


# Copied from ae_kl.adopt_weight
def adopt_weight(weight, global_step, threshold=0, value=0.0):
    """disc_start schedule: `value` (0) before step `threshold`, then `weight`. Python floats: no sync."""
    return value if global_step < threshold else weight


# Copied from ae_kl.hinge_d_loss
def hinge_d_loss(logits_real, logits_fake):
    """Hinge loss of the discriminator (taming-transformers): 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_rec))])."""
    return 0.5 * (torch.mean(F.relu(1.0 - logits_real)) + torch.mean(F.relu(1.0 + logits_fake)))


# Copied from ae_kl.vanilla_d_loss
def vanilla_d_loss(logits_real, logits_fake):
    """0.5 * (E[softplus(-D(x))] + E[softplus(D(x_rec))]), the original non-saturating GAN loss."""
    return 0.5 * (torch.mean(F.softplus(-logits_real)) + torch.mean(F.softplus(logits_fake)))


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


# ----------------------------------------------------------------------------------------------------------
# Sec. 3.1 VQ-reg: the vector quantizer (taming/modules/vqvae/quantize.py VectorQuantizer2)
# ----------------------------------------------------------------------------------------------------------

# VQ-VAE Sec. 3.1, Eq. 1-2: a one-hot posterior on the nearest code, z_q(x) = e_k, k = argmin_j ||z_e(x) - e_j||
class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantization with the straight-through gradient (VQ-VAE Eq. 1-3; VQGAN Eq. 2, 4).

    z (B, C, H, W) -> z_q (B, C, H, W), loss, (None, None, indices (B*H*W,) or (B, H, W)).
    Loss with legacy=True (the LDM/taming default, kept by the official for backward compatibility):
        mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2)
    i.e. beta multiplies the CODEBOOK term and the commitment term has weight 1 -- taming's own comment calls
    this "beta applied to the wrong term". legacy=False is the VQ-VAE paper's placement (commitment * beta).
    The forward value is (1 + beta) * mean((z_q - z)^2) either way; only the gradients differ.
    Computed in float32 with autocast off: argmin over bf16 distances would pick other codes.
    """

    def __init__(self, n_e, e_dim, beta=0.25, legacy=True, sane_index_shape=False):
        super().__init__()
        # n_e = K codes (n_embed), e_dim = C = embed_dim; beta 0.25 as VQ-VAE Sec. 3.2 and the taming code
        self.n_e, self.e_dim, self.beta, self.legacy = n_e, e_dim, beta, legacy
        self.sane_index_shape = sane_index_shape
        # the codebook Z = {e_k}, a (n_e, e_dim) table, trained only through the codebook term of the loss
        self.embedding = nn.Embedding(n_e, e_dim)
        # all codes start in a tiny box around 0 (scale 1/n_e), close together, none far from the others
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)  # the official init

    def forward(self, z):
        # float32 even under AMP: near-ties in d would flip the argmin in bf16
        with torch.autocast(z.device.type, enabled=False):
            # each latent pixel's C-vector becomes one row to quantize
            z = z.float().permute(0, 2, 3, 1).contiguous()  # (B, C, H, W) -> (B, H, W, C)
            # why flatten: quantization is per spatial position, independent of batch and location, so the
            # (B, H, W, C) grid becomes N = B*H*W independent C-vectors and one matrix of distances covers them all
            z_flattened = z.view(-1, self.e_dim)  # (N, C), N = B*H*W
            e = self.embedding.weight.float()  # (n_e, C)
            # squared distances ||z||^2 + ||e||^2 - 2 z.e, the expanded form of the official: (N, n_e)
            # expanded rather than broadcast (z[:, None] - e[None]): a GEMM, never an (N, n_e, C) tensor in memory
            d = (torch.sum(z_flattened ** 2, dim=1, keepdim=True) + torch.sum(e ** 2, dim=1)
                 - 2 * z_flattened @ e.t())
            # VQGAN Eq. 2: one code per latent pixel (argmin takes the first minimum on ties)
            # argmin has no gradient: this is why the codebook and commitment terms and the straight-through
            # estimator below are needed at all
            min_encoding_indices = torch.argmin(d, dim=1)  # (N,)
            # lookup in e (a differentiable cast of the weight): the codebook term reaches the weight
            z_q = F.embedding(min_encoding_indices, e).view(z.shape)  # (B, H, W, C)
            # VQGAN Eq. 4's last two terms: sg[z_q] - z pulls the encoder to the codes (commitment), z_q - sg[z]
            # moves the codes (codebook); legacy: beta on the codebook term; else VQ-VAE Eq. 3's placement
            if self.legacy:
                # why stop-gradients: without them one squared distance would pull codes and encoder towards each
                # other at the same rate; sg[.] splits it so each side has its own term and its own weight
                loss = torch.mean((z_q.detach() - z) ** 2) + self.beta * torch.mean((z_q - z.detach()) ** 2)
            else:
                loss = self.beta * torch.mean((z_q.detach() - z) ** 2) + torch.mean((z_q - z.detach()) ** 2)
            # straight-through (VQ-VAE Sec. 3.2, "copy gradients from decoder input z_q(x) to encoder output
            # z_e(x)"): the value is z_q, the gradient d z_q / d z = I
            # the decoder's gradient w.r.t. z_q is passed unchanged to z, as if quantization were the identity
            z_q = z + (z_q - z).detach()
            z_q = z_q.permute(0, 3, 1, 2).contiguous()  # (B, H, W, C) -> (B, C, H, W)
        if self.sane_index_shape:  # (N,) -> (B, H, W), the latent grid layout of the codes
            min_encoding_indices = min_encoding_indices.reshape(z_q.shape[0], z_q.shape[2], z_q.shape[3])
        # the two Nones stand in for the official's perplexity / one-hot encodings slots, never used by LDM
        return z_q, loss, (None, None, min_encoding_indices)

    def get_codebook_entry(self, indices, shape=None):
        """Codebook lookup; `shape` = (B, H, W, C) gives (B, C, H, W), None keeps (N, C)."""
        # decode from indices, e.g. sampled by a prior over codes (VQGAN Sec. 3.2 transformer)
        z_q = self.embedding(indices)  # (N,) -> (N, C)
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()  # (N, C) -> (B, H, W, C) -> (B, C, H, W)
        return z_q


def measure_perplexity(predicted_indices, n_embed):
    """exp(entropy of the code histogram) and the number of codes used (ldm vqperceptual.measure_perplexity),
    from a scatter-add histogram: the official's N x n_embed one-hot matrix gives the same numbers."""
    counts = torch.zeros(n_embed, device=predicted_indices.device)  # counts[k]: vectors assigned to code k
    idx = predicted_indices.reshape(-1)
    counts.index_add_(0, idx, torch.ones_like(idx, dtype=counts.dtype))
    avg_probs = counts / predicted_indices.numel()  # p_k; perplexity exp(H(p)): 1 (collapse) .. n_embed (uniform)
    perplexity = (-(avg_probs * torch.log(avg_probs + 1e-10)).sum()).exp()
    cluster_use = torch.sum(avg_probs > 0)  # codes used at least once (dead codes lower it)
    return perplexity, cluster_use


# ----------------------------------------------------------------------------------------------------------
# VQGAN Eq. 5-6 / LDM App. G Eq. 25 for VQ-reg: VQLPIPSWithDiscriminator
# (taming/modules/losses/vqperceptual.py, the loss the released configs name; + the ldm variant's
# pixel_loss "l2" and perplexity logging, ldm/modules/losses/vqperceptual.py)
# ----------------------------------------------------------------------------------------------------------

class VQLPIPSWithDiscriminator(nn.Module):
    """mean(|x - x_rec| + perceptual_weight * LPIPS) + codebook_weight * L_VQ + d_weight * disc_factor * L_GAN.

    Unlike the KL loss, the reconstruction term is a MEAN over all elements and there is no learned logvar.
    The adaptive weight is always computed (no disc_factor > 0 guard, unlike the KL loss).
    optimizer_idx 1: disc_factor * hinge(D(x), D(x_rec)) (or vanilla).
    """

    def __init__(self, disc_start, codebook_weight=1.0, pixelloss_weight=1.0, disc_num_layers=3,
                 disc_in_channels=3, disc_factor=1.0, disc_weight=1.0, perceptual_weight=1.0, disc_ndf=64,
                 disc_loss="hinge", pixel_loss="l1", n_classes=None, lpips_pretrained=True):
        super().__init__()
        if disc_loss not in ("hinge", "vanilla"):
            raise ValueError(f"disc_loss must be 'hinge' or 'vanilla', got {disc_loss!r}")
        if pixel_loss not in ("l1", "l2"):
            raise ValueError(f"pixel_loss must be 'l1' or 'l2', got {pixel_loss!r}")
        # weight of L_VQ (VQGAN Eq. 6 sums L_VQ + lambda L_GAN); 1.0 in every released config
        self.codebook_weight = codebook_weight
        self.pixel_weight = pixelloss_weight  # stored and never used, as in the official code
        self.perceptual_weight = perceptual_weight
        self.pixel_loss = pixel_loss
        # n_classes = n_embed: the histogram size of measure_perplexity (not a class count)
        # (perplexity near n_embed: codes used evenly; far below: many dead codes)
        self.n_classes = n_classes
        self.lpips_pretrained = lpips_pretrained  # LPIPS: get_lpips, built at the first loss, not in state_dict()
        # PatchGAN D of VQGAN Sec. 3.1: one real/fake logit per image patch, not per image
        self.discriminator = NLayerDiscriminator(disc_in_channels, ndf=disc_ndf, n_layers=disc_num_layers)
        self.discriminator.apply(weights_init)
        # disc_start: global step before which disc_factor is 0 (VQGAN trains the GAN term late)
        # why late: early reconstructions are blurry and D would win at once with large, uninformative gradients;
        # L_rec + L_VQ first bring the decoder close to the data and settle the codebook
        self.discriminator_iter_start = disc_start
        self.disc_loss = hinge_d_loss if disc_loss == "hinge" else vanilla_d_loss
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight

    def perceptual_loss(self, x, x_rec):
        """LPIPS(x, x_rec), shape (B, 1, 1, 1); lpips takes inputs in [-1, 1], the range x and x_rec have."""
        return get_lpips(self.lpips_pretrained, x.device)(x.contiguous(), x_rec.contiguous()).float()

    def _discriminate_for_generator(self, x_rec):
        """D(x_rec) with D's parameters frozen for this call (Lightning's toggle_optimizer): the
        autoencoder step must not leave gradients in the discriminator. The input still gets gradients."""
        flags = [p.requires_grad for p in self.discriminator.parameters()]
        for p in self.discriminator.parameters():
            p.requires_grad_(False)
        try:
            return self.discriminator(x_rec.contiguous()).float()  # (B, 1, H', W') patch logits
        finally:
            for p, f in zip(self.discriminator.parameters(), flags):
                p.requires_grad_(f)

    def forward(self, codebook_loss, inputs, reconstructions, optimizer_idx, global_step, last_layer=None,
                predicted_indices=None):
        """(loss, log) for optimizer_idx 0 (autoencoder) or 1 (discriminator); logs are detached."""
        inputs, reconstructions = inputs.float(), reconstructions.float()  # fp32 loss math under AMP
        # 0 before disc_start: gates both the generator and the D loss
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        if optimizer_idx == 0:
            # L_rec of VQGAN Eq. 4, L1 per element (taming) + LPIPS below; the ldm variant also allows L2
            if self.pixel_loss == "l1":
                rec_loss = torch.abs(inputs - reconstructions)  # (B, C, H, W)
            else:
                rec_loss = (inputs - reconstructions) ** 2  # (B, C, H, W), the ldm variant's pixel_loss 'l2'
            if self.perceptual_weight > 0:
                p_loss = self.perceptual_loss(inputs, reconstructions)  # (B, 1, 1, 1), broadcast to every pixel
                rec_loss = rec_loss + self.perceptual_weight * p_loss
            else:
                p_loss = torch.zeros((), device=inputs.device)  # (), logged only
            # no KL or logvar here: the codebook bounds the latent by construction (a finite set of codes), so only
            # L_VQ regularizes, and a mean suffices for the reconstruction term
            nll_loss = torch.mean(rec_loss)  # a mean over all elements, unlike the KL loss's sum / B
            # generator side of VQGAN Eq. 5 in the code's hinge form: -E[D(x_rec)], D itself frozen here
            # D is frozen inside this call but x_rec is not: the gradient reaches the decoder, codebook and E only via
            # the reconstruction
            g_loss = -torch.mean(self._discriminate_for_generator(reconstructions))
            # lambda of VQGAN Eq. 7 (delta 1e-4 as the code; the paper: 1e-6), times disc_weight
            # why at the decoder's last layer: L_rec and L_GAN both reach the image only through it, so
            # matching their gradient norms there balances the two terms without a hand-tuned GAN weight
            d_weight = calculate_adaptive_weight(nll_loss, g_loss, last_layer, self.discriminator_weight)
            # VQGAN Eq. 6 for E, D and the codebook: L_rec + L_VQ + lambda * L_GAN (lambda = 0 before disc_start)
            # the codebook only learns through codebook_loss: argmin gives it no gradient from L_rec or L_GAN
            loss = nll_loss + d_weight * disc_factor * g_loss + self.codebook_weight * codebook_loss.mean()
            log = {"total_loss": loss.detach(), "quant_loss": codebook_loss.detach().mean(),
                   "nll_loss": nll_loss.detach(), "rec_loss": rec_loss.detach().mean(),
                   "p_loss": p_loss.detach().mean(), "d_weight": d_weight.detach(),
                   "disc_factor": torch.tensor(float(disc_factor)), "g_loss": g_loss.detach()}
            # logging only (no_grad): perplexity and used/unused codes detect codebook collapse
            if predicted_indices is not None:  # the ldm variant: codebook usage
                with torch.no_grad():
                    perplexity, cluster_usage = measure_perplexity(predicted_indices, self.n_classes)
                log["perplexity"], log["cluster_usage"] = perplexity, cluster_usage
                log["unused_codes"] = self.n_classes - cluster_usage  # ours: codes no vector picked
            return loss, log
        # discriminator step: inputs detached so no gradient reaches the autoencoder
        if optimizer_idx == 1:
            logits_real = self.discriminator(inputs.detach()).float()  # (B, 1, H', W')
            logits_fake = self.discriminator(reconstructions.detach()).float()  # (B, 1, H', W')
            # D maximises VQGAN Eq. 5 (LDM App. G Eq. 25's log D_psi(x) term); hinge form in the released configs
            d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)  # (), 0 before disc_start
            log = {"disc_loss": d_loss.detach(), "logits_real": logits_real.detach().mean(),
                   "logits_fake": logits_fake.detach().mean()}
            return d_loss, log
        raise ValueError(f"optimizer_idx must be 0 or 1, got {optimizer_idx!r}")


# Copied from ae_kl.check_images
def check_images(x, channels, factor, what="x"):
    """One-line ValueError unless x is (B, channels, H, W) with H, W divisible by `factor`."""
    if not torch.is_tensor(x) or x.ndim != 4 or x.shape[1] != channels:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{what} must be (B, {channels}, H, W), got {shape}")
    if x.shape[2] % factor or x.shape[3] % factor:
        raise ValueError(f"{what} height and width must be multiples of {factor}, got {tuple(x.shape[2:])}")


# ----------------------------------------------------------------------------------------------------------
# The autoencoder (ldm/models/autoencoder.py VQModel + VQModelInterface)
# ----------------------------------------------------------------------------------------------------------

class VQModel(nn.Module):
    """E, the quantizer and D of Sec. 3.1 (VQ-reg), with the training loss as `loss_fn` (official: `loss`).

    h = quant_conv(E(x)) (B, embed_dim, H/f, W/f); z_q = quantize(h); x_rec = D(post_quant_conv(z_q)).
    The latent diffusion runs on h, BEFORE quantization (VQModelInterface.encode); decode quantizes first
    ("the quantization layer is absorbed by the decoder", Sec. 3.1).
    """

    def __init__(self, *, ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, embed_dim, n_embed,
                 resolution=256, in_channels=3, out_ch=3, dropout=0.0, attn_type="vanilla", scale_factor=0.0,
                 beta=0.25, legacy=True, loss=None, hparams=None):
        super().__init__()
        body = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, resolution=resolution,
                    attn_resolutions=tuple(attn_resolutions), z_channels=z_channels, dropout=dropout,
                    attn_type=attn_type)
        # double_z=False: E outputs z_channels maps (no mean/logvar split as in the KL model)
        self.encoder = Encoder(in_channels=in_channels, double_z=False, **body)
        self.decoder = Decoder(out_ch=out_ch, **body)
        # loss=None: inference only, no PatchGAN; n_classes = n_embed, the perplexity histogram's size
        self.loss_fn = None if loss is None else VQLPIPSWithDiscriminator(**loss, n_classes=n_embed)
        # beta 0.25 and legacy=True as VQModel constructs it (legacy is never passed, so True)
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta=beta, legacy=legacy)
        # 1x1 convs between E/D's z_channels and the codebook dimension embed_dim (equal in all presets)
        # why a 1x1 conv: the codebook dimension can be chosen apart from E's output width at the cost of
        # a per-pixel linear map
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.in_channels, self.embed_dim, self.n_embed = in_channels, embed_dim, n_embed
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        # 1.0 in every official VQ LDM config; 0 = "not measured yet" (encode/decode use 1, with a warning,
        # until train.py --ae measures 1/std and stores it here)
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))
        self._scale_checked = False
        self.hparams = dict(hparams or {})

    # --- the official VQModel methods --------------------------------------------------------------------
    def encode_to_prequant(self, x):
        """h = quant_conv(E(x)), the continuous pre-quantization latent (B, embed_dim, H/f, W/f)."""
        check_images(x, self.in_channels, self.downsample_factor)
        return self.quant_conv(self.encoder(x))  # (B, C, H, W) -> (B, embed_dim, H/f, W/f)

    def encode_quant(self, x):
        """Official `VQModel.encode`: (z_q, codebook loss, (None, None, indices))."""
        return self.quantize(self.encode_to_prequant(x))  # z_q (B, embed_dim, H/f, W/f), indices (N,)

    def decode_quant(self, quant):
        """Official `VQModel.decode`: z_q -> image."""
        check_images(quant, self.embed_dim, 1, what="z")
        return self.decoder(self.post_quant_conv(quant))  # (B, embed_dim, h, w) -> (B, out_ch, h*f, w*f)

    def forward(self, x, return_pred_indices=False):
        """(x_rec, codebook loss[, indices]), as VQModel.forward."""
        # training always quantizes: E, codebook and D must agree on the discrete latent D will be given
        quant, diff, (_, _, ind) = self.encode_quant(x)
        dec = self.decode_quant(quant)  # (B, embed_dim, H/f, W/f) -> (B, out_ch, H, W)
        return (dec, diff, ind) if return_pred_indices else (dec, diff)

    def get_last_layer(self):
        """W of the adaptive weight (VQGAN Eq. 7): the decoder's last conv weight."""
        return self.decoder.conv_out.weight  # (out_ch, ch * ch_mult[0], 3, 3)

    # --- the contract (VQModelInterface, times scale_factor as LDM's get_first_stage_encoding) -------------
    def _scale(self):
        """scale_factor, or 1 while it is 0 ("not measured"); one host sync per model, for the warning."""
        if not self._scale_checked and not self.scale_factor.is_meta:
            self._scale_checked = True
            if float(self.scale_factor) == 0:
                warnings.warn("ae_vq scale_factor is not measured (0): encode/decode use 1 (train.py --ae measures it)")
        return torch.where(self.scale_factor == 0, torch.ones_like(self.scale_factor), self.scale_factor)

    def encode(self, x, sample=True):
        """x in [-1, 1] -> h * scale_factor, h the PRE-quantization latent (what the official LDM diffuses).
        Deterministic: `sample` is accepted, as by the other autoencoders, and ignored."""
        # LDM diffuses the continuous h, not z_q: the diffusion model's output need not land exactly on codes,
        # and decode() snaps it there
        return self.encode_to_prequant(x) * self._scale()

    def decode(self, z, force_not_quantize=False):
        """Scaled latent -> image: divide, quantize to the nearest codes (VQModelInterface.decode), decode."""
        # undo the LDM scaling (LDM Sec. 4.3.2 unit-variance latent rescaling) before the codebook lookup
        h = z / self._scale()
        check_images(h, self.embed_dim, 1, what="z")
        # [0] keeps z_q only; the diffusion model's sample is snapped to the nearest codes here
        quant = h if force_not_quantize else self.quantize(h)[0]  # (B, embed_dim, h, w), same shape
        return self.decode_quant(quant)  # (B, out_ch, h*f, w*f)

    def optimizer_groups(self, phase=None):
        """{"ae": E, D, codebook, quant_conv, post_quant_conv, "disc": the PatchGAN} (lr_g_factor 1)."""
        # everything but the loss (PatchGAN; LPIPS is frozen and unregistered) belongs to the AE optimizer
        loss_fn = self._loss_fn()
        ae = [p for name, p in self.named_parameters() if not name.startswith("loss_fn.")]
        return {"ae": ae, "disc": list(loss_fn.discriminator.parameters())}

    def _loss_fn(self):
        if self.loss_fn is None:
            raise ValueError("this model was built with loss=None (inference only): no losses, no optimizer groups")
        return self.loss_fn

    def loss(self, group, batch, step):
        """One training step's loss for `group` ("ae" = optimizer_idx 0, "disc" = 1), as training_step.

        The "ae" logs include the codebook perplexity, the number of codes used (cluster_usage) and unused.
        """
        x, loss_fn = batch["x"], self._loss_fn()
        if group == "ae":
            # full forward with gradients: L_rec, L_GAN and L_VQ all flow back into E, codebook and D
            # the indices are only for logging the codebook usage, not for any loss
            x_rec, qloss, ind = self(x, return_pred_indices=True)  # x_rec (B, C, H, W), ind (N,)
            return loss_fn(qloss, x, x_rec, 0, step, last_layer=self.get_last_layer(), predicted_indices=ind)
        if group == "disc":
            with torch.no_grad():  # the official reruns the AE forward; only detached outputs are used
                x_rec, qloss = self(x)
            # D step of VQGAN Eq. 6 (max over D); the loss detaches its inputs again
            return loss_fn(qloss, x, x_rec, 1, step)
        raise ValueError(f"unknown optimizer group {group!r}; expected 'ae' or 'disc'")


# ----------------------------------------------------------------------------------------------------------
# Presets. Parameter counts: the official "model part" (E, D, codebook, quant convs) | + loss_fn (PatchGAN),
# measured by tests/test_ae_vq.py::test_param_counts. LPIPS (14.7M, frozen) is not counted.
# ----------------------------------------------------------------------------------------------------------

# Training batch per preset: the batch_size of its released yaml (no accumulate_grad_batches there; the GPU
# count is not recorded, so these are one GPU's batch). tiny: ours; a dict config gets vq-f4's 8.
_BATCH = {"vq-f4": 8, "vq-f4-noattn": 8, "vq-f8": 10, "vq-f8-n256": 10, "vq-f16": 14, "tiny": 12}


def _hparams(batch_size):
    """LDM main.py --scale_lr: lr = base_learning_rate 4.5e-6 x global batch (accumulation x GPUs x per-GPU
    batch; train.py's batch_size is the global one and it does not rescale lr: pass --lr with --batch-size).
    Adam betas (0.5, 0.9) for both optimizers, no EMA (ema_decay 0), no gradient clipping (grad_clip 0: off)."""
    return {"lr": 4.5e-6 * batch_size, "betas": (0.5, 0.9), "weight_decay": 0.0, "ema_decay": 0.0,
            "warmup_steps": 0, "grad_clip": 0.0, "batch_size": batch_size}


# released models/first_stage_models/vq-*/config.yaml; all hinge, perceptual_weight 1, codebook_weight 1
# f = 2^(len(ch_mult) - 1); a 256^2 image gives (256/f)^2 latent pixels of embed_dim channels; n_embed = |Z|
CONFIGS = {
    # 55,322,782 | 58,088,415 params; 64x64x3 latents for 256^2 (LDM celebahq/ffhq/lsun_beds/cin256-v2)
    "vq-f4": dict(ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, attn_resolutions=(), z_channels=3,
                  embed_dim=3, n_embed=8192, resolution=256, scale_factor=1.0, disc_start=0, disc_weight=0.75),
    # no attention at all (attn_type none), LDM inpainting; 53,219,486 | 55,985,119 params
    "vq-f4-noattn": dict(ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, attn_resolutions=(), z_channels=3,
                         embed_dim=3, n_embed=8192, resolution=256, attn_type="none", scale_factor=1.0,
                         disc_start=11, disc_weight=0.75),
    # 67,717,295 | 68,380,656 params; 32x32x4 (LDM cin-ldm-vq-f8); a 2-layer PatchGAN
    "vq-f8": dict(ch=128, ch_mult=(1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(32,), z_channels=4,
                  embed_dim=4, n_embed=16384, resolution=256, scale_factor=1.0, disc_start=1, disc_weight=0.6,
                  disc_num_layers=2),
    # 67,652,783 | 70,418,416 params; f8 with only 256 codes
    "vq-f8-n256": dict(ch=128, ch_mult=(1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(32,), z_channels=4,
                       embed_dim=4, n_embed=256, resolution=256, scale_factor=1.0, disc_start=250001,
                       disc_weight=0.75),
    # 69,593,371 | 70,256,732 params; 16x16x8
    "vq-f16": dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), z_channels=8,
                   embed_dim=8, n_embed=16384, resolution=256, scale_factor=1.0, disc_start=250001,
                   disc_weight=0.75, disc_num_layers=2),
    # CPU-sized (ours): f4, mid attention only, 256 codes, a small PatchGAN; 953,231 | 996,192 params
    "tiny": dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), z_channels=4, embed_dim=4,
                 n_embed=256, resolution=32, scale_factor=0.0, disc_start=1000, disc_weight=0.75,
                 disc_num_layers=2, disc_ndf=16),
}

# the split of a flat config: _BODY_KEYS go to VQModel, _LOSS_KEYS to VQLPIPSWithDiscriminator
_BODY_KEYS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "embed_dim", "n_embed",
              "resolution", "in_channels", "out_ch", "dropout", "attn_type", "scale_factor", "beta", "legacy")
_LOSS_KEYS = ("disc_start", "codebook_weight", "pixelloss_weight", "disc_num_layers", "disc_in_channels",
              "disc_factor", "disc_weight", "perceptual_weight", "disc_ndf", "disc_loss", "pixel_loss",
              "lpips_pretrained")


def _from_official(kwargs):
    """The official constructor kwargs ({"ddconfig", "lossconfig", "n_embed", "embed_dim", ...}) -> flat."""
    # ddconfig = the Encoder/Decoder kwargs of the yaml; options we do not implement are rejected loudly
    dd = dict(kwargs["ddconfig"])
    if dd.pop("double_z", False):  # the KL model's mean/logvar split; a VQ encoder outputs z itself
        raise ValueError("VQModel needs ddconfig.double_z = False")
    if dd.pop("tanh_out", False) or dd.pop("give_pre_end", False) or dd.pop("resamp_with_conv", True) is False:
        raise ValueError("tanh_out / give_pre_end / resamp_with_conv=False are not supported")
    dd.pop("use_linear_attn", None)
    if kwargs.get("remap") is not None:
        raise ValueError("VQModel remap (index remapping, unused by LDM) is not supported")
    cfg = {**dd, "embed_dim": kwargs["embed_dim"], "n_embed": kwargs["n_embed"]}
    lossconfig = kwargs.get("lossconfig") or {}
    # LDM's first_stage_config has a torch.nn.Identity loss; only standalone AE yamls name the VQ loss
    if lossconfig.get("target", "torch.nn.Identity") != "torch.nn.Identity":
        params = dict(lossconfig.get("params", {}))
        if params.pop("use_actnorm", False) or params.pop("disc_conditional", False):
            raise ValueError("use_actnorm / disc_conditional discriminators are not supported")
        params.pop("n_classes", None)  # ldm variant: we always use n_embed
        if params.pop("perceptual_loss", "lpips") != "lpips":
            raise ValueError("only perceptual_loss 'lpips' exists")
        cfg.update(params)
    else:  # LDM configs embed the first stage with an Identity loss: no loss here either (loss=None)
        cfg["loss"] = None
    return cfg


def create(config="tiny", **overrides):
    """Build a VQModel from a CONFIGS name, a flat dict, or the official constructor kwargs.

    Generic overrides from train.py: `in_channels` (also out_ch and the discriminator input), `image_size`
    (ignored: fully convolutional; attention placement follows the nominal `resolution`, as the official)
    and `num_classes` (ignored: unconditional). `loss=None` builds the network only (no PatchGAN): inference.
    """
    build_loss = overrides.pop("loss", True) is not None
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"unknown ae_vq preset {config!r}; choose from {sorted(CONFIGS)}")
        cfg = dict(CONFIGS[config])
    elif isinstance(config, dict):
        cfg = _from_official(config) if "ddconfig" in config else dict(config)
    else:
        raise ValueError(f"config must be a preset name or a dict, got {type(config).__name__}")
    # train.py passes dataset-level kwargs; an unconditional AE ignores the class count
    overrides.pop("num_classes", None)
    image_size = overrides.pop("image_size", None)
    if "in_channels" in overrides:
        c = overrides.pop("in_channels")
        cfg.update(in_channels=c, out_ch=c, disc_in_channels=c)
    build_loss = build_loss and cfg.pop("loss", True) is not None
    cfg.update(overrides)
    cfg.pop("monitor", None)  # Lightning's checkpoint metric, present in official kwargs, no role here
    if cfg.pop("disc_conditional", False):
        raise ValueError("disc_conditional discriminators are not supported (no released config uses them)")
    # reject typos early instead of silently dropping a key
    unknown = sorted(set(cfg) - set(_BODY_KEYS) - set(_LOSS_KEYS))
    if unknown:
        raise ValueError(f"unknown ae_vq config keys {unknown}")
    widths = [cfg["ch"] * m for m in cfg["ch_mult"]]  # channel width of each encoder level
    if cfg["ch"] % 32 or any(w % 32 for w in widths):
        raise ValueError(f"channel widths {widths} must be multiples of 32 (GroupNorm with 32 groups)")
    # same f as VQModel.downsample_factor: images must tile into f x f latent pixels
    f = 2 ** (len(cfg["ch_mult"]) - 1)
    if image_size is not None and image_size % f:
        raise ValueError(f"image_size {image_size} is not a multiple of the downsampling factor {f}")
    # disc_start has no official default (a required argument): a dict without it gets vq-f16's 250001
    loss = {k: cfg.pop(k) for k in _LOSS_KEYS if k in cfg}
    loss.setdefault("disc_start", 250001)
    loss.setdefault("disc_in_channels", cfg.get("in_channels", 3))
    hparams = _hparams(_BATCH[config] if isinstance(config, str) else 8)
    return VQModel(**cfg, loss=loss if build_loss else None, hparams=hparams)


# ----------------------------------------------------------------------------------------------------------
# Official checkpoints. Rename table (official -> ours): "loss." -> "loss_fn." (the only one).
# ----------------------------------------------------------------------------------------------------------

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


# Copied from ae_kl._official_state
def _official_state(sd, name):
    """Shared by ae_kl and ae_vq: official keys -> ours. A LatentDiffusion checkpoint gives its
    first_stage_model.* (and scale_factor); loss.* -> loss_fn.*; loss.perceptual_loss.* (LPIPS-VGG, the same
    weights the lpips package loads) is dropped with a note."""
    if any(k.startswith("first_stage_model.") for k in sd):
        n_other = sum(not k.startswith(("first_stage_model.", "scale_factor")) for k in sd)
        print(f"{name}: LatentDiffusion checkpoint: loading first_stage_model.* and ignoring {n_other} other keys")
        sd = {k.removeprefix("first_stage_model."): v for k, v in sd.items()
              if k.startswith("first_stage_model.") or k == "scale_factor"}
    lpips_keys = [k for k in sd if k.startswith("loss.perceptual_loss.")]
    if lpips_keys:
        print(f"{name}: skipped {len(lpips_keys)} loss.perceptual_loss.* entries (LPIPS-VGG, rebuilt by lpips)")
    return {("loss_fn." + k[5:] if k.startswith("loss.") else k): v for k, v in sd.items() if k not in lpips_keys}


# Copied from ae_kl._load_strict
def _load_strict(model, sd, name):
    """load_state_dict(strict=True) after a one-line error for missing / unexpected keys or wrong shapes."""
    own = model.state_dict()
    sd = dict(sd, scale_factor=sd.get("scale_factor", own["scale_factor"]).reshape(()))
    # reported under the official names (loss.*)
    missing, unexpected = ([k.replace("loss_fn.", "loss.", 1) for k in sorted(a - b)[:5]]
                           for a, b in ((set(own), set(sd)), (set(sd), set(own))))
    if missing or unexpected:
        raise ValueError(f"{name}: checkpoint does not match the config: missing {missing}, unexpected {unexpected}")
    bad = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in own.items() if sd[k].shape != v.shape]
    if bad:
        raise ValueError(f"{name}: checkpoint shapes do not match the config: {bad[:5]}")
    model.load_state_dict(sd, strict=True)
    return model


def load_official(path_or_state_dict, config):
    """Load an official VQModel / VQModelInterface checkpoint (first-stage model.ckpt, or a LatentDiffusion
    checkpoint, whose first_stage_model.* and scale_factor are taken), strict.

    `config`: a CONFIGS name or the official constructor kwargs (first line of a keys file in tests/golden/).
    loss.discriminator.* loads into loss_fn; a checkpoint without loss.* (LDM) gives a model built with
    loss=None (inference only; prints a note).
    """
    name = "ae_vq.load_official"
    sd = _official_state(read_checkpoint(path_or_state_dict), name)
    has_loss = any(k.startswith("loss_fn.") for k in sd)
    if not has_loss:
        print(f"{name}: no loss.* entries in the checkpoint: built with loss=None (inference only)")
    return _load_strict(create(config, **({} if has_loss else {"loss": None})), sd, name)
