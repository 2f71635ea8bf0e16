"""Swin Transformer encoder whose batch dimension stays the batch dimension.

Stock timm and MONAI Swin fold the attention windows into the batch dimension and gather the
relative-position table inside a module that also holds a buffer. Both break per-sample gradients
(Opacus would clip per window, not per image). Here windows live in their own dimension
(`[B, nW, N, C]`), every Linear sees `[B, tokens, C]`, and the bias table sits alone in
`RelPosBias`, which adds it to per-sample logits. Parameter names follow timm's Swin except the
table (`attn.rel_pos.relative_position_bias_table`); `echocare_core.checkpoint` maps timm names.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["SWIN_VARIANTS", "EncoderConfig", "SwinEncoder", "RelPosBias", "WindowAttention"]

SWIN_VARIANTS: dict[str, dict] = {
    "test": dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4)),
    "mini": dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8)),
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
}


@dataclass(frozen=True)
class EncoderConfig:
    """Encoder architecture and input spec; stored in every checkpoint.

    `embed_dim`, `depths` and `num_heads` override the named variant when given.
    """

    variant: str = "tiny"
    in_chans: int = 1
    img_size: int = 256
    patch_size: int = 4
    window_size: int = 8
    mlp_ratio: float = 4.0
    drop_path: float = 0.1
    grad_checkpointing: bool = False
    fused_attn: bool = True
    embed_dim: int | None = None
    depths: tuple[int, ...] | None = None
    num_heads: tuple[int, ...] | None = None
    arch: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.variant not in SWIN_VARIANTS:
            close = difflib.get_close_matches(self.variant, list(SWIN_VARIANTS), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"unknown encoder variant '{self.variant}'; choose one of {list(SWIN_VARIANTS)}.{hint}")
        arch = dict(SWIN_VARIANTS[self.variant])
        for key in ("embed_dim", "depths", "num_heads"):
            if getattr(self, key) is not None:
                arch[key] = tuple(getattr(self, key)) if key != "embed_dim" else getattr(self, key)
        object.__setattr__(self, "arch", arch)
        for key in ("img_size", "patch_size", "window_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)}: must be >= 1")
        if self.in_chans not in (1, 3):
            raise ValueError(f"in_chans={self.in_chans}: use 1 (grayscale, default) or 3")
        if len(arch["depths"]) != len(arch["num_heads"]):
            raise ValueError(f"depths {arch['depths']} and num_heads {arch['num_heads']} need the same length")
        for i, heads in enumerate(arch["num_heads"]):
            if (arch["embed_dim"] * 2 ** i) % heads:
                raise ValueError(f"stage {i} width {arch['embed_dim'] * 2 ** i} is not divisible by {heads} heads")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path={self.drop_path}: must be in [0, 1)")
        if self.img_size % self.stride:
            raise ValueError(f"img_size={self.img_size} must be a multiple of patch_size * 2**(stages-1) = "
                             f"{self.stride}; e.g. {max(1, round(self.img_size / self.stride)) * self.stride}")
        for i, res in enumerate(self.stage_resolutions):
            if res % min(self.window_size, res):
                raise ValueError(f"window_size={self.window_size} does not divide the stage-{i} feature map "
                                 f"({res}x{res}); pick a window that divides {res}")

    @property
    def stride(self) -> int:
        """Pixels per token of the last stage."""
        return self.patch_size * 2 ** (len(self.arch["depths"]) - 1)

    @property
    def stage_resolutions(self) -> list[int]:
        return [self.img_size // self.patch_size // 2 ** i for i in range(len(self.arch["depths"]))]

    @property
    def stage_channels(self) -> list[int]:
        return [self.arch["embed_dim"] * 2 ** i for i in range(len(self.arch["depths"]))]


def relative_position_index(wh: int, ww: int) -> torch.Tensor:
    """Index into the `(2wh-1)(2ww-1)` bias table for every token pair of a window: `[N, N]`."""
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # [N, N, 2]
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    return rel[:, :, 0] * (2 * ww - 1) + rel[:, :, 1]


class RelPosBias(nn.Module):
    """Adds the relative-position bias to attention logits `[B, nW, heads, N, N]`.

    It holds only the table: the window's index is a plain attribute, neither a buffer (Opacus refuses
    trainable layers with buffers) nor an input (Opacus would read its first dimension as a batch), so a
    per-sample gradient rule can be registered for it (`echocare_core.privacy.dp`).
    """

    def __init__(self, window: int, num_heads: int) -> None:
        super().__init__()
        self.window = window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.index = relative_position_index(window, window)  # [N, N]

    def bias(self) -> torch.Tensor:
        table = self.relative_position_bias_table
        if self.index.device != table.device:
            self.index = self.index.to(table.device)
        n = self.index.shape[0]
        return table[self.index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)  # [h, N, N]

    def forward(self, attn: torch.Tensor) -> torch.Tensor:
        return attn + self.bias()


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, on `[B, nW, N, C]`."""

    def __init__(self, dim: int, num_heads: int, window: int, fused_attn: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos = RelPosBias(window, num_heads)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, nW, N, C = x.shape
        qkv = self.qkv(x.reshape(B, nW * N, C)).reshape(B, nW, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each [B, nW, heads, N, hd]
        if self.fused_attn:
            # Fused kernels want 4-D input; folding windows here is safe: this path is never used for DP.
            bias = self.rel_pos.bias()  # [h, N, N]
            bias = bias.expand(nW, -1, -1, -1) if mask is None else bias + mask.unsqueeze(1)
            bias = bias.to(q.dtype).expand(B, -1, -1, -1, -1).reshape(B * nW, self.num_heads, N, N)
            out = F.scaled_dot_product_attention(*(t.reshape(B * nW, self.num_heads, N, -1) for t in (q, k, v)),
                                                 attn_mask=bias)
            out = out.reshape(B, nW, self.num_heads, N, -1)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # [B, nW, h, N, N]
            attn = self.rel_pos(attn)
            if mask is not None:
                attn = attn + mask.unsqueeze(1)
            out = attn.softmax(dim=-1) @ v
        out = out.permute(0, 1, 3, 2, 4).reshape(B, nW * N, C)
        return self.proj(out).reshape(B, nW, N, C)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def window_partition(x: torch.Tensor, w: int) -> torch.Tensor:
    """`[B, H, W, C] -> [B, nW, w*w, C]`, windows in row-major order."""
    B, H, W, C = x.shape
    return x.reshape(B, H // w, w, W // w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, -1, w * w, C)


def window_reverse(x: torch.Tensor, w: int, H: int, W: int) -> torch.Tensor:
    """`[B, nW, w*w, C] -> [B, H, W, C]`."""
    B, _, _, C = x.shape
    return x.reshape(B, H // w, W // w, w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)


def shifted_window_mask(res: int, window: int, shift: int) -> torch.Tensor:
    """Additive mask `[nW, N, N]` (0 or -100) that keeps shifted windows from mixing regions."""
    img = torch.zeros(1, res, res, 1)
    cnt = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            img[:, hs, ws, :] = cnt
            cnt += 1
    win = window_partition(img, window)[0, :, :, 0]  # [nW, N]
    diff = win[:, None, :] - win[:, :, None]
    return torch.where(diff != 0, torch.tensor(-100.0), torch.tensor(0.0))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, res: int, window: int, shift: bool, mlp_ratio: float,
                 drop_path: float, fused_attn: bool) -> None:
        super().__init__()
        self.window = min(window, res)
        self.shift = self.window // 2 if shift and res > window else 0
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, self.window, fused_attn)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        mask = shifted_window_mask(res, self.window, self.shift) if self.shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C]
        B, H, W, C = x.shape
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        x = x.reshape(B, H * W, C)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(B, H, W, C)

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        _, H, W, _ = x.shape
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        x = window_reverse(self.attn(window_partition(x, self.window), self.attn_mask), self.window, H, W)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        return x


class PatchMerging(nn.Module):
    """2x2 neighbouring tokens -> one, `[B, H, W, C] -> [B, H/2, W/2, 2C]` (timm's channel order)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, H * W // 4, 4 * C)
        return self.reduction(self.norm(x)).reshape(B, H // 2, W // 2, 2 * C)


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, H/p, W/p, D]
        # contiguous: Opacus' conv per-sample rule assumes NCHW-contiguous input
        return self.norm(self.proj(x.contiguous()).permute(0, 2, 3, 1))


class SwinStage(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, res: int, cfg: EncoderConfig,
                 drop_path: list[float], downsample: bool) -> None:
        super().__init__()
        self.downsample = PatchMerging(dim // 2) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            SwinBlock(dim, num_heads, res, cfg.window_size, shift=i % 2 == 1, mlp_ratio=cfg.mlp_ratio,
                      drop_path=drop_path[i], fused_attn=cfg.fused_attn)
            for i in range(depth)])
        self.grad_checkpointing = cfg.grad_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class SwinEncoder(nn.Module):
    """Swin Transformer encoder with timm's encoder API.

    `forward(x)` gives the pooled global feature `[B, num_features]`; `forward_features` the normed
    last-stage map `[B, H, W, C]`; `forward_intermediates` the multi-scale maps for dense heads.
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        depths, heads = cfg.arch["depths"], cfg.arch["num_heads"]
        self.embed_dim = cfg.arch["embed_dim"]
        self.num_features = cfg.stage_channels[-1]
        self.patch_embed = PatchEmbed(cfg.in_chans, self.embed_dim, cfg.patch_size)
        rates = torch.linspace(0, cfg.drop_path, sum(depths)).tolist()
        self.layers = nn.Sequential(*[
            SwinStage(cfg.stage_channels[i], depths[i], heads[i], cfg.stage_resolutions[i], cfg,
                      rates[sum(depths[:i]):sum(depths[:i + 1])], downsample=i > 0)
            for i in range(len(depths))])
        self.norm = nn.LayerNorm(self.num_features)
        self.apply(_init_weights)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None,
                              intermediates_only: bool = False, token_mask: torch.Tensor | None = None,
                              mask_token: torch.Tensor | None = None
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the encoder and keep stage outputs for dense heads (timm's API).

        Args:
            x: images `[B, in_chans, H, W]`.
            indices: stages to return: a list of stage numbers, the last n stages for an int, all for None.
            intermediates_only: return only the stage maps (stops after the last one asked for).
            token_mask: `[B, H/p, W/p]`, 1 where a patch is replaced by `mask_token` (masked image modelling).
            mask_token: `[D]` or broadcastable to `[B, H/p, W/p, D]`.

        Returns:
            The stage maps `[B, C_i, H_i, W_i]`, preceded by the normed last-stage map `[B, h, w, C]`
            unless `intermediates_only`.

        Raises:
            ValueError: a stage index out of range.
        """
        n = len(self.layers)
        wanted = list(range(n)) if indices is None else (
            list(range(n - indices, n)) if isinstance(indices, int) else list(indices))
        if not wanted or any(not 0 <= i < n for i in wanted):
            raise ValueError(f"indices={indices}: stages are 0..{n - 1}")
        t = self.patch_embed(x)  # [B, Hp, Wp, D]
        if token_mask is not None:
            w = token_mask.unsqueeze(-1).to(t.dtype)
            t = t * (1.0 - w) + mask_token.to(t.dtype) * w
        feats = []
        for i, stage in enumerate(self.layers[:max(wanted) + 1] if intermediates_only else self.layers):
            t = stage(t)
            if i in wanted:
                feats.append(t.permute(0, 3, 1, 2))
        return feats if intermediates_only else (self.norm(t), feats)

    def forward_features(self, x: torch.Tensor, token_mask: torch.Tensor | None = None,
                         mask_token: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_intermediates(x, [len(self.layers) - 1], token_mask=token_mask, mask_token=mask_token)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).mean(dim=(1, 2))  # [B, num_features]


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
