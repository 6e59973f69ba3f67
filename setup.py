"""The one thing pyproject.toml cannot say: an install also puts `pl_dpo_lm_eval.pth` into site-packages, so that
lm-eval's own `lm_eval --model pl_dpo` finds pl_dpo's backend (pl_dpo/harness/lm_eval_hook.py says why and how)."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "pl_dpo_lm_eval.pth"  # after __editable__.pl_dpo-*.pth in sorted order: pl_dpo is importable by then
PTH_LINE = "import pl_dpo.harness.lm_eval_hook as hook; hook.install()\n"


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        # A wheel's root goes to site-packages. An editable (PEP 660) wheel is made of what `install_lib` holds,
        # not of build_lib, so the line goes there.
        root = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, PTH_NAME), "w") as f:
            f.write(PTH_LINE)


setup(cmdclass={"build_py": BuildPyWithPth})
