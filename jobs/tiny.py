"""Build a small random-weight BERT with a WordPiece vocabulary trained on a corpus.

Used by the tests and by the embedded demo, where no pretrained model can be downloaded. The
result is an ordinary Hugging Face folder that `from_pretrained` loads like any hub model.
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_tiny_bert(out_dir: str | os.PathLike, texts: Iterable[Sequence[str]], *, num_layers: int = 2,
                    hidden: int = 64, heads: int = 2, vocab_size: int = 2000, seed: int = 0,
                    max_length: int = 128, dropout: float = 0.1) -> str:
    """Train a cased WordPiece vocabulary on word lists `texts`, save tokenizer and random BERT."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, min_frequency=1)
    tok.train_from_iterator((" ".join(words) for words in texts), trainer=trainer)
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
