"""The TF-IDF + logistic-regression peer of shared/DATA.md, on mtl's own splits.

    python scripts/peer_tfidf.py tweet_sentiment bbc_topic

DATA.md quotes the peer on a split of its own (shuffled 80/10/10, seed 0). A test split of 223
BBC articles is small enough that which articles land in it moves the score by points, so a
model and its peer must be scored on the same rows. This script reads each task's splits
through mtl's pipeline (`load_raw_splits`: the rows `mtl evaluate` scores), fits the peer on
train and prints validation and test accuracy and macro-F1 for:

- the recipe as DATA.md states it: word 1-2 gram TF-IDF, scikit-learn's default
  LogisticRegression (C=1);
- the same peer tuned on validation: C and sublinear tf chosen by the task's metric.

Classification tasks only (a head whose labels are one class per example).
"""

from __future__ import annotations

import argparse
import itertools

from mtl.data import load_raw_splits
from mtl.metrics import classification_metrics
from mtl.models.heads import get_head
from mtl.tasks import load_tasks

GRID_C = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def fit_peer(train, c: float, sublinear_tf: bool):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    peer = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=sublinear_tf),
                         LogisticRegression(C=c, max_iter=5000))
    return peer.fit(train["text"], train["label"])


def scores(peer, split, labels: list[str]) -> dict[str, float]:
    ids = {label: i for i, label in enumerate(labels)}
    y_true = [ids[v] for v in split["label"]]
    y_pred = [ids[v] for v in peer.predict(split["text"])]
    return classification_metrics(y_true, y_pred, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tasks", nargs="+", help="shipped task names or task-spec paths")
    args = parser.parse_args()

    print("| task | peer | C | sublinear tf | validation accuracy / macro-F1 | test accuracy / macro-F1 | test rows |")
    print("|---|---|---|---|---|---|---|")
    for spec in load_tasks(args.tasks):
        if get_head(spec.head).label_kind != "class":
            raise SystemExit(f"{spec.name}: head {spec.head!r} is not single-label classification")
        splits, _ = load_raw_splits(spec)
        train, validation, test = (splits[s].to_dict() for s in ("train", "validation", "test"))
        labels = spec.labels or sorted(set(train["label"]))

        peers = {cs: fit_peer(train, *cs) for cs in itertools.product(GRID_C, (False, True))}
        tuned = max(peers, key=lambda cs: scores(peers[cs], validation, labels)[spec.metric])
        for name, (c, sublinear) in (("DATA.md recipe", (1.0, False)), ("tuned on validation", tuned)):
            peer = peers[c, sublinear]
            val, tst = scores(peer, validation, labels), scores(peer, test, labels)
            print(f"| {spec.name} | {name} | {c:g} | {sublinear} | {val['accuracy']:.4f} / {val['macro_f1']:.4f} "
                  f"| {tst['accuracy']:.4f} / {tst['macro_f1']:.4f} | {len(test['label'])} |", flush=True)


if __name__ == "__main__":
    main()
