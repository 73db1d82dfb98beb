"""``python -m tl_degeneracy``: the same as the ``tl-degeneracy`` command."""

import sys

from tl_degeneracy.run.cli import main

if __name__ == "__main__":
    sys.exit(main())
