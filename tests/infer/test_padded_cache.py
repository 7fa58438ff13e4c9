"""PaddedCache: rows of different lengths in one batch each get their own stream's result;
restart, compaction and a decoding sub-cache (take / put_back) keep that true."""

import torch
from transformers import DynamicCache

from dst_train.infer.padded_cache import PaddedCache
from dst_train.model.build import Precision, build_model
from tests.conftest import tiny_run_config


@torch.no_grad()
def test_rows_match_their_own_stream_through_restart_compaction_and_take(
    demo_root, tiny_family_dir
):
    # both families: Qwen's multimodal RoPE gets the per-row positions on all three axes
    cfg = tiny_run_config(demo_root, tiny_family_dir)
    torch.manual_seed(0)
    backbone = build_model(cfg.model, cfg.head_config(), Precision("fp32", "sdpa")).backbone.eval()
    streams: dict[int, list[torch.Tensor]] = {0: [], 1: [], 2: []}

    def alone(row):
        """Last hidden state of ``row``'s stream fed piece by piece with a plain cache."""
        cache, out = DynamicCache(), None
        for piece in streams[row]:
            out, cache = backbone.decode(piece[None], past_key_values=cache, use_cache=True)
        return out[0, -1]

    def feed(target, lengths, rows=(0, 1, 2)):
        """Feed random embeddings to ``target`` (whose row i is ``rows[i]``) and check every
        fed row against its stream alone."""
        items = {i: torch.randn(n, backbone.hidden_size) for i, n in lengths.items()}
        for i, e in items.items():
            streams[rows[i]].append(e)
        for i, h in target.feed(items).items():
            assert torch.allclose(h, alone(rows[i]), atol=1e-5), rows[i]

    cache = PaddedCache(backbone, 3, torch.device("cpu"), slack=0)
    feed(cache, {0: 5, 1: 2, 2: 9})
    for _ in range(6):  # row 1 alone grows: pads pile up in rows 0 and 2
        feed(cache, {1: 3})
    assert cache.cache.get_seq_length() == 9 + 6 * 3
    cache.restart(1)
    streams[1] = []
    feed(cache, {0: 1, 1: 1, 2: 4})  # longest live row is 9 <= 27 / 2: compacts first
    assert cache.cache.get_seq_length() == 9 + 4
    assert [cache.length(r) for r in range(3)] == [6, 1, 13]

    sub = cache.take([0, 2])  # rows 0 and 2 decode; row 1 is not in the batch at all
    for n in (2, 1, 1):
        feed(sub, {0: n, 1: 1}, rows=(0, 2))
    cache.put_back(sub, [0, 2])
    assert [cache.length(r) for r in range(3)] == [10, 1, 16]
    feed(cache, {0: 1, 1: 2, 2: 1})
    assert [cache.length(r) for r in range(3)] == [11, 3, 17]

    # a sub-cache that grew by one token (a single decoding step), or by none, comes back too
    for grow in (1, 0):
        sub = cache.take([1])
        if grow:
            feed(sub, {0: grow}, rows=(1,))
        cache.put_back(sub, [1])
    assert [cache.length(r) for r in range(3)] == [11, 4, 17]
    feed(cache, {0: 1, 1: 1, 2: 1})
