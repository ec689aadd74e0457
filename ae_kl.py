"""LDM KL autoencoder: the first stage of latent diffusion, regularized towards N(0, I) by a small KL term.

Paper: Robin Rombach, Andreas Blattmann, Dominik Lorenz, Patrick Esser, Bjoern Ommer,
"High-Resolution Image Synthesis with Latent Diffusion Models", CVPR 2022, arXiv 2112.10752.
Sec. 3.1 ("Perceptual Image Compression") and App. G (Eq. 25, the autoencoder objective). The GAN part is
VQGAN's (Esser et al., "Taming Transformers for High-Resolution Image Synthesis", arXiv 2012.09841, Sec. 3.1).

Official code matched (tensor for tensor: tests/test_ae_kl.py on the goldens in tests/golden/ae_kl/):
    CompVis/latent-diffusion @ a506df5756472e2ebaf9078affdde2c4f1502cd4
        ldm/modules/diffusionmodules/model.py   Normalize, nonlinearity, ResnetBlock, AttnBlock, make_attn,
                                                Downsample, Upsample, Encoder, Decoder
        ldm/modules/distributions/distributions.py   DiagonalGaussianDistribution
        ldm/modules/losses/contperceptual.py    LPIPSWithDiscriminator
        ldm/models/autoencoder.py               AutoencoderKL (encode, decode, forward, training_step,
                                                configure_optimizers, get_last_layer)
        ldm/models/diffusion/ddpm.py            get_first_stage_encoding / decode_first_stage (scale_factor)
    CompVis/taming-transformers @ 3ba01b241669f5ade541ce990f7650a3b8f65318
        taming/modules/discriminator/model.py   NLayerDiscriminator, weights_init
        taming/modules/losses/vqperceptual.py   hinge_d_loss, vanilla_d_loss, adopt_weight

Map from the paper to this file:
    Sec. 3.1, encoder E and decoder D (downsampling factor f = 2^(len(ch_mult)-1))   Encoder, Decoder
        their blocks                                                                  ResnetBlock, AttnBlock,
                                                                                      Downsample, Upsample
    Sec. 3.1 "KL-reg": q_E(z|x) = N(mu, sigma^2), small KL penalty to N(0, I)         DiagonalGaussianDistribution
    App. G Eq. 25: L = L_rec(x, D(E(x))) - L_adv(D(E(x))) + log D_psi(x) + L_reg      LPIPSWithDiscriminator
        L_rec = L1 + LPIPS (perceptual loss), weighted by a learned variance (logvar)
        L_adv: PatchGAN D_psi (pix2pix), hinge loss, adaptive weight (VQGAN Eq. 7)     NLayerDiscriminator,
                                                                                      calculate_adaptive_weight
    Sec. 4.3.2 / App. D.1: the latent rescaled by 1/std (scale_factor)               AutoencoderKL.encode/decode
    the whole autoencoder                                                             AutoencoderKL
Reading order: ResnetBlock, AttnBlock, Encoder, Decoder, DiagonalGaussianDistribution, hinge_d_loss,
calculate_adaptive_weight, LPIPSWithDiscriminator.forward, AutoencoderKL.

Deliberately left out / changed (each is also noted where it happens):
    * The official ResnetBlock's timestep embedding (temb_channels=0 everywhere in the autoencoder), the
      3x3 `conv_shortcut` option (never used), the avg-pool Down/Upsample (resamp_with_conv=True always),
      the "linear" attention (no config uses it), `give_pre_end`, `tanh_out`, dropout > 0 is kept.
    * ActNorm and the conditional discriminator (no released config uses them): a ValueError if asked.
    * Official kwargs whose lossconfig is torch.nn.Identity (LDM's first_stage_config) build loss=None, as
      the official builds no loss there; a dict config without disc_start gets the released 50001.
    * `pixelloss_weight` is accepted and ignored, as in the official code (it is stored and never read).
    * LPIPS comes from the `lpips` pip package (the same network and weights as taming's copy). It is
      frozen, in eval mode (the official Lightning trainer puts it in train mode, which turns its dropout
      on), built on the first loss call and cached per process (get_lpips: encode/decode never need the
      VGG16 download), and kept OUT of state_dict(): its weights are public files training never changes.
    * The official Lightning loop toggles requires_grad so that the autoencoder step gives the
      discriminator no gradient; we do the same inside `loss("ae", ...)`.
    * Posterior noise is drawn on the latent's device (the official draws it on the CPU and copies it).
    * The official keeps the learned `loss.logvar` out of the optimizer (so it never moves from
      logvar_init although it has requires_grad=True). We give it requires_grad=False: the same numbers.
    * The submodule the official calls `loss` is `loss_fn` here, because `loss(...)` is the contract
      method. `load_official` renames `loss.*` -> `loss_fn.*` (the only rename).
    * Logs, image logging, validation, EMA (the official has none for the autoencoder) live in train.py.
"""
import copy
import math
import os
import warnings
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------------
# Building blocks of the encoder and decoder (ldm/modules/diffusionmodules/model.py)
# ----------------------------------------------------------------------------------------------------------

