"""Safe loading of fairseq checkpoints: numpy scalars pickled under numpy 1 or numpy 2 both load."""
import io

import numpy as np
import pytest
import torch

import t2r_fairseq  # noqa: F401  (allows fairseq's checkpoint types under weights_only loading)


@pytest.mark.parametrize("module", [b"numpy.core.multiarray", b"numpy._core.multiarray"])
def test_numpy_scalars_load_whichever_numpy_wrote_them(module):
    buf = io.BytesIO()
    # The legacy format with pickle protocol 2 names globals as plain text lines ("c<module>\n<name>\n"),
    # so the module spelling of the other numpy major version can be substituted byte for byte.
    torch.save({"best_loss": np.float64(1.5), "indices": np.arange(3)}, buf, _use_new_zipfile_serialization=False)
    written = b"numpy._core.multiarray" if np.__version__ >= "2" else b"numpy.core.multiarray"
    raw = buf.getvalue()
    assert raw.count(written + b"\n") == 2
    state = torch.load(io.BytesIO(raw.replace(written + b"\n", module + b"\n")), weights_only=True)
    assert state["best_loss"] == 1.5 and state["indices"].tolist() == [0, 1, 2]
