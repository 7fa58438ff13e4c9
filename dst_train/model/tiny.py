"""A tiny random VLM of a family (same classes as the real ones) with a tokenizer trained locally.

``make_tiny_model(out, corpus, family_name=...)`` writes a folder laid out like a real model —
config.json, model.safetensors, tokenizer.json/tokenizer_config.json, preprocessor_config.json —
so every later stage (training, conversion, evaluation) loads it exactly as it would load the
real SmolVLM2 or Qwen2.5-VL.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from dst_train.model.backbone import ARCHS, ChatFormat, arch_config, family

TINY_VOCAB = 1024
TINY_FAMILIES = {"smolvlm": "smolvlm", "qwen2.5-vl": "qwen2_5_vl"}  # CLI name -> model_type


def train_tokenizer(
    corpus: Iterable[str],
    vocab_size: int = TINY_VOCAB,
    pad_to: int = 0,
    chat: ChatFormat | None = None,
):
    """Byte-level BPE (any text encodes, no unknown token) with the special tokens of ``chat``
    (default SmolVLM's); with ``pad_to``, filler tokens make the vocabulary exactly that size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    chat = chat or ChatFormat()
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


def set_token_ids(config, tokenizer, chat: ChatFormat) -> None:
    """Write the tokenizer's image, pad, bos and end (eos) ids into a VLM ``config`` (both
    families keep the image id at the top and the others in ``text_config``)."""
    ids = tokenizer.convert_tokens_to_ids([chat.image, chat.pad, chat.bos, chat.end])
    config.image_token_id = ids[0]
    t = config.text_config
    t.pad_token_id, t.bos_token_id, t.eos_token_id = ids[1:]


def make_arch_folder(out: str | Path, corpus: Iterable[str], arch: str) -> Path:
    """A model folder of a named architecture (e.g. ``smolvlm2-2.2b``) that needs no hub: its
    config, a locally trained tokenizer padded to the real vocabulary size, and the frame
    processor at the real frame size — no weights (train with ``model.pretrained=false``)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHS))}")
    config = arch_config(arch)
    fam = family(config.model_type)
    tokenizer = train_tokenizer(corpus, pad_to=config.text_config.vocab_size, chat=fam.CHAT)
    set_token_ids(config, tokenizer, fam.CHAT)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    fam.frame_processor(config).save_pretrained(out)
    return out


def make_tiny_model(
    out: str | Path,
    corpus: Iterable[str],
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    family_name: str = "smolvlm",
) -> Path:
    """Write the tiny model folder of ``family_name`` (smolvlm | qwen2.5-vl; LM ``hidden`` ×
    ``layers``); returns its path."""
    import torch

    if family_name not in TINY_FAMILIES:
        raise ValueError(f"unknown family {family_name!r}; known: {', '.join(TINY_FAMILIES)}")
    fam = family(TINY_FAMILIES[family_name])
    out = Path(out)
    tokenizer = train_tokenizer(corpus, chat=fam.CHAT)
    config = fam.tiny_config(len(tokenizer), hidden=hidden, layers=layers)
    set_token_ids(config, tokenizer, fam.CHAT)
    torch.manual_seed(seed)
    model = fam.model_class()(config)
    out.mkdir(parents=True, exist_ok=True)  # only once the shape is known to be valid
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    fam.frame_processor(config).save_pretrained(out)
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
