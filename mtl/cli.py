"""The `mtl` command: argument parsing and calls into the public API, nothing more.

Bad input raises `MtlError`; `main` prints its message alone (no traceback) and exits 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from mtl import hostmem
from mtl.assets import DEFAULT_MODEL, enable_compilation_cache
from mtl.errors import MtlError

EXAMPLE_SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "A man is riding a horse.",
    "The stock market crashed today.",
]


def _embed(args: argparse.Namespace) -> None:
    from mtl import Encoder, load_tokenizer, resolve_model
    from mtl.embed import embed_sentences

    directory = resolve_model(args.model)
    encoder = Encoder.from_pretrained(directory)
    sentences = [_unicode(s, f'sentence {i}') for i, s in enumerate(args.sentences, start=1)] or EXAMPLE_SENTENCES
    embeddings = embed_sentences(encoder, load_tokenizer(directory), sentences, args.max_length)
    similarity = embeddings @ embeddings.T
    print(f"model: {args.model} ({directory})")
    print(f"{encoder.config.model_type}, {encoder.config.num_layers} layers, hidden {encoder.config.hidden_size}")
    print("cosine similarity of mean-pooled embeddings:")
    for i, sentence in enumerate(sentences):
        print(f"  [{i}] {sentence}")
    print("      " + "".join(f"{f'[{j}]':>8}" for j in range(len(sentences))))
    for i, row in enumerate(similarity):
        print(f"  [{i}] " + "".join(f"{value:8.3f}" for value in row))


def _fetch(args: argparse.Namespace) -> None:
    from mtl import resolve_model

    print(resolve_model(args.model))


def _data(args: argparse.Namespace) -> None:
    import json

    from mtl import load_tokenizer, resolve_model
    from mtl.data import load_task_data
    from mtl.hf import read_config
    from mtl.tasks import load_tasks

    specs = load_tasks(args.tasks)  # a bad task name fails before any model is resolved
    directory = resolve_model(args.model)
    limit = read_config(directory).max_sequence_length
    tokenizer = load_tokenizer(directory)
    for spec in specs:
        data = load_task_data(spec, tokenizer, max_positions=limit)
        summary = {"task": spec.name, "head": spec.head, "labels": data.labels, **data.stats}
        print(json.dumps(summary, indent=None if args.compact else 2))


def _print_summary(results: dict[str, float], everything: bool = False, primary: list[str] | None = None) -> None:
    """`results` as JSON: every one, or `headline`'s with the `primary` keys (each task's metric)."""
    import json

    from mtl.tracking import headline

    shown = results if everything else headline(results, primary or [])
    print(json.dumps({k: round(v, 4) for k, v in shown.items()}, indent=2))


def _primary_metrics(config) -> list[str]:
    from mtl.tasks import load_tasks, primary_metrics

    return primary_metrics(load_tasks([t.task for t in config.tasks], [t.overrides for t in config.tasks]))


def _train(args: argparse.Namespace) -> None:
    from mtl.config import load_experiment

    config = load_experiment(args.config, args.overrides)  # a bad key is named before the trainer's 3 s of imports
    from mtl.train.loop import train

    _print_summary(train(config, args.workdir), primary=_primary_metrics(config))


def _meta_train(args: argparse.Namespace) -> None:
    from mtl.config import load_experiment

    config = load_experiment(args.config, args.overrides)  # as in _train
    from mtl.train.meta_trainer import meta_train

    _print_summary(meta_train(config, args.workdir))


def _meta_test(args: argparse.Namespace) -> None:
    from mtl.train.meta_trainer import meta_test

    report = meta_test(args.workdir, split=args.split, episodes=args.episodes, ways=args.ways, shots=args.shots,
                       queries=args.queries, baseline_from=args.baseline_from, checkpoint=_checkpoint(args))
    print(f"{report['algorithm']}: {report['ways']}-way {report['shots']}-shot, {report['queries']} queries, "
          f"{report['inner_steps']} adaptation steps, split {report['split']} (checkpoint step {report['step']})")
    for row, result in report["results"].items():
        metric = next(k for k in result if not k.endswith("_ci95") and k != "episodes")
        print(f"  {row:32s} {metric} {result[metric]:.4f} +- {result[metric + '_ci95']:.4f} "
              f"(95% CI, {result['episodes']} episodes)")


def _evaluate(args: argparse.Namespace) -> None:
    from mtl.config import load_experiment
    from mtl.errors import MtlError
    from mtl.tasks import load_task, primary_metrics
    from mtl.train.loop import evaluate, evaluate_on

    if args.on is None:
        if args.task is not None:
            raise MtlError("--task picks the head that reads --on's data; without --on, every task is scored")
        results = evaluate(args.workdir, args.split, _checkpoint(args), args.batch_size, args.predictions)
        _print_summary(results, args.all, _primary_metrics(load_experiment(Path(args.workdir) / "config.yaml")))
        return
    results = evaluate_on(args.workdir, args.on, args.task, args.split, _checkpoint(args), args.batch_size,
                          args.predictions)
    _print_summary(results, args.all, primary_metrics([load_task(args.on, training=False)]))


def _jsonl_texts(lines, tokens: bool = False, pairs: bool = False,
                 choices: int = 0) -> Iterator[str | list[str] | tuple[str, str] | tuple[str, list[str]]]:
    """The "text" of each non-blank {"text": ...} line; with `tokens` (for a token task) also the
    words of a {"tokens": [...]} line; with `pairs` (a task on pairs of texts) the (text,
    text_pair) of a {"text": ..., "text_pair": ...} line; with `choices` K (a multiple-choice task)
    the (text, choices) of a {"text": ..., "choices": [1 to K texts]} line. A bad line is an error
    naming its number."""
    import json

    from mtl.data.readers import parse_json_line

    def string(item: dict, key: str, where: str) -> str:
        if not isinstance(item[key], str):
            raise MtlError(f"{where}: \"{key}\" must be a string, got {json.dumps(item[key])}")
        return _unicode(item[key], f"{where}: \"{key}\"")

    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"stdin:{number}"
        item = parse_json_line(line, where)
        if choices:
            if not (isinstance(item, dict) and "text" in item and "choices" in item):
                raise MtlError(f"{where}: expected a JSON object with \"text\" and \"choices\" keys: this task "
                               "picks one of several choices")
            options = item["choices"]
            if not (isinstance(options, list) and 0 < len(options) <= choices
                    and all(isinstance(c, str) for c in options)):
                raise MtlError(f"{where}: \"choices\" must be a list of 1 to {choices} texts (this task picks one "
                               f"of up to {choices}), got {json.dumps(options)[:80]}")
            yield (string(item, "text", where),
                   [_unicode(c, f"{where}: \"choices\" text {i}") for i, c in enumerate(options, start=1)])
            continue
        if pairs:
            if not (isinstance(item, dict) and "text" in item and "text_pair" in item):
                raise MtlError(f"{where}: expected a JSON object with \"text\" and \"text_pair\" keys: this task "
                               "reads pairs of texts")
            yield string(item, "text", where), string(item, "text_pair", where)
            continue
        if isinstance(item, dict) and "text_pair" in item:  # it would be dropped without a word
            raise MtlError(f"{where}: \"text_pair\" is for tasks on pairs of texts; this task reads one text")
        if isinstance(item, dict) and "choices" in item:
            raise MtlError(f"{where}: \"choices\" are for multiple-choice tasks; this task reads one text")
        key = next((k for k in ("text", "tokens") if k in item), None) if isinstance(item, dict) else None
        if key is None:
            raise MtlError(f"{where}: expected a JSON object with a \"text\" key"
                           + (' or a "tokens" list' if tokens else ""))
        value = item[key]
        if key == "text":
            yield string(item, "text", where)
        elif not tokens:
            raise MtlError(f"{where}: \"tokens\" are for token tasks; this task reads whole texts: give \"text\"")
        elif not isinstance(value, list) or not all(isinstance(w, str) and w.strip() for w in value):
            # [] is a sentence of no words, as a blank "text" is: it gets no tags.
            raise MtlError(f"{where}: \"tokens\" must be a list of words (non-blank strings), got {json.dumps(value)}")
        else:
            yield [_unicode(w, f"{where}: \"tokens\" word {i}") for i, w in enumerate(value, start=1)]


def _unicode(text: str, where: str) -> str:
    """`text`, if it is valid Unicode. Python reads undecodable bytes (stdin, argv) as lone
    surrogates, as does JSON's "\\udcff"; the tokenizer would fail on them in a traceback."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise MtlError(f"{where} is not valid UTF-8 (at character {e.start})") from None
    return text


