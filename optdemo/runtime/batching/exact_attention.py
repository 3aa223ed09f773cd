"""Prompt attention whose every row is the same however the prompt is cut.

A prompt computed whole and the same prompt computed after a reused prefix ask attention for the
same rows in calls of different shapes; torch's attention kernels split queries and keys into
blocks sized by the call's shape, so the bits of a row would change with the cut. Here queries go
in blocks of ``QUERY_BLOCK`` rows aligned to their absolute positions (padded with zero rows) and
keys in blocks of ``KEY_BLOCK`` aligned to position 0 (padded and masked), each pair computed with
the same shapes in float32 with an online softmax (the flash-attention recurrence). A row's result
then depends only on its position and the keys before it, never on the call.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

QUERY_BLOCK = 64
# Large key blocks: each block pair is a few tensor operations, so fewer, larger pairs keep a long
# conversation's prompt bound by arithmetic rather than by the operations' own overhead.
KEY_BLOCK = 512


def block_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None = None
) -> torch.Tensor:
    """Causal attention of one sequence's newest ``query`` rows over all its ``key``/``value`` rows
    (``[1, heads, rows, dim]`` each, keys as many heads as queries), in ``query``'s dtype, shaped
    ``[1, rows, heads, dim]`` as transformers' attention functions return it."""
    import torch

    _, heads, rows, dim = query.shape
    total = key.shape[2]
    first = total - rows  # absolute position of the first query row
    scale = scaling if scaling is not None else 1.0 / math.sqrt(dim)
    out = torch.empty((heads, rows, dim), dtype=torch.float32, device=query.device)
    q = query[0].float() * scale  # scaled once here, not every block's scores
    keys, values = _key_blocks(key[0], total), _key_blocks(value[0], total)
    key_positions = torch.arange(KEY_BLOCK, device=query.device)
    for block_start in range(first - first % QUERY_BLOCK, total, QUERY_BLOCK):
        lo, hi = max(block_start, first), min(block_start + QUERY_BLOCK, total)
        block = q.new_zeros((heads, QUERY_BLOCK, dim))
        block[:, lo - block_start : hi - block_start] = q[:, lo - first : hi - first]
        query_positions = block_start + torch.arange(QUERY_BLOCK, device=query.device)
        result = _attend(block, keys, values, query_positions, key_positions, total)
        out[:, lo - first : hi - first] = result[:, lo - block_start : hi - block_start]
    return out.to(query.dtype).transpose(0, 1).unsqueeze(0)


def _key_blocks(rows: torch.Tensor, total: int) -> torch.Tensor:
    """``[heads, total, dim]`` as float32 blocks ``[blocks, heads, KEY_BLOCK, dim]``, each one
    contiguous (the same layout for every block pair) and the last padded with zero rows."""
    heads, _, dim = rows.shape
    blocks = -(-total // KEY_BLOCK)
    padded = rows.new_zeros((heads, blocks * KEY_BLOCK, dim), dtype=rows.dtype)
    padded[:, :total] = rows
    return padded.float().view(heads, blocks, KEY_BLOCK, dim).transpose(0, 1).contiguous()


def _attend(
    block: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    total: int,
) -> torch.Tensor:
    """One (scaled) query block against the key blocks up to its last position (online softmax).
    The scores are updated in place: each block pair is a few passes over one buffer."""
    import torch

    heads, rows, dim = block.shape
    maximum = block.new_full((heads, rows, 1), float("-inf"))
    norm = block.new_zeros((heads, rows, 1))
    acc = block.new_zeros((heads, rows, dim))
    first_row, end = int(query_positions[0]), int(query_positions[-1]) + 1
    for index, key_start in enumerate(range(0, end, KEY_BLOCK)):
        scores = torch.matmul(block, keys[index].transpose(1, 2))
        if key_start + KEY_BLOCK > min(first_row + 1, total):  # some key is masked for some row
            positions = key_start + key_positions
            hidden = (positions[None, :] > query_positions[:, None]) | (positions[None, :] >= total)
            scores.masked_fill_(hidden, float("-inf"))
        new_max = torch.maximum(maximum, scores.amax(dim=-1, keepdim=True))
        # Rows with nothing visible yet keep -inf: exp(-inf - -inf) is NaN, so shift by 0 there.
        shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        weights = scores.sub_(shift).exp_()
        correction = torch.exp(maximum - shift)
        norm = norm * correction + weights.sum(dim=-1, keepdim=True)
        acc = acc * correction + torch.matmul(weights, values[index])
        maximum = new_max
    return acc / norm.clamp_min(torch.finfo(acc.dtype).tiny)
