"""The TF-IDF + logistic-regression peer of shared/DATA.md, on mtl's own splits.

    python scripts/peer_tfidf.py tweet_sentiment bbc_topic
    python scripts/peer_tfidf.py bbc_topic --split-seeds 0 1 2 3 4

DATA.md quotes the peer on a split of its own (shuffled 80/10/10, seed 0). A test split of 223
BBC articles is small enough that which articles land in it moves the score by points, so a
model and its peer must be scored on the same rows. This script reads each task's splits
through mtl's pipeline (`load_raw_splits`: the rows `mtl evaluate` scores), fits the peer on
train and prints validation and test accuracy and macro-F1 for:

- the recipe as DATA.md states it: word 1-2 gram TF-IDF, scikit-learn's default
  LogisticRegression (C=1);
- the same peer tuned on validation: C and sublinear tf chosen by the task's metric.

`--split-seeds` scores the peer on other seeded splits (the task override `split.seed=S`, the
one `mtl train` takes as `tasks.N.overrides=[split.seed=S]`), so that a model can be compared
with its peer over several draws of the test rows rather than one.

Classification tasks on one text only (a head whose labels are one class per example).
"""

from __future__ import annotations

import argparse
import itertools

from mtl.data import load_raw_splits
from mtl.errors import MtlError
from mtl.metrics import classification_metrics
from mtl.models.heads import get_head
from mtl.tasks import load_task

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
    parser.add_argument("--split-seeds", type=int, nargs="+", metavar="S",
                        help="score on the splits of these seeds (default: each spec's own seed)")
    args = parser.parse_args()

    # Every spec is read and checked before any fitting, which takes minutes a task: a bad last
    # argument fails at once, not after the others have been scored.
    specs = [checked_spec(task, seed) for task in args.tasks for seed in args.split_seeds or [None]]
    print("| task | split seed | peer | C | sublinear tf | validation accuracy / macro-F1 "
          "| test accuracy / macro-F1 | test rows |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in specs:
        score_peers(spec)


def checked_spec(task: str, seed: int | None):
    """The spec of `task` (its split reseeded when `seed` is given), refused unless the peer applies."""
    spec = load_task(task, [f"split.seed={seed}"] if seed is not None else [])
    if get_head(spec.head).label_kind != "class":
        raise SystemExit(f"{spec.origin}: head {spec.head!r} is not single-label classification")
    if spec.columns.text_pair is not None:  # one bag of words cannot tell the pair's two texts apart
        raise SystemExit(f"{spec.origin}: task {spec.name!r} reads pairs of texts; this peer reads one text")
    if seed is not None and spec.source.splits:
        raise SystemExit(f"{spec.origin}: task {spec.name!r} has fixed splits (source.splits); "
                         "--split-seeds does not apply to it")
    return spec


def score_peers(spec) -> None:
    """Fit the DATA.md recipe and the validation-tuned peer on `spec`'s train split; print a row each."""
    splits, _ = load_raw_splits(spec)
    train, validation, test = (splits[s].to_dict() for s in ("train", "validation", "test"))
    labels = spec.labels or sorted(set(train["label"]))

    peers = {cs: fit_peer(train, *cs) for cs in itertools.product(GRID_C, (False, True))}
    tuned = max(peers, key=lambda cs: scores(peers[cs], validation, labels)[spec.metric])
    for name, (c, sublinear) in (("DATA.md recipe", (1.0, False)), ("tuned on validation", tuned)):
        peer = peers[c, sublinear]
        val, tst = scores(peer, validation, labels), scores(peer, test, labels)
        print(f"| {spec.name} | {spec.split.seed} | {name} | {c:g} | {sublinear} "
              f"| {val['accuracy']:.4f} / {val['macro_f1']:.4f} | {tst['accuracy']:.4f} / {tst['macro_f1']:.4f} "
              f"| {len(test['label'])} |", flush=True)


if __name__ == "__main__":
    try:
        main()
    except MtlError as e:  # an unknown task or a bad spec: one line, not a traceback
        raise SystemExit(f"peer_tfidf.py: error: {e}") from None