def _predict(args: argparse.Namespace) -> None:
    import itertools
    import json

    from mtl.inference import Predictor

    predictor = Predictor.from_workdir(args.workdir, _checkpoint(args), batch_size=args.batch_size)
    tokens = predictor.takes_tokens(args.task)  # an unknown task is an error before stdin is read
    pairs = predictor.takes_pairs(args.task)
    choices = predictor.num_choices(args.task)
    if pairs and args.texts:
        raise MtlError(f"task {args.task!r} reads pairs of texts: give them as {{\"text\": ..., \"text_pair\": "
                       f"...}} lines on stdin, not as arguments")
    if choices and args.texts:
        raise MtlError(f"task {args.task!r} picks one of several choices: give {{\"text\": ..., \"choices\": "
                       f"[...]}} lines on stdin, not arguments")
    # stdin is read and answered a chunk at a time: a file of any size streams through in
    # bounded memory, and results appear while later lines are still being read. A bad line
    # stops the run after every line before it has its result.
    texts = (iter([_unicode(t, f'text argument {i}') for i, t in enumerate(args.texts, start=1)]) if args.texts
             else _jsonl_texts(sys.stdin, tokens, pairs, choices))
    bad_line = None
    while bad_line is None:
        chunk = []
        try:
            for text in itertools.islice(texts, 16 * args.batch_size):
                chunk.append(text)
        except MtlError as e:
            bad_line = e
        if not chunk:
            break
        for result in predictor.predict(args.task, chunk):
            print(json.dumps(result, ensure_ascii=False))
        sys.stdout.flush()
    if bad_line is not None:
        raise bad_line


