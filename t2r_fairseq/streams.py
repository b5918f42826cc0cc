"""`t2r_truncated_bptt_lm`: a T2R language model reads text as long streams, its recurrent state
carried from one batch to the next (truncated backpropagation through time), in training and in
scoring with fairseq-eval-lm.

It is fairseq's own `truncated_bptt_lm` task (shipped in fairseq/examples/truncated_bptt: batch
row r is one contiguous stream, rows sharded across ranks, batches in order, never shuffled) plus
`--convert-from`, with one change to its data: fairseq's blocks each predict only their own next
tokens, so the first token of every block is never a target. Here row r is the split's token
stream cut into `--batch-size` x ranks contiguous pieces, and the targets run across block
boundaries: every token of the split is predicted once, from all of its history.

Each batch names its block (`net_input["stream_block"]`), and the model keeps each layer's final
state (detached: gradients stay inside a batch) for the next block of the same rows, as fairseq's
transformer_xl keeps its `_mems` (see T2RLanguageModel.forward). Block 0 (an epoch's start, every
validation) and a change of batch size start the streams over; training and evaluation keep
separate states. Batches the hub builds for .score/.sample (fairseq's own inference items) name no
block: there the model runs a plain forward and nothing carries over between calls.

Positions restart at every block: each block is a plain forward of --tokens-per-sample tokens, so
a model never sees a position it was not trained on (learned position tables end at
--max-target-positions, and a converted model learned its positions on blocks that short). What
reaches across blocks is the recurrent state alone.

`--distance-buckets 128,512,2048` makes fairseq-eval-lm also log the perplexity of the tokens at each
distance from their stream's start (a token's distance is block * --tokens-per-sample + its position):
what a long history is worth, bucket by bucket.
"""
import logging
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.data import data_utils
from fairseq.examples.truncated_bptt.truncated_bptt_lm_task import TruncatedBPTTLMConfig, TruncatedBPTTLMTask
from fairseq.tasks import register_task
from omegaconf import II

from .errors import T2RUsageError
from .history import next_token_inputs, token_stream
from .models import T2RLanguageModel
from .tasks import ConvertFromConfig, T2RTask

logger = logging.getLogger(__name__)


class StreamBatches(torch.utils.data.Dataset):
    """Item i: block i of each of this shard's rows, as (i, inputs, targets), each (rows, <= block).

    The split is one token stream (its lines in order, each ending in </s>); the input is the
    stream shifted right by one (</s> first), so the target at every position is the next token.
    The stream is cut into `rows * num_shards` pieces of equal length; the last is padded at its end,
    and padding is neither input to any real token nor a target."""

    def __init__(self, tokens: torch.Tensor, *, rows: int, block: int, shard_id: int, num_shards: int, eos: int,
                 pad: int):
        streams = rows * num_shards
        length = math.ceil(tokens.numel() / streams)
        padding = tokens.new_full((length * streams - tokens.numel(),), pad)
        inputs = torch.cat([next_token_inputs(tokens, eos), padding]).view(streams, length)
        targets = torch.cat([tokens, padding]).view(streams, length)
        mine = slice(shard_id * rows, (shard_id + 1) * rows)
        self.inputs, self.targets, self.block = inputs[mine], targets[mine], block
        self.sizes = [block] * len(self)  # fairseq reads dataset.sizes in places; every item is one batch

    def __len__(self):
        return math.ceil(self.inputs.size(1) / self.block)

    def __getitem__(self, i):
        window = slice(i * self.block, (i + 1) * self.block)
        return i, self.inputs[:, window].contiguous(), self.targets[:, window].contiguous()


@dataclass
class T2RTruncatedBPTTLMConfig(TruncatedBPTTLMConfig, ConvertFromConfig):
    # Optional here (fairseq's is not): fairseq-eval-lm without --batch-size reads one stream.
    batch_size: Optional[int] = II("dataset.batch_size")
    distance_buckets: Optional[str] = field(default=None, metadata={
        "help": "fairseq-eval-lm also logs the perplexity by distance from the stream start in buckets with "
                "these edges (increasing token counts): 128,512,2048 gives 0-128, 128-512, 512-2048, 2048+"})


def parse_distance_buckets(text):
    """'128,512,2048' -> (128, 512, 2048), or a T2RUsageError naming the fix."""
    try:
        edges = tuple(int(x) for x in text.split(","))
    except ValueError:
        edges = ()
    if not edges or edges[0] <= 0 or any(a >= b for a, b in zip(edges, edges[1:])):
        raise T2RUsageError(f"--distance-buckets {text}: give increasing positive token counts, comma-separated, "
                            f"e.g. --distance-buckets 128,512,2048")
    return edges


