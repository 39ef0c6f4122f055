"""A small synthetic English-like corpus the project writes itself (no downloads).

A probabilistic grammar with number agreement between subjects and verbs (also across a relative
clause), adjectives, prepositional phrases and coordination, so a model must track structure
over several tokens to predict well. Deterministic for a given seed.
"""

from __future__ import annotations

import random

NOUNS = {  # singular -> plural
    "dog": "dogs", "cat": "cats", "bird": "birds", "child": "children", "teacher": "teachers",
    "farmer": "farmers", "river": "rivers", "garden": "gardens", "house": "houses", "king": "kings",
    "queen": "queens", "robot": "robots", "student": "students", "painter": "painters", "horse": "horses",
    "tree": "trees", "city": "cities", "boat": "boats", "friend": "friends", "doctor": "doctors",
}
VERBS_T = {"sees": "see", "likes": "like", "finds": "find", "follows": "follow", "helps": "help",
           "watches": "watch", "paints": "paint", "visits": "visit", "builds": "build", "carries": "carry"}
VERBS_I = {"sleeps": "sleep", "runs": "run", "sings": "sing", "waits": "wait", "laughs": "laugh",
           "swims": "swim", "works": "work", "smiles": "smile"}
ADJS = ["small", "old", "green", "happy", "quiet", "brave", "tall", "red", "young", "clever", "tired", "bright"]
PREPS = ["near", "behind", "under", "beside", "above", "with"]
ADVS = ["slowly", "today", "again", "quickly", "often", "never", "at night", "in winter"]
DETS_SG = ["the", "a", "this", "that", "every"]
DETS_PL = ["the", "some", "these", "those", "many", "two"]


class Grammar:
    def __init__(self, seed: int):
        self.r = random.Random(seed)

    def np(self, plural: bool, depth: int = 0) -> list[str]:
        r = self.r
        noun = r.choice(list(NOUNS))
        words = [r.choice(DETS_PL if plural else DETS_SG)]
        if r.random() < 0.45:
            words.append(r.choice(ADJS))
        words.append(NOUNS[noun] if plural else noun)
        if depth < 1 and r.random() < 0.25:
            words += [r.choice(PREPS)] + self.np(r.random() < 0.5, depth + 1)
        return words

    def vp(self, plural: bool, depth: int = 0) -> list[str]:
        r = self.r
        if r.random() < 0.6:
            verb = r.choice(list(VERBS_T))
            words = [VERBS_T[verb] if plural else verb] + self.np(r.random() < 0.4, depth + 1)
        else:
            verb = r.choice(list(VERBS_I))
            words = [VERBS_I[verb] if plural else verb]
        if r.random() < 0.3:
            words.append(r.choice(ADVS))
        return words

    def clause(self) -> list[str]:
        r = self.r
        plural = r.random() < 0.5
        subject = self.np(plural)
        if r.random() < 0.3:  # a relative clause between subject and verb: agreement at a distance
            subject += ["that"] + self.vp(plural, 1)
        return subject + self.vp(plural)

    def sentence(self) -> str:
        words = self.clause()
        if self.r.random() < 0.25:
            words += [self.r.choice(["and", "but", "while"])] + self.clause()
        return " ".join(words) + " ."


def make_corpus(n: int, seed: int = 0) -> list[str]:
    """`n` sentences of the grammar (deterministic for a seed)."""
    g = Grammar(seed)
    return [g.sentence() for _ in range(n)]
