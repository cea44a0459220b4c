"""Print the numbers the README's ablation prose needs, from the assembled ablation.json (or the out files)."""
import json
import sys
from pathlib import Path

import numpy as np

OUT = Path("/work/runs/s13/out")


def runs(steps, row):
    got = {}
    for seed in (0, 1, 2):
        f = OUT / f"out-{steps}-{seed}-{row}.json"
        if f.is_file() and f.stat().st_size:
            r = list(json.loads(f.read_text())["rows"].values())[0]
            got[seed] = r
    return got


def fmt(steps, row, metric="scene_accuracy"):
    got = runs(steps, row)
    v = np.array([r[metric] for r in got.values()])
    if not len(v):
        return f"{row}@{steps}: -"
    s = f"{v.mean():.3f}" + (f" ± {v.std(ddof=1):.3f}" if len(v) > 1 else "")
    return f"{row}@{steps} {metric[:4]}: {s} ({' / '.join(f'{x:.3f}' for x in v)}) n={len(v)}"


rows = sys.argv[1:] or None
for steps, names in ((2400, ["gap-none", "noise-scale-4"]), (1500, ["maccap-multi-no-noise", "maccap-multi-noise"]),
                     (500, ["gap-none", "gap-noise", "gap-mean", "gap-mean-std", "gap-mean-std-noise",
                            "noise-scale-0.25", "noise-scale-1", "noise-scale-2", "noise-scale-4", "tomcap-k1",
                            "tomcap-k2", "tomcap-k6", "no-retrieval", "maccap-single-no-noise",
                            "maccap-single-noise", "maccap-multi-no-noise", "maccap-multi-noise", "capdec-no-noise",
                            "capdec-noise", "maccap-s1", "maccap-cls", "maccap-s20"])):
    for name in names:
        print(fmt(steps, name), "|", fmt(steps, name, "text_to_text_scene_accuracy").split(": ", 1)[1])
