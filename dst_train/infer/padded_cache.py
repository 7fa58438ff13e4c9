"""A KV cache shared by several independent token streams (one per batch row).

Streams grow by different amounts at each step (one row decodes a 12-token response while
another only sees a frame), but a batched forward pass needs one tensor: each call is padded on
the right to its longest row, and an attention mask (B, L) hides the pads as keys. RoPE
positions are counted per row over real tokens only, so a row attends to exactly the keys, at
exactly the positions, it would have alone; the pads only cost compute.

A row can be restarted (context refresh, or a new video in a freed row) by masking its whole
past. Pads pile up fast (a row decoding a 30-token reply adds 30 pads to every other row), and
every pad is still read by attention and copied by the cache, so when the physical length
reaches twice the longest live row (+ ``slack``), :meth:`compact` drops every masked slot and
left-aligns the rows: memory and attention stay within 2x of the longest live row.
Decoding, where only a few rows grow for many steps, runs on a copy of just those rows
(:meth:`take`, then :meth:`put_back`), so it costs what it would for those rows alone.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class PaddedCache:
    def __init__(
        self, backbone, rows: int, device: torch.device, slack: int = 64, compacts: bool = True
    ):
        self.backbone = backbone
        self.rows = rows
        self.slack = slack
        self.compacts = compacts
        self.device = device
        self.cache = DynamicCache()
        self.mask = torch.zeros(rows, 0, dtype=torch.long, device=device)  # (B, L), 1 = real
        self.pos = torch.zeros(rows, dtype=torch.long, device=device)  # next RoPE position

    def length(self, row: int) -> int:
        """Real tokens in ``row`` since its last restart (what the row's context holds)."""
        return int(self.pos[row])

    def restart(self, row: int) -> None:
        """Forget ``row``'s past: it no longer attends to anything fed before."""
        self.mask[row] = 0
        self.pos[row] = 0

    def feed(self, items: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Append embeddings to some rows in one forward pass.

        ``items``: row → (T_row, H) embeddings; rows not named get only pads.
        Returns row → (H,) hidden state at that row's last fed token."""
        if self.compacts and self.cache.get_seq_length() >= 2 * int(self.pos.max()) + self.slack:
            self.compact()
        width = max(len(e) for e in items.values())
        first = next(iter(items.values()))
        embeds = torch.zeros(
            self.rows, width, first.shape[-1], dtype=first.dtype, device=self.device
        )
        valid = torch.zeros(self.rows, width, dtype=torch.long, device=self.device)
        for row, e in items.items():
            embeds[row, : len(e)] = e
            valid[row, : len(e)] = 1
        positions = self.pos[:, None] + torch.arange(width, device=self.device)
        self.mask = torch.cat([self.mask, valid], dim=1)
        hidden, self.cache = self.backbone.decode(
            embeds,
            attention_mask=self.mask,
            past_key_values=self.cache,
            use_cache=True,
            position_ids=positions,
        )
        self.pos += valid.sum(1)
        return {row: hidden[row, len(e) - 1] for row, e in items.items()}

    def compact(self) -> None:
        """Drop the slots no row attends to; each row's live tokens end up left-padded.

        Keys keep the RoPE rotation of their original positions, and every row keeps its keys in
        order, so attention is unchanged."""
        keep = [torch.nonzero(m).squeeze(1) for m in self.mask]
        width = max(len(k) for k in keep)
        mask = torch.zeros(self.rows, width, dtype=torch.long, device=self.device)
        for row, k in enumerate(keep):
            mask[row, width - len(k) :] = 1
        fresh = DynamicCache()
        for i, layer in enumerate(self.cache.layers):
            keys, values = layer.keys, layer.values  # (B, heads, L, head_dim)
            new_k = keys.new_zeros(*keys.shape[:2], width, keys.shape[-1])
            new_v = values.new_zeros(*values.shape[:2], width, values.shape[-1])
            for row, k in enumerate(keep):
                new_k[row, :, width - len(k) :] = keys[row, :, k]
                new_v[row, :, width - len(k) :] = values[row, :, k]
            fresh.update(new_k, new_v, i)
        self.cache, self.mask = fresh, mask

    def take(self, rows: list[int]) -> PaddedCache:
        """A cache of only ``rows`` (a copy; its row i is ``rows[i]``), for a phase in which only
        they grow, such as decoding: the other rows then cost nothing, not a pad per token.
        Give it back with :meth:`put_back`; it does not compact, so its layout stays aligned."""
        index = torch.tensor(rows, device=self.device)
        sub = PaddedCache(self.backbone, len(rows), self.device, self.slack, compacts=False)
        for i, layer in enumerate(self.cache.layers):
            sub.cache.update(layer.keys[index], layer.values[index], i)
        sub.mask, sub.pos = self.mask[index], self.pos[index].clone()
        return sub

    def put_back(self, sub: PaddedCache, rows: list[int]) -> None:
        """Append what ``sub`` (from ``take(rows)``) grew to those rows; the others get pads."""
        old, grown = self.mask.shape[1], sub.mask.shape[1] - self.mask.shape[1]
        if grown == 0:
            return
        index = torch.tensor(rows, device=self.device)
        fresh = DynamicCache()
        for i, (layer, new) in enumerate(zip(self.cache.layers, sub.cache.layers, strict=True)):
            parts = []
            for mine, theirs in ((layer.keys, new.keys), (layer.values, new.values)):
                tail = mine.new_zeros(*mine.shape[:2], grown, mine.shape[-1])
                tail[index] = theirs[:, :, old:]
                parts.append(torch.cat([mine, tail], dim=2))
            fresh.update(*parts, i)
        tail = self.mask.new_zeros(self.rows, grown)
        tail[index] = sub.mask[:, old:]
        self.cache, self.mask = fresh, torch.cat([self.mask, tail], dim=1)
        self.pos[index] = sub.pos
