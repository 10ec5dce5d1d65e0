"""Build a small random-weight BERT with a WordPiece vocabulary trained on a corpus.

Used by the tests and by the embedded demo, where no pretrained model can be downloaded. The
result is an ordinary Hugging Face folder that `from_pretrained` loads like any hub model.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Iterable, Sequence

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_tiny_bert(out_dir: str | os.PathLike, texts: Iterable[Sequence[str]], *, num_layers: int = 2,
                    hidden: int = 64, heads: int = 2, vocab_size: int = 2000, seed: int = 0,
                    max_length: int = 128, dropout: float = 0.1) -> str:
    """Train a cased WordPiece vocabulary on word lists `texts`, save tokenizer and random BERT."""
    # torch, tokenizers and transformers take seconds to import: only when a model is built (the
    # demo imports this module before its settings are checked).
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, BertTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    vocab = wordpiece_vocab(texts, vocab_size, normalizer, pre_tokenizer)
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tokenizer = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                  cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                  model_max_length=max_length)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=num_layers,
                        num_attention_heads=heads, intermediate_size=2 * hidden,
                        max_position_embeddings=max(512, max_length), pad_token_id=0,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    os.makedirs(out_dir, exist_ok=True)
    BertModel(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return os.fspath(out_dir)


def wordpiece_vocab(texts: Iterable[Sequence[str]], vocab_size: int, normalizer, pre_tokenizer) -> dict[str, int]:
    """A WordPiece vocabulary that depends on the words alone: the special tokens, every character
    (alone, and as a continuation `##c` where it occurs inside a word), then the pieces of
    repeated merges of the most frequent adjacent pair (ties in alphabetical order), until
    `vocab_size` or until no pair occurs twice.

    Written here rather than taken from `tokenizers.trainers.WordPieceTrainer`, which breaks ties
    between equally frequent pairs in hash order: its vocabulary, and so the demo's model and
    results, changed from one process to the next.
    """
    counts: Counter = Counter()
    for words in texts:
        text = normalizer.normalize_str(" ".join(words))
        counts.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(text))
    split = {word: [word[0], *(f"##{c}" for c in word[1:])] for word in counts}
    tokens = list(SPECIAL) + sorted({piece for pieces in split.values() for piece in pieces})
    known = set(tokens)
    pairs: Counter = Counter()
    holders: dict = {}  # pair -> the words whose pieces hold it
    for word, pieces in split.items():
        for pair in zip(pieces, pieces[1:]):
            pairs[pair] += counts[word]
            holders.setdefault(pair, set()).add(word)
    while len(tokens) < vocab_size and pairs:
        (a, b), count = min(pairs.items(), key=lambda item: (-item[1], item[0]))
        if count < 2:
            break
        merged = a + b[2:]
        for word in sorted(holders.pop((a, b), ())):
            old = split[word]
            for pair in zip(old, old[1:]):
                pairs[pair] -= counts[word]
                if pairs[pair] <= 0:
                    del pairs[pair]
            new, i = [], 0
            while i < len(old):
                if i + 1 < len(old) and old[i] == a and old[i + 1] == b:
                    new.append(merged)
                    i += 2
                else:
                    new.append(old[i])
                    i += 1
            split[word] = new
            for pair in zip(new, new[1:]):
                pairs[pair] += counts[word]
                holders.setdefault(pair, set()).add(word)
        if merged not in known:
            tokens.append(merged)
            known.add(merged)
    return {token: i for i, token in enumerate(tokens)}
