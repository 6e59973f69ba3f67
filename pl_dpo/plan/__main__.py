"""`python -m pl_dpo.plan --config=... --topology=...`: see pl_dpo.plan (the package doc) and pl_dpo.plan.cli."""

import sys

from pl_dpo.plan.cli import main

sys.exit(main())
