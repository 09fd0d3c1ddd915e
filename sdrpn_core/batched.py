"""Batched answering: B (image, question) pairs through one prefill and one greedy loop (docs/method.md §6).

Every row's sequence is right-aligned in a [B, L] batch (left padding, as HF generate pads), with an attention
mask over the padding and each token's own position ids, so a row attends to exactly what it would alone and
gets the same answer as at batch 1 (tested on every RoI branch, both families).

SD-RPN at batch B: pass 1 is one partial prefill of the collated batch; the RoI plans and crops are made per
row; pass 2 packs the rows' ragged sequences (different crop-token counts). With KV reuse, each row's unchanged
prefix (system prompt + original image) is taken from pass 1's cache and h^K, laid out as
`[pad | prefix_i][pad | new_i]`: the prefix block is right-aligned in the first P columns, the new tokens (crop +
question) in the last N, so every row's last token is the batch's last column. Rotary positions are explicit per
token and padding is masked, so the gap in the middle changes nothing a row sees."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdrpn_core.models.base import VLMAdapter
from sdrpn_core.models.decoder import eos_token_ids, layer_inputs, new_cache, run_layers

Sequence = tuple[torch.Tensor, torch.Tensor]  # (embeds [1, L, D], positions [1, L] or [3, 1, L]) of one row


@dataclass
class Packed:
    """Rows right-aligned in one batch: embeds [B, L, D], positions [B, L] or [3, B, L], mask [B, L] (1 = token)."""

    embeds: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor


def pack(rows: list[Sequence], width: int | None = None) -> Packed:
    """Left-pad the rows to `width` (default: the longest); padding has zero embeddings and position 0."""
    width = width or max(e.shape[1] for e, _ in rows)
    e0, p0 = rows[0]
    embeds = e0.new_zeros(len(rows), width, e0.shape[-1])
    positions = p0.new_zeros((*p0.shape[:-2], len(rows), width))
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=e0.device)
    for i, (e, p) in enumerate(rows):
        n = e.shape[1]
        if n:
            embeds[i, width - n :] = e[0]
            positions[..., i, width - n :] = p[..., 0, :]
            mask[i, width - n :] = 1
    return Packed(embeds, positions, mask)


def concat(a: Packed, b: Packed) -> Packed:
    """Two packed blocks side by side (the reused prefix, then the new tokens)."""
    return Packed(
        torch.cat([a.embeds, b.embeds], 1), torch.cat([a.positions, b.positions], -1), torch.cat([a.mask, b.mask], 1)
    )


def next_logits(adapter: VLMAdapter, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token logits at the last column [B, V] (every row's last token: rows are right-aligned)."""
    return adapter.lm_head(adapter.final_norm(hidden[:, -1:]))[:, -1]


def padding_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """The 2-D mask for HF's mask builder; None when nothing is padded (the batch-1 kernels)."""
    return None if bool(mask.all()) else mask


def prefill(adapter: VLMAdapter, packed: Packed):
    """The whole decoder over a packed batch → (next-token logits [B, V], KV cache)."""
    cache = new_cache(adapter)
    mask, pe = layer_inputs(adapter, packed.embeds, packed.positions, padding_mask(packed.mask), cache)
    hidden = run_layers(adapter.decoder_layers, packed.embeds, mask, pe, packed.positions, cache)
    return next_logits(adapter, hidden), cache


def penalised(logits: torch.Tensor, seen: list[set[int]], penalty: float) -> torch.Tensor:
    """HF's repetition penalty per row: logits of tokens already seen divided by it (multiplied when negative)."""
    if not any(seen):
        return logits
    out = logits.clone()
    for i, ids in enumerate(seen):
        if ids:
            index = torch.tensor(sorted(ids), device=logits.device)
            picked = logits[i, index]
            out[i, index] = torch.where(picked < 0, picked * penalty, picked / penalty)
    return out


def greedy(
    adapter: VLMAdapter,
    cache,
    logits: torch.Tensor,
    packed: Packed,
    max_new_tokens: int,
    prompt_ids: list[torch.Tensor] | None = None,
    scores: list[torch.Tensor] | None = None,
) -> list[list[int]]:
    """Greedy decoding of every row with an explicit cache. Each new token takes its row's last position + 1 (after
    M-RoPE or dropped crop tokens, the row's max position + 1, as Qwen's `rope_deltas` give). The checkpoint's
    `repetition_penalty` applies to the row's prompt ids and answer so far, as `generate` does (Qwen2.5-VL-Instruct
    ships 1.05). A row stops at EOS; the loop stops when every row has. `scores`, when given, receives row 0's
    next-token scores at each step (as `generate(output_scores=True)` does at batch 1)."""
    eos = set(eos_token_ids(adapter.model))
    penalty = float(getattr(adapter.model.generation_config, "repetition_penalty", None) or 1.0)
    batch = logits.shape[0]
    seen = [
        set(p.tolist()) if prompt_ids is not None and penalty != 1.0 else set() for p in prompt_ids or [None] * batch
    ]
    where = packed.positions.masked_fill(packed.mask == 0, -1)  # padding never counts as a row's last position
    start = (where.amax(dim=(0, 2)) if where.ndim == 3 else where.amax(-1)) + 1  # [B]
    mask = packed.mask
    tokens: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    for step in range(max_new_tokens):
        logits = logits.float()  # as `generate`: penalty and argmax on fp32 logits (bf16 ties where fp32 does not)
        if penalty != 1.0:
            logits = penalised(logits, seen, penalty)
        if scores is not None:
            scores.append(logits[0].cpu())
        picked = logits.argmax(-1)
        for i, token in enumerate(picked.tolist()):
            if not done[i]:
                tokens[i].append(token)
                seen[i].add(token)
                done[i] = token in eos
        if all(done) or step == max_new_tokens - 1:
            break
        emb = adapter.embed_tokens(picked[:, None])
        pos = (start + step)[:, None]
        pos = pos if packed.positions.ndim == 2 else pos[None].expand(3, batch, 1)
        mask = torch.cat([mask, mask.new_ones(batch, 1)], 1)
        m, pe = layer_inputs(adapter, emb, pos, padding_mask(mask), cache)
        logits = next_logits(adapter, run_layers(adapter.decoder_layers, emb, m, pe, pos, cache))
    return tokens


def reuse_prefix_cache(adapter: VLMAdapter, cache, rows: list[tuple[int, int, int]], K: int, width: int):
    """A fresh cache whose layers 0..K−1 hold each row's prefix KV from pass 1's batch cache, right-aligned in
    `width` columns. `rows[i]` = (row in pass 1's batch, its left padding there, its prefix length)."""
    out = new_cache(adapter)
    for layer in range(K):
        keys, values = cache.layers[layer].keys, cache.layers[layer].values  # [B1, H, L1, d]
        k = keys.new_zeros(len(rows), keys.shape[1], width, keys.shape[-1])
        v = values.new_zeros(len(rows), values.shape[1], width, values.shape[-1])
        for i, (row, offset, n) in enumerate(rows):
            if n:
                k[i, :, width - n :] = keys[row, :, offset : offset + n]
                v[i, :, width - n :] = values[row, :, offset : offset + n]
        out.update(k, v, layer)
    return out
