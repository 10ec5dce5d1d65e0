"""Label raw text in any language with a trained checkpoint: retrieve each sentence's English
support sentences, adapt, and print the entities.

    python -m jobs.predict --checkpoint FOLDER --text "Angela Merkel besuchte Paris ." [--file sentences.txt]
    python -m jobs.predict --checkpoint FOLDER --lang zh --text "江泽民访问美国。"
"""
from __future__ import annotations

import re
import sys

from .common import build_supports, main_guard, parse

# The corpora are tokenised into words and punctuation, Chinese into characters: raw text is
# split the same way so that the model sees the granularity it was trained and adapted on.
_TOKEN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[^\W\u3400-\u9fff\uf900-\ufaff]+|[^\w\s]", re.UNICODE)


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text)


def run(argv=None) -> int:
    from cluster.runtime import check_resources, init_ray
    from trainer.adapt import AdaptItem, Adapter
    from trainer.corpus import Sentence, entity_spans, read_corpus

    def arguments(p):
        p.add_argument("--checkpoint", required=True, help="checkpoint folder of a trained run")
        p.add_argument("--text", action="append", default=[], help="a sentence (repeatable)")
        p.add_argument("--file", help="a file with one sentence per line")
        p.add_argument("--lang", help="language of the text: one of data.unspaced_languages (zh) is read "
                                      "unspaced, as its test set is")

    cfg, args = parse(argv, "predict", arguments)
    lines = list(args.text)
    if args.file:
        with open(args.file, encoding="utf-8") as fh:
            lines += [line.strip() for line in fh if line.strip()]
    unspaced = args.lang in cfg.data.unspaced_languages
    sentences = [Sentence(tuple(w), ("O",) * len(w), unspaced) for w in map(tokenize, lines) if w]
    if not sentences:
        raise ValueError("nothing to label: give --text SENTENCE or --file FILE with one sentence per line")
    init_ray(cfg.cluster.address)
    check_resources(cfg, ("retrieval",))
    source = read_corpus(cfg.data.resolve(cfg.data.source_train)).sentences
    supports = build_supports(cfg, source, {"input": sentences})
    items = [AdaptItem(i, s, tuple(sup)) for i, (s, sup) in
             enumerate(zip(sentences, supports.sentences("input", source)))]
    tags = Adapter(args.checkpoint, cfg=cfg).run(items)
    for i, s in enumerate(sentences):
        found = [f"{kind}: {' '.join(s.words[a:b])}" for kind, a, b in entity_spans(tags[i])]
        sys.stdout.write(" ".join(s.words) + "\n  " + ("; ".join(found) or "(no entities)") + "\n")
    return 0


main = main_guard(run)

if __name__ == "__main__":
    raise SystemExit(main())