def Normalize(in_channels):
    """GroupNorm with 32 groups and eps 1e-6: every channel count must be a multiple of 32."""
    return nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


def nonlinearity(x):
    """swish / SiLU, x * sigmoid(x) (the official writes it out; F.silu is the same function, fused)."""
    return F.silu(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv (the official resamp_with_conv=True path)."""

    def __init__(self, in_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(x)


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


def make_attn(in_channels, attn_type="vanilla"):
    """"vanilla" -> AttnBlock; "none" -> Identity (no keys; VQ vq-f4-noattn). "linear" is not supported."""
    if attn_type == "vanilla":
        return AttnBlock(in_channels)
    if attn_type == "none":
        return nn.Identity()
    raise ValueError(f"attn_type must be 'vanilla' or 'none', got {attn_type!r}")


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
# Sec. 3.1 KL-reg: the diagonal Gaussian posterior q_E(z | x) (ldm/modules/distributions/distributions.py)
# ----------------------------------------------------------------------------------------------------------

class DiagonalGaussianDistribution:
    """N(mean, exp(logvar)) per latent element, from the 2*C channel "moments" (first half: the mean).

    logvar is clamped to [-30, 20] and every method uses the clamped value. Computed in float32 (under
    bf16 autocast the moments arrive in bf16; the KL of a sum over ~1e4 elements needs float32).
    """

    def __init__(self, parameters, deterministic=False):
        # fp16/bf16 moments are upcast: exp(logvar) and the summed KL lose precision in half precision
        low = parameters.dtype in (torch.float16, torch.bfloat16)
        self.parameters = parameters.float() if low else parameters  # (B, 2C, h, w)
        # the encoder predicts log sigma^2 rather than sigma: any real output is a valid variance, no positivity
        # constraint needed (the clamp below only guards exp against overflow)
        self.mean, self.logvar = torch.chunk(self.parameters, 2, dim=1)  # (B, 2C, h, w) -> 2 x (B, C, h, w)
        # clamp as the official: exp(20) ~ 4.9e8 and exp(-30) ~ 9e-14 keep var finite and nonzero
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)  # sigma = exp(logvar / 2), (B, C, h, w)
        self.var = torch.exp(self.logvar)  # sigma^2, (B, C, h, w)
        # deterministic: a point mass at the mean, so sample() == mode() and kl() == 0
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)

    def sample(self, noise=None):
        """mean + std * eps (reparameterised: gradients reach mean and std), eps ~ N(0, I) from the global RNG
        on the latent's device, or the given `noise` (reproducible tests)."""
        if noise is None:
            # eps carries all the randomness, so z is a deterministic, differentiable function of (mean, std)
            noise = torch.randn(self.mean.shape, device=self.mean.device, dtype=self.mean.dtype)
        # training decodes a sample, not the mean: the decoder must tolerate the posterior's spread, which keeps
        # the latent space smooth for the diffusion model that later samples in it
        return self.mean + self.std * noise.to(self.mean)

    def kl(self, other=None):
        """KL(q || N(0, I)) (or KL(q || other)) summed over C, H, W: shape (B,). The L_reg of Sec. 3.1."""
        if self.deterministic:
            return torch.tensor([0.0])  # the official returns a CPU float32 (1,) tensor here
        if other is None:
            # the closed form of KL(N(mu, sigma^2) || N(0, 1)), summed: (B, C, h, w) -> (B,)
            # per element 0.5 * (mu^2 + sigma^2 - 1 - log sigma^2): zero exactly when mu = 0 and sigma = 1
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        # KL between two diagonal Gaussians (unused by the autoencoder; official API, pinned by the golden)
        return 0.5 * torch.sum((self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0
                               - self.logvar + other.logvar, dim=[1, 2, 3])

    def nll(self, sample, dims=(1, 2, 3)):
        """-log N(sample; mean, var) summed over `dims`."""
        if self.deterministic:
            return torch.tensor([0.0])
        # per element 0.5 * (log 2pi + log sigma^2 + (x - mu)^2 / sigma^2), summed over dims
        logtwopi = math.log(2.0 * math.pi)
        return 0.5 * torch.sum(logtwopi + self.logvar + (sample - self.mean).pow(2) / self.var, dim=list(dims))

    def mode(self):
        """The mean: the deterministic encoding (encode(x, sample=False))."""
        return self.mean


# ----------------------------------------------------------------------------------------------------------
# App. G Eq. 25, the adversarial part: PatchGAN discriminator and GAN losses (taming-transformers)
# ----------------------------------------------------------------------------------------------------------

def weights_init(m):
    """taming-transformers' init: conv weights ~ N(0, 0.02), biases kept; BatchNorm gamma ~ N(1, 0.02), beta 0."""
    classname = m.__class__.__name__
    if classname.find("Conv") != -1:
        nn.init.normal_(m.weight.data, 0.0, 0.02)
    elif classname.find("BatchNorm") != -1:
        nn.init.normal_(m.weight.data, 1.0, 0.02)
        nn.init.constant_(m.bias.data, 0)


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


def adopt_weight(weight, global_step, threshold=0, value=0.0):
    """disc_start schedule: `value` (0) before step `threshold`, then `weight`. Python floats: no sync."""
    return value if global_step < threshold else weight


def hinge_d_loss(logits_real, logits_fake):
    """Hinge loss of the discriminator (taming-transformers): 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_rec))])."""
    return 0.5 * (torch.mean(F.relu(1.0 - logits_real)) + torch.mean(F.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real, logits_fake):
    """0.5 * (E[softplus(-D(x))] + E[softplus(D(x_rec))]), the original non-saturating GAN loss."""
    return 0.5 * (torch.mean(F.softplus(-logits_real)) + torch.mean(F.softplus(logits_fake)))


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


def get_lpips(pretrained, device):
    """The process-wide frozen LPIPS for `device` (frozen, so models can share it)."""
    key = (bool(pretrained), str(device))
    if key not in _LPIPS_CACHE:
        cpu = _LPIPS_CACHE.get((bool(pretrained), "cpu")) or build_lpips(pretrained)
        _LPIPS_CACHE[(bool(pretrained), "cpu")] = cpu
        _LPIPS_CACHE[key] = cpu if str(device) == "cpu" else copy.deepcopy(cpu).to(device)
    return _LPIPS_CACHE[key]


# ----------------------------------------------------------------------------------------------------------
# App. G Eq. 25 for KL-reg: LPIPSWithDiscriminator (ldm/modules/losses/contperceptual.py)
# ----------------------------------------------------------------------------------------------------------

class LPIPSWithDiscriminator(nn.Module):
    """L1 + LPIPS reconstruction under a learned variance, KL, and the PatchGAN with an adaptive weight.

    forward(..., optimizer_idx=0) is the autoencoder loss:
        rec   = |x - x_rec| + perceptual_weight * LPIPS(x, x_rec)       (LPIPS (B,1,1,1) added to EVERY pixel)
        nll   = rec / exp(logvar) + logvar,  summed over all elements / B  (NOT a per-pixel mean)
        kl    = sum over latent elements / B
        loss  = nll + kl_weight * kl + d_weight * disc_factor * (-mean D(x_rec))
    forward(..., optimizer_idx=1) is the discriminator loss disc_factor * hinge(D(x), D(x_rec)).
    disc_factor is 0 before step disc_start; d_weight is computed all the same (it is then multiplied by 0).
    """

    def __init__(self, disc_start, logvar_init=0.0, kl_weight=1.0, pixelloss_weight=1.0, disc_num_layers=3,
                 disc_in_channels=3, disc_factor=1.0, disc_weight=1.0, perceptual_weight=1.0, disc_loss="hinge",
                 disc_ndf=64, lpips_pretrained=True):
        super().__init__()
        # taming's two choices: hinge (every released config) or the non-saturating softplus loss
        if disc_loss not in ("hinge", "vanilla"):
            raise ValueError(f"disc_loss must be 'hinge' or 'vanilla', got {disc_loss!r}")
        # weight of L_reg: 1e-6 in the released configs, the "slight KL-penalty" of Sec. 3.1
        # why tiny: the KL only has to stop the latent from drifting to arbitrary scales; a VAE-sized weight
        # would blur reconstructions, and LDM wants a near-lossless first stage (the diffusion model does the
        # generative work), so the latent stays high-variance and is rescaled later by scale_factor
        self.kl_weight = kl_weight
        self.pixel_weight = pixelloss_weight  # stored and never used, as in the official code
        self.perceptual_weight = perceptual_weight
        self.lpips_pretrained = lpips_pretrained  # LPIPS: get_lpips, built at the first loss, not in state_dict()
        # output log variance: the reconstruction is scored as a Laplace likelihood with a learned scale
        # why a logvar: rec / exp(logvar) + logvar is a likelihood with a learnable scale, which would let the
        # model trade reconstruction against the KL itself; the official never optimizes it, so with
        # logvar_init 0 the nll is just the summed reconstruction loss
        self.logvar = nn.Parameter(torch.ones(size=()) * logvar_init, requires_grad=False)
        # disc_ndf is ours (the official is always 64: the CPU-sized tiny preset narrows it); n_layers=3 is
        # pix2pix's 70x70 PatchGAN (each output logit sees a 70x70 input patch)
        self.discriminator = NLayerDiscriminator(disc_in_channels, ndf=disc_ndf, n_layers=disc_num_layers)
        # DCGAN-style N(0, 0.02) init, applied after construction as in taming
        self.discriminator.apply(weights_init)
        # the GAN term starts at step disc_start (adopt_weight), once reconstructions are reasonable
        # why late: early reconstructions are blurry and trivially told apart, so D would win at once and its
        # gradients would be large and uninformative; L1 + LPIPS first get the decoder close to the data
        self.discriminator_iter_start = disc_start
        # the discriminator's term of App. G Eq. 25 (log D_psi(x) side), hinge or softplus form
        self.disc_loss = hinge_d_loss if disc_loss == "hinge" else vanilla_d_loss
        self.disc_factor = disc_factor
        # a constant factor on the adaptive weight lambda of VQGAN Eq. 7 (the taming code's, not in the paper)
        self.discriminator_weight = disc_weight

    def perceptual_loss(self, x, x_rec):
        """LPIPS(x, x_rec), shape (B, 1, 1, 1); lpips takes inputs in [-1, 1], the range x and x_rec have."""
        return get_lpips(self.lpips_pretrained, x.device)(x.contiguous(), x_rec.contiguous()).float()

    def _discriminate_for_generator(self, x_rec):
        """D(x_rec) with D's parameters frozen for this call (Lightning's toggle_optimizer): the
        autoencoder step must not leave gradients in the discriminator. The input still gets gradients."""
        # remember the flags so that a discriminator frozen by the caller stays frozen afterwards
        flags = [p.requires_grad for p in self.discriminator.parameters()]
        for p in self.discriminator.parameters():
            p.requires_grad_(False)
        try:
            # (B, 1, H', W') patch logits; finally restores the flags even if D raises
            return self.discriminator(x_rec.contiguous()).float()
        finally:
            for p, f in zip(self.discriminator.parameters(), flags):
                p.requires_grad_(f)

    def forward(self, inputs, reconstructions, posteriors, optimizer_idx, global_step, last_layer=None):
        """(loss, log) for optimizer_idx 0 (autoencoder) or 1 (discriminator); logs are detached."""
        # losses in float32 whatever the autocast dtype of the network
        inputs, reconstructions = inputs.float(), reconstructions.float()
        # disc_factor = self.disc_factor from step disc_start on, 0 before (taming's adopt_weight)
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        if optimizer_idx == 0:
            # L_rec of Eq. 25: pixel L1 plus the perceptual loss (VQGAN Sec. 3.1 replaces L2 by a perceptual loss)
            # L1 rather than L2: L2 averages plausible outputs and blurs; L1 keeps edges sharper
            rec_loss = torch.abs(inputs - reconstructions)  # (B, C, H, W)
            if self.perceptual_weight > 0:
                # LPIPS compares VGG features, so textures that match perceptually but not pixel by pixel are not
                # punished; this is what lets the GAN fill in detail instead of fighting the pixel loss
                p_loss = self.perceptual_loss(inputs, reconstructions)  # (B, 1, 1, 1), broadcast to every pixel
                rec_loss = rec_loss + self.perceptual_weight * p_loss  # (B, C, H, W) + (B, 1, 1, 1) -> (B, C, H, W)
            # one scale for all pixels: for the L1 part the Laplace NLL |x - x_rec| / b + log b, b = exp(logvar)
            nll_loss = rec_loss / torch.exp(self.logvar) + self.logvar
            # summed over all elements / B (the official's per-element `weights` option: never passed, left out)
            # a sum, not a mean: each pixel counts fully, so the summed KL (over latent elements) times kl_weight
            # is compared against a loss of the same summed scale
            nll_loss = torch.sum(nll_loss) / nll_loss.shape[0]
            # L_reg: kl() is (B,), already summed over C, h, w; averaged over the batch like the nll
            kl_loss = posteriors.kl()
            kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]  # (B,) -> scalar
            # generator side of Eq. 25: the decoder is pushed to raise D(x_rec) on every patch
            # D's parameters are frozen for this call but x_rec is not: the gradient of -D(x_rec) reaches the
            # decoder and encoder only
            logits_fake = self._discriminate_for_generator(reconstructions)  # (B, 1, H', W')
            g_loss = -torch.mean(logits_fake)  # -L_adv
            if self.disc_factor > 0.0:
                # lambda of VQGAN Eq. 7 at W = last_layer, computed even before disc_start (as the official)
                # why at the decoder's last layer: both losses reach the image only through it, so their gradient norms
                # there are a cheap measure of their relative pull; no hand-tuned GAN weight per dataset
                d_weight = calculate_adaptive_weight(nll_loss, g_loss, last_layer, self.discriminator_weight)
            else:
                # disc_factor 0: no GAN at all, and no autograd.grad through last_layer
                d_weight = torch.zeros((), device=inputs.device)
            # Eq. 25 without the discriminator's own term (disc_factor 0 before disc_start: L_rec + L_reg only)
            loss = nll_loss + self.kl_weight * kl_loss + d_weight * disc_factor * g_loss
            # rec_loss is logged as a per-element mean (L1 + LPIPS), unlike the summed nll
            log = {"total_loss": loss.detach(), "logvar": self.logvar.detach(), "kl_loss": kl_loss.detach(),
                   "nll_loss": nll_loss.detach(), "rec_loss": rec_loss.detach().mean(),
                   "d_weight": d_weight.detach(), "disc_factor": torch.tensor(float(disc_factor)),
                   "g_loss": g_loss.detach()}
            return loss, log
        if optimizer_idx == 1:
            # two separate calls (matters for BatchNorm in train mode); detached: this step trains D_psi only
            logits_real = self.discriminator(inputs.detach()).float()  # (B, C, H, W) -> (B, 1, H', W')
            logits_fake = self.discriminator(reconstructions.detach()).float()  # (B, C, H, W) -> (B, 1, H', W')
            # hinge: 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_rec))), 0 before disc_start
            # hinge: D stops pushing once a patch is classified with margin 1, which keeps its logits bounded
            d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
            log = {"disc_loss": d_loss.detach(), "logits_real": logits_real.detach().mean(),
                   "logits_fake": logits_fake.detach().mean()}
            return d_loss, log
        raise ValueError(f"optimizer_idx must be 0 or 1, got {optimizer_idx!r}")


# ----------------------------------------------------------------------------------------------------------
# The autoencoder (ldm/models/autoencoder.py AutoencoderKL)
# ----------------------------------------------------------------------------------------------------------

def check_images(x, channels, factor, what="x"):
    """One-line ValueError unless x is (B, channels, H, W) with H, W divisible by `factor`."""
    if not torch.is_tensor(x) or x.ndim != 4 or x.shape[1] != channels:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{what} must be (B, {channels}, H, W), got {shape}")
    if x.shape[2] % factor or x.shape[3] % factor:
        raise ValueError(f"{what} height and width must be multiples of {factor}, got {tuple(x.shape[2:])}")


class AutoencoderKL(nn.Module):
    """E, D and the KL posterior of Sec. 3.1, with the training loss as `loss_fn` (official: `loss`).

    Latent: z ~ N(mean, var) with `embed_dim` channels at 1/f of the image size, f = 2^(len(ch_mult)-1).
    quant_conv (2*z_channels -> 2*embed_dim) and post_quant_conv (embed_dim -> z_channels) are 1x1 convs.
    """

    def __init__(self, *, ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, embed_dim,
                 resolution=256, in_channels=3, out_ch=3, dropout=0.0, attn_type="vanilla", scale_factor=0.0,
                 loss=None, hparams=None):
        super().__init__()
        # E and D share every hyperparameter except their in/out channels (mirror images)
        body = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, resolution=resolution,
                    attn_resolutions=tuple(attn_resolutions), z_channels=z_channels, dropout=dropout,
                    attn_type=attn_type)
        # E: double_z=True, so it outputs 2*z_channels channels (mean and logvar halves)
        self.encoder = Encoder(in_channels=in_channels, double_z=True, **body)
        self.decoder = Decoder(out_ch=out_ch, **body)  # D: z_channels -> out_ch
        # loss=None: inference only, no PatchGAN / logvar (and never an LPIPS)
        self.loss_fn = None if loss is None else LPIPSWithDiscriminator(**loss)
        # the name is the VQ model's: here no quantization happens, the 1x1 conv only maps E's output to the
        # mean / logvar moments of embed_dim channels, so KL and VQ models share one Encoder/Decoder
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)  # moments: (mean, logvar) per channel
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)  # (B, embed_dim, h, w) -> (B, z_channels, h, w)
        self.in_channels, self.embed_dim = in_channels, embed_dim
        # f of Sec. 3.1: one Downsample per level but the last
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        # Sec. 4.3.2 / App. D.1: z is rescaled to unit variance before diffusion. 0 = "not measured yet":
        # encode/decode then use 1 (with a warning) and train.py --ae measures 1/std and stores it here.
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))
        self._scale_checked = False
        self.hparams = dict(hparams or {})

    # --- the official AutoencoderKL methods -------------------------------------------------------------
    def encode_posterior(self, x):
        """Official `AutoencoderKL.encode`: q_E(z | x) as a DiagonalGaussianDistribution (unscaled)."""
        # H, W must be multiples of f: Downsample floors odd sizes and D(E(x)) would not match x
        check_images(x, self.in_channels, self.downsample_factor)
        moments = self.quant_conv(self.encoder(x))  # (B, C, H, W) -> (B, 2*embed_dim, H/f, W/f)
        return DiagonalGaussianDistribution(moments)

    def decode_latent(self, z):
        """Official `AutoencoderKL.decode`: unscaled z (B, embed_dim, h, w) -> image (B, out_ch, h*f, w*f)."""
        check_images(z, self.embed_dim, 1, what="z")
        return self.decoder(self.post_quant_conv(z))  # -> (B, z_channels, h, w) -> (B, out_ch, h*f, w*f)

    def forward(self, x, sample_posterior=True):
        """(reconstruction, posterior): decode a posterior sample (training) or, if not sample_posterior, its mode."""
        posterior = self.encode_posterior(x)
        # training reconstructs from a sample (the decoder sees the posterior noise); evaluation can use the mean
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode_latent(z), posterior

    def get_last_layer(self):
        """W of the adaptive weight (VQGAN Eq. 7): the decoder's last conv weight."""
        return self.decoder.conv_out.weight  # (out_ch, ch * ch_mult[0], 3, 3)

    # --- the contract ------------------------------------------------------------------------------------
    def _scale(self):
        """scale_factor, or 1 while it is 0 ("not measured"); one host sync per model, for the warning."""
        if not self._scale_checked and not self.scale_factor.is_meta:
            self._scale_checked = True
            if float(self.scale_factor) == 0:
                warnings.warn("ae_kl scale_factor is not measured (0): encode/decode use 1 (train.py --ae measures it)")
        return torch.where(self.scale_factor == 0, torch.ones_like(self.scale_factor), self.scale_factor)

    def encode(self, x, sample=True):
        """x in [-1, 1] -> z * scale_factor, z a posterior sample (LDM's get_first_stage_encoding) or, with
        sample=False, the posterior mode (the mean: deterministic)."""
        posterior = self.encode_posterior(x)
        # scaled so that the diffusion model sees latents of about unit variance (Sec. 4.3.2)
        # why rescale: with a KL weight of 1e-6 the latent's variance is arbitrary, and the diffusion noise
        # schedule assumes data of about unit variance; one scalar fixes that without retraining E
        return (posterior.sample() if sample else posterior.mode()) * self._scale()

    def decode(self, z):
        """Scaled latent -> image in (about) [-1, 1]: LDM's decode_first_stage (divide, then decode)."""
        # the inverse of encode's scaling: the decoder was trained on unscaled latents
        return self.decode_latent(z / self._scale())

    def _loss_fn(self):
        if self.loss_fn is None:
            raise ValueError("this model was built with loss=None (inference only): no losses, no optimizer groups")
        return self.loss_fn

    def optimizer_groups(self, phase=None):
        """{"ae": E, D, quant_conv, post_quant_conv, "disc": the PatchGAN}."""
        # everything but the loss module (PatchGAN; logvar, which the official never optimizes)
        loss_fn = self._loss_fn()
        ae = [p for name, p in self.named_parameters() if not name.startswith("loss_fn.")]
        # two optimizers because the GAN is a min-max game: D ascends the adversarial objective that the
        # autoencoder descends, so each side takes its own step (and keeps its own Adam state)
        return {"ae": ae, "disc": list(loss_fn.discriminator.parameters())}

    def loss(self, group, batch, step):
        """One training step's loss for `group` ("ae" = optimizer_idx 0, "disc" = 1), as training_step."""
        x, loss_fn = batch["x"], self._loss_fn()
        # optimizer_idx 0: grads flow through D(x_rec) into the decoder, D itself stays untouched
        if group == "ae":
            x_rec, posterior = self(x)  # sampled z (sample_posterior=True), as training_step
            # L_rec + kl_weight * L_reg + lambda * L_adv; last_layer = W of the adaptive weight (VQGAN Eq. 7)
            return loss_fn(x, x_rec, posterior, 0, step, last_layer=self.get_last_layer())
        if group == "disc":
            with torch.no_grad():  # the official reruns the AE forward; only detached outputs are used
                x_rec, posterior = self(x)
            # the discriminator's loss: hinge(D(x), D(x_rec)) from x vs. the detached x_rec
            return loss_fn(x, x_rec, posterior, 1, step)
        raise ValueError(f"unknown optimizer group {group!r}; expected 'ae' or 'disc'")


