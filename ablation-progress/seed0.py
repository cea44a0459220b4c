"""Score the recipe's full-length rows' seed 0 on the build's own training: its run dir copied to the row's."""
import shutil
import sys
from pathlib import Path

import training.shapes.ablate as ablate

W = Path("/work/runs/s13/fresh/build")
method, steps, row = sys.argv[1], sys.argv[2], sys.argv[3]
real = ablate.run_command


def from_the_build(argv):
    run = Path(argv[argv.index("--run-dir") + 1])
    if not run.exists():
        shutil.copytree(W / f"{method}-run", run)
    real(argv)


ablate.run_command = from_the_build
sys.exit(ablate.main(["--work-dir", str(W), "--weights", "/work/wt-abl2/weights/shapes", "--steps", steps, "--n", "500",
                      "--train-seeds", "0", "--only", row, "--json"]))
