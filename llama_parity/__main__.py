"""`python -m llama_parity ...` is `llama-parity ...`; what torchrun runs on each rank:

    torchrun --nproc-per-node 2 -m llama_parity verify --meta-dir META --hf-dir HF
"""

import sys

from llama_parity.cli import main

if __name__ == "__main__":
    sys.exit(main())
