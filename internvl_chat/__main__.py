"""`python -m internvl_chat …`: the same program as the `internvl-chat` command, for a checkout
run without installing (PYTHONPATH=. python -m internvl_chat)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
