"""Which sample the autotuner probes: ranked by estimated bytes, close ones measured."""

from types import SimpleNamespace

from dst_train.config import load_config
from dst_train.data.sequence import DST, IGNORE, RESPONSE, Sample
from dst_train.model.backbone import BackboneShape, arch_config
from dst_train.tune.autotune import cache_key, choose_worst_case, worst_case_index
from dst_train.tune.search import Probe
from dst_train.tune.worst_case import SampleCost, labelled_positions, worst_case_candidates

ARCH = BackboneShape.of(arch_config("smolvlm2-2.2b"), merge=3)  # pixel-shuffle scale 3
SIZE = 384  # SmolVLM2's frame side in pixels


class Samples:
    """A dataset of (tokens, frames, labelled positions) triples."""

    def __init__(self, *shapes):
        self.shapes = shapes
        self.samples = [SimpleNamespace(targets=[IGNORE] * (t - n) + [1] * n) for t, _, n in shapes]

    def lengths(self):
        return [t for t, _, _ in self.shapes]

    def num_frames(self, i):
        return self.shapes[i][1]

    def __len__(self):
        return len(self.shapes)

    def __getitem__(self, i):
        return i


# the case: the most tokens (512 / 38 frames) is not the most frames (510 / 60)
DATA = Samples((512, 38, 20), (510, 60, 20), (100, 10, 5))


def _cost(*overrides):
    cfg = load_config(None, ["model.arch=smolvlm2-2.2b", *overrides])
    return SampleCost.for_run(cfg, ARCH, SIZE)


def test_frames_decide_when_the_tower_runs_online():
    # pixels of a frame (1.8 MB) outweigh two tokens' activations: 60 frames beat 2 tokens
    assert worst_case_index(DATA, _cost()) == 1
    # checkpointing shrinks the per-token share: the frames win by far, one candidate
    assert worst_case_candidates(DATA, _cost("model.gradient_checkpointing=true")) == [
        (1, _cost("model.gradient_checkpointing=true").of(510, 60, 20))
    ]


def test_tokens_decide_with_a_feature_cache():
    assert worst_case_index(DATA, _cost("data.feature_cache=/cache")) == 0


def test_labelled_positions_count():
    # same tokens and frames: the one with more vocabulary-sized logit rows costs more
    data = Samples((300, 10, 5), (300, 10, 200))
    assert worst_case_index(data, _cost()) == 1


def test_labelled_positions_are_the_positions_the_sequence_labels():
    # the sequence's own "no target" value, whatever it is, and never a token id: the LM
    # targets of a response and a DST turn, nothing at the frame and prompt positions
    sample = Sample(
        input_ids=[1, 100, 3, 4, 5, 6],
        targets=[IGNORE, 100, 4, IGNORE, 6, IGNORE],
        target_kind=[0, RESPONSE, RESPONSE, 0, DST, 0],
    )
    assert labelled_positions(sample) == 3


def test_close_candidates_are_measured_and_the_highest_peak_wins():
    cost = _cost()
    candidates = worst_case_candidates(DATA, cost)
    assert [i for i, _ in candidates] == [1, 0]  # within 5 % of each other; sample 2 far below

    prober = Prober()
    chosen = choose_worst_case(DATA, cost, prober)
    assert chosen["index"] == 0 and prober.sample == 0
    assert [c["measured_peak_bytes"] for c in chosen["candidates"]] == [8_000, 9_000]
    assert prober.calls == [(1, 1), (0, 1)]  # one micro-batch-1 probe per candidate


class Prober:
    """Records (sample, micro-batch) of every probe."""

    sample = None

    def __init__(self):
        self.calls = []

    def __call__(self, b):
        self.calls.append((self.sample, b))
        peak = {0: 9_000, 1: 8_000, 2: 1_000}[self.sample]  # the estimate's runner-up peaks
        return Probe(b, peak, 0.1)


def test_a_single_candidate_is_taken_without_a_probe():
    cost = _cost("model.gradient_checkpointing=true")  # the frames win by far: one candidate
    prober = Prober()
    chosen = choose_worst_case(DATA, cost, prober)
    assert (chosen["index"], prober.sample, prober.calls) == (1, 1, [])
    assert chosen["candidates"] == [
        {"index": 1, "estimated_bytes": cost.of(510, 60, 20), "measured_peak_bytes": None}
    ]


def test_the_cache_key_changes_with_the_global_batch():
    cfg = load_config(None, ["model.arch=smolvlm2-2.2b"])
    assert cache_key(cfg, 24, 0.9, 2, 8) != cache_key(cfg, 24, 0.9, 2, 16)
    assert cache_key(cfg, 24, 0.9, 2, 8) == cache_key(cfg, 24, 0.9, 2, 8)


def test_the_cost_model_of_each_memory_option():
    """SmolVLM2-2.2B: 24 LM layers × 2048, tower 27 layers × 1152 on 27² patches, 49 280 vocab."""
    lm = ARCH.lm_layers * ARCH.lm_hidden
    assert (lm, ARCH.vocab_size) == (24 * 2048, 49280)
    assert (ARCH.vision_layers, ARCH.vision_hidden, ARCH.patch_size) == (27, 1152, 14)
    tower = (SIZE // ARCH.patch_size) ** 2 * ARCH.vision_layers * ARCH.vision_hidden
    pixels = 3 * SIZE * SIZE  # uint8 on the GPU
    frozen = _cost()  # the defaults: frozen tower online, no checkpointing
    assert (frozen.per_token, frozen.per_frame, frozen.per_label) == (34 * lm, pixels, 12 * 49280)
    assert _cost("model.gradient_checkpointing=true").per_token == 2 * lm
    assert _cost("model.freeze_vision=false").per_frame == pixels + 34 * tower
    # the cache holds the pooled patches before the connector, (s·√k)² = 9·k of them, fp16
    cached = _cost("data.feature_cache=/cache", "model.tokens_per_frame=4")
    assert cached.per_frame == 9 * 4 * ARCH.vision_hidden * 2
    assert frozen.of(10, 2, 3) == 10 * 34 * lm + 2 * pixels + 3 * 12 * 49280
