"""``python -m fastlora.cli``: the ``fastlora`` command (src/fastlora/app/cli.py) started as a
module, as launchers do (``torchrun --nproc-per-node 2 -m fastlora.cli train``)."""
import sys

from .app.cli import main

if __name__ == "__main__":
    sys.exit(main())
