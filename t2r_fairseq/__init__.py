"""t2r_fairseq: finetune pretrained fairseq transformers into RNNs (T2R, Kasai et al. 2021).

Loaded by fairseq with `--user-dir t2r_fairseq`; importing registers the models, tasks and
criterions, lets fairseq's CLIs read fairseq checkpoints under torch's safe loading, and has
them print the plugin's usage errors (a bad flag or file) as one line (see errors.py).
"""
from .checkpoints import allow_fairseq_checkpoints
from .errors import report_usage_errors_in_one_line

allow_fairseq_checkpoints()
report_usage_errors_in_one_line()

from . import criterions, models, streams, tasks  # noqa: E402,F401  (registration side effects)