# ----------------------------------------------------------------------------------------------------------
# Presets. Parameter counts: E + D + quant convs (the official "model part") | + loss_fn (logvar + PatchGAN),
# measured by tests/test_ae_kl.py::test_param_counts. LPIPS (14.7M, frozen) is not counted.
# ----------------------------------------------------------------------------------------------------------

# released configs (models/first_stage_models/kl-f*/config.yaml): disc_start 50001, kl_weight 1e-6,
# disc_weight 0.5, everything else at the constructor defaults (hinge, n_layers 3, perceptual_weight 1)
_RELEASED_LOSS = {"disc_start": 50001, "kl_weight": 1e-6, "disc_weight": 0.5}


def _hparams(batch_size):
    """The official recipe for train.py, whose batch_size is the GLOBAL batch (all GPUs x --grad-accum).

    LDM main.py --scale_lr (on by default): lr = accumulate_grad_batches x GPUs x per-GPU batch x
    base_learning_rate 4.5e-6 = 4.5e-6 x global batch. configs/autoencoder/autoencoder_kl_*.yaml train with
    batch_size 12 and accumulate_grad_batches 2: global batch 24, lr 1.08e-4 on one GPU. Run it as
    --batch-size 24 --grad-accum 2 (12 per pass, as the official: the PatchGAN's BatchNorm sees the same
    batches); with more GPUs pass --lr 4.5e-6 x the new global batch (train.py does not rescale lr). The
    yamls shipped beside the checkpoints (models/first_stage_models/kl-f*/config.yaml) say batch 10/4/6/6
    without accumulation; we follow the training configs. Adam betas (0.5, 0.9) for both optimizers; no
    EMA (ema_decay 0: the EMA copy equals the raw weights), no gradient clipping (grad_clip 0: off).
    """
    return {"lr": 4.5e-6 * batch_size, "betas": (0.5, 0.9), "weight_decay": 0.0, "ema_decay": 0.0,
            "warmup_steps": 0, "grad_clip": 0.0, "batch_size": batch_size}


