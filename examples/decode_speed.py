"""Generation cost as the prefix grows: per-token time and the bytes held in fairseq's
incremental_state, for any fairseq language model (softmax: a key/value cache that grows with
the prefix; T2R: a recurrent state of constant size).

Decoding goes through fairseq's own incremental path, exactly as fairseq-generate drives it: one
`model.decoder(tokens[:, :t + 1], incremental_state=state)` call per new token.
"""
import statistics
import time
from typing import Dict, List

import torch


def prefix_lengths(max_prefix: int, start: int = 64) -> List[int]:
    """start, 2 * start, ... up to max_prefix (max_prefix itself always included)."""
    lengths = []
    length = min(start, max_prefix)
    while length < max_prefix:
        lengths.append(length)
        length *= 2
    return lengths + [max_prefix]


def state_bytes(incremental_state: Dict[str, Dict[str, object]]) -> int:
    """Bytes of every tensor the model keeps between decode steps."""
    return sum(t.numel() * t.element_size() for buffer in incremental_state.values()
               for t in buffer.values() if torch.is_tensor(t))


def load_lm(path: str):
    """A fairseq LM checkpoint, loaded by fairseq's own loader, on CPU, in eval mode."""
    from fairseq import checkpoint_utils

    import t2r_fairseq  # noqa: F401  (registers t2r_lm / t2r_language_modeling; safe checkpoint loading)

    models, _ = checkpoint_utils.load_model_ensemble([str(path)])
    return models[0].eval()


@torch.no_grad()
def measure_decoding(model, lengths: List[int], timed_steps: int = 16, seed: int = 0) -> List[dict]:
    """Decode one sequence token by token up to max(lengths) + timed_steps. For each L in lengths:
    ms_per_token is the median time of the `timed_steps` steps that follow a prefix of L tokens
    (median: the machine may be shared), state_bytes what incremental_state holds after L tokens.

    Tokens are random ids: the cost of a decode step does not depend on which tokens they are.
    """
    vocab = len(model.decoder.dictionary)
    generator = torch.Generator().manual_seed(seed)
    total = max(lengths) + timed_steps
    tokens = torch.randint(model.decoder.dictionary.nspecial, vocab, (1, total), generator=generator)
    state: Dict[str, Dict[str, object]] = {}
    seconds, held = [], {}
    for t in range(total):
        start = time.perf_counter()
        model.decoder(tokens[:, :t + 1], incremental_state=state)
        seconds.append(time.perf_counter() - start)
        if t + 1 in lengths:
            held[t + 1] = state_bytes(state)
    return [{"prefix": L, "ms_per_token": 1000 * statistics.median(seconds[L:L + timed_steps]),
             "state_bytes": held[L]} for L in lengths]
