"""Train-step throughput: mtl's multi-task step against HF PyTorch, measured in the same run.

    python scripts/bench_train.py                  # MiniLM, batch 32, seq 128, 10 steps
    python scripts/bench_train.py --iters 5
    python scripts/bench_train.py --retain-memory  # glibc keeps freed memory, for all three sides
    python scripts/bench_train.py --no-huge-pages  # malloc as the system sets it, as before mtl used huge pages
    python scripts/bench_train.py --freeze-encoder # train the head alone (optim.freeze_encoder)
    python scripts/bench_train.py --scan-layers --freeze-layers 3   # the embeddings and layers 0-2 frozen
    python scripts/bench_train.py --random-init bert-base --dtype bfloat16 --batch 256   # on a GPU

mtl: the Trainer's own step for a classification task (MultiTaskModel, cross-entropy, clipping
and AdamW from build_optimizer, dropout on) on the real all-MiniLM-L6-v2, or on a random
encoder of a named shape (--random-init: speed depends on shapes, not weights).
Peer: transformers' BertForSequenceClassification (its default attention) with
torch.optim.AdamW and clip_grad_norm_, on the same weights (or the same shape) and the same
batch, on the GPU when there is one; --dtype bfloat16 runs it under torch.autocast, and mtl
with bf16 compute over fp32 params.

Second peer, in float32 on one device: scripts/minimal_jax.py, the same model and update as a bare
jitted JAX function over a dict of arrays. mtl / minimal is mtl's own overhead; torch / minimal
is how XLA's kernels compare with PyTorch's on this machine.

The process runs as every `mtl` command does, with glibc asking for transparent huge pages for
large blocks (mtl.hostmem.reexec_with_huge_pages), so all three sides run with them; with
--no-huge-pages or --retain-memory none does.

Prints steady-state step time for each, with the page faults and system CPU time a step costs
(on CPU, memory freed and allocated afresh every step is faulted in again: see the README), the
ratio torch / mtl (above 1: mtl is faster), mtl's compile time, tokens/s, and model FLOPs
utilisation: 6 * non-embedding params * tokens plus attention FLOPs, over the device peak (the
data sheet's for a known accelerator, for a CPU the higher of two matmuls measured before and
after the steps).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from mtl.assets import DEFAULT_MODEL
from mtl.hostmem import asks_for_huge_pages, reexec_with_huge_pages, retain_freed_memory

from timing import (  # scripts/timing.py: no JAX
    SHAPES,
    VOCAB,
    StepCost,
    cpu_description,
    device_memory_peak_gb,
    device_peak,
    parse_mesh,
    step_cost,
)


def parse_args() -> argparse.Namespace:
    """The command line; read before JAX and PyTorch load (see below)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--random-init", choices=sorted(SHAPES), help="a random encoder of this shape, not --model")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--no-peer", action="store_true", help="time mtl alone (no PyTorch, no minimal JAX)")
    parser.add_argument("--mesh", help="mtl's device mesh as mesh config keys, e.g. data=2,fsdp=4 (default: data "
                        "parallel over all devices); MFU is then over all devices' peak")
    parser.add_argument("--scan-layers", action="store_true", help="mtl with model.scan_layers true")
    parser.add_argument("--no-dropout", action="store_true", help="both sides without dropout")
    parser.add_argument("--freeze-encoder", action="store_true", help="train the head alone: mtl with "
                        "optim.freeze_encoder, the peer with requires_grad off under .bert (no minimal JAX step)")
    parser.add_argument("--freeze-layers", type=int, default=0, metavar="N", help="mtl with optim.freeze_layers=N, "
                        "the peer with requires_grad off on the embeddings and layers 0..N-1 (no minimal JAX step)")
    parser.add_argument("--prng", choices=("threefry2x32", "rbg", "unsafe_rbg"),
                        help="JAX's random-number generator (jax_default_prng_impl); it draws the keys that dropout "
                             "hashes its masks from")
    parser.add_argument("--profile", metavar="DIR", help="also write a jax.profiler trace of 3 mtl steps to DIR "
                        "(open it with xprof or TensorBoard's profile plugin)")
    parser.add_argument("--retain-memory", action="store_true", help="the process (mtl and both peers) keeps the "
                        "memory it frees for reuse (mtl.hostmem): no page faults for fresh temporaries")
    parser.add_argument("--no-huge-pages", action="store_true", help="the process (mtl and both peers) maps memory "
                        "in the system's default pages, not the huge pages every mtl command asks for (mtl.hostmem)")
    return parser.parse_args()


if __name__ == "__main__":
    # How this process maps memory is settled before the imports below, which take seconds: a
    # restart with huge pages would make them again, and retained memory must be set before
    # torch's and XLA's threads allocate.
    ARGS = parse_args()
    if not (ARGS.no_huge_pages or ARGS.retain_memory):  # as the mtl command decides
        reexec_with_huge_pages()  # this script again, from the start, with huge pages
    if ARGS.retain_memory and not retain_freed_memory():
        sys.exit("bench_train: --retain-memory needs glibc's malloc")

