"""Old (ead3bb9) vs new feature_constraint, alternated on the same class cells; seconds per run.

    git show ead3bb9:engine/methods/feature_constraint.py > var/fc_old.py
    .venv/bin/python docs/bench/robust/round4/ab_graphless.py n4000,n2000,n1000,classes5,noise5,mlp 0,1 out.json

Originals come from the suite's cache (`var/bench-cache`), trained on first use.
"""
import importlib.util, json, statistics as st, sys, time
from pathlib import Path
import numpy as np, torch
from engine.bench import forget_set, original_model
from engine.methods import make_method
from engine.methods.base import UnlearnContext
from engine.runtime import DeviceData, Reporter, pick_device
from engine.suite import CONFIGURATIONS
from engine.training import Recipe
torch.set_num_threads(1)
spec = importlib.util.spec_from_file_location("fc_old", "var/fc_old.py")
fc_old = importlib.util.module_from_spec(spec); sys.modules["fc_old"] = fc_old; spec.loader.exec_module(fc_old)
out = []
for name in sys.argv[1].split(","):
    for seed in [int(s) for s in sys.argv[2].split(",")]:
        conf = CONFIGURATIONS[name]; ds = conf.dataset(seed); dev = pick_device(None)
        data = DeviceData(ds, dev); rec = Recipe(**{**Recipe().to_dict(), "seed": seed})
        orig, _ = original_model(conf.arch, data, rec, Path("var/bench-cache"))
        orig = orig.eval()
        for p in orig.parameters():
            p.requires_grad_(False)
        forget = forget_set(ds, "class", seed); retain = np.setdiff1d(ds.train_indices, forget)
        def ctx():
            return UnlearnContext(arch=conf.arch, num_classes=ds.num_classes, data=data, original=orig,
                forget_idx=forget.astype(np.int64), retain_idx=retain.astype(np.int64),
                heldout_idx=ds.calibration_indices, recipe=rec, teacher_seed=10_000 + seed, seed=seed,
                reporter=Reporter(None, None), reference_stats=None)
        times = {"old": [], "new": []}; steps = {}
        for _ in range(3):
            for label in ("old", "new"):
                m = fc_old.FeatureConstraint() if label == "old" else make_method("feature_constraint")
                t = time.perf_counter(); o = m.run(ctx()); times[label].append(time.perf_counter() - t)
                steps[label] = (o.steps, o.extra["selected_step"])
        r = {"configuration": name, "seed": seed, "old_s": times["old"], "new_s": times["new"], "steps": steps,
             "ratio_new_to_old": st.median(times["new"]) / st.median(times["old"])}
        out.append(r); print(json.dumps(r), flush=True)
Path(sys.argv[3]).write_text(json.dumps(out, indent=1))
