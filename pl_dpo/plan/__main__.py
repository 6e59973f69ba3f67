"""`python -m pl_dpo.plan --config=... --topology=...`: see pl_dpo.plan.planner."""

import sys

from pl_dpo.plan.planner import main

sys.exit(main())
