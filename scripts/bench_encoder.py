"""Encoder speed against HF PyTorch, and compile time with and without layer scanning.

    python scripts/bench_encoder.py                 # MiniLM, batch 32, seq 128
    python scripts/bench_encoder.py --batch 8 --seq 64 --iters 5
    python scripts/bench_encoder.py --no-huge-pages  # malloc as the system sets it, as before mtl used huge pages

Prints, for the real all-MiniLM-L6-v2 on this machine's CPU:
  - forward and forward+backward step time for mtl (jit, scanned and looped layers) and for
    transformers' BertModel (PyTorch, its default attention) measured in the same run, with the
    ratio torch_time / mtl_time (above 1 means mtl is faster);
  - compile time of the jitted forward and forward+backward, scanned vs looped, for the 6-layer
    MiniLM and a 24-layer encoder of the same width, to show how each grows with depth.
The loss for the backward pass is mean(last_hidden_state ** 2): a stand-in that exercises
every parameter without a task head.

The process runs as every `mtl` command does, with glibc asking for transparent huge pages for
large blocks (mtl.hostmem.reexec_with_huge_pages), so both sides run with them.
"""

from __future__ import annotations

import argparse
import os
import time

from mtl.assets import DEFAULT_MODEL
from mtl.hostmem import asks_for_huge_pages, reexec_with_huge_pages

from timing import cpu_description, median_time  # scripts/timing.py: no JAX


def parse_args() -> argparse.Namespace:
    """The command line; read before JAX and PyTorch load (see below)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--deep-layers", type=int, default=24, help="depth of the compile-time comparison model")
    parser.add_argument("--no-huge-pages", action="store_true", help="both sides map memory in the system's "
                        "default pages, not the huge pages every mtl command asks for (mtl.hostmem)")
    return parser.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()
    if not ARGS.no_huge_pages:  # as the mtl command decides; before the imports below, which a restart
        reexec_with_huge_pages()  # would make again: this script from the start, with huge pages

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from mtl import Encoder, resolve_model  # noqa: E402


def mtl_steps(encoder: Encoder, ids, mask):
    graphdef, params, rest = nnx.split(encoder, nnx.Param, ...)

    def loss(params, ids, mask):
        out = nnx.merge(graphdef, params, rest)(ids, mask)
        return jnp.mean(jnp.square(out.last_hidden_state))

    forward = jax.jit(lambda p, i, m: nnx.merge(graphdef, p, rest)(i, m).last_hidden_state)
    backward = jax.jit(jax.value_and_grad(loss))
    return params, forward, backward


def compile_seconds(encoder: Encoder, ids, mask) -> tuple[float, float]:
    params, forward, backward = mtl_steps(encoder, ids, mask)
    out = []
    for fn in (forward, backward):
        start = time.perf_counter()
        fn.lower(params, ids, mask).compile()
        out.append(time.perf_counter() - start)
    return out[0], out[1]


def step_seconds(encoder: Encoder, ids, mask, iters: int) -> tuple[float, float]:
    """Median seconds of a forward pass and of a forward and backward pass, compiled."""
    params, forward, backward = mtl_steps(encoder, ids, mask)
    fwd = median_time(lambda: forward(params, ids, mask).block_until_ready(), iters)
    bwd = median_time(lambda: jax.block_until_ready(backward(params, ids, mask)), iters)
    return fwd, bwd


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(os.cpu_count())

    directory = resolve_model(args.model)
    rng = np.random.RandomState(0)
    ids_np = rng.randint(1000, 20000, size=(args.batch, args.seq))
    mask_np = np.ones_like(ids_np)
    ids, mask = jnp.asarray(ids_np), jnp.asarray(mask_np)
    print(f"{args.model}: batch {args.batch}, seq {args.seq}, {jax.devices()[0].platform}, "
          f"{cpu_description()}, {'malloc huge pages' if asks_for_huge_pages() else 'default malloc pages'}, "
          f"jax {jax.__version__}, torch {torch.__version__}")

    model = transformers.AutoModel.from_pretrained(directory).eval()
    t_ids, t_mask = torch.tensor(ids_np), torch.tensor(mask_np)

    def torch_forward():
        with torch.no_grad():
            model(input_ids=t_ids, attention_mask=t_mask)

    def torch_backward():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=t_ids, attention_mask=t_mask)
        out.last_hidden_state.pow(2).mean().backward()

    torch_fwd = median_time(torch_forward, args.iters)
    torch_bwd = median_time(torch_backward, args.iters)
    print(f"\n{'':24}{'forward':>12}{'fwd+bwd':>12}{'fwd ratio':>12}{'bwd ratio':>12}")
    print(f"{'HF PyTorch':24}{torch_fwd * 1e3:10.1f}ms{torch_bwd * 1e3:10.1f}ms")
    for scan in (True, False):
        fwd, bwd = step_seconds(Encoder.from_pretrained(directory, scan_layers=scan), ids, mask, args.iters)
        label = f"mtl ({'scan' if scan else 'loop'})"
        print(f"{label:24}{fwd * 1e3:10.1f}ms{bwd * 1e3:10.1f}ms{torch_fwd / fwd:11.2f}x{torch_bwd / bwd:11.2f}x")

    print(f"\ncompile time (s){'':8}{'forward':>12}{'fwd+bwd':>12}")
    base = Encoder.from_pretrained(directory).config
    for layers in (base.num_layers, args.deep_layers):
        for scan in (True, False):
            config = base.replace(num_layers=layers, scan_layers=scan)
            encoder = Encoder(config, rngs=nnx.Rngs(0))
            fwd_c, bwd_c = compile_seconds(encoder, ids, mask)
            label = f"{layers} layers, {'scan' if scan else 'loop'}"
            print(f"{label:24}{fwd_c:11.2f}s{bwd_c:11.2f}s")


if __name__ == "__main__":
    main(ARGS)