class DistanceBuckets:
    """The scored targets' log-probabilities summed by distance from their stream's start."""

    def __init__(self, edges, block, pad):
        self.edges, self.block, self.pad = torch.tensor(edges), block, pad
        bounds = (0, *edges)
        self.labels = [f"{a}-{b}" for a, b in zip(bounds, bounds[1:])] + [f"{edges[-1]}+"]
        self.nll = torch.zeros(len(self.labels), dtype=torch.float64)
        self.count = torch.zeros(len(self.labels), dtype=torch.long)
        self.offset = 0

    def add(self, lprobs, sample):
        """lprobs: (rows, time, vocab) for sample["target"]: the whole batch, or a flat piece of it
        when fairseq-eval-lm --softmax-batch splits the softmax (pieces come in order)."""
        target = sample["target"]
        scores = lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1).double().flatten()
        width = sample["net_input"]["src_tokens"].size(1)
        flat = torch.arange(self.offset, self.offset + scores.numel(), device=scores.device)
        distance = sample["net_input"]["stream_block"] * self.block + flat % width
        # As fairseq-eval-lm counts: padding is no token, and it skips infinite scores.
        keep = target.flatten().ne(self.pad) & scores.isfinite()
        bucket = torch.bucketize(distance[keep], self.edges.to(scores.device), right=True)
        self.nll += torch.bincount(bucket, weights=-scores[keep], minlength=len(self.labels)).cpu()
        self.count += torch.bincount(bucket, minlength=len(self.labels)).cpu()
        self.offset = (self.offset + scores.numel()) % sample["net_input"]["src_tokens"].numel()

    def line(self):
        cells = [f"{label} {math.exp(nll / n) if n else float('nan'):.2f} (n={n:,})"
                 for label, nll, n in zip(self.labels, self.nll.tolist(), self.count.tolist())]
        return "Perplexity by distance from the stream start: " + " | ".join(cells)


class _LogWhenDone:
    """fairseq-eval-lm's batch iterator, calling done() once the last batch has been scored (the
    scorer asks for the next batch only after scoring the one before)."""

    def __init__(self, iterator, done):
        self.iterator, self.done = iterator, done
        self.n = getattr(iterator, "n", 0)

    def __len__(self):
        return len(self.iterator)

    def __iter__(self):
        yield from self.iterator
        self.done()


@register_task("t2r_truncated_bptt_lm", dataclass=T2RTruncatedBPTTLMConfig)
class T2RTruncatedBPTTLMTask(T2RTask, TruncatedBPTTLMTask):
    def __init__(self, cfg, **kwargs):
        # kwargs: fairseq's setup_task passes from_checkpoint=True when a checkpoint is loaded
        # without a task (hub interface, load_model_ensemble); fairseq's own task takes none.
        if cfg.batch_size is None:
            cfg.batch_size = 1
            logger.info("reading 1 stream (--batch-size N reads N streams side by side)")
        self.distance_edges = parse_distance_buckets(cfg.distance_buckets) if cfg.distance_buckets else None
        self.distance = None  # DistanceBuckets while fairseq-eval-lm scores
        super().__init__(cfg)

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        if not isinstance(model, T2RLanguageModel) or model.decoder.options.softmax_layers:
            raise T2RUsageError("--task t2r_truncated_bptt_lm carries each layer's recurrent state between "
                                "batches: it needs a T2R language model (--arch t2r_lm*) whose every layer is T2R "
                                "(no --t2r-softmax-layers); for other models use --task language_modeling")
        if self.cfg.tokens_per_sample > model.max_positions():
            raise T2RUsageError(f"--tokens-per-sample {self.cfg.tokens_per_sample} is longer than the model's "
                                f"{model.max_positions()} positions; positions restart in every block, so a block "
                                f"of up to {model.max_positions()} tokens loses no context")
        if self.distance_edges:
            # fairseq's scorer computes each target's log-probability from this call alone; tapping
            # it here leaves the model, training and plain scoring untouched.
            normalized = model.get_normalized_probs

            def get_normalized_probs(net_output, log_probs, sample=None):
                probs = normalized(net_output, log_probs, sample)
                # log_probs False: an ensemble averages probabilities; its members' own are not its scores.
                if self.distance is not None and log_probs and sample and "stream_block" in sample["net_input"]:
                    self.distance.add(probs, sample)
                return probs

            model.get_normalized_probs = get_normalized_probs
        return model

    def eval_lm_dataloader(self, *args, **kwargs):
        iterator = super().eval_lm_dataloader(*args, **kwargs)
        if not self.distance_edges:
            return iterator
        self.distance = DistanceBuckets(self.distance_edges, self.cfg.tokens_per_sample, self.dictionary.pad())
        return _LogWhenDone(iterator, lambda: logger.info(self.distance.line()))

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        path = self.cfg.data.split(":")[(epoch - 1) % len(self.cfg.data.split(":"))] + f"/{split}"
        lines = data_utils.load_indexed_dataset(path, self.dictionary, combine=combine)
        if lines is None:
            raise FileNotFoundError(f"Dataset not found: {split} ({path})")
        tokens = token_stream(lines)
        self.datasets[split] = StreamBatches(
            tokens, rows=self.cfg.batch_size, block=self.cfg.tokens_per_sample, shard_id=self.cfg.data_parallel_rank,
            num_shards=self.cfg.data_parallel_size, eos=self.dictionary.eos(), pad=self.dictionary.pad())

    def _collate_fn(self, items):
        if len(items[0]) == 2:  # (i, [tokens]): fairseq's build_dataset_for_inference, the hub's .score/.sample
            return super()._collate_fn(items)
        (i, inputs, targets), = items  # every item is a whole batch
        real = targets.ne(self.dictionary.pad())
        return {"id": torch.arange(inputs.size(0)) + i * inputs.size(0),
                "net_input": {"src_tokens": inputs, "stream_block": i},
                "target": targets, "nsentences": inputs.size(0), "ntokens": int(real.sum())}
