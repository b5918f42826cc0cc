"""t2r_fairseq: finetune pretrained fairseq transformers into RNNs (T2R, Kasai et al. 2021).

Loaded by fairseq with `--user-dir t2r_fairseq`; importing registers the models, tasks and
criterions, and lets fairseq's CLIs read fairseq checkpoints under torch's safe loading.
"""
from .checkpoints import allow_fairseq_checkpoints

allow_fairseq_checkpoints()

from . import criterions, models, tasks  # noqa: E402,F401  (registration side effects)
