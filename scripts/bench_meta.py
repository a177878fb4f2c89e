"""Meta-step throughput and peak memory: mtl's MAML against a torch.func peer, in the same run.

    python scripts/bench_meta.py               # MiniLM, 5-way 5-shot 5-query, meta-batch 4, seq 64
    python scripts/bench_meta.py --iters 1 --only mtl-maml torch-maml
    python scripts/bench_meta.py --only torch-maml mtl-maml --retain-memory   # both sides keep freed memory
    python scripts/bench_meta.py --no-huge-pages   # malloc as the system sets it (mtl commands ask for huge pages)
    python scripts/bench_meta.py --random-init minilm --iters 10     # on a GPU: no download
    python scripts/bench_meta.py --freeze-encoder --only mtl-maml mtl-anil torch-maml   # meta-learn the head alone
    python scripts/bench_meta.py --freeze-layers 3 --only mtl-anil mtl-anil-scan   # hold the lower 3 layers still

Setup (the issue's): all-MiniLM-L6-v2 with a mean-pooled 5-way linear head; a meta-batch of 4
episodes of 25 support + 25 query sequences of 64 random tokens; one inner SGD step over all
parameters; an AdamW outer update. No dropout in either. With --freeze-encoder the outer update
trains the head alone (optim.freeze_encoder; the peer differentiates the query loss with respect
to the head's parameters only); the inner step still adapts every parameter it adapts. With
--freeze-layers N the outer update holds the embeddings and the lowest N layers still
(optim.freeze_layers; the peer leaves them out of its meta-gradient).

  mtl-maml        second-order MAML: mtl's MetaLearner + make_meta_step, as mtl meta-train runs it
                  (looped layers, the encoder's default)
  mtl-maml-scan   the same with scanned layers (model.scan_layers: true)
  mtl-maml-remat  looped layers with meta.remat (each inner step recomputed in the backward pass)
                  and the encoder's remat_policy nothing_saveable
  mtl-fomaml, mtl-anil   first-order MAML; ANIL (head-only inner loop, encoder run once)
  mtl-anil-scan   ANIL with scanned layers
  torch-maml      the peer: torch.func.functional_call + grad + vmap over the episodes on
                  transformers' BertModel with eager attention (its default SDPA attention has no
                  double backward on CPU) and torch.optim.AdamW

Each variant runs in its own subprocess so that its peak memory is its own: resident memory
(ru_maxrss) on a CPU, the allocator's peak on a GPU. Prints seconds per meta-step (median after
one warm-up step), tasks per second, the ratio against the peer (above 1: mtl is faster), mtl's
compile time and the peak memory. On a GPU both sides run fp32 with TF32 matmuls (XLA's default).

MFU: no closed formula counts second-order MAML (a backward pass through an inner backward
pass), so the FLOPs are the ones XLA counts in the compiled meta-gradient program of mtl-maml,
mtl-fomaml or mtl-anil (the optimizer update adds a few FLOPs per parameter, well under 0.1%),
over the device peak (scripts/timing.py: data sheet, or a measured matmul on a CPU), summed
over the mesh's devices. mtl-maml-scan and mtl-maml-remat compute the same model FLOPs as
mtl-maml and take its count, as mtl-anil-scan takes mtl-anil's: XLA counts a scanned loop's body
once, and remat's recomputation is extra work, not model FLOPs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time

WAYS, SHOTS, QUERIES, META_BATCH, SEQ, INNER_LR = 5, 5, 5, 4, 64, 0.01
VARIANTS = ("mtl-maml", "mtl-maml-scan", "mtl-maml-remat", "mtl-fomaml", "mtl-anil", "mtl-anil-scan", "torch-maml")
# Variants that compute the model FLOPs of another (see the docstring's MFU paragraph).
SAME_FLOPS_AS = {"mtl-maml-scan": "mtl-maml", "mtl-maml-remat": "mtl-maml", "mtl-anil-scan": "mtl-anil"}


def episodes():
    import numpy as np

    rng = np.random.RandomState(0)

    def part(per_class):
        rows = WAYS * per_class
        ids = rng.randint(1000, 20000, size=(META_BATCH, rows, SEQ)).astype(np.int32)
        labels = np.tile(np.repeat(np.arange(WAYS, dtype=np.int32), per_class), (META_BATCH, 1))
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
                "labels": labels, "weights": np.ones((META_BATCH, rows), np.float32)}

    return {"support": part(SHOTS), "query": part(QUERIES)}


def run_mtl(variant: str, directory: str | None, shape: str | None, iters: int, mesh: str | None = None,
            freeze_encoder: bool = False, freeze_layers: int = 0) -> dict:
    import jax
    from flax import nnx

    from mtl import Encoder, EncoderConfig
    from mtl.config import OptimSection
    from mtl.models.heads import ClassificationHead
    from mtl.models.model import MultiTaskModel
    from mtl.sharding import Layout, make_mesh
    from mtl.train.meta import HEAD, MetaLearner, make_meta_step
    from mtl.train.optim import build_optimizer, frozen_mask
    from mtl.train.state import TrainState

    from timing import SHAPES, VOCAB, device_memory_peak_gb, device_peak, median_time, parse_mesh  # scripts/timing.py

    remat = variant == "mtl-maml-remat"
    options = dict(remat_policy="nothing_saveable" if remat else None, scan_layers=variant.endswith("-scan"))
    if shape:
        encoder = Encoder(EncoderConfig(vocab_size=VOCAB, **SHAPES[shape], **options), rngs=nnx.Rngs(0))
    else:
        encoder = Encoder.from_pretrained(directory, **options)
    head = ClassificationHead(encoder.config.hidden_size, [str(i) for i in range(WAYS)], rngs=nnx.Rngs(0),
                              pooling="mean", dropout=0.0)
    graphdef, params, rest = nnx.split(MultiTaskModel(encoder, {HEAD: head}), nnx.Param, ...)
    algorithm = {"mtl-fomaml": "fomaml", "mtl-anil": "anil", "mtl-anil-scan": "anil"}.get(variant, "maml")
    learner = MetaLearner(graphdef, rest, encoder.config, algorithm=algorithm, inner_lr=INNER_LR, remat=remat)
    meta_params = learner.init_params(params)
    optim = OptimSection(learning_rate=1e-5, warmup_ratio=0.0, clip_norm=None, freeze_encoder=freeze_encoder,
                         freeze_layers=freeze_layers)
    tx = build_optimizer(optim, meta_params, encoder.config, total_steps=1000)
    layout = Layout(make_mesh(parse_mesh(mesh)))  # the meta-batch's episodes split over its data axes
    layout.check_batch(META_BATCH, "the meta-batch")
    holder = {"state": layout.put(TrainState.create(meta_params, tx, seed=0))}
    step = make_meta_step(learner, tx, skip_nonfinite=False, shardings=layout.step_shardings(holder["state"]),
                          frozen=frozen_mask(meta_params, encoder.config, optim))
    batch = episodes()
    peak_before, _ = device_peak("float32")  # measured again after the steps; the higher is kept

    def one():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics)

    start = time.perf_counter()
    one()
    first = time.perf_counter() - start
    seconds = median_time(one, iters)
    flops = compiled_flops(step.gradients, holder["state"], batch)
    peak, peak_source = device_peak("float32", earlier=peak_before)
    # The first step compiles, then runs.
    return {"seconds": seconds, "compile_seconds": first - seconds, "device_peak_gb": device_memory_peak_gb(),
            "flops": flops, "peak_flops": peak * layout.mesh.devices.size, "peak_source": peak_source}


def compiled_flops(jitted, *args) -> float:
    """FLOPs XLA counts in the compiled program of `jitted(*args)` (all devices together)."""
    analysis = jitted.lower(*args).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis["flops"])


def run_torch(directory: str | None, shape: str | None, iters: int, freeze_encoder: bool = False,
              freeze_layers: int = 0) -> dict:
    import torch
    import transformers
    from torch.func import functional_call, grad, vmap

    from timing import SHAPES, VOCAB, median_time

    torch.set_num_threads(os.cpu_count())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True  # as XLA's default fp32 matmul precision on a GPU
    if shape:
        s = SHAPES[shape]
        config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=s["hidden_size"],
                                         num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"],
                                         intermediate_size=s["intermediate_size"], attn_implementation="eager")
        body = transformers.BertModel(config, add_pooling_layer=False)
    else:
        body = transformers.BertModel.from_pretrained(directory, attn_implementation="eager", add_pooling_layer=False)
    body = body.to(device).eval()
    head = torch.nn.Linear(body.config.hidden_size, WAYS).to(device)
    params = {**{f"body.{k}": v for k, v in body.named_parameters()},
              **{f"head.{k}": v for k, v in head.named_parameters()}}
    # With a frozen encoder the meta-gradient is taken with respect to the head alone; with frozen
    # layers, with respect to everything but the embeddings and those layers.
    frozen = ("body.",) if freeze_encoder else ()
    if freeze_layers:
        frozen = ("body.embeddings.", *(f"body.encoder.layer.{i}." for i in range(freeze_layers)))
    trained = {k: v for k, v in params.items() if not k.startswith(frozen)}
    optimizer = torch.optim.AdamW(trained.values(), lr=1e-5)
    batch = {part: {k: torch.as_tensor(v, device=device).long() if k != "weights" else torch.as_tensor(v, device=device)
                    for k, v in d.items()}
             for part, d in episodes().items()}

    def loss_fn(p, ids, mask, labels):
        # An additive [batch, 1, 1, seq] mask: given the 2-D mask, transformers' mask builder branches
        # on mask.all(), which torch.func.vmap refuses as data-dependent control flow.
        additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        hidden = functional_call(body, {k[5:]: v for k, v in p.items() if k.startswith("body.")},
                                 (ids,), {"attention_mask": additive}).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
        logits = functional_call(head, {k[5:]: v for k, v in p.items() if k.startswith("head.")}, (pooled,))
        return torch.nn.functional.cross_entropy(logits, labels)

    def task_loss(p, s_ids, s_mask, s_y, q_ids, q_mask, q_y):
        g = grad(loss_fn)(p, s_ids, s_mask, s_y)
        adapted = {k: v - INNER_LR * g[k] for k, v in p.items()}
        return loss_fn(adapted, q_ids, q_mask, q_y)

    def meta_loss(trained_params):
        p = {**{k: v.detach() for k, v in params.items()}, **trained_params}
        s, q = batch["support"], batch["query"]
        losses = vmap(task_loss, in_dims=(None, 0, 0, 0, 0, 0, 0))(
            p, s["input_ids"], s["attention_mask"], s["labels"], q["input_ids"], q["attention_mask"], q["labels"])
        return losses.mean()

    def one():
        optimizer.zero_grad(set_to_none=True)
        grads = grad(meta_loss)({k: v.detach() for k, v in trained.items()})
        for k, v in trained.items():
            v.grad = grads[k]
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    seconds = median_time(one, iters)
    return {"seconds": seconds, "device_peak_gb": torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None}


def worker(variant: str, directory: str | None, shape: str | None, iters: int, mesh: str | None,
           freeze_encoder: bool, freeze_layers: int) -> None:
    run = run_torch if variant == "torch-maml" else functools.partial(run_mtl, variant, mesh=mesh)
    result = run(directory, shape, iters, freeze_encoder=freeze_encoder, freeze_layers=freeze_layers)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--random-init", choices=("minilm", "bert-base"),
                        help="a random encoder of this shape, not --model")
    parser.add_argument("--iters", type=int, default=2, help="timed meta-steps per variant after a warm-up")
    parser.add_argument("--only", nargs="*", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--mesh", help="mtl's device mesh as mesh config keys, e.g. data=4 (default: data parallel "
                        "over all devices)")
    parser.add_argument("--retain-memory", action="store_true", help="every variant's process keeps the memory "
                        "it frees for reuse (mtl.hostmem), the peer's too: no page faults for fresh temporaries")
    parser.add_argument("--freeze-encoder", action="store_true", help="the outer update trains the head alone "
                        "(optim.freeze_encoder; the peer's meta-gradient is the head's only)")
    parser.add_argument("--freeze-layers", type=int, default=0, metavar="N", help="the outer update holds the "
                        "embeddings and the lowest N layers still (optim.freeze_layers; the peer leaves them out)")
    parser.add_argument("--no-huge-pages", action="store_true", help="every variant's process maps memory in the "
                        "system's default pages, not the huge pages every mtl command asks for (mtl.hostmem)")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--directory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from mtl.hostmem import asks_for_huge_pages, reexec_with_huge_pages, retain_freed_memory

    if not (args.no_huge_pages or args.retain_memory):  # as the mtl command; the workers inherit it
        reexec_with_huge_pages()
    if args.worker:
        if args.retain_memory and not retain_freed_memory():
            sys.exit("--retain-memory needs glibc's malloc")
        worker(args.worker, args.directory, args.random_init, args.iters, args.mesh, args.freeze_encoder,
               args.freeze_layers)
        return
    from mtl import resolve_model

    from timing import cpu_description  # scripts/timing.py

    directory = None if args.random_init else str(resolve_model(args.model))
    name = f"random {args.random_init}" if args.random_init else args.model
    print(f"{name}: {WAYS}-way {SHOTS}-shot {QUERIES}-query, meta-batch {META_BATCH}, seq {SEQ}, "
          f"1 inner step over all params, {cpu_description()}"
          f"{', freed memory retained (both sides)' if args.retain_memory else ''}"
          f"{', malloc huge pages (both sides)' if asks_for_huge_pages() else ', default malloc pages'}"
          f"{', encoder frozen in the outer update' if args.freeze_encoder else ''}"
          + (f", embeddings and layers 0-{args.freeze_layers - 1} frozen in the outer update"
             if args.freeze_layers else ""))
    results = {}
    for variant in args.only:
        source = ["--random-init", args.random_init] if args.random_init else ["--directory", directory]
        mesh = ["--mesh", args.mesh] if args.mesh else []
        flags = [*(["--retain-memory"] if args.retain_memory else []),
                 *(["--no-huge-pages"] if args.no_huge_pages else []),
                 *(["--freeze-encoder"] if args.freeze_encoder else []),
                 "--freeze-layers", str(args.freeze_layers), "--iters", str(args.iters)]
        proc = subprocess.run([sys.executable, __file__, "--worker", variant, *source, *mesh, *flags],
                              capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            reason = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode
            print(f"{variant:16s} failed: {reason}")
            continue
        results[variant] = r = json.loads(line[len("RESULT "):])
        plain = SAME_FLOPS_AS.get(variant)
        if plain:  # model FLOPs: the looped program's
            r["flops"] = results[plain]["flops"] if plain in results else None
        # A GPU's own allocator peak where there is one; resident host memory on a CPU.
        r["peak_gb"] = r["device_peak_gb"] if r.get("device_peak_gb") is not None else r["peak_rss_gb"]
        extra = f"   compile {r['compile_seconds']:.1f} s" if "compile_seconds" in r else ""
        if r.get("flops") is not None:
            extra += (f"   MFU {r['flops'] / r['seconds'] / r['peak_flops']:.1%} "
                      f"({r['flops'] / 1e12:.2f} TFLOP counted by XLA; peak: {r['peak_source']})")
        where = "device" if r.get("device_peak_gb") is not None else "RSS"
        print(f"{variant:16s} {r['seconds']:7.3f} s/meta-step  {META_BATCH / r['seconds']:7.3f} tasks/s  "
              f"peak {where} {r['peak_gb']:5.2f} GB{extra}", flush=True)
    peer = results.get("torch-maml")
    if peer:
        for variant, r in results.items():
            if variant != "torch-maml":
                print(f"{variant:16s} tasks/s ratio mtl/torch {peer['seconds'] / r['seconds']:.2f}x, "
                      f"peak memory ratio {r['peak_gb'] / peer['peak_gb']:.2f}x")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