CONFIGS = {
    # 55,312,063 | 58,077,697 params; 64x64x3 latents for 256^2 (f = 4: three levels, two Downsamples)
    "kl-f4": dict(ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, attn_resolutions=(), z_channels=3,
                  embed_dim=3, resolution=256, scale_factor=0.0, **_RELEASED_LOSS),
    # the Stable Diffusion VAE layout; 83,653,863 | 86,419,497 params; 32x32x4 latents for 256^2;
    # scale 0.18215 as in txt2img-1p4B-eval.yaml / Stable Diffusion
    "kl-f8": dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, attn_resolutions=(), z_channels=4,
                  embed_dim=4, resolution=256, scale_factor=0.18215, **_RELEASED_LOSS),
    # 69,610,963 | 72,376,597 params; 16x16x16; scale from retrieval-augmented-diffusion/768x768.yaml;
    # attention at nominal resolution 16 = 256 / 16, the lowest level
    "kl-f16": dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), z_channels=16,
                   embed_dim=16, resolution=256, scale_factor=0.22765929, **_RELEASED_LOSS),
    # 103,880,131 | 106,645,765 params; 8x8x64; attention at the two lowest levels (16 and 8)
    "kl-f32": dict(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16, 8),
                   z_channels=64, embed_dim=64, resolution=256, scale_factor=0.0, **_RELEASED_LOSS),
    # CPU-sized (ours): f4, mid-block attention only, a small PatchGAN; 954,567 | 997,529 params
    "tiny": dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), z_channels=4, embed_dim=4,
                 resolution=32, scale_factor=0.0, disc_start=1000, kl_weight=1e-6, disc_weight=0.5,
                 disc_num_layers=2, disc_ndf=16),
}

