"""The offline converter `t2r-convert` (`python -m t2r_fairseq.convert`): a softmax checkpoint file
in, a T2R checkpoint file out (the weight transfer itself is transfer.py)."""
import argparse
import logging
import os
import sys
import uuid
from typing import List

import torch
from fairseq.dataclass.utils import gen_parser_from_dataclass

from .checkpoints import load_checkpoint
from .errors import T2RUsageError
from .options import T2R_DEFAULTS, T2RConfig
from .transfer import convert_state

logger = logging.getLogger(__name__)


def _check_output_path(input_path: str, output_path: str):
    if os.path.isdir(output_path):
        raise T2RUsageError(f"--output {output_path} is a directory; give a file name, e.g. "
                            f"{os.path.join(output_path, 't2r.pt')}")
    if os.path.exists(output_path) and os.path.exists(input_path) and os.path.samefile(input_path, output_path):
        raise T2RUsageError(f"--output {output_path} is the input checkpoint {input_path}; writing it would "
                            f"overwrite the softmax model: give another --output")


def atomic_torch_save(obj, path: str):
    """Write beside `path` under a temporary name, then rename: never a half-written checkpoint.
    The file's mode follows the umask, as fairseq's own checkpoints do (mkstemp would make it 0600)."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".t2r-convert-{uuid.uuid4().hex[:12]}.tmp")
    try:
        os.makedirs(directory, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(obj, f)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:  # a read-only directory, a parent that is a file, a full disk, ...
        raise T2RUsageError(f"cannot write --output {path}: {e.strerror or e}") from None


def convert_checkpoint(input_path: str, output_path: str, **overrides) -> List[str]:
    """Convert the softmax checkpoint at input_path into a T2R one at output_path, with T2R options
    given as T2RConfig's field names (t2r_feature_dim=16, ...); returns the names of the new tensors."""
    _check_output_path(input_path, output_path)
    state, new_keys = convert_state(load_checkpoint(input_path), input_path, overrides)
    atomic_torch_save(state, output_path)
    return new_keys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="t2r-convert", description="Convert a fairseq softmax transformer checkpoint (transformer_lm* or "
        "transformer*) into a T2R checkpoint of the matching t2r_* architecture. Weights are copied unchanged; "
        "feature maps are freshly initialized. Finetune with fairseq-train --finetune-from-model. T2R options "
        "not given take the t2r_* architecture's defaults.")
    parser.add_argument("--input", required=True, help="softmax checkpoint (.pt)")
    parser.add_argument("--output", required=True, help="where to write the T2R checkpoint")
    # The same flags, choices and help as fairseq-train's, generated from the one dataclass.
    gen_parser_from_dataclass(parser, T2RConfig(), delete_default=True)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    replaced = os.path.isfile(args.output)
    try:
        new_keys = convert_checkpoint(args.input, args.output, **{name: getattr(args, name) for name in T2R_DEFAULTS})
    except T2RUsageError as e:
        print(f"t2r-convert: error: {e}", file=sys.stderr)
        return 2
    # An existing output is replaced, as fairseq-train replaces its checkpoints; said, so it is never a surprise.
    logger.info(f"wrote {args.output}{' (replaced the file that was there)' if replaced else ''}: "
                f"{len(new_keys)} new tensors ({', '.join(new_keys)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
