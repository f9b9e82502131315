"""``python -m medseg`` (also what ``torchrun -m medseg train ...`` runs)."""

from __future__ import annotations

import sys

from medseg.cli.main import main

sys.exit(main())