# Grow GPU memory as needed instead of taking 75% at start, so the PyTorch peer in the same
# process gets the memory it needs (it runs first and hands its cache back).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from mtl import Encoder, EncoderConfig, resolve_model  # noqa: E402
from mtl.config import OptimSection  # noqa: E402
from mtl.models.heads import ClassificationHead  # noqa: E402
from mtl.models.model import MultiTaskModel  # noqa: E402
from mtl.sharding import Layout, make_mesh  # noqa: E402
from mtl.train.multitask import make_train_steps  # noqa: E402
from mtl.train.optim import build_optimizer, frozen_mask  # noqa: E402
from mtl.train.state import TrainState  # noqa: E402

import minimal_jax  # noqa: E402  (scripts/minimal_jax.py)


def main(args: argparse.Namespace) -> None:
    frozen = args.freeze_encoder or args.freeze_layers > 0
    if args.prng:
        jax.config.update("jax_default_prng_impl", args.prng)
    torch.set_num_threads(os.cpu_count())
    torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    # Both sides use TF32 tensor cores for fp32 matmuls on a GPU (XLA's default precision does).
    torch.backends.cuda.matmul.allow_tf32 = True
    rng = np.random.RandomState(0)
    ids = rng.randint(1000, 20000, size=(args.batch, args.seq)).astype(np.int32)
    labels = rng.randint(0, 3, size=(args.batch,)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
             "labels": labels, "weights": np.ones((args.batch,), np.float32)}
    name = f"random {args.random_init}" if args.random_init else args.model
    setup = [f"batch {args.batch}", f"seq {args.seq}", f"{args.dtype} compute",
             f"{'scanned' if args.scan_layers else 'looped'} layers", f"dropout {'off' if args.no_dropout else 'on'}"]
    if args.freeze_encoder:
        setup.append("encoder frozen")
    if args.freeze_layers:
        setup.append(f"embeddings and {args.freeze_layers} layers frozen")
    if args.retain_memory:
        setup.append("freed memory retained")
    setup += ["malloc huge pages" if asks_for_huge_pages() else "default malloc pages",
              f"prng {jax.config.jax_default_prng_impl}", f"jax {jax.__version__} on {jax.devices()[0].device_kind}",
              f"torch {torch.__version__} on {torch_device}", cpu_description()]
    print(f"{name}: {', '.join(setup)}")

    peak_before, _ = device_peak(args.dtype)  # measured again after the steps; the higher is kept

    # The HF PyTorch peer first: it gives its GPU memory back before mtl starts.
    torch_cost = None if args.no_peer else time_peer(args, batch, torch_device)
    if torch_device == "cuda":
        torch.cuda.empty_cache()  # hand the peer's cached blocks back to the GPU for XLA

    # mtl
    if args.random_init:
        config = EncoderConfig(vocab_size=VOCAB, **SHAPES[args.random_init], dtype=args.dtype,
                               scan_layers=args.scan_layers)
        encoder = Encoder(config, rngs=nnx.Rngs(0))
    else:
        encoder = Encoder.from_pretrained(resolve_model(args.model), dtype=args.dtype, scan_layers=args.scan_layers)
    head = ClassificationHead(encoder.config.hidden_size, ["a", "b", "c"], rngs=nnx.Rngs(0))
    model = MultiTaskModel(encoder, {"task": head})
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    train_params = {"model": params, "log_vars": jnp.zeros((1,), jnp.float32)}
    optim = OptimSection(learning_rate=2e-5, warmup_ratio=0.0, freeze_encoder=args.freeze_encoder,
                         freeze_layers=args.freeze_layers)
    tx = build_optimizer(optim, train_params, encoder.config, total_steps=1000)
    layout = Layout(make_mesh(parse_mesh(args.mesh)))
    layout.check_batch(args.batch, "--batch")
    state = layout.put(TrainState.create(train_params, tx, seed=0))
    step = make_train_steps(graphdef, rest, tx, ["task"], [1.0], weighting="static", skip_nonfinite=False,
                            dropout=not args.no_dropout, shardings=layout.step_shardings(state),
                            frozen=frozen_mask(train_params, encoder.config, optim))["task"]
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - start
    holder = {"state": state}

    def mtl_step():
        holder["state"], m = step(holder["state"], batch)
        jax.block_until_ready(m)

    mtl_cost = step_cost(mtl_step, args.iters)
    mtl_time = mtl_cost.seconds
    mtl_memory = device_memory_peak_gb()
    if args.profile:
        with jax.profiler.trace(args.profile):
            for _ in range(3):
                mtl_step()
        print(f"profile of 3 mtl steps written under {args.profile}")
    holder.clear()  # free mtl's state before the minimal peer allocates its own
    del state
    minimal_cost = None
    if not args.no_peer and layout.mesh.devices.size == 1 and args.dtype == "float32" and not frozen:
        cfg = encoder.config
        minimal_cost = time_minimal(args, batch, vocab=cfg.vocab_size, hidden=cfg.hidden_size, layers=cfg.num_layers,
                                    heads=cfg.num_heads, intermediate=cfg.intermediate_size)

    # Embedding tables are looked up, not multiplied: count the non-embedding parameters.
    n_params = sum(x.size for x in jax.tree.leaves(params)) - sum(
        x.size for x in jax.tree.leaves(nnx.state(encoder.embeddings, nnx.Param)))
    tokens = args.batch * args.seq
    cfg = encoder.config
    attention = 12 * cfg.num_layers * args.batch * args.seq**2 * cfg.hidden_size  # QK^T and PV, fwd+bwd
    flops = 6 * n_params * tokens + attention
    if frozen:  # a frozen layer runs forward only: a third of its FLOPs
        trained = 0.0 if args.freeze_encoder else (cfg.num_layers - args.freeze_layers) / cfg.num_layers
        flops = int(flops * (1 + 2 * trained) / 3)
    peak, peak_source = device_peak(args.dtype, earlier=peak_before)
    devices = layout.mesh.devices.size
    peak, peak_source = peak * devices, f"{peak_source}, x {devices} devices of mesh {dict(layout.mesh.shape)}"
    memory = f", device memory peak {mtl_memory:.1f} GB" if mtl_memory is not None else ""
    print(f"\nmtl train step          {mtl_time * 1e3:8.1f} ms   {tokens / mtl_time:,.0f} tokens/s{memory}; "
          f"{mtl_cost.kernel()}")
    print(f"mtl compile (first step) {compile_seconds:7.1f} s")
    print(f"mtl MFU {flops / mtl_time / peak:.1%}: {flops / mtl_time / 1e12:.2f} TFLOP/s of {peak / 1e12:.1f} "
          f"({peak_source}); {flops / 1e12:.3f} TFLOP per step, {n_params / 1e6:.1f}M non-embedding params")
    if torch_cost is not None:
        torch_time = torch_cost.seconds
        print(f"HF PyTorch train step   {torch_time * 1e3:8.1f} ms   {tokens / torch_time:,.0f} tokens/s   "
              f"MFU {flops / torch_time / peak:.1%}; {torch_cost.kernel()}")
        print(f"ratio torch/mtl {torch_time / mtl_time:.2f}x")
    if minimal_cost is not None:
        minimal_time = minimal_cost.seconds
        print(f"minimal JAX train step  {minimal_time * 1e3:8.1f} ms   {tokens / minimal_time:,.0f} tokens/s   "
              f"MFU {flops / minimal_time / peak:.1%}; {minimal_cost.kernel()}")
        print(f"mtl overhead: mtl/minimal {mtl_time / minimal_time:.2f}x")
        if torch_cost is not None:
            print(f"XLA's kernels: torch/minimal {torch_cost.seconds / minimal_time:.2f}x")


