"""Train-step throughput: mtl's multi-task step against HF PyTorch, measured in the same run.

    python scripts/bench_train.py                  # MiniLM, batch 32, seq 128, 10 steps
    python scripts/bench_train.py --iters 5

mtl: the Trainer's own step for a classification task (MultiTaskModel, cross-entropy, clipping
and AdamW from build_optimizer, dropout on) on the real all-MiniLM-L6-v2.
Peer: transformers' BertForSequenceClassification (its default attention) with
torch.optim.AdamW and clip_grad_norm_, on the same weights and the same batch.

Prints steady-state step time for both, the ratio torch / mtl (above 1: mtl is faster), mtl's
compile time, and the achieved GFLOP/s (6 * non-embedding params * tokens + attention) as a fraction of the
measured float32 matmul peak of this machine.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from timing import median_time  # scripts/timing.py

from mtl import DEFAULT_MODEL, Encoder, resolve_model
from mtl.config import OptimSection
from mtl.models.heads import ClassificationHead
from mtl.models.model import MultiTaskModel
from mtl.train.multitask import make_train_steps
from mtl.train.optim import build_optimizer
from mtl.train.state import TrainState


def matmul_peak(n: int = 2048) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    seconds = median_time(lambda: f(a).block_until_ready(), 5)
    return 2 * n**3 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    directory = resolve_model(args.model)
    rng = np.random.RandomState(0)
    ids = rng.randint(1000, 20000, size=(args.batch, args.seq)).astype(np.int32)
    labels = rng.randint(0, 3, size=(args.batch,)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
             "labels": labels, "weights": np.ones((args.batch,), np.float32)}
    print(f"{args.model}: batch {args.batch}, seq {args.seq}, {jax.devices()[0].platform}, {os.cpu_count()} cores")

    # mtl
    encoder = Encoder.from_pretrained(directory)
    head = ClassificationHead(encoder.config.hidden_size, ["a", "b", "c"], rngs=nnx.Rngs(0))
    model = MultiTaskModel(encoder, {"task": head})
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    train_params = {"model": params, "log_vars": jnp.zeros((1,), jnp.float32)}
    optim = OptimSection(learning_rate=2e-5, warmup_ratio=0.0)
    tx = build_optimizer(optim, train_params, encoder.config, total_steps=1000)
    state = TrainState.create(train_params, tx, seed=0)
    step = make_train_steps(graphdef, rest, tx, ["task"], [1.0], weighting="static",
                            skip_nonfinite=False, dropout=True)["task"]
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - start
    holder = {"state": state}

    def mtl_step():
        holder["state"], m = step(holder["state"], batch)
        jax.block_until_ready(m)

    mtl_time = median_time(mtl_step, args.iters)

    # HF PyTorch peer
    peer = transformers.BertForSequenceClassification.from_pretrained(directory, num_labels=3)
    peer.train()
    optimizer = torch.optim.AdamW(peer.parameters(), lr=2e-5, weight_decay=0.01)
    t_batch = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items() if k not in ("weights",)}

    def torch_step():
        optimizer.zero_grad(set_to_none=True)
        loss = peer(**t_batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(peer.parameters(), 1.0)
        optimizer.step()

    torch_time = median_time(torch_step, args.iters)

    # Embedding tables are looked up, not multiplied: count the non-embedding parameters.
    n_params = sum(x.size for x in jax.tree.leaves(params)) - sum(
        x.size for x in jax.tree.leaves(nnx.state(encoder.embeddings, nnx.Param)))
    tokens = args.batch * args.seq
    cfg = encoder.config
    attention = 12 * cfg.num_layers * args.batch * args.seq**2 * cfg.hidden_size  # QK^T and PV, fwd+bwd
    flops = 6 * n_params * tokens + attention
    peak = matmul_peak()
    print(f"\nHF PyTorch train step   {torch_time * 1e3:8.1f} ms")
    print(f"mtl train step          {mtl_time * 1e3:8.1f} ms   ratio torch/mtl {torch_time / mtl_time:.2f}x")
    print(f"mtl compile (first step) {compile_seconds:7.1f} s")
    print(f"achieved {flops / mtl_time / 1e9:.1f} GFLOP/s of a measured {peak / 1e9:.1f} GFLOP/s matmul peak "
          f"({flops / mtl_time / peak:.0%}); torch {flops / torch_time / 1e9:.1f} GFLOP/s ({flops / torch_time / peak:.0%})")


if __name__ == "__main__":
    main()
