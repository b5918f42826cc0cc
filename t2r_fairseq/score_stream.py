"""Unbounded-context scoring of a T2R language model (`t2r-eval-stream`).

fairseq-eval-lm scores a split as independent blocks of --tokens-per-sample tokens (or, with
--context-window, overlapping blocks that recompute the overlap). A T2R model is an RNN: each
block can start from the state the previous block ended with, so every token is scored with all
of its history at constant cost per token. Positions restart in each block (as in training);
only the attention state carries over.

    t2r-eval-stream DATA --path t2r/checkpoint_best.pt [--gen-subset test] [--block 256]

prints the same "Loss (base 2), Perplexity" line as fairseq-eval-lm. The split is cut into
--streams contiguous pieces scored side by side as a batch (each its own recurrent state).
"""
import argparse
import logging
import math
import os
import sys
import time

import torch

logger = logging.getLogger("t2r_fairseq.score_stream")


def token_stream(task, subset: str) -> torch.Tensor:
    """The split as one token sequence, sentences in order, each ending in </s>."""
    from fairseq.data import data_utils

    path = os.path.join(task.cfg.data.split(os.pathsep)[0] if hasattr(task, "cfg") and task.cfg is not None
                        else task.args.data.split(os.pathsep)[0], subset)
    dataset = data_utils.load_indexed_dataset(path, task.source_dictionary)
    if dataset is None:
        raise FileNotFoundError(f"no binarized split {subset!r} at {path}")
    return torch.cat([dataset[i] for i in range(len(dataset))]).long()


@torch.no_grad()
def score(model, stream: torch.Tensor, eos: int, block: int, streams: int) -> tuple:
    """Summed NLL (nats) and token count over the stream; every token predicted from all before it."""
    # Imported here, not at start-up: fairseq takes seconds to import, and --help should not wait.
    from .attention import T2RSelfAttention, prefill

    layers = [getattr(layer, "module", layer) for layer in model.decoder.layers]  # unwraps FSDP
    if not all(isinstance(layer.self_attn, T2RSelfAttention) for layer in layers):
        raise ValueError("stream scoring needs every decoder layer to be T2R (a softmax layer cannot carry "
                         "its context across blocks); use fairseq-eval-lm --context-window for hybrid models")
    inputs = torch.cat([stream.new_tensor([eos]), stream[:-1]])
    length = -(-stream.numel() // streams)
    pad = length * streams - stream.numel()
    # The last piece is padded at its end; causal attention keeps padding out of every real
    # token's score, and padded targets are not counted.
    inputs = torch.cat([inputs, inputs.new_full((pad,), eos)]).view(streams, length)
    targets = torch.cat([stream, stream.new_full((pad,), -1)]).view(streams, length)
    total, state = 0.0, {}
    for start in range(0, length, block):
        x, y = inputs[:, start:start + block], targets[:, start:start + block]
        # Each block continues the state the previous one left in `state`, as decoding would.
        lprobs = model.get_normalized_probs(prefill(model.decoder, x, state), log_probs=True)
        real = y.ge(0)
        total -= lprobs.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)[real].sum().item()
    return total, stream.numel()


def main(argv=None):
    p = argparse.ArgumentParser(prog="t2r-eval-stream", description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="fairseq-preprocess output directory")
    p.add_argument("--path", required=True, help="T2R language model checkpoint")
    p.add_argument("--gen-subset", default="test")
    p.add_argument("--block", type=int, default=256, help="tokens per forward (memory only; context is unbounded)")
    p.add_argument("--streams", type=int, default=8, help="contiguous pieces scored side by side")
    p.add_argument("--cpu", action="store_true", help="(default when no GPU) run on CPU")
    args = p.parse_args(argv)
    if args.block <= 0 or args.streams <= 0:
        p.error("--block and --streams must be positive")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from fairseq import checkpoint_utils

    from . import checkpoints  # noqa: F401  (registers models and safe loading)
    from .checkpoints import CheckpointError, load_checkpoint

    try:
        load_checkpoint(args.path)  # a one-line error for a missing or broken file
        models, _, task = checkpoint_utils.load_model_ensemble_and_task([args.path], arg_overrides={"data": args.data})
        model = models[0].eval()
        if torch.cuda.is_available() and not args.cpu:
            model.cuda()
        stream = token_stream(task, args.gen_subset)
        start = time.time()
        nll, count = score(model, stream.to(next(model.parameters()).device), task.source_dictionary.eos(),
                           args.block, args.streams)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"t2r-eval-stream: error: {e}", file=sys.stderr)
        return 2
    loss2 = nll / count / math.log(2)
    logger.info(f"scored {count} tokens in {time.time() - start:.1f}s ({count / (time.time() - start):.0f} tokens/s), "
                f"carrying state across blocks of {args.block}")
    logger.info(f"Loss (base 2): {loss2:.4f}, Perplexity: {2 ** loss2:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
