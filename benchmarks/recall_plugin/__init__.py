"""A benchmark-only fairseq plugin for `python -m benchmarks.recall`: t2r_fairseq's models and tasks
plus a criterion that scores only the answers of a multi-query associative recall line.

fairseq's --user-dir takes one directory, so this one imports t2r_fairseq (registering everything it
has) and adds `recall_answers`; the package itself stays free of benchmark code.
"""

import torch
import torch.nn.functional as F
from fairseq import metrics
from fairseq.criterions import register_criterion
from fairseq.criterions.cross_entropy import CrossEntropyCriterion, CrossEntropyCriterionConfig

import t2r_fairseq  # noqa: F401  (registers the T2R models and tasks)

KEY_PREFIX = "k"  # keys are the words k0, k1, ...; values v0, v1, ...


def key_table(dictionary) -> torch.Tensor:
    """(vocab,) bool: which dictionary entries are keys."""
    return torch.tensor([s.startswith(KEY_PREFIX) and s[1:].isdigit() for s in dictionary.symbols])


def answer_mask(src_tokens: torch.Tensor, is_key: torch.Tensor) -> torch.Tensor:
    """src_tokens: (batch, time) inputs; is_key: (vocab,) bool. Returns (batch, time) bool, True where the
    input is a key that already occurred earlier in its line: a query, so the next token (the target at
    that position) is the value the key was paired with. Keys are distinct among the pairs, so a key's
    first occurrence is its pair and any later one a query."""
    t = src_tokens.size(1)
    earlier = torch.ones(t, t, dtype=torch.bool, device=src_tokens.device).tril(-1)
    seen = ((src_tokens[:, :, None] == src_tokens[:, None, :]) & earlier).any(-1)
    return is_key.to(src_tokens.device)[src_tokens] & seen


@register_criterion("recall_answers", dataclass=CrossEntropyCriterionConfig)
class RecallAnswersCriterion(CrossEntropyCriterion):
    """Cross-entropy on the answer positions only: keys and values of the pairs are random, so their loss
    is irreducible noise that would drown the signal (Zoology trains MQAR this way). Logs accuracy."""

    def __init__(self, task, sentence_avg):
        super().__init__(task, sentence_avg)
        self.is_key = key_table(task.target_dictionary)

    def forward(self, model, sample, reduce=True):
        net_output = model(**sample["net_input"])
        lprobs = model.get_normalized_probs(net_output, log_probs=True)
        mask = answer_mask(sample["net_input"]["src_tokens"], self.is_key)
        target = sample["target"][mask]
        lprobs = lprobs[mask]
        loss = F.nll_loss(lprobs, target, reduction="sum")
        n = int(mask.sum())
        logging_output = {"loss": loss.data, "ntokens": n, "nsentences": sample["target"].size(0), "sample_size": n,
                          "correct": int((lprobs.argmax(-1) == target).sum())}
        return loss, n, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        correct = sum(log.get("correct", 0) for log in logging_outputs)
        total = sum(log.get("sample_size", 0) for log in logging_outputs)
        metrics.log_scalar("acc", 100 * correct / max(total, 1), total, round=1)