# create() splits a flat config: network constructor keys vs. LPIPSWithDiscriminator keys
_BODY_KEYS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "embed_dim", "resolution",
              "in_channels", "out_ch", "dropout", "attn_type", "scale_factor")
_LOSS_KEYS = ("disc_start", "logvar_init", "kl_weight", "pixelloss_weight", "disc_num_layers",
              "disc_in_channels", "disc_factor", "disc_weight", "perceptual_weight", "disc_loss", "disc_ndf",
              "lpips_pretrained")


def _from_official(kwargs):
    """The official constructor kwargs ({"ddconfig", "lossconfig", "embed_dim", ...}) -> our flat config."""
    # ddconfig: the official Encoder/Decoder config, shared by both
    dd = dict(kwargs["ddconfig"])
    if not dd.pop("double_z", True):
        raise ValueError("AutoencoderKL needs ddconfig.double_z = True (mean and logvar)")
    # options this file leaves out (module docstring, "Deliberately left out")
    if dd.pop("tanh_out", False) or dd.pop("give_pre_end", False) or dd.pop("resamp_with_conv", True) is False:
        raise ValueError("tanh_out / give_pre_end / resamp_with_conv=False are not supported")
    # an official ddconfig flag, dropped unread (attn_type decides the attention here)
    dd.pop("use_linear_attn", None)
    cfg = {**dd, "embed_dim": kwargs["embed_dim"]}  # flat: ddconfig keys + embed_dim
    lossconfig = kwargs.get("lossconfig") or {}
    if lossconfig.get("target", "torch.nn.Identity") != "torch.nn.Identity":  # Identity: no loss (LDM stage)
        params = dict(lossconfig.get("params", {}))
        # ActNorm / conditional D: not in any released config, not implemented
        if params.pop("use_actnorm", False) or params.pop("disc_conditional", False):
            raise ValueError("use_actnorm / disc_conditional discriminators are not supported")
        cfg.update(params)  # create() splits these off again by _LOSS_KEYS
    else:  # LDM configs embed the first stage with an Identity loss: no loss here either (loss=None)
        cfg["loss"] = None
    return cfg


