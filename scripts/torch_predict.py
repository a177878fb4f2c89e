"""Predict with an `mtl export` directory in PyTorch: the export format, read without mtl or JAX.

    mtl export --workdir workdirs/multitask --out exported
    python scripts/torch_predict.py exported --task bbc_topic "Shares fell after the bank cut its forecast"
    echo '{"tokens": ["Anne", "flew", "to", "Paris"]}' | python scripts/torch_predict.py exported --task wnut_ner

It prints one JSON line per text, as `mtl predict` does, and needs only torch, transformers,
safetensors and, for a token task's entity spans, seqeval. Texts come as arguments, or as
{"text": ...} lines on stdin ({"tokens": [...]} for a token task, {"text": ..., "text_pair": ...}
for a task on pairs of texts, {"text": ..., "choices": [...]} for a multiple-choice task).
tests/test_export_torch.py checks that its predictions are mtl's.

An export holds:
- config.json, model.safetensors and the tokenizer files: the encoder, for transformers.AutoModel;
- heads.safetensors: each task's output layer, "TASK.out.kernel" [hidden, outputs] (the transpose
  of a torch.nn.Linear weight) and "TASK.out.bias" [outputs];
- tasks.json: each task's head, head_options (defaults filled in), max_length, text_pair (true for a
  task on pairs of texts, each encoded as the tokenizer encodes a pair) and labels in id order.

Each shipped head is that one linear layer, applied to:
- classification, sentiment, regression, multi_label: one vector per text, by head_options.pooling:
  "pooler" (the encoder's pooler output), "cls" (the first token's last hidden state) or "mean"
  (the mean of the real tokens' last hidden states);
- multiple_choice: the same pooled vector of each (text, choice) pair, encoded as a pair; its one
  output is the choice's score, and a softmax over an input's choices picks one (labels name the
  choice positions);
- token_classification: every token's last hidden state; a word's tag is read at its first
  sub-token, and words cut off at max_length are tagged "O".
The outputs are then a softmax over labels (classification; sentiment adds score, the expected
polarity with the labels spread evenly from -1 to 1), the number itself (regression), or a sigmoid
per label kept above head_options.threshold (multi_label). Dropout only trains: it is not applied.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

POOLED_HEADS = ("classification", "sentiment", "regression", "multi_label")
HEADS = POOLED_HEADS + ("token_classification", "multiple_choice")


class ExportError(Exception):
    """An export or an input this reader cannot use; the message says which and why."""


class ExportedModel:
    """An `mtl export` directory, loaded into PyTorch."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        if not (directory / "tasks.json").is_file():
            raise ExportError(f"{directory}: not an mtl export (no tasks.json); write one with mtl export")
        self.encoder = transformers.AutoModel.from_pretrained(directory).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
        self.tasks = json.loads((directory / "tasks.json").read_text())["tasks"]
        self.heads = load_file(directory / "heads.safetensors")

    def task(self, name: str) -> dict:
        if name not in self.tasks:
            raise ExportError(f"task {name!r} is not in this export; tasks: {sorted(self.tasks)}")
        task = self.tasks[name]
        if task["head"] not in HEADS:
            raise ExportError(f"task {name!r} has head {task['head']!r}, which this reader does not know (it reads "
                              f"{list(HEADS)}); its parameters are the {name}.* entries of heads.safetensors")
        return task

    @torch.no_grad()
    def predict(self, name: str, texts: list, batch_size: int = 32) -> list[dict]:
        """One result per text, in order; a token task also takes a text as its list of words, a
        task on pairs of texts takes (text, text_pair) pairs, and a multiple-choice task (text,
        [choice, ...]) pairs."""
        task = self.task(name)
        kernel, bias = self.heads[f"{name}.out.kernel"], self.heads[f"{name}.out.bias"]
        linear = lambda x: x.float() @ kernel + bias  # noqa: E731
        read = {"token_classification": self._tag, "multiple_choice": self._choose}.get(task["head"], self._classify)
        results = []
        for start in range(0, len(texts), batch_size):
            results += read(task, linear, texts[start:start + batch_size])
        return results

    def _classify(self, task: dict, linear, texts: list) -> list[dict]:
        pairs = None
        if task.get("text_pair", False):
            if not all(isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(x, str) for x in t)
                       for t in texts):
                raise ExportError("this task reads pairs of texts: give each input as (text, text_pair)")
            texts, pairs = [t[0] for t in texts], [t[1] for t in texts]
        elif not all(isinstance(t, str) for t in texts):
            raise ExportError(f"head {task['head']!r} reads whole texts: give strings, not lists of words")
        outputs, labels, head = linear(self._pooled(task, texts, pairs)), task["labels"], task["head"]
        results = []
        for i, (text, row) in enumerate(zip(texts, outputs, strict=True)):
            result = {"text": text} if pairs is None else {"text": text, "text_pair": pairs[i]}
            if head == "regression":
                result["score"] = float(row[0])
            elif head == "multi_label":
                probs = torch.sigmoid(row)
                threshold = task["head_options"]["threshold"]
                result["labels"] = [label for label, p in zip(labels, probs, strict=True) if p > threshold]
                result["probs"] = {label: round(float(p), 4) for label, p in zip(labels, probs, strict=True)}
            else:
                probs = torch.softmax(row, -1)
                result["label"] = labels[int(probs.argmax())]
                result["probs"] = {label: round(float(p), 4) for label, p in zip(labels, probs, strict=True)}
                if head == "sentiment":
                    result["score"] = round(float(probs @ torch.linspace(-1.0, 1.0, len(labels))), 4)
            results.append(result)
        return results

    def _pooled(self, task: dict, texts: list[str], pairs: list[str] | None) -> torch.Tensor:
        """One vector per text (or pair), by head_options.pooling."""
        enc = self.tokenizer(texts, pairs, padding=True, truncation=True, max_length=task["max_length"],
                             return_tensors="pt")
        out = self.encoder(**enc)
        pooling = task["head_options"]["pooling"]
        if pooling == "pooler":
            return out.pooler_output
        if pooling == "cls":
            return out.last_hidden_state[:, 0]
        mask = enc["attention_mask"][..., None].to(out.last_hidden_state.dtype)
        return (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def _choose(self, task: dict, linear, inputs: list) -> list[dict]:
        labels = task["labels"]
        k = len(labels)
        if not all(isinstance(x, (list, tuple)) and len(x) == 2 and isinstance(x[0], str) and isinstance(x[1], list)
                   and 0 < len(x[1]) <= k and all(isinstance(c, str) for c in x[1]) for x in inputs):
            raise ExportError(f"this task picks one of up to {k} choices: give each input as (text, [1 to {k} "
                              "choice texts])")
        firsts = [text for text, choices in inputs for _ in choices]
        scores = linear(self._pooled(task, firsts, [c for _, choices in inputs for c in choices]))[:, 0]
        results = []
        for (text, choices), row in zip(inputs, scores.split([len(c) for _, c in inputs]), strict=True):
            probs = torch.softmax(row, -1)  # over the input's own choices
            best = int(probs.argmax())
            results.append({"text": text, "choices": choices, "label": labels[best], "answer": choices[best],
                            "probs": {label: round(float(p), 4) for label, p in zip(labels, probs, strict=False)}})
        return results

    def _tag(self, task: dict, linear, texts: list[str | list[str]]) -> list[dict]:
        from seqeval.scheme import IOB2, Entities  # strict, as mtl scores and prints entities

        labels = task["labels"]
        outside = labels.index("O") if "O" in labels else 0
        words = [t.split() if isinstance(t, str) else list(t) for t in texts]
        tagged = [i for i, w in enumerate(words) if w]  # a text of no words has no tags
        tags = [[outside] * len(w) for w in words]
        if tagged:
            enc = self.tokenizer([words[i] for i in tagged], is_split_into_words=True, padding=True, truncation=True,
                                 max_length=task["max_length"], return_tensors="pt")
            predicted = linear(self.encoder(**enc).last_hidden_state).argmax(-1)
            for row, i in enumerate(tagged):
                seen = set()
                for position, word in enumerate(enc.word_ids(row)):
                    if word is not None and word not in seen:  # the word's first sub-token
                        seen.add(word)
                        tags[i][word] = int(predicted[row, position])
        results = []
        for text, ws, ids in zip(texts, words, tags, strict=True):
            names = [labels[t] for t in ids]
            entities = [{"type": e.tag, "start": e.start, "end": e.end, "text": " ".join(ws[e.start:e.end])}
                        for e in Entities([names], IOB2).entities[0]]
            results.append({"text": text if isinstance(text, str) else " ".join(text), "tokens": ws, "tags": names,
                            "entities": entities})
        return results


def _stdin_texts(lines, token_task: bool, pair_task: bool, choice_task: bool = False) -> list:
    texts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ExportError(f"stdin:{number}: not a JSON line ({e.msg})") from None
        if choice_task:
            if not (isinstance(item, dict) and isinstance(item.get("text"), str)
                    and isinstance(item.get("choices"), list)):
                raise ExportError(f'stdin:{number}: expected {{"text": "...", "choices": [...]}}, got '
                                  f"{line.strip()[:80]}")
            texts.append((item["text"], item["choices"]))
        elif pair_task:
            if not (isinstance(item, dict) and isinstance(item.get("text"), str)
                    and isinstance(item.get("text_pair"), str)):
                raise ExportError(f'stdin:{number}: expected {{"text": "...", "text_pair": "..."}}, got '
                                  f"{line.strip()[:80]}")
            texts.append((item["text"], item["text_pair"]))
        elif isinstance(item, dict) and isinstance(item.get("text"), str):
            texts.append(item["text"])
        elif token_task and isinstance(item, dict) and isinstance(item.get("tokens"), list):
            texts.append([str(w) for w in item["tokens"]])
        else:
            want = '{"text": "..."}' + (' or {"tokens": [...]}' if token_task else "")
            raise ExportError(f"stdin:{number}: expected {want}, got {line.strip()[:80]}")
    return texts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", help="a directory `mtl export` wrote")
    parser.add_argument("--task", required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("texts", nargs="*", help='texts; with none, read {"text": ...} lines from stdin')
    args = parser.parse_intermixed_args(argv)  # texts may follow --task
    transformers.logging.disable_progress_bar()  # a bar per load: noise before the results
    try:
        model = ExportedModel(args.export)
        task = model.task(args.task)
        pair_task = task.get("text_pair", False)
        choice_task = task["head"] == "multiple_choice"
        if pair_task and args.texts:
            raise ExportError(f'task {args.task!r} reads pairs of texts: give {{"text": ..., "text_pair": ...}} '
                              "lines on stdin")
        if choice_task and args.texts:
            raise ExportError(f'task {args.task!r} picks one of several choices: give {{"text": ..., "choices": '
                              '[...]} lines on stdin')
        texts = args.texts or _stdin_texts(sys.stdin, task["head"] == "token_classification", pair_task, choice_task)
        for result in model.predict(args.task, texts, args.batch_size):
            print(json.dumps(result, ensure_ascii=False))
    except ExportError as e:
        sys.exit(f"torch_predict: {e}")


if __name__ == "__main__":
    main()
