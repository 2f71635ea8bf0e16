"""The EchoCare encoder: MONAI's 2-D `SwinTransformer(use_v2=True)`, rebuilt with a true batch dimension.

EchoCare's released encoder is a MONAI `SwinTransformer(spatial_dims=2, use_v2=True)`. This module is an own
implementation of that network, not a wrapper: its state dict has exactly MONAI's keys and shapes (the release
loads with `strict=True`) and its five outputs equal MONAI's on the same weights, but

- window attention keeps windows in their own dimension (`[B, nW, N, C]`) and every Linear sees `[B, tokens, C]`,
  so Opacus computes one gradient per image (MONAI folds windows into the batch, which would clip per window);
- the relative-position bias table lives alone in a leaf module (`RelPosBias`) that adds it to per-sample
  logits, so a per-sample gradient rule can be registered for it (`echocare_core.privacy.dp`); Opacus needs
  a module that owns parameters to have no trainable children. State-dict hooks keep MONAI's key for it
  (`attn.relative_position_bias_table`; its parameter name is `attn.rel_pos.relative_position_bias_table`);
- attention can run fused (`scaled_dot_product_attention`) while training, where MONAI fuses only without
  gradients; DP training switches it off.

Layout (MONAI's): `patch_embed` (no norm), then per stage i = 1..4 a residual conv block `layers{i}c.0` and a
Swin stage `layers{i}.0` whose blocks are followed by a patch merge (the fourth included). Outputs are the patch
embedding and the four merged stages, each layer-normed without weights: for 3x256x256 and the release numbers,
128@128, 256@64, 512@32, 1024@16 and 2048@8. Like MONAI, a stage whose map is not larger than the window attends
over the whole map with no shift and reads the first `n x n` entries of the full window's position index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetrBasicBlock
from timm.layers import DropPath, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from echocare_core.config import did_you_mean

__all__ = [
    "SWIN_VARIANTS",
    "STAGES",
    "EncoderConfig",
    "RelPosBias",
    "SwinEncoder",
    "WindowAttention",
    "trainable_state_names",
]

STAGES = 4  # MONAI's SwinTransformer has exactly four (layers1..layers4)

SWIN_VARIANTS: dict[str, dict] = {
    "echocare": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),  # the released encoder
    "small": dict(embed_dim=48, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24)),
    "mini": dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8)),
    "test": dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4)),
}


@dataclass(frozen=True)
class EncoderConfig:
    """Encoder architecture and input contract; stored in every checkpoint.

    The defaults are the released EchoCare encoder: 3 channels (grayscale is replicated), 256 px, patch 2,
    window 8. `embed_dim`, `depths` and `num_heads` override the named variant when given. Pixels are scaled
    to `(x / 255 - input_mean) / input_std`; the authors do not document the scaling the release was trained
    with, so it is a recorded value (default [-1, 1]) that every checkpoint carries.
    """

    variant: str = "echocare"
    in_chans: int = 3
    img_size: int = 256
    patch_size: int = 2
    window_size: int = 8
    mlp_ratio: float = 4.0
    drop_path: float = 0.1
    input_mean: float = 0.5
    input_std: float = 0.5
    grad_checkpointing: bool = False
    fused_attn: bool = True
    embed_dim: int | None = None
    depths: tuple[int, ...] | None = None
    num_heads: tuple[int, ...] | None = None
    arch: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.variant not in SWIN_VARIANTS:
            hint = did_you_mean(self.variant, list(SWIN_VARIANTS))
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
            raise ValueError(f"in_chans={self.in_chans}: use 3 (the release; grayscale is replicated) or 1")
        if len(arch["depths"]) != STAGES or len(arch["num_heads"]) != STAGES:
            raise ValueError(
                f"depths {arch['depths']} and num_heads {arch['num_heads']} need {STAGES} entries each "
                f"(the EchoCare encoder has {STAGES} stages)"
            )
        for i, heads in enumerate(arch["num_heads"]):
            if (arch["embed_dim"] * 2**i) % heads:
                raise ValueError(f"stage {i + 1} width {arch['embed_dim'] * 2**i} is not divisible by {heads} heads")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path={self.drop_path}: must be in [0, 1)")
        if not self.input_std > 0:
            raise ValueError(f"input_std={self.input_std}: must be > 0")
        if self.img_size % self.stride:
            raise ValueError(
                f"img_size={self.img_size} must be a multiple of patch_size * 2**{STAGES} = "
                f"{self.stride}; e.g. {max(1, round(self.img_size / self.stride)) * self.stride}"
            )
        for i, res in enumerate(self.block_resolutions):
            if res % min(self.window_size, res):
                raise ValueError(
                    f"window_size={self.window_size} does not divide the stage-{i + 1} feature map "
                    f"({res}x{res}); pick a window that divides {res}"
                )

    @property
    def input_spec(self) -> dict:
        """What an input image must be, as checkpoints record it: channels, side, intensity mean and std."""
        return {"channels": self.in_chans, "size": self.img_size, "mean": self.input_mean, "std": self.input_std}

    @property
    def scale(self) -> tuple[float, float]:
        """`(input_mean, input_std)`: pixels in [0, 1] become `(x - mean) / std`."""
        return self.input_mean, self.input_std

    @property
    def stride(self) -> int:
        """Pixels per token of the last output."""
        return self.patch_size * 2**STAGES

    @property
    def block_resolutions(self) -> list[int]:
        """Side of the map each stage's attention blocks see (before its patch merge)."""
        return [self.img_size // self.patch_size // 2**i for i in range(STAGES)]

    @property
    def stage_resolutions(self) -> list[int]:
        """Side of each of the five outputs: the patch embedding, then each stage after its merge."""
        return [self.img_size // self.patch_size // 2**i for i in range(STAGES + 1)]

    @property
    def stage_channels(self) -> list[int]:
        """Channels of each of the five outputs."""
        return [self.arch["embed_dim"] * 2**i for i in range(STAGES + 1)]


def relative_position_index(window: int) -> torch.Tensor:
    """Index into the `(2w-1)^2` bias table for every token pair of a window: `[w*w, w*w]` (MONAI's)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # [N, N, 2]
    return rel[:, :, 0] * (2 * window - 1) + rel[:, :, 1]


class RelPosBias(nn.Module):
    """Adds the relative-position bias to attention logits `[B, nW, heads, n, n]`.

    It holds only the table (no buffer, no child), as Opacus needs of a layer with its own per-sample rule;
    `index` (`[n, n]`) is handed over by `WindowAttention` before each call, never passed as an input (Opacus
    would read its first dimension as a batch size).
    """

    def __init__(self, window: int, num_heads: int) -> None:
        super().__init__()
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.index: torch.Tensor | None = None

    def bias(self, index: torch.Tensor) -> torch.Tensor:
        """`[heads, n, n]` for the position index `[n, n]`."""
        n = index.shape[0]
        return self.relative_position_bias_table[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits + self.bias(self.index)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, on `[B, nW, N, C]` (`attend`); MONAI's state-dict keys.

    The position index is a constant buffer under MONAI's name; the bias table's key is MONAI's
    `relative_position_bias_table` in state dicts, `rel_pos.relative_position_bias_table` as a parameter.
    """

    def __init__(self, dim: int, num_heads: int, window: int, fused_attn: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos = RelPosBias(window, num_heads)
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.register_state_dict_post_hook(_monai_keys)
        self.register_load_state_dict_pre_hook(_own_keys)

    def index(self, n: int) -> torch.Tensor:
        """The first `n x n` entries of the full window's index (MONAI's, also for smaller windows)."""
        return self.relative_position_index[:n, :n]

    def attend(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of `x` `[B, nW, N, C]`; `mask` `[nW, N, N]` keeps shifted windows apart."""
        B, nW, N, C = x.shape
        qkv = self.qkv(x.reshape(B, nW * N, C)).reshape(B, nW, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each [B, nW, heads, N, hd]
        if self.fused_attn:
            # Fused kernels want 4-D input; folding windows here is safe: DP training switches this path off.
            bias = self.rel_pos.bias(self.index(N))
            bias = bias.expand(nW, -1, -1, -1) if mask is None else bias + mask.unsqueeze(1)
            bias = bias.to(q.dtype).expand(B, -1, -1, -1, -1).reshape(B * nW, self.num_heads, N, N)
            out = F.scaled_dot_product_attention(
                *(t.reshape(B * nW, self.num_heads, N, -1) for t in (q, k, v)), attn_mask=bias
            )
            out = out.reshape(B, nW, self.num_heads, N, -1)
        else:
            self.rel_pos.index = self.index(N)
            attn = self.rel_pos(q * q.shape[-1] ** -0.5 @ k.transpose(-2, -1))  # [B, nW, h, N, N]
            if mask is not None:
                attn = attn + mask.unsqueeze(1)
            out = attn.softmax(dim=-1) @ v
        out = out.permute(0, 1, 3, 2, 4).reshape(B, nW * N, C)
        return self.proj(out).reshape(B, nW, N, C)


_TABLE = "relative_position_bias_table"


def _monai_keys(module: nn.Module, state: dict, prefix: str, _meta: Any) -> None:
    """State-dict post hook: the table under MONAI's key, the attention's keys in MONAI's order."""
    keys = [k for k in state if k.startswith(prefix)]
    values = {k: state.pop(k) for k in keys}
    state[prefix + _TABLE] = values.pop(f"{prefix}rel_pos.{_TABLE}")
    state.update(values)


def _own_keys(module: nn.Module, state: dict, prefix: str, *_: Any) -> None:
    """Load-state-dict pre hook: MONAI's key for the table back to the parameter's."""
    if prefix + _TABLE in state:
        state[f"{prefix}rel_pos.{_TABLE}"] = state.pop(prefix + _TABLE)


def trainable_state_names(model: nn.Module) -> list[str]:
    """State-dict keys of the parameters that train (they differ from parameter names for the bias tables)."""
    return [k for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, nn.Parameter) and v.requires_grad]


class Mlp(nn.Module):
    """MONAI's `MLPBlock` names (`linear1`, `linear2`), exact GELU."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.fn = nn.GELU()
        self.linear2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.fn(self.linear1(x)))


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
    def __init__(
        self,
        dim: int,
        num_heads: int,
        res: int,
        window: int,
        shift: bool,
        mlp_ratio: float,
        drop_path: float,
        fused_attn: bool,
    ) -> None:
        super().__init__()
        self.window = min(window, res)  # MONAI: a map not larger than the window is one window, unshifted
        self.shift = window // 2 if shift and res > window else 0
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window, fused_attn)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        mask = shifted_window_mask(res, self.window, self.shift) if self.shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C]
        B, H, W, C = x.shape
        x = x + self.drop_path(self._attn(self.norm1(x)))
        x = x.reshape(B, H * W, C)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x.reshape(B, H, W, C)

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        _, H, W, _ = x.shape
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        x = window_reverse(self.attn.attend(window_partition(x, self.window), self.attn_mask), self.window, H, W)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        return x


class PatchMerging(nn.Module):
    """2x2 neighbouring tokens -> one, `[B, H, W, C] -> [B, H/2, W/2, 2C]` (MONAI's channel order)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        # (row, column) offsets (0,0), (1,0), (0,1), (1,1), as MONAI's concatenation
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, H * W // 4, 4 * C)
        return self.reduction(self.norm(x)).reshape(B, H // 2, W // 2, 2 * C)


class SwinStage(nn.Module):
    """MONAI's `BasicLayer`: attention blocks, then a patch merge."""

    def __init__(
        self, dim: int, depth: int, num_heads: int, res: int, cfg: EncoderConfig, drop_path: list[float]
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(
                dim,
                num_heads,
                res,
                cfg.window_size,
                shift=i % 2 == 1,
                mlp_ratio=cfg.mlp_ratio,
                drop_path=drop_path[i],
                fused_attn=cfg.fused_attn,
            )
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim)
        self.grad_checkpointing = cfg.grad_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C] -> [B, H/2, W/2, 2C]
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.downsample(x)


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, D, H/p, W/p]
        # contiguous: Opacus' conv per-sample rule assumes NCHW-contiguous input
        return self.proj(x.contiguous())


def _conv_block(dim: int) -> nn.Module:
    """MONAI's v2 residual conv block (`layers{i}c.0`): two 3x3 convs, instance norm, LeakyReLU."""
    block = UnetrBasicBlock(2, dim, dim, kernel_size=3, stride=1, norm_name="instance", res_block=True)
    for m in block.modules():  # in-place activations break Opacus' backward hooks
        if hasattr(m, "inplace"):
            m.inplace = False
    return block


def _channel_norm(x: torch.Tensor) -> torch.Tensor:
    """MONAI's `proj_out(normalize=True)`: layer norm over channels without weights, `[B, C, H, W]`."""
    return F.layer_norm(x.permute(0, 2, 3, 1), [x.shape[1]]).permute(0, 3, 1, 2)


class SwinEncoder(nn.Module):
    """The EchoCare Swin encoder with timm's encoder API.

    `forward(x)` gives the pooled global feature `[B, num_features]`; `forward_features` the normed last map
    `[B, h, w, C]`; `forward_intermediates` the five normed maps for dense heads (MONAI's outputs).
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        depths, heads = cfg.arch["depths"], cfg.arch["num_heads"]
        self.embed_dim = cfg.arch["embed_dim"]
        self.num_features = cfg.stage_channels[-1]
        self.patch_embed = PatchEmbed(cfg.in_chans, self.embed_dim, cfg.patch_size)
        n = sum(depths)
        rates = [cfg.drop_path * i / max(1, n - 1) for i in range(n)]  # stochastic depth grows with depth
        for i in range(STAGES):  # MONAI's order: all Swin stages, then all conv blocks
            self.add_module(
                f"layers{i + 1}",
                nn.ModuleList(
                    [
                        SwinStage(
                            cfg.stage_channels[i],
                            depths[i],
                            heads[i],
                            cfg.block_resolutions[i],
                            cfg,
                            rates[sum(depths[:i]) : sum(depths[: i + 1])],
                        )
                    ]
                ),
            )
        for i in range(STAGES):
            self.add_module(f"layers{i + 1}c", nn.ModuleList([_conv_block(cfg.stage_channels[i])]))
        self.apply(_init_weights)

    def stage(self, i: int) -> tuple[nn.Module, nn.Module]:
        """The conv block and the Swin stage of stage `i` (0-based)."""
        return getattr(self, f"layers{i + 1}c")[0], getattr(self, f"layers{i + 1}")[0]

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        intermediates_only: bool = False,
        token_mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the encoder and keep its outputs for dense heads (timm's API).

        Args:
            x: images `[B, in_chans, H, W]`.
            indices: outputs to return (0 = the patch embedding, 1..4 = the stages): a list, the last n for
                an int, all five for None.
            intermediates_only: return only those maps (stops after the last one asked for).
            token_mask: `[B, H/p, W/p]`, 1 where a patch is replaced by `mask_token` (masked image modelling).
            mask_token: `[D]`, the embedding a masked patch gets.

        Returns:
            The maps `[B, C_i, H_i, W_i]`, preceded by the last map `[B, h, w, C]` unless `intermediates_only`.

        Raises:
            ValueError: an output index out of range.
        """
        n = STAGES + 1
        wanted = (
            list(range(n))
            if indices is None
            else (list(range(n - indices, n)) if isinstance(indices, int) else list(indices))
        )
        if not wanted or any(not 0 <= i < n for i in wanted):
            raise ValueError(f"indices={indices}: outputs are 0..{n - 1}")
        t = self.patch_embed(x)  # [B, D, Hp, Wp]
        if token_mask is not None:
            w = token_mask.unsqueeze(1).to(t.dtype)
            t = t * (1.0 - w) + mask_token.to(t.dtype).reshape(1, -1, 1, 1) * w
        outs = [_channel_norm(t)] if 0 in wanted else []
        for i in range(max(wanted) if intermediates_only else STAGES):
            conv, stage = self.stage(i)
            t = stage(conv(t).permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()
            if i + 1 in wanted:
                outs.append(_channel_norm(t))
        if intermediates_only:
            return outs
        return (outs[-1] if STAGES in wanted else _channel_norm(t)).permute(0, 2, 3, 1), outs

    def forward_features(
        self, x: torch.Tensor, token_mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The normed last map `[B, h, w, num_features]`."""
        return self.forward_intermediates(x, [STAGES], True, token_mask, mask_token)[0].permute(0, 2, 3, 1)

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
