"""The real all-MiniLM-L6-v2, jitted as the trainers compile it, against HF's BertModel: the
forward pass and the gradient of every parameter, looped and scanned layers. For
tests/test_real_minilm.py, which runs it in a process of its own with XLA's default code
generation (the tests' fast compile changes float32 rounding).

    python tests/minilm_parity.py MODEL_DIR

Measured on a 2-core Zen 5 EPYC: the hidden states differ from PyTorch's by at most 3.3e-6,
the pooler output by 1.6e-7, and the gradients by at most 5.4e-6 of their tensor's largest
magnitude (the position embeddings, whose rows sum over the batch). Both bounds allow about 4x.

It does not reuse tests/test_encoder.py's gradient helpers: importing a test module imports
conftest, which turns the fast compile on, and the point here is the default one.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from mtl import Encoder, load_tokenizer
from mtl.hf import encoder_to_hf_tensors

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market crashed today."]
OUTPUT_ATOL = 1.5e-5
GRADIENT_ATOL_OF_SCALE = 2e-5


def torch_reference(directory, batch, target):
    model = transformers.BertModel.from_pretrained(directory).eval()  # eval: no dropout
    out = model(**{k: torch.tensor(v) for k, v in batch.items()})
    (torch.sum(out.last_hidden_state * torch.tensor(target)) + torch.sum(out.pooler_output)).backward()
    grads = {k: p.grad.numpy() for k, p in model.named_parameters()}
    return out.last_hidden_state.detach().numpy(), out.pooler_output.detach().numpy(), grads


def mtl_outputs(directory, batch, target, scan_layers):
    graphdef, params = nnx.split(Encoder.from_pretrained(directory, scan_layers=scan_layers), nnx.Param)
    inputs = [jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "token_type_ids")]

    def loss(params):
        out = nnx.merge(graphdef, params)(*inputs)
        return jnp.sum(out.last_hidden_state * target) + jnp.sum(out.pooler_output), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return out.last_hidden_state, out.pooler_output, encoder_to_hf_tensors(nnx.merge(graphdef, grads))


def main(directory):
    batch = dict(load_tokenizer(directory)(SENTENCES, padding=True, return_tensors="np"))
    target = np.random.RandomState(0).randn(*batch["input_ids"].shape, 384).astype(np.float32)
    hidden, pooled, grads = torch_reference(directory, batch, target)
    for scan_layers in (False, True):
        name = "scanned" if scan_layers else "looped"
        mtl_hidden, mtl_pooled, mtl_grads = mtl_outputs(directory, batch, target, scan_layers)
        np.testing.assert_allclose(mtl_hidden, hidden, atol=OUTPUT_ATOL, rtol=0, err_msg=f"{name} hidden states")
        np.testing.assert_allclose(mtl_pooled, pooled, atol=OUTPUT_ATOL, rtol=0, err_msg=f"{name} pooler output")
        assert mtl_grads.keys() == grads.keys(), set(mtl_grads) ^ set(grads)
        for key, expected in grads.items():
            atol = GRADIENT_ATOL_OF_SCALE * max(np.abs(expected).max(), 1.0)
            np.testing.assert_allclose(mtl_grads[key], expected, atol=atol, rtol=0, err_msg=f"{name} gradient {key}")
        worst = max(np.abs(mtl_grads[k] - g).max() / max(np.abs(g).max(), 1.0) for k, g in grads.items())
        print(f"{name}: hidden {np.abs(mtl_hidden - hidden).max():.2e}, "
              f"pooler {np.abs(mtl_pooled - pooled).max():.2e}, gradients {worst:.2e} of scale")


if __name__ == "__main__":
    main(sys.argv[1])
