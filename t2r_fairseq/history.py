"""`--history-blocks K` (t2r_language_modeling): every training block starts from the recurrent
state of the text just before it, read without gradients.

Why: trained on independent blocks, a T2R model only ever starts from an empty state; scored with
its state carried (t2r_truncated_bptt_lm), every block but a stream's first starts from a full one
(positions restart at every block there, as here). Carried-state training (the stream task) shows
the model that state, but its batches are a few contiguous streams, so every update reads the same
few places of the text one after the other; on WikiText-2 that cost 2.4-2.5 ppl of plain quality
in 100 updates (results/wikitext2.json, the *_then_carried rows). Here the batches stay fairseq's
shuffled blocks; before a batch, the model reads the k blocks of text preceding each of its blocks
(k drawn per batch from 0..K, the same for all its rows, fewer where the text has fewer), one block
at a time as the stream task does, under torch.no_grad and without the output layer. The loss is
the block's alone, so the model learns to read the state it will carry at scoring time: state
passing (Buitrago and Gu, 2025), with the state built from the block's true history rather than
from another sequence. k = 0 keeps the empty start in training.

Cost: up to K forward passes of a block without gradients per update (about a third of a training
pass each, less the output layer). Validation and scoring are unchanged.
"""
import numpy as np
import torch
from fairseq.data import BaseWrapperDataset

from .attention import prefill
from .errors import T2RUsageError


def check_options(history_blocks, sample_break_mode, add_bos_token):
    if history_blocks < 0:
        raise T2RUsageError(f"--history-blocks {history_blocks}: give how many blocks of text before each training "
                            f"block to read into its state (0: none)")
    if history_blocks and str(sample_break_mode) != "none":
        raise T2RUsageError(f"--history-blocks reads the text just before each block, which --sample-break-mode "
                            f"{sample_break_mode} does not keep contiguous: use --sample-break-mode none")
    if history_blocks and add_bos_token:
        raise T2RUsageError("--history-blocks reads the text before each block as one stream, and --add-bos-token "
                            "starts every block with <s>: drop one of them")


def token_stream(lines) -> torch.Tensor:
    """A split's lines (each ending in </s>), in order, as one token stream: the text that
    --sample-break-mode none cuts into blocks, and that the stream task cuts into streams."""
    return torch.cat([torch.as_tensor(lines[i]) for i in range(len(lines))]).long()


def next_token_inputs(tokens: torch.Tensor, eos: int) -> torch.Tensor:
    """The inputs that predict `tokens`: the stream shifted right by one, </s> first."""
    return torch.cat([tokens.new_tensor([eos]), tokens[:-1]])


class HistoryBlocks(BaseWrapperDataset):
    """fairseq's language-modeling dataset (--sample-break-mode none), whose batches also carry
    net_input["history_tokens"]: (rows, k, block), the k blocks of inputs before each row's block.

    tokens: the split's token stream, as TokenBlockDataset cuts it into blocks (block i's inputs are
    its tokens [i * block, (i + 1) * block) shifted right by one, </s> first)."""

    def __init__(self, dataset, tokens: torch.Tensor, *, block: int, max_blocks: int, eos: int, seed: int):
        super().__init__(dataset)
        self.inputs = next_token_inputs(tokens, eos)
        self.block, self.max_blocks, self.seed = block, max_blocks, seed

    def history_length(self, ids):
        """k for the batch of blocks `ids`: drawn from 0..max_blocks, reproducible from the batch alone (a
        resumed run draws the same), clipped to what the earliest block has before it."""
        k = int(np.random.default_rng([self.seed, *sorted(ids)]).integers(0, self.max_blocks + 1))
        return min(k, min(ids))

    def collater(self, samples):
        batch = self.dataset.collater(samples)
        if not batch:
            return batch
        ids = batch["id"].tolist()
        k = self.history_length(ids)
        batch["net_input"]["history_tokens"] = torch.stack(
            [self.inputs[(i - k) * self.block:i * self.block].view(k, self.block) for i in ids])
        return batch


def read_history(decoder, history_tokens, state):
    """Fill `state` (each T2R layer's incremental state) with the history, block by block, positions
    restarting at each, without gradients: the blocks that follow continue from it."""
    with torch.no_grad():
        for block in history_tokens.unbind(1):
            prefill(decoder, block, state, features_only=True)
