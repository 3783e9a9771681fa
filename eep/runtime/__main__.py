"""`python -m eep.runtime FD`: start one rank process (see `eep.runtime.rank.main`).

The rank's code lives in `eep.runtime.rank`, imported under its own name rather than run as
`__main__` (as a fork server's child runs it).
"""

import sys

from eep.runtime.rank import main

main(sys.argv)
