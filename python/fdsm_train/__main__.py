"""``python -m fdsm_train`` (what ``torchrun -m fdsm_train`` runs): the ``fdsm-train`` command."""

import sys

from .cli import main

sys.exit(main())
