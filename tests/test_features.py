"""Windows, first-subword labels, dynamic padding and the round trip back to words."""
import random

import pytest

from trainer.data.corpus import LABELS, Sentence
from trainer.data.features import IGNORE, Featurizer


def _long_sentence(toy_corpus, n_words, seed):
    rng = random.Random(seed)
    pool = [(w, t) for s in toy_corpus["en"] for w, t in zip(s.words, s.tags)]
    pairs = [rng.choice(pool) for _ in range(n_words)]
    return Sentence(tuple(w for w, _ in pairs), tuple("O" if t.startswith("I-") else t for _, t in pairs))


def test_first_subword_only_carries_the_label(tiny_tokenizer):
    feat = Featurizer(tiny_tokenizer, max_length=32, context=4)
    sentence = Sentence(("Anna", "Berg", "visitedxyzq", "Madrid", "."), ("B-PER", "I-PER", "O", "B-LOC", "O"))
    (window,) = feat.encode([sentence])
    assert window.input_ids[0] == tiny_tokenizer.cls_token_id and window.input_ids[-1] == tiny_tokenizer.sep_token_id
    labelled = [lab for lab in window.labels if lab != IGNORE]
    assert [LABELS[i] for i in labelled] == list(sentence.tags)
    pieces = feat.word_pieces([sentence])[0]
    assert len(pieces[2]) > 1  # an unseen word splits, and only its first piece is labelled
    assert len(window.labels) == 2 + sum(len(p) for p in pieces)
    assert window.labels[0] == window.labels[-1] == IGNORE


@pytest.mark.parametrize("n_words, max_length, context", [(300, 32, 8), (1000, 64, 16), (57, 16, 0), (5, 128, 32)])
def test_windows_round_trip_every_word_once(tiny_tokenizer, toy_corpus, n_words, max_length, context):
    feat = Featurizer(tiny_tokenizer, max_length=max_length, context=context)
    sentences = [_long_sentence(toy_corpus, n_words, seed) for seed in range(3)]
    windows = feat.encode(sentences)
    assert all(len(w) <= max_length for w in windows)
    if n_words * 1 > max_length:
        assert len(windows) > len(sentences)
    # Predict each word's gold label back through the windows: the merge must reproduce the tags.
    predictions = [[lab for lab in w.labels if lab != IGNORE] for w in windows]
    assert feat.merge(sentences, windows, predictions) == [list(s.tags) for s in sentences]
    for w in windows[1:]:
        if w.sentence == windows[0].sentence and context:
            # a continuation window opens with unlabelled context subwords
            assert w.labels[1] == IGNORE


def test_merge_refuses_missing_or_duplicate_windows(tiny_tokenizer, toy_corpus):
    feat = Featurizer(tiny_tokenizer, max_length=16, context=4)
    sentence = _long_sentence(toy_corpus, 40, 0)
    windows = feat.encode([sentence])
    preds = [[0] * len(w.words) for w in windows]
    with pytest.raises(ValueError, match="not predicted"):
        feat.merge([sentence], windows[:-1], preds[:-1])
    with pytest.raises(ValueError, match="predicted twice"):
        feat.merge([sentence], windows + windows[:1], preds + preds[:1])


def test_dynamic_padding_to_longest_in_batch(tiny_tokenizer, toy_corpus):
    feat = Featurizer(tiny_tokenizer, max_length=128, context=8)
    windows = feat.encode(toy_corpus["en"][:8])
    batch = feat.collate(windows)
    longest = max(len(w) for w in windows)
    assert batch["input_ids"].shape == (8, longest) and longest < 128
    for row, w in enumerate(windows):
        assert batch["attention_mask"][row].sum() == len(w)
        assert (batch["labels"][row, len(w):] == IGNORE).all()
        assert (batch["input_ids"][row, len(w):] == tiny_tokenizer.pad_token_id).all()


def test_word_without_pieces_becomes_unknown(tiny_tokenizer):
    feat = Featurizer(tiny_tokenizer, max_length=16, context=0)
    sentence = Sentence(("a", "\u200b", "b"), ("O", "B-PER", "O"))
    pieces = feat.word_pieces([sentence])[0]
    assert all(pieces) and pieces[1] == [tiny_tokenizer.unk_token_id]
    windows = feat.encode([sentence])
    assert feat.merge([sentence], windows, [[1, 2, 0]]) == [["B-PER", "I-PER", "O"]]


