"""Report generation head: a transformer decoder that writes a report from one or two images' encoder features.

The encoder's last-stage tokens of every view, projected to the decoder's width with a learned position
(location in the image matters to a report: "left", "upper") and view embedding, are the memory the
decoder attends to (R2Gen-style encoder-decoder, the paper's report generator). Pre-norm blocks of causal
self-attention, cross-attention and an MLP, built from `nn.Linear`, `nn.LayerNorm` and `nn.Embedding`
only, so per-sample gradients (DP) need no rewrite. Decoding: greedy or beam search.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MAX_VIEWS", "ReportHead", "ReportHeadConfig"]

MAX_VIEWS = 2  # images per report


@dataclass(frozen=True)
class ReportHeadConfig:
    width: int = 256  # decoder width
    depth: int = 3  # decoder blocks
    heads: int = 8
    max_tokens: int = 256  # ids per report, with start and end (bytes, for the byte-level tokenizer)

    def __post_init__(self) -> None:
        if self.width < 1 or self.depth < 1 or self.heads < 1 or self.width % self.heads or self.max_tokens < 3:
            raise ValueError(f"report head: need width divisible by heads, depth >= 1 and max_tokens >= 3; got "
                             f"width={self.width}, heads={self.heads}, depth={self.depth}, "
                             f"max_tokens={self.max_tokens}")


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor, memory: torch.Tensor, causal: bool) -> torch.Tensor:
        b, n, c = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:  # [B, L, C] -> [B, heads, L, C / heads]
            return t.view(b, -1, self.heads, c // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(memory)), split(self.v(memory)),
                                           is_causal=causal)
        return self.out(y.transpose(1, 2).reshape(b, n, c))


class _Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attn, self.cross_attn = _Attention(width, heads), _Attention(width, heads)
        self.fc1, self.fc2, self.act = nn.Linear(width, 4 * width), nn.Linear(4 * width, width), nn.GELU()

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.self_attn(h, h, causal=True)
        x = x + self.cross_attn(self.norm2(x), memory, causal=False)
        return x + self.fc2(self.act(self.fc1(self.norm3(x))))


class ReportHead(nn.Module):
    """`forward(stage_tokens [B, V, N, C_enc], ids [B, L]) -> [B, L, vocab]` next-token logits.

    Args:
        in_features: channels of the encoder's normed last stage.
        grid: tokens per view of that stage (h * w).
        vocab_size: the tokenizer's ids.
    """

    def __init__(self, in_features: int, grid: int, vocab_size: int, cfg: ReportHeadConfig) -> None:
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.memory_proj = nn.Linear(in_features, cfg.width)
        self.memory_pos = nn.Parameter(torch.zeros(grid, cfg.width))
        self.view_embed = nn.Embedding(MAX_VIEWS, cfg.width)
        self.token_embed = nn.Embedding(vocab_size, cfg.width)
        self.token_pos = nn.Embedding(cfg.max_tokens, cfg.width)
        self.blocks = nn.ModuleList(_Block(cfg.width, cfg.heads) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)
        self.logits = nn.Linear(cfg.width, vocab_size)
        nn.init.trunc_normal_(self.memory_pos, std=0.02)

    def memory(self, stage_tokens: torch.Tensor) -> torch.Tensor:
        """`[B, V, N, C_enc] -> [B, V * N, width]`."""
        b, v, n, _ = stage_tokens.shape
        views = self.view_embed(torch.arange(v, device=stage_tokens.device))  # [V, width]
        x = self.memory_proj(stage_tokens) + self.memory_pos + views[None, :, None]
        return x.reshape(b, v * n, -1)

    def decode(self, memory: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Logits `[B, L, vocab]` of the token after each of `ids` `[B, L]`, given `memory` `[B, M, width]`."""
        pos = self.token_pos(torch.arange(ids.shape[1], device=ids.device))
        x = self.token_embed(ids) + pos
        for block in self.blocks:
            x = block(x, memory)
        return self.logits(self.norm(x))

    def forward(self, stage_tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.decode(self.memory(stage_tokens), ids)

    @torch.no_grad()
    def generate(self, stage_tokens: torch.Tensor, bos: int, eos: int, beam: int = 1) -> list[list[int]]:
        """The ids of each sample's report (without `<bos>`, up to `<eos>`): greedy when `beam` is 1, else beam
        search keeping `beam` hypotheses, ranked by log-probability per token (length-normalised)."""
        if beam < 1:
            raise ValueError(f"beam={beam}: must be >= 1 (1: greedy)")
        memory = self.memory(stage_tokens)  # [B, M, width]
        return [self._beam(memory[i:i + 1], bos, eos, beam) for i in range(len(memory))]

    def _beam(self, memory: torch.Tensor, bos: int, eos: int, beam: int) -> list[int]:
        """Beam search for one sample; with `beam` 1 it is greedy decoding."""
        seqs = torch.full((1, 1), bos, dtype=torch.long, device=memory.device)  # live hypotheses [K, t]
        scores = torch.zeros(1, device=memory.device)  # their summed log-probabilities [K]
        done: list[tuple[float, list[int]]] = []
        for step in range(1, self.cfg.max_tokens):
            logp = self.decode(memory.expand(len(seqs), -1, -1), seqs)[:, -1].float().log_softmax(-1)  # [K, vocab]
            total = (scores[:, None] + logp).flatten()
            top = total.topk(min(beam, len(total))).indices
            src, token = top // logp.shape[1], top % logp.shape[1]
            seqs, scores = torch.cat([seqs[src], token[:, None]], dim=1), total[top]
            ended = (token == eos) | (step == self.cfg.max_tokens - 1)
            done += [(float(s) / step, q[1:].tolist()) for s, q, e in zip(scores, seqs, ended) if e]
            seqs, scores = seqs[~ended], scores[~ended]
            best_live = float(scores.max()) / step if len(scores) else float("-inf")
            # Hugging Face's early stop: `beam` hypotheses have ended and the best live one, scored at its
            # current length, is no better than the worst of them
            if len(done) >= beam and best_live <= sorted(s for s, _ in done)[-beam]:
                break
        best = max(done, key=lambda d: d[0])[1]
        return best[:-1] if best and best[-1] == eos else best
