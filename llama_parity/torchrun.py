"""`python -m llama_parity.torchrun ARGS`: torchrun (same arguments) ending as single-process verify.

    python -m llama_parity.torchrun --standalone --nproc-per-node 8 -m llama_parity verify --meta-dir M --hf-dir H

torchrun's own process is PyTorch's: stopped by a signal it prints a traceback and exits 1 (the
"parity failed" code). This runs the same launcher in a process of ours, which answers
SIGINT/SIGTERM/SIGHUP with one line and 130/143/129 (distributed.torchrun_main).
"""

import sys

from llama_parity.distributed import torchrun_main

if __name__ == "__main__":
    sys.exit(torchrun_main(sys.argv[1:]))