def test_real_tokenizer_of_record(tiny_tokenizer):
    from conftest import MODELS
    from transformers import AutoTokenizer

    if not (MODELS / "bert-tiny-6l").is_dir():
        pytest.skip(f"model of record not found at {MODELS / 'bert-tiny-6l'}")
    tok = AutoTokenizer.from_pretrained(MODELS / "bert-tiny-6l")
    feat = Featurizer(tok, max_length=128, context=32)
    sentence = Sentence(("EU", "rejects", "German", "call"), ("B-ORG", "O", "B-MISC", "O"))
    (window,) = feat.encode([sentence])
    assert window.input_ids[0] == 101 and window.input_ids[-1] == 102


def _unigram_tokenizer(pieces):
    """A Metaspace unigram tokenizer over `pieces`, as XLM-R and e5 have, built here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    vocab = [(p, 0.0) for p in specials] + [(p, -1.0 - i) for i, p in enumerate(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=3))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", cls_token="<s>", pad_token="<pad>",
                                   eos_token="</s>", sep_token="</s>", unk_token="<unk>", mask_token="<mask>")


def _sentencepiece_tokenizer():
    """"江" has no "▁江" piece."""
    return _unigram_tokenizer(["▁", "江", "苏", "▁Anna", "▁visit", "ed", "▁Madrid", "▁."])


def test_bare_word_marker_never_carries_the_label():
    tok = _sentencepiece_tokenizer()
    feat = Featurizer(tok, max_length=32, context=0)
    sentence = Sentence(("Anna", "visited", "江", "苏", "."), ("B-PER", "O", "B-LOC", "I-LOC", "O"))
    raw = tok([list(sentence.words)], is_split_into_words=True, add_special_tokens=False)["input_ids"][0]
    assert tok.convert_ids_to_tokens(raw).count("▁") == 2  # the tokenizer does split "▁ 江"
    pieces = feat.word_pieces([sentence])[0]
    assert [tok.convert_ids_to_tokens(p) for p in pieces] == [["▁Anna"], ["▁visit", "ed"], ["江"], ["苏"], ["▁."]]
    (window,) = feat.encode([sentence])
    labelled = [tok.convert_ids_to_tokens(i) for i, label in zip(window.input_ids, window.labels) if label != IGNORE]
    assert labelled == ["▁Anna", "▁visit", "江", "苏", "▁."]
    # "a" is "▁" + unknown: the unknown piece, not the marker, stands for it.
    assert feat.word_pieces([Sentence(("a",), ("O",))])[0] == [[tok.unk_token_id]]


def test_e5_tokenizer_labels_chinese_characters():
    from conftest import MODELS
    from transformers import AutoTokenizer

    if not (MODELS / "me5-small-ner").is_dir():
        pytest.skip(f"pretrained encoder not found at {MODELS / 'me5-small-ner'}")
    tok = AutoTokenizer.from_pretrained(MODELS / "me5-small-ner")
    feat = Featurizer(tok)
    sentence = Sentence(tuple("江苏省") + ("Madrid",), ("B-LOC", "I-LOC", "I-LOC", "B-LOC"))
    pieces = feat.word_pieces([sentence])[0]
    assert [tok.convert_ids_to_tokens(p) for p in pieces] == [["江"], ["苏"], ["省"], ["▁Madrid"]]


# ---------------------------------------------------------------- unspaced sentences (Chinese)


def _joined_tokenizer():
    """Multi-character Chinese pieces ("江苏", "▁北京")."""
    return _unigram_tokenizer(["▁", "江苏", "江", "苏", "省", "在", "▁北京", "北", "京", "▁Anna", "。"])


def _labelled(tok, window):
    return [(tok.convert_ids_to_tokens(i), LABELS[lab]) for i, lab in zip(window.input_ids, window.labels)
            if lab != IGNORE]


def test_unspaced_sentence_is_tokenised_as_one_string_and_labelled_through_offsets():
    tok = _joined_tokenizer()
    feat = Featurizer(tok, max_length=32, context=0)
    words = tuple("北京在江苏省") + ("。",)
    sentence = Sentence(words, ("B-LOC", "I-LOC", "O", "B-LOC", "I-LOC", "I-LOC", "O"), unspaced=True)
    (window,) = feat.encode([sentence])
    assert list(window.input_ids[1:-1]) == tok("".join(words), add_special_tokens=False)["input_ids"]
    # A piece takes the label of its first character.
    assert _labelled(tok, window) == [("▁北京", "B-LOC"), ("在", "O"), ("江苏", "B-LOC"), ("省", "I-LOC"), ("。", "O")]
    assert window.words == (0, 2, 3, 5, 6) and window.widths == (2, 1, 2, 1, 1)
    # A predicted piece label expands over its characters: B-X, then I-X; O stays O.
    predicted = [LABELS.index(t) for t in ("B-ORG", "O", "B-PER", "O", "I-LOC")]
    assert feat.merge([sentence], [window], [predicted]) == [["B-ORG", "I-ORG", "O", "B-PER", "I-PER", "O", "I-LOC"]]
    # The same words spaced keep one piece per character.
    spaced = feat.encode([Sentence(words, sentence.tags)])[0]
    assert spaced.widths == (1,) * len(words)


def test_bare_marker_of_unspaced_text_is_kept_but_never_labelled():
    tok = _joined_tokenizer()
    feat = Featurizer(tok, max_length=32, context=0)
    sentence = Sentence(tuple("江苏省"), ("B-LOC", "I-LOC", "I-LOC"), unspaced=True)
    (window,) = feat.encode([sentence])
    assert tok.convert_ids_to_tokens(list(window.input_ids)) == ["<s>", "▁", "江苏", "省", "</s>"]
    assert _labelled(tok, window) == [("江苏", "B-LOC"), ("省", "I-LOC")]


def test_entity_boundary_inside_a_piece_is_counted():
    from trainer.data.features import split_entities

    tok = _joined_tokenizer()
    feat = Featurizer(tok, max_length=32, context=0)
    # "江" and "苏" are one piece but two entities: both have a boundary inside it.
    cut = Sentence(tuple("在江苏"), ("O", "B-PER", "B-LOC"), unspaced=True)
    whole = Sentence(tuple("在江苏"), ("O", "B-LOC", "I-LOC"), unspaced=True)
    counts = split_entities(feat, [cut, whole])
    assert (counts["entities"], counts["entities_split"], counts["sentences_with_split"]) == (3, 2, 1)
    assert (counts["words"], counts["units"]) == (6, 4)
    windows = feat.encode([cut, whole])
    gold = [[lab for lab in w.labels if lab != IGNORE] for w in windows]
    assert feat.merge([cut, whole], windows, gold) == [["O", "B-PER", "I-PER"], list(whole.tags)]
    assert split_entities(feat, [Sentence(cut.words, cut.tags)])["entities_split"] == 0  # spaced: none


def test_characters_no_piece_covers_belong_to_the_piece_before():
    tok = _joined_tokenizer()
    feat = Featurizer(tok, max_length=32, context=0)
    # The space is no piece of its own: its marker opens "苏" unlabelled.
    sentence = Sentence(("江", " ", "苏"), ("B-LOC", "I-LOC", "I-LOC"), unspaced=True)
    (window,) = feat.encode([sentence])
    assert _labelled(tok, window) == [("江", "B-LOC"), ("苏", "I-LOC")]
    assert window.widths == (2, 1)
    assert feat.merge([sentence], [window], [[LABELS.index("B-LOC"), LABELS.index("I-LOC")]]) == [list(sentence.tags)]
    blank = Sentence(("\u3000",), ("O",), unspaced=True)
    assert feat.merge([blank], feat.encode([blank]), [[0]]) == [["O"]]
    assert feat.encode([Sentence((), (), unspaced=True)])[0].words == ()


def test_long_unspaced_sentence_is_windowed_every_character_once(toy_corpus):
    tok = _joined_tokenizer()
    feat = Featurizer(tok, max_length=12, context=3)
    base = Sentence(tuple("北京在江苏省") + ("。",), ("B-LOC", "I-LOC", "O", "B-LOC", "I-LOC", "I-LOC", "O"))
    long = Sentence(base.words * 20, base.tags * 20, unspaced=True)
    mixed = [toy_corpus["en"][0], long, toy_corpus["zh"][0]]
    windows = feat.encode(mixed)
    assert sum(w.sentence == 1 for w in windows) > 5 and all(len(w) <= 12 for w in windows)
    assert [w.sentence for w in windows] == sorted(w.sentence for w in windows)
    predictions = [[lab for lab in w.labels if lab != IGNORE] for w in windows]
    assert feat.merge(mixed, windows, predictions) == [list(s.tags) for s in mixed]
    # One call for all equals a call per sentence: spaced and unspaced sentences keep their order.
    assert [w.input_ids for w in windows] == [w.input_ids for s in mixed for w in feat.encode([s])]


def test_wordpiece_vocabulary_keeps_the_word_by_word_path(tiny_tokenizer, toy_corpus):
    from conftest import MODELS
    from transformers import AutoTokenizer

    tokenizers = [tiny_tokenizer]
    if (MODELS / "bert-tiny-6l").is_dir():
        tokenizers.append(AutoTokenizer.from_pretrained(MODELS / "bert-tiny-6l"))
    sentences = toy_corpus["zh"][:10] + [Sentence(tuple("2008年北京"), ("O",) * 5 + ("B-LOC", "I-LOC"))]
    for tok in tokenizers:
        feat = Featurizer(tok, max_length=16, context=4)
        assert not feat.joins_unspaced
        unspaced = [Sentence(s.words, s.tags, unspaced=True) for s in sentences]
        assert feat.encode(unspaced) == feat.encode(sentences)


def test_wikiann_zh_round_trip_through_e5_pieces(e5_tokenizer):
    """Characters -> pieces -> characters on real sentences: exact wherever entity boundaries fall
    between pieces; the sentences where they do not are exactly those counted."""
    from conftest import zh_sentences

    from trainer.data.corpus import entity_spans
    from trainer.data.features import split_entities

    sentences = zh_sentences(3000)
    feat = Featurizer(e5_tokenizer, max_length=32, context=8)  # short windows: long sentences are cut
    windows = feat.encode(sentences)
    assert len(windows) > len(sentences)
    gold = [[lab for lab in w.labels if lab != IGNORE] for w in windows]
    merged = feat.merge(sentences, windows, gold)
    counts = split_entities(feat, sentences)
    assert counts["units"] < counts["words"]  # multi-character pieces do occur
    assert 0 < counts["entities_split"] < 0.02 * counts["entities"]
    lost = [len(set(entity_spans(s.tags)) - set(entity_spans(m))) for s, m in zip(sentences, merged)]
    assert sum(lost) == counts["entities_split"]
    assert sum(n > 0 for n in lost) == counts["sentences_with_split"]
    assert all(m == list(s.tags) for s, m, n in zip(sentences, merged, lost) if n == 0)
    # What the encoder reads is the joined text's own tokenisation.
    short = [s for s in sentences if len(s.words) < 15][:50]
    short_windows = feat.encode(short)
    assert len(short_windows) == len(short)
    for s, w in zip(short, short_windows):
        assert list(w.input_ids[1:-1]) == e5_tokenizer("".join(s.words), add_special_tokens=False)["input_ids"]


def test_official_loss_positions_label_every_position_of_a_window(tiny_tokenizer):
    from trainer.data.features import labels_for

    labels = labels_for("all")
    assert labels[: len(LABELS)] == LABELS and labels[len(LABELS):] == ("X", "[CLS]", "[SEP]", "[PAD]")
    f = Featurizer(tiny_tokenizer, max_length=12, context=3, labels=labels)
    # A long word (several pieces) and a sentence long enough for two windows with left context.
    sentence = Sentence(tuple("Kowalczykowski visited Lisbon and then Madrid and Paris".split()),
                        ("B-PER", "O", "B-LOC", "O", "O", "B-LOC", "O", "B-LOC"))
    windows = f.encode([sentence])
    assert len(windows) > 1 and f.all_positions
    batch = f.collate(windows)
    targets = f.loss_labels(batch)
    X, CLS, SEP = (f.label2id[t] for t in ("X", "[CLS]", "[SEP]"))
    for row, w in enumerate(windows):
        t = targets[row, : len(w)].tolist()
        assert t[0] == CLS and t[-1] == SEP
        first = next(i for i, label in enumerate(w.labels) if label != IGNORE)
        for i in range(1, len(w) - 1):
            if w.labels[i] != IGNORE:
                assert t[i] == w.labels[i]  # a word's first piece keeps its tag
            elif i < first:
                assert t[i] == IGNORE  # left context belongs to the window before
            else:
                assert t[i] == X  # continuation pieces
        assert all(v == IGNORE for v in targets[row, len(w):].tolist())  # padding
    assert (targets == X).any() and any(w.labels[1] == IGNORE for w in windows[1:]), "no X or no left context seen"
    # Predictions of the extra classes are no entity.
    assert [f.tag(f.label2id[x]) for x in ("X", "[CLS]", "[SEP]", "[PAD]", "B-LOC")] == ["O"] * 4 + ["B-LOC"]
    plain = Featurizer(tiny_tokenizer, max_length=12, context=3)
    assert not plain.all_positions and plain.loss_labels(batch) is batch["labels"]
