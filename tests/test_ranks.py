"""A process's place among the job's processes, as the launcher gave it."""

import pytest

from dst_train.ranks import Ranks


def test_a_rank_outside_the_world_the_launcher_gave_is_named(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")  # the last one
    last = Ranks.from_launcher()
    assert (last.rank, last.world, last.local_rank, last.main) == (1, 2, 1, False)
    assert last.share(list(range(5))) == [1, 3]  # every world-th, from its rank on
    for rank in ("2", "-1"):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(ValueError, match=f"rank {rank} of 2 processes"):
            Ranks.from_launcher()
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):  # nothing set: one process
        monkeypatch.delenv(var)
    alone = Ranks.from_launcher()
    assert (alone.rank, alone.world, alone.main) == (0, 1, True)