def create(config="tiny", **overrides):
    """Build an AutoencoderKL from a CONFIGS name, a flat dict, or the official constructor kwargs.

    Generic overrides from train.py: `in_channels` (also sets out_ch and the discriminator input),
    `image_size` (ignored: the network is fully convolutional; attention placement follows the preset's
    nominal `resolution`, as in the official code) and `num_classes` (ignored: unconditional).
    `loss=None` builds the network only (no PatchGAN, no logvar, never an LPIPS): inference.
    """
    build_loss = overrides.pop("loss", True) is not None
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"unknown ae_kl preset {config!r}; choose from {sorted(CONFIGS)}")
        cfg = dict(CONFIGS[config])
    elif isinstance(config, dict):
        # official kwargs are recognised by their "ddconfig" key
        cfg = _from_official(config) if "ddconfig" in config else dict(config)
    else:
        raise ValueError(f"config must be a preset name or a dict, got {type(config).__name__}")
    # train.py passes num_classes / image_size to every model; only the size check uses image_size
    overrides.pop("num_classes", None)
    image_size = overrides.pop("image_size", None)
    # one channel count for encoder input, decoder output and discriminator input (e.g. grayscale)
    if "in_channels" in overrides:
        c = overrides.pop("in_channels")
        cfg.update(in_channels=c, out_ch=c, disc_in_channels=c)
    build_loss = build_loss and cfg.pop("loss", True) is not None
    cfg.update(overrides)
    # Lightning's checkpoint metric, present in official kwargs, no role here
    cfg.pop("monitor", None)
    # reject misspelt keys instead of silently ignoring them
    unknown = sorted(set(cfg) - set(_BODY_KEYS) - set(_LOSS_KEYS))
    if unknown:
        raise ValueError(f"unknown ae_kl config keys {unknown}")
    # GroupNorm(32) in Normalize needs every level width to be a multiple of 32
    widths = [cfg["ch"] * m for m in cfg["ch_mult"]]
    if cfg["ch"] % 32 or any(w % 32 for w in widths):
        raise ValueError(f"channel widths {widths} must be multiples of 32 (GroupNorm with 32 groups)")
    f = 2 ** (len(cfg["ch_mult"]) - 1)  # Sec. 3.1's downsampling factor f = 2^m
    if image_size is not None and image_size % f:
        raise ValueError(f"image_size {image_size} is not a multiple of the downsampling factor {f}")
    # disc_start has no official default (a required argument): a dict without it gets the released 50001
    loss = {k: cfg.pop(k) for k in _LOSS_KEYS if k in cfg}
    loss.setdefault("disc_start", 50001)
    loss.setdefault("disc_in_channels", cfg.get("in_channels", 3))  # D_psi sees images: encoder input channels
    loss = loss if build_loss else None
    # the official batch 12 x 2 accumulation; tiny keeps the same lr rule at a CPU-sized batch of 12
    hparams = _hparams(12 if config == "tiny" else 24)
    return AutoencoderKL(**cfg, loss=loss, hparams=hparams)


# ----------------------------------------------------------------------------------------------------------
# Official checkpoints. Rename table (official -> ours): "loss." -> "loss_fn." (the only one).
# ----------------------------------------------------------------------------------------------------------

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
    """Load an official AutoencoderKL checkpoint (first-stage model.ckpt, or a LatentDiffusion checkpoint,
    whose first_stage_model.* and scale_factor are taken), strict.

    `config`: a CONFIGS name or the official constructor kwargs (first line of a keys file in tests/golden/).
    Released first-stage checkpoints carry the training loss: loss.logvar and loss.discriminator.* load into
    loss_fn (strict: all or none), so training can resume. A checkpoint without loss.* (LDM, Stable Diffusion
    VAEs) gives a model built with loss=None (inference only; prints a note).
    """
    name = "ae_kl.load_official"
    sd = _official_state(read_checkpoint(path_or_state_dict), name)
    has_loss = any(k.startswith("loss_fn.") for k in sd)
    if not has_loss:
        print(f"{name}: no loss.* entries in the checkpoint: built with loss=None (inference only)")
    return _load_strict(create(config, **({} if has_loss else {"loss": None})), sd, name)
