"""``python -m harness``: the command line as a module, which is how torchrun launches one
process per GPU: ``torchrun --nproc-per-node 8 -m harness run SUITE``."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