def _export(args: argparse.Namespace) -> None:
    from mtl.inference import export

    print(export(args.workdir, args.out, _checkpoint(args)))


def _positive_int(text: str) -> int:
    """argparse type: a count of at least 1 (0 or less is a usage error naming the option)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


TRAINED_WORKDIR = "a workdir of mtl train"


def _checkpoint(args: argparse.Namespace) -> str | int:
    """--checkpoint as best, latest or a step number; checked before any workdir is read."""
    from mtl.config import checkpoint_choice

    return checkpoint_choice(args.checkpoint, "--checkpoint")


def _add_checkpoint_option(parser: argparse.ArgumentParser) -> None:
    # The value is checked where it is used (mtl.config.checkpoint_choice): parsing imports no jax.
    parser.add_argument("--checkpoint", default="best", metavar="{best,latest,STEP}",
                        help="the best checkpoint by train.best_metric, the latest, or the one saved at step "
                             "STEP (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    """The `mtl` command line: global options, then one subparser per subcommand."""
    parser = argparse.ArgumentParser(prog="mtl", description="Transfer learning for NLP in JAX.")
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("-v", "--verbose", action="store_true", help="log at INFO level, the libraries too")
    loudness.add_argument("-q", "--quiet", action="store_true",
                          help="warnings and errors only: no notes, no training progress (results still print)")
    parser.add_argument("--retain-memory", action="store_true",
                        help="keep memory the steps free for reuse (glibc): faster on CPU, higher peak memory; "
                             "see mtl.hostmem")
    parser.add_argument("--no-huge-pages", action="store_true",
                        help="leave malloc as the system sets it, without transparent huge pages for large "
                             "blocks (see mtl.hostmem)")
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="compile every jitted program afresh instead of loading it from mtl's cache "
                             "(see mtl.assets.enable_compilation_cache)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    embed = sub.add_parser("embed", help="embed sentences with a pretrained encoder and print their similarities")
    embed.add_argument("sentences", nargs="*", help=f"sentences (default: {len(EXAMPLE_SENTENCES)} examples)")
    embed.add_argument("--model", default=DEFAULT_MODEL, help="model name or directory (default: %(default)s)")
    embed.add_argument("--max-length", type=_positive_int, default=128,
                       help="truncate longer inputs (default: %(default)s)")
    embed.set_defaults(run=_embed)

    train = sub.add_parser("train", help="train (or resume) an experiment config in a workdir")
    train.add_argument("config", help="experiment YAML, e.g. configs/multitask.yaml")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=100")
    train.add_argument("--workdir", required=True, help="run directory; an existing one is resumed")
    train.set_defaults(run=_train)

    meta_train = sub.add_parser("meta-train", help="meta-train (or resume) a config with a `meta` section")
    meta_train.add_argument("config", help="experiment YAML, e.g. configs/meta_text.yaml")
    meta_train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. meta.shots=1")
    meta_train.add_argument("--workdir", required=True, help="run directory; an existing one is resumed")
    meta_train.set_defaults(run=_meta_train)

    meta_test = sub.add_parser("meta-test", help="few-shot evaluation of a meta-trained workdir beside its baselines")
    meta_test.add_argument("--workdir", required=True, help="a workdir of mtl meta-train")
    meta_test.add_argument("--split", default="test", choices=["validation", "test"],
                           help="the split episodes are drawn from (default: %(default)s)")
    meta_test.add_argument("--episodes", type=_positive_int, help="episodes (default: the config's meta.test_episodes)")
    meta_test.add_argument("--ways", type=_positive_int, help="classes per episode (protonet or proto_init only)")
    meta_test.add_argument("--shots", type=_positive_int, help="support examples per class")
    meta_test.add_argument("--queries", type=_positive_int, help="query examples per class")
    meta_test.add_argument("--baseline-from", help="multi-task workdir for baseline (b) (default: meta.baseline_from)")
    _add_checkpoint_option(meta_test)
    meta_test.set_defaults(run=_meta_test)

    evaluate = sub.add_parser("evaluate", help="score a workdir's best checkpoint (or one chosen) on every task")
    evaluate.add_argument("--workdir", required=True, help=TRAINED_WORKDIR)
    evaluate.add_argument("--split", default="validation", choices=["validation", "test"],
                          help="the split to score (default: %(default)s)")
    _add_checkpoint_option(evaluate)
    evaluate.add_argument("--batch-size", type=_positive_int,
                          help="rows per forward pass (default: the config's train.eval_batch_size, else batch_size)")
    evaluate.add_argument("--predictions", metavar="FILE",
                          help="also write each row's prediction and gold label to FILE as JSON lines")
    evaluate.add_argument("--all", action="store_true", help="print every metric (per class, per type)")
    evaluate.add_argument("--on", metavar="SPEC",
                          help="score one trained task's head on this task spec's data instead (another dataset "
                               "with its labels); nothing is trained")
    evaluate.add_argument("--task", help="with --on: the trained task whose head reads it (default: the task of the "
                                         "spec's name, or the workdir's only task)")
    evaluate.set_defaults(run=_evaluate)

    predict = sub.add_parser("predict", help="predict with a trained workdir; texts as arguments or JSONL on stdin")
    predict.add_argument("texts", nargs="*", help='texts; with none, read {"text": ...} lines from stdin')
    predict.add_argument("--workdir", required=True, help=TRAINED_WORKDIR)
    predict.add_argument("--task", required=True, help="the name of one of the workdir's tasks")
    _add_checkpoint_option(predict)
    predict.add_argument("--batch-size", type=_positive_int, default=64, help="texts per forward pass (default 64)")
    predict.set_defaults(run=_predict)

    export = sub.add_parser("export", help="write the encoder in HF format, plus heads and label maps")
    export.add_argument("--workdir", required=True, help=TRAINED_WORKDIR)
    export.add_argument("--out", required=True, help="output directory (transformers.AutoModel loads it)")
    _add_checkpoint_option(export)
    export.set_defaults(run=_export)

    data = sub.add_parser(
        "data", help="load tasks (shipped names or spec files) and print their example and label counts")
    data.add_argument("tasks", nargs="+", help="task names (e.g. tweet_sentiment) or paths to task YAML files")
    data.add_argument("--model", default=DEFAULT_MODEL,
                      help="model whose tokenizer and position limit apply (default: %(default)s)")
    data.add_argument("--compact", action="store_true", help="one JSON line per task")
    data.set_defaults(run=_data)

    fetch = sub.add_parser("fetch", help="resolve a model name to a local directory (downloading it once) and print it")
    fetch.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="model name (default: %(default)s)")
    fetch.set_defaults(run=_fetch)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; `key=value` overrides may also follow the options
    (`mtl train CONFIG --workdir DIR train.steps=100`), which argparse alone refuses."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status. `argv` None reads this process's own command
    line, which it may then run again in a process set up to map memory in huge pages
    (`hostmem.reexec_with_huge_pages`); a given `argv` runs here, in this process."""
    args = parse_args(argv)
    # Before anything is read, written or imported. Retained memory is never faulted in again,
    # and huge pages on its one heap only raised the peak (README, Other commands).
    if argv is None and not (args.no_huge_pages or args.retain_memory):
        hostmem.reexec_with_huge_pages()
    if args.retain_memory and not hostmem.retain_freed_memory():  # before JAX starts its threads
        print("mtl: --retain-memory needs glibc's malloc; continuing without it", file=sys.stderr)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.quiet:  # mtl's own notes (model source, resume step, transferred heads) by default
        logging.getLogger("mtl").setLevel(logging.INFO)
    else:  # nor the training progress, nor the libraries' bars (tokenizing a dataset the first time)
        import datasets

        from mtl import tracking

        tracking.SHOW_PROGRESS = False
        datasets.disable_progress_bars()
    if not args.no_compile_cache:  # before the command compiles anything
        enable_compilation_cache()
    try:
        args.run(args)
    except MtlError as e:
        print(f"mtl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback (a trainer has said where it stopped)
        print("mtl: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
