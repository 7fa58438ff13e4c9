"""A tiny random SmolVLM (same classes as the real ones) with a tokenizer trained locally.

``make_tiny_model(out, corpus)`` writes a folder laid out like a real model — config.json,
model.safetensors, tokenizer.json/tokenizer_config.json, preprocessor_config.json — so every later
stage (training, conversion, evaluation) loads it exactly as it would load SmolVLM2.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from dst_train.model.backbone import ChatFormat

TINY_IMAGE_SIZE = 32
TINY_VOCAB = 1024


def tiny_config(
    vocab_size: int = TINY_VOCAB, image_token_id: int = 3, hidden: int = 64, layers: int = 2
):
    """LM ``hidden`` × ``layers`` (default 64 × 2), vision hidden 32 × 2 layers, image 32 / patch 8,
    scale 2 → 4 tokens per image natively (~0.2 M parameters with a 1k vocabulary by default)."""
    from transformers import SmolVLMConfig

    if hidden < 32 or hidden % 32 or layers < 1:
        # heads of 16 dims and half as many key/value heads: hidden must split evenly in both
        raise ValueError(
            f"tiny model: hidden {hidden} must be a multiple of 32, layers {layers} >= 1"
        )
    return SmolVLMConfig(
        image_token_id=image_token_id,
        scale_factor=2,
        tie_word_embeddings=False,
        text_config={
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": hidden // 16,
            "num_key_value_heads": max(hidden // 32, 1),
            "vocab_size": vocab_size,
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        vision_config={
            "model_type": "smolvlm_vision",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": TINY_IMAGE_SIZE,
            "patch_size": 8,
        },
    )


def train_tokenizer(corpus: Iterable[str], vocab_size: int = TINY_VOCAB, pad_to: int = 0):
    """Byte-level BPE (any text encodes, no unknown token) with SmolVLM's special tokens; with
    ``pad_to``, filler tokens make the vocabulary exactly that size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    chat = ChatFormat()
    # ids 0..3 are fixed: pad, bos, end-of-utterance (eos), image
    specials = [chat.pad, chat.bos, chat.end, chat.image]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    if pad_to:
        tok = _pad_vocabulary(tok, pad_to)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=chat.pad,
        bos_token=chat.bos,
        eos_token=chat.end,
        additional_special_tokens=[chat.image],
    )


def _pad_vocabulary(tok, vocab_size: int):
    """``tok`` (a ``tokenizers.Tokenizer``) with filler tokens, never produced by encoding, up to
    ``vocab_size`` ids: embedding and LM-head shapes then equal a real model's."""
    import json

    from tokenizers import Tokenizer

    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"tokenizer has {tok.get_vocab_size()} tokens > {vocab_size} wanted")
    raw = json.loads(tok.to_str())
    vocab = raw["model"]["vocab"]
    used = set(vocab.values()) | {t["id"] for t in raw["added_tokens"]}
    vocab.update({f"<|filler_{i}|>": i for i in range(vocab_size) if i not in used})
    return Tokenizer.from_str(json.dumps(raw))


def make_arch_folder(out: str | Path, corpus: Iterable[str], arch: str) -> Path:
    """A model folder of a named architecture (e.g. ``smolvlm2-2.2b``) that needs no hub: its
    config, a locally trained tokenizer padded to the real vocabulary size, and the image
    processor at the real image size — no weights (train with ``model.pretrained=false``)."""
    from dst_train.model.backbone import ARCHS, arch_config

    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHS))}")
    config = arch_config(arch)
    chat = ChatFormat()
    tokenizer = train_tokenizer(corpus, pad_to=config.text_config.vocab_size)
    config.image_token_id = tokenizer.convert_tokens_to_ids(chat.image)
    ids = tokenizer.convert_tokens_to_ids([chat.pad, chat.bos, chat.end])
    t = config.text_config
    t.pad_token_id, t.bos_token_id, t.eos_token_id = ids
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor(config.vision_config.image_size).save_pretrained(out)
    return out


def image_processor(size: int = TINY_IMAGE_SIZE):
    """SmolVLM's PIL image processor (the default one needs torchvision) with no image splitting:
    one frame → one ``size``×``size`` image."""
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    return SmolVLMImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": size}, max_image_size={"longest_edge": size}
    )


def make_tiny_model(
    out: str | Path, corpus: Iterable[str], seed: int = 0, hidden: int = 64, layers: int = 2
) -> Path:
    """Write the tiny model folder (LM ``hidden`` × ``layers``); returns its path."""
    import torch
    from transformers import SmolVLMForConditionalGeneration

    out = Path(out)
    tokenizer = train_tokenizer(corpus)
    image_token_id = tokenizer.convert_tokens_to_ids(ChatFormat().image)
    torch.manual_seed(seed)
    model = SmolVLMForConditionalGeneration(
        tiny_config(len(tokenizer), image_token_id, hidden, layers)
    )
    out.mkdir(parents=True, exist_ok=True)  # only once the shape is known to be valid
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor().save_pretrained(out)
    return out


def demo_corpus(root: str | Path) -> list[str]:
    """Every text a demo dataset can put in a sequence: turns, node names, states, transitions."""
    from dst_train.data.dataset import SPLITS, load_split
    from dst_train.data.dst_tree import STATES, load_dst_tsv

    texts = [f"{s}" for s in STATES]
    for split in SPLITS:
        for clip in load_split(root, split):
            texts += [t.content for t in clip.clip.conversation if t.role != "frames"]
            texts += list(clip.dst_updates.values())
    for tsv in sorted((Path(root) / "dst").glob("*.tsv")):
        tree = load_dst_tsv(tsv)
        texts.append(tree.render_state(tree.initial_state()))
    return texts
