"""Report generation head: a transformer decoder that writes a report from one or two images' encoder features.

The encoder's last-stage tokens of every view, projected to the decoder's width with a learned position
(location in the image matters to a report: "left", "upper") and view embedding, are the memory the
decoder attends to (R2Gen-style encoder-decoder, the paper's report generator). Pre-norm blocks of causal
self-attention, cross-attention and an MLP, built from `nn.Linear`, `nn.LayerNorm` and `nn.Embedding`
only, so per-sample gradients (DP) need no rewrite. Decoding: greedy or beam search.

With `findings`, a linear classifier on the views' pooled features also learns which of those phrases the
report states (multi-label, an auxiliary loss as in Jing et al. 2018's tag prediction). Measured on the
synthetic reports: without it, the encoder's features collapse to one point while the decoder learns the
template, and the model writes one report for every study (docs/benchmarks.md).
"""

from __future__ import annotations

import math
import re
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
    views: int = 1  # images per report: 1 (`image`), or 2 (`image`, `image2`; a study without image2 repeats image)
    findings: tuple[str, ...] = ()  # phrases a classifier on the images learns to detect (auxiliary loss)
    findings_weight: float = 1.0  # that loss's weight next to the report's; 0: no classifier

    def __post_init__(self) -> None:
        if (
            self.width < 1
            or self.depth < 1
            or self.heads < 1
            or self.width % self.heads
            or self.max_tokens < 3
            or not 1 <= self.views <= MAX_VIEWS
        ):
            raise ValueError(
                f"report head: need width divisible by heads, depth >= 1, max_tokens >= 3 and views 1 "
                f"or {MAX_VIEWS}; got width={self.width}, heads={self.heads}, depth={self.depth}, "
                f"max_tokens={self.max_tokens}, views={self.views}"
            )
        if (
            not 0 <= self.findings_weight < math.inf
            or len({str(f).lower() for f in self.findings}) < len(self.findings)
            or not all(isinstance(f, str) and re.search(r"[^\W_]", f) for f in self.findings)
        ):
            raise ValueError(
                f"report head: findings must be distinct phrases of words (case does not count) and "
                f"findings_weight a finite number >= 0; got findings={list(self.findings)}, "
                f"findings_weight={self.findings_weight}"
            )

    @property
    def classifies(self) -> bool:
        """Whether the head has the findings classifier."""
        return bool(self.findings) and self.findings_weight > 0


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))

    def _split(self, t: torch.Tensor) -> torch.Tensor:  # [B, L, C] -> [B, heads, L, C / heads]
        return t.view(t.shape[0], -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)

    def kv(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `source` `[B, L, C]`, each `[B, heads, L, C / heads]`."""
        return self._split(self.k(source)), self._split(self.v(source))

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        y = F.scaled_dot_product_attention(self._split(self.q(x)), k, v, is_causal=causal)
        return self.out(y.transpose(1, 2).reshape(x.shape))

    def forward(self, x: torch.Tensor, source: torch.Tensor, causal: bool) -> torch.Tensor:
        return self.attend(x, *self.kv(source), causal=causal)


_Cache = tuple[torch.Tensor, torch.Tensor]


class _Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attn, self.cross_attn = _Attention(width, heads), _Attention(width, heads)
        self.fc1, self.fc2, self.act = nn.Linear(width, 4 * width), nn.Linear(4 * width, width), nn.GELU()

    def _rest(self, x: torch.Tensor, cross: _Cache) -> torch.Tensor:
        x = x + self.cross_attn.attend(self.norm2(x), *cross, causal=False)
        return x + self.fc2(self.act(self.fc1(self.norm3(x))))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        return self._rest(x + self.self_attn(h, h, causal=True), self.cross_attn.kv(memory))

    def step(self, x: torch.Tensor, cache: _Cache | None, cross: _Cache) -> tuple[torch.Tensor, _Cache]:
        """One new position `x` `[K, 1, C]`, the earlier positions' self-attention keys and values in `cache`."""
        h = self.norm1(x)
        k, v = self.self_attn.kv(h)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        return self._rest(x + self.self_attn.attend(h, k, v, causal=False), cross), (k, v)


class ReportHead(nn.Module):
    """`forward(stage_tokens [B, V, N, C_enc], ids [B, L])` -> (`[B, L, vocab]` next-token logits, `[B, F]` logits
    of the config's F findings; F is 0 without the classifier).

    Args:
        in_features: channels of the encoder's normed last stage.
        grid: tokens per view of that stage (h * w).
        vocab_size: the tokenizer's ids.
    """

    def __init__(self, in_features: int, grid: int, vocab_size: int, cfg: ReportHeadConfig) -> None:
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.memory_proj = nn.Linear(in_features, cfg.width)
        self.memory_pos = nn.Embedding(grid, cfg.width)  # an Embedding, not a bare Parameter: Opacus has its rule
        self.view_embed = nn.Embedding(MAX_VIEWS, cfg.width)
        self.token_embed = nn.Embedding(vocab_size, cfg.width)
        self.token_pos = nn.Embedding(cfg.max_tokens, cfg.width)
        self.blocks = nn.ModuleList(_Block(cfg.width, cfg.heads) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)
        self.logits = nn.Linear(cfg.width, vocab_size)
        self.findings = nn.Linear(in_features, len(cfg.findings)) if cfg.classifies else None
        nn.init.trunc_normal_(self.memory_pos.weight, std=0.02)

    def memory(self, stage_tokens: torch.Tensor) -> torch.Tensor:
        """`[B, V, N, C_enc] -> [B, V * N, width]`."""
        b, v, n, _ = stage_tokens.shape
        # positions as a batch of their own ids: Opacus' Embedding rule reads the first dimension as the batch
        views = self.view_embed(torch.arange(v, device=stage_tokens.device).expand(b, v))  # [B, V, width]
        pos = self.memory_pos(torch.arange(n, device=stage_tokens.device).expand(b, n))  # [B, N, width]
        x = self.memory_proj(stage_tokens) + pos[:, None] + views[:, :, None]
        return x.reshape(b, v * n, -1)

    def decode(self, memory: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Logits `[B, L, vocab]` of the token after each of `ids` `[B, L]`, given `memory` `[B, M, width]`."""
        pos = self.token_pos(torch.arange(ids.shape[1], device=ids.device).expand_as(ids))  # [B, L, width]
        x = self.token_embed(ids) + pos
        for block in self.blocks:
            x = block(x, memory)
        return self.logits(self.norm(x))

    def finding_logits(self, stage_tokens: torch.Tensor) -> torch.Tensor:
        """`[B, V, N, C_enc] -> [B, F]`, from the mean of all views' tokens."""
        if self.findings is None:
            return stage_tokens.new_zeros(len(stage_tokens), 0)
        return self.findings(stage_tokens.mean((1, 2)))

    def forward(self, stage_tokens: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decode(self.memory(stage_tokens), ids), self.finding_logits(stage_tokens)

    @torch.no_grad()
    def generate(self, stage_tokens: torch.Tensor, bos: int, eos: int, beam: int = 1) -> list[list[int]]:
        """The ids of each sample's report (without `<bos>`, up to `<eos>`): greedy when `beam` is 1, else beam
        search keeping `beam` hypotheses, ranked by log-probability per token (length-normalised). Keys and
        values of earlier positions are cached, so each step runs the decoder on one position."""
        if beam < 1:
            raise ValueError(f"beam={beam}: must be >= 1 (1: greedy)")
        memory = self.memory(stage_tokens)  # [B, M, width]
        return [self._beam(memory[i : i + 1], bos, eos, beam) for i in range(len(memory))]

    def _log_probs(
        self, seqs: torch.Tensor, cross: list[_Cache], caches: list[_Cache | None]
    ) -> tuple[torch.Tensor, list[_Cache]]:
        """Log-probabilities `[K, vocab]` of the token after each hypothesis `seqs` `[K, t]`, whose first t - 1
        positions are in `caches` (one per block); returns the caches with position t added."""
        k = len(seqs)
        x = self.token_embed(seqs[:, -1:]) + self.token_pos.weight[seqs.shape[1] - 1]  # [K, 1, width]
        new = []
        for block, (ck, cv), cache in zip(self.blocks, cross, caches):
            x, kv = block.step(x, cache, (ck.expand(k, -1, -1, -1), cv.expand(k, -1, -1, -1)))
            new.append(kv)
        return self.logits(self.norm(x))[:, -1].float().log_softmax(-1), new

    def _beam(self, memory: torch.Tensor, bos: int, eos: int, beam: int) -> list[int]:
        """Beam search for one sample `memory` `[1, M, width]`; with `beam` 1 it is greedy decoding."""
        cross = [block.cross_attn.kv(memory) for block in self.blocks]
        caches: list = [None] * len(self.blocks)
        seqs = torch.full((1, 1), bos, dtype=torch.long, device=memory.device)  # live hypotheses [K, t]
        scores = torch.zeros(1, device=memory.device)  # their summed log-probabilities [K]
        done: list[tuple[float, list[int]]] = []
        for step in range(1, self.cfg.max_tokens):
            logp, caches = self._log_probs(seqs, cross, caches)  # [K, vocab]
            total = (scores[:, None] + logp).flatten()
            top = total.topk(min(beam, len(total))).indices
            src, token = top // logp.shape[1], top % logp.shape[1]
            seqs, scores = torch.cat([seqs[src], token[:, None]], dim=1), total[top]
            ended = (token == eos) | (step == self.cfg.max_tokens - 1)
            done += [(float(s) / step, q[1:].tolist()) for s, q, e in zip(scores, seqs, ended) if e]
            live = src[~ended]
            seqs, scores = seqs[~ended], scores[~ended]
            caches = [(k[live], v[live]) for k, v in caches]
            best_live = float(scores.max()) / step if len(scores) else float("-inf")
            # Hugging Face's early stop: `beam` hypotheses have ended and the best live one, scored at its
            # current length, is no better than the worst of them
            if len(done) >= beam and best_live <= sorted(s for s, _ in done)[-beam]:
                break
        best = max(done, key=lambda d: d[0])[1]
        return best[:-1] if best and best[-1] == eos else best