def time_minimal(args, batch: dict, *, vocab: int, hidden: int, layers: int, heads: int, intermediate: int) -> StepCost:
    """The train step of scripts/minimal_jax.py at mtl's shapes (fp32, one device)."""
    params = minimal_jax.init(jax.random.key(0), vocab=vocab, hidden=hidden, layers=layers, intermediate=intermediate)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(2e-5, weight_decay=0.01))
    step = minimal_jax.make_step(tx, heads=heads, dropout=not args.no_dropout)
    holder = {"params": params, "opt_state": tx.init(params), "step": 0}
    device_batch = jax.device_put({k: v for k, v in batch.items() if k != "weights"})

    def run():
        holder["params"], holder["opt_state"], loss = step(holder["params"], holder["opt_state"], device_batch,
                                                           holder["step"])
        holder["step"] += 1
        loss.block_until_ready()

    return step_cost(run, args.iters)


def time_peer(args, batch: dict, device: str) -> StepCost:
    """The train step of BertForSequenceClassification + AdamW on the same batch."""
    if args.random_init:
        shape = SHAPES[args.random_init]
        peer_config = transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=shape["hidden_size"], num_hidden_layers=shape["num_layers"],
            num_attention_heads=shape["num_heads"], intermediate_size=shape["intermediate_size"], num_labels=3)
        peer = transformers.BertForSequenceClassification(peer_config)
    else:
        peer = transformers.BertForSequenceClassification.from_pretrained(resolve_model(args.model), num_labels=3)
    if args.no_dropout:
        peer.config.hidden_dropout_prob = peer.config.attention_probs_dropout_prob = 0.0
        for module in peer.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    if args.freeze_encoder:
        peer.bert.requires_grad_(False)  # no .grad: neither AdamW nor clip_grad_norm_ sees them
    elif args.freeze_layers:
        peer.bert.embeddings.requires_grad_(False)
        for layer in peer.bert.encoder.layer[:args.freeze_layers]:
            layer.requires_grad_(False)
    peer.to(device).train()
    optimizer = torch.optim.AdamW(peer.parameters(), lr=2e-5, weight_decay=0.01)
    t_batch = {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in batch.items() if k != "weights"}
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def torch_step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = peer(**t_batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(peer.parameters(), 1.0)
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return step_cost(torch_step, args.iters)  # the peer's tensors are freed on return


if __name__ == "__main__":
    main(ARGS)
