"""fairseq-train that SIGKILLs itself right after writing the checkpoint at a given update: a crash
at a known point, whatever the machine's speed (no polling, no sleeps).

    python tests/sigkill_after_checkpoint.py UPDATE <fairseq-train arguments>
"""
import os
import signal
import sys

from fairseq import checkpoint_utils
from fairseq_cli.train import cli_main


def main():
    kill_at = int(sys.argv.pop(1))
    save_checkpoint = checkpoint_utils.save_checkpoint

    def save_then_die(cfg, trainer, epoch_itr, val_loss):
        saved = save_checkpoint(cfg, trainer, epoch_itr, val_loss)
        if trainer.get_num_updates() == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return saved

    # fairseq_cli.train looks save_checkpoint up on the module at each call.
    checkpoint_utils.save_checkpoint = save_then_die
    sys.argv[0] = "fairseq-train"
    cli_main()


if __name__ == "__main__":
    main()
