"""A deterministic synthetic NER corpus in six languages, made from templates and name lists.

It lets the demo and the tests run the whole method with no licensed data. Names are shared across
languages (as real names mostly are) while the context words differ, so that cross-lingual
transfer is possible but not trivial.
"""
from __future__ import annotations

import os
import random

from trainer.data.corpus import Sentence
from trainer.utils.paths import atomic_file

NAMES = {
    "PER": ["Anna Berg", "Carlos Ruiz", "Jan de Vries", "Marie Dubois", "Li Wei", "John Smith",
            "Sofia Rossi", "Peter Müller", "Elena Garcia", "Ahmed Khan", "Yuki Tanaka", "Olga Petrova"],
    "LOC": ["Berlin", "Madrid", "Amsterdam", "Paris", "Beijing", "London", "New York", "Rome",
            "Lisbon", "Vienna", "Cairo", "Tokyo"],
    "ORG": ["Siemens", "Telefonica", "Philips", "Renault", "Huawei", "Reuters", "United Nations",
            "Real Madrid", "Ajax", "Bayern Munich", "Greenpeace", "Airbus"],
    "MISC": ["Olympics", "World Cup", "Euro", "Tour de France", "Nobel Prize", "Oscar"],
}

# {X} is a slot filled with a name of type X; other tokens are context words.
TEMPLATES = {
    "en": ["{PER} visited {LOC} on Monday .", "{ORG} opened an office in {LOC} .",
           "{PER} works for {ORG} .", "{PER} won the {MISC} in {LOC} .",
           "The team of {ORG} played in {LOC} yesterday .", "{PER} met {PER} at the {MISC} ."],
    "es": ["{PER} visitó {LOC} el lunes .", "{ORG} abrió una oficina en {LOC} .",
           "{PER} trabaja para {ORG} .", "{PER} ganó el {MISC} en {LOC} .",
           "El equipo de {ORG} jugó ayer en {LOC} .", "{PER} conoció a {PER} en el {MISC} ."],
    "nl": ["{PER} bezocht {LOC} op maandag .", "{ORG} opende een kantoor in {LOC} .",
           "{PER} werkt voor {ORG} .", "{PER} won de {MISC} in {LOC} .",
           "Het team van {ORG} speelde gisteren in {LOC} .", "{PER} ontmoette {PER} op de {MISC} ."],
    "de": ["{PER} besuchte {LOC} am Montag .", "{ORG} eröffnete ein Büro in {LOC} .",
           "{PER} arbeitet für {ORG} .", "{PER} gewann die {MISC} in {LOC} .",
           "Das Team von {ORG} spielte gestern in {LOC} .", "{PER} traf {PER} bei der {MISC} ."],
    "fr": ["{PER} a visité {LOC} lundi .", "{ORG} a ouvert un bureau à {LOC} .",
           "{PER} travaille pour {ORG} .", "{PER} a gagné le {MISC} à {LOC} .",
           "L' équipe de {ORG} a joué hier à {LOC} .", "{PER} a rencontré {PER} aux {MISC} ."],
    "zh": ["{PER} 周 一 访 问 了 {LOC} 。", "{ORG} 在 {LOC} 开 设 了 办 事 处 。",
           "{PER} 在 {ORG} 工 作 。", "{PER} 在 {LOC} 赢 得 了 {MISC} 。",
           "{ORG} 队 昨 天 在 {LOC} 比 赛 。", "{PER} 在 {MISC} 上 遇 见 了 {PER} 。"],
}


def make_sentences(lang: str, n: int, seed: int = 0) -> list[Sentence]:
    """`n` sentences of language `lang`, the same for the same seed on every machine."""
    if lang not in TEMPLATES:
        raise ValueError(f"no synthetic templates for {lang!r}; choose one of {', '.join(TEMPLATES)}")
    rng = random.Random(f"{lang}-{seed}")
    out = []
    for _ in range(n):
        words, tags = [], []
        for token in rng.choice(TEMPLATES[lang]).split():
            if token.startswith("{") and token.endswith("}"):
                kind = token[1:-1]
                name = rng.choice(NAMES[kind]).split()
                words += name
                tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(name) - 1)
            else:
                words.append(token)
                tags.append("O")
        out.append(Sentence(tuple(words), tuple(tags)))
    return out


def write_corpus(path: str | os.PathLike, sentences: list[Sentence]) -> None:
    """Two-column `word TAG` file, blank line between sentences (the paper's processed format)."""
    with atomic_file(path) as fh:
        for s in sentences:
            fh.writelines(f"{w} {t}\n" for w, t in zip(s.words, s.tags))
            fh.write("\n")
