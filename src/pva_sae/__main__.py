"""``python -m pva_sae`` (and ``torchrun -m pva_sae``): the ``pva-sae`` command."""

import sys

from pva_sae.cli import main

sys.exit(main())
