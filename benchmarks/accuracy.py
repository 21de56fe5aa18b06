"""Every method on the shared real samples at one equal budget: ``python -m benchmarks accuracy``.

Data (``../shared/data``; nothing else is ever used):

* ``zhanglab`` -- ZhangLab pediatric chest X-rays, the Kermany TRAIN split (1,341 normal, 400 pneumonia),
  at 128 x 128 (the SQUID protocol's size). Patient-disjoint split (a child's ``personNNN_bacteria`` and
  ``personNNN_virus`` images are one patient): train = 55 % of the normal patients, AR 0 (the SQUID
  protocol trains on normals only); val (model selection) and test (our dev-test) share the rest and the
  pneumonia patients. The official TEST split is held out and measured independently, so our dev-test
  is NOT the published protocol's figure (it is drawn from the TRAIN distribution and is easier: the
  classic detectors reach ~0.9 here against 0.81 for IF on the official TEST). Published image AUROC on
  the official TEST: SQUID 0.876, SALAD 0.827, IF 2D 0.810, MemAE 0.778.
* ``cxr`` -- 723 NIH ChestX-ray14 images at 64 x 64 (patient groups, AR 5 %, train fraction 0.4).
* ``msk`` -- 300 FracAtlas radiographs, carrier + segmentation, background masked, 64 x 64 (image ids as
  groups, AR 5 %, train fraction 0.3: 0.4 leaves 18 normals in val and test).
* ``demo`` -- the ``salad-med demo`` phantoms (600 patients, unchanged), 64 x 64, its split.
* factor rows (not in the default list): ``msk_nomask`` (FracAtlas without background masking), ``msk128``
  and ``msk256`` (FracAtlas masked at 128 / 256 px); same images, split parameters and seed as ``msk``;
  ``zhanglab64`` and ``zhanglab256`` (ZhangLab at 64 / 256 px, 256 from its 224 px copies; the same patient
  split as ``zhanglab``).

Methods: any registered method, as ``method[@preset][+key=value...]`` (``salad+train.rec_reduction=mean`` is
an ablation row); SALAD without a preset is the paper's recipe (pinned over ``configs/demo.yaml``). Any registered method (the default list ends with the survey comparators ``rdpp`` and its ablation
``rd``, whose SimCLR teacher is pre-trained inline once per data set with the same epoch budget);
``name@preset`` trains ``name`` with ``configs/<preset>.yaml`` layered on the budget (e.g.
``salad@salad_cpu``). An extra ``key=@name`` takes the run folder of method ``name`` on the same data set and
seed (trained first if missing): ``salad+model.init_from=@simclr`` starts SALAD from that SimCLR encoder;
``&`` gives the referenced run its own extras (``salad+model.init_from=@simclr&train.rounds=13`` starts it from a
SimCLR run trained longer).
The SALAD variants train on the split with its known anomalies (the paper's AR); every
other method trains on the same split without them (AR 0, as the paper's Table 1 MemDAE and DAE). Budget:
conv6, base 16 channels, batch 16, lr 1e-4, 10 + 4 x 5 epochs (30 epochs for every network; the classic
detectors fit once), K 20; the same for every method and seed; CPU seconds of each run are reported.
Method-specific settings of that budget are in ``METHOD_BUDGET`` (Uninformed Students: one S/2 window of
dense outputs per student step). The survey methods' frozen SimCLR teacher is trained (the same 30
epochs) once per data set and seed (``params.teacher_seed`` = the run's seed), cached and shared by the
survey methods of that seed: their spread over seeds includes the teacher's.

Each run is cached in the work folder (``runs/<dataset>/<method>/seed<k>/result.json``): an interrupted
benchmark continues where it stopped, and a finished one prints its tables again in seconds. Prints two
tables, method x data set: test AUC (mean +- std over seeds, and the mean bootstrap 95 % CI) and validation
AUC (mean +- std; the ZhangLab targets are on it), and writes ``accuracy.csv`` / ``accuracy.md``. Read the spread across seeds before the means: 300 test images give
roughly +- 0.06.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SALAD_MED_SHARED_DATA", REPO.parent / "shared" / "data"))  # as tests/conftest.py

_NO_CARRIER = ["data.dataset=folder", "preprocess.detect_carrier=false", "preprocess.segment=false"]
_MSK = dict(folder="msk_sample", labels=None, size=64, pre=["data.dataset=folder", "preprocess.apply_mask=true"],
            ar=0.05, tf=0.3, group="patient_bodypart")
_ZHANGLAB = dict(folder="zhanglab_train", labels="labels.csv", size=128, pre=_NO_CARRIER, ar=0.0, tf=0.55,
                 group="patient", budget=["train.pretrain_epochs=4", "train.rounds=3", "train.epochs_per_round=2"],
                 patient=r"^(person\d+)_")  # person1022_bacteria and person1022_virus are one child
#: dataset -> source folder, labels file, image size, preprocessing overrides, split parameters (``patient``: a
#: regular expression whose group is the patient id within the manifest's ``patient_id``, where files carry more)
DATASETS: dict[str, dict] = {
    "zhanglab": _ZHANGLAB,
    "cxr": dict(folder="cxr_sample", labels=None, size=64, pre=_NO_CARRIER, ar=0.05, tf=0.4, group="patient"),
    "msk": _MSK,
    # factor rows of docs/accuracy.md: FracAtlas without background masking, and at 128 / 256 px (same images,
    # same split seed and parameters)
    "msk_nomask": {**_MSK, "pre": ["data.dataset=folder"]},
    "msk128": {**_MSK, "size": 128},
    "msk256": {**_MSK, "size": 256},
    # ZhangLab at 64 / 256 px (the shared copies are 224 px: resolution up to the source's), same split
    "zhanglab64": {**_ZHANGLAB, "size": 64},
    "zhanglab256": {**_ZHANGLAB, "size": 256},
    "demo": dict(folder=None, labels=None, size=64, pre=["data.dataset=mura"], ar=0.05, tf=0.5,
                 group="patient_bodypart"),
}
#: The paper's recipe pinned over configs/demo.yaml (the demo preset only sets the budget today; a departure
#: added there later must not change what the ``salad`` row measures).
PAPER = {"train": {"rec_reduction": "sum"}}
#: The equal budget of every method (configs/demo.yaml + PAPER + these + the data set's size and budget:
#: ZhangLab at 128x128 trains 4 + 3 x 2 = 10 epochs, <= 10 CPU minutes per SALAD run on one core).
BUDGET = ["model.arch=conv6", "model.base_channels=16", "train.batch_size=16", "train.lr=1e-4",
          "train.pretrain_epochs=10", "train.rounds=4", "train.epochs_per_round=5", "train.k=20", "score.k=20",
          "data.num_workers=0", "train.device=cpu"]
DEFAULT_METHODS = ("salad,salad@salad_cpu,salad@official,salad+train.rec_reduction=mean,memdae,dae,deep_svdd,pixel_knn,pca,"
                   "iforest,ocsvm,simclr,spade,students,rdpp,rd")
#: Per-method settings of the equal budget, as ``f(image size) -> overrides``. Uninformed Students regress the
#: teacher's descriptors on one random S/2 x S/2 window per student step (``params.student_crop``; an unbiased
#: subsample of Eq. 6's pixel mean; on the whole image its grouped convolutions take ~9 s a step at 64 px on
#: one core) and validate every 10 epochs (``train.val_every``; 2 validations + the last epoch's): one
#: validation scores every pixel of the training normals (Eq. 10 statistics) and of the val split at 3 patch
#: sizes x (teacher + 3 students), ~130 s at 64 px on one core, 6x a student epoch. The training budget
#: (epochs, batch, lr) is everyone's; only model selection sees fewer candidates.
METHOD_BUDGET = {"students": lambda size: [f"params.student_crop={size // 2}", "train.val_every=10"]}
#: Methods trained on the split with its known anomalies (the paper's AR); the others get the AR 0 split.
AR_METHODS = {"salad", "salad_no_rec", "salad_no_agg"}


def _size(size: int) -> list[str]:
    return [f"data.image_size={size}", f"preprocess.size={size}"]


def prepare(name: str, work: Path) -> tuple[Path, Path]:
    """Preprocess and split a data set once; returns ``(split with known anomalies, AR 0 split)``."""
    import pandas as pd

    from salad_med.config import load_config
    from salad_med.data.preprocess_job import run_preprocess
    from salad_med.data.splits import make_split, write_split

    spec = DATASETS[name]
    out = work / "data" / name
    split_csv, ar0_csv = out / "split.csv", out / "split_ar0.csv"
    if split_csv.is_file() and ar0_csv.is_file():
        return split_csv, ar0_csv
    cfg = load_config("demo", [*spec["pre"], *_size(spec["size"]), "preprocess.workers=1"])
    if name == "demo":
        manifest_path = _demo_phantoms(cfg, out)
    else:
        src = SHARED / spec["folder"]
        labels = str(src / spec["labels"]) if spec["labels"] else None
        summary = run_preprocess("folder", src, out / "preprocessed", cfg, labels=labels)
        print(f"{name}: {summary.line()}", flush=True)
        manifest_path = summary.manifest_path
    m = pd.read_csv(manifest_path, dtype=str, keep_default_na=False)
    m = m[m["status"] != "failed"].copy()
    m["label"] = m["label"].astype(int)
    if spec.get("patient"):
        pid = m["patient_id"].str.extract(spec["patient"], expand=False)
        m["patient_id"] = pid.fillna(m["patient_id"])
    split = make_split(m, anomalous_ratio=spec["ar"], train_fraction=spec["tf"], group=spec["group"], seed=0)
    params = {"dataset": name, "anomalous_ratio": spec["ar"], "train_fraction": spec["tf"], "group": spec["group"]}
    write_split(split, split_csv, params)
    ar0 = split[~((split["split"] == "train") & (split["label"] == 1))]
    write_split(ar0, ar0_csv, {**params, "known_anomalies_removed": True})
    counts = split.groupby(["split", "label"]).size().to_dict()
    print(f"{name}: split (split, label) -> images {counts}", flush=True)
    return split_csv, ar0_csv


def _demo_phantoms(cfg, out: Path) -> Path:
    """The demo's phantoms (its defaults) preprocessed like ``salad-med demo``; returns the manifest."""
    from salad_med.data.preprocess_job import run_preprocess
    from salad_med.demo import DEMO_ANOMALY_SCALE, DEMO_BODY_PARTS, DEMO_PATIENTS, DEMO_SPEC_OVERRIDES
    from salad_med.synthetic.phantom import generate_demo_dataset

    side = max(64, 2 * cfg.preprocess.size)
    generate_demo_dataset(out / "phantoms", n_patients=DEMO_PATIENTS, size=(side, max(64, side - side // 8)),
                          seed=cfg.seed, n_dicom=0, anomaly_scale=DEMO_ANOMALY_SCALE,
                          body_parts=tuple(DEMO_BODY_PARTS), spec_overrides=DEMO_SPEC_OVERRIDES)
    summary = run_preprocess("mura", out / "phantoms" / "mura", out / "preprocessed", cfg)
    print(f"demo: {summary.line()}", flush=True)
    return summary.manifest_path


def run_one(dataset: str, entry: str, seed: int, work: Path, splits: tuple[Path, Path], n_boot: int) -> dict:
    """Train + evaluate one ``method[@preset]`` x seed (cached in its run folder)."""
    from salad_med.config import load_config
    from salad_med.engine.trainer import train_from_manifest
    from salad_med.evaluation.evaluate import evaluate_run
    from salad_med.methods.registry import get_method

    name, *extra = entry.split("+")  # method[@preset][+key=value...]: extra overrides (ablation rows)
    method, _, preset = name.partition("@")
    run_dir = work / "runs" / dataset / entry.replace("@", "_at_").replace("+", "_with_").replace("=", "-").replace("&", "_and_") / f"seed{seed}"
    cached, where = run_dir / "result.json", {"run_dir": str(run_dir.relative_to(work))}
    if cached.is_file():
        return {**json.loads(cached.read_text()), **where}
    spec = DATASETS[dataset]
    get_method(method)  # unknown names fail here, before any training
    # ``key=@name``: the run folder of method ``name`` on this data set and seed (trained first if missing),
    # e.g. ``salad+model.init_from=@simclr`` starts SALAD from the SimCLR run's encoder
    for i, kv in enumerate(extra):
        key, _, value = kv.partition("=")
        if value.startswith("@"):  # "@simclr&train.rounds=13": the referenced run with its own extras
            source = run_one(dataset, value[1:].replace("&", "+"), seed, work, splits, n_boot)
            extra[i] = f"{key}={(work / source['run_dir']).resolve()}"
    split = splits[0] if method in AR_METHODS else splits[1]
    per_method = METHOD_BUDGET.get(method, lambda size: [])(spec["size"])
    if any(f.name == "teacher_seed" for f in get_method(method).params_fields()):
        per_method.append(f"params.teacher_seed={seed}")  # each seed its own SimCLR teacher: the spread includes it
    overrides = [*BUDGET, *spec.get("budget", []), *per_method, *spec["pre"], *_size(spec["size"]), f"train.method={method}",
                 f"seed={seed}", f"data.cache_dir={(work / 'cache' / dataset).resolve()}", *extra]
    import yaml

    # configs/demo.yaml, the paper's defaults, the preset, then the budget, the data set and the extras
    paper = work / "presets" / "paper.yaml"
    paper.parent.mkdir(parents=True, exist_ok=True)
    paper.write_text(yaml.safe_dump({"base": ["demo"], **PAPER}))
    config = paper
    if preset:
        config = work / "presets" / f"{preset}.yaml"
        config.write_text(yaml.safe_dump({"base": [str(paper.resolve()),
                                                   str((REPO / "configs" / f"{preset}.yaml").resolve())]}))
    cfg = load_config(config, overrides)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    trained = train_from_manifest(cfg, split, run_dir, overwrite=True)
    cpu = time.process_time() - cpu0
    ev = evaluate_run(run_dir, "test", run_dir / "eval-test", n_boot=n_boot, seed=seed, plots=False,
                      report=False)  # metrics only (the report's occlusion maps with TTA took > 3 min a run)
    result = {"dataset": dataset, "method": entry, "seed": seed, "val_auc": trained["best_val_auc"],
              "test_auc": ev["auc"], "test_auc_ci95": ev["auc_ci95"], "test_auprc": ev["auprc"],
              "best_epoch": trained["best_epoch"], "epochs": trained["epochs"], "steps": trained["steps"],
              "cpu_s": round(cpu, 1), "wall_s": round(time.perf_counter() - wall0, 1),
              "split": split.name, "n_test": ev["n"], "n_test_abnormal": ev["n_abnormal"]}
    cached.write_text(json.dumps(result, indent=2))
    return {**result, **where}


def summarise(rows: list[dict]):
    """Mean, sample std and mean CI bounds of test AUC per data set x method (order of appearance)."""
    import pandas as pd

    df = pd.DataFrame(rows)

    def std(v):  # sample std over seeds; NaN for one seed
        return v.std(ddof=1) if len(v) > 1 else float("nan")

    out = []
    for (dataset, method), g in df.groupby(["dataset", "method"], sort=False):
        out.append({"dataset": dataset, "method": method, "seeds": len(g), "test_auc_mean": g["test_auc"].mean(),
                    "test_auc_std": std(g["test_auc"]),
                    "ci_lo_mean": g["test_auc_ci95"].map(lambda c: c[0]).mean(),
                    "ci_hi_mean": g["test_auc_ci95"].map(lambda c: c[1]).mean(),
                    "val_auc_mean": g["val_auc"].mean(), "val_auc_std": std(g["val_auc"]),
                    "cpu_s_mean": g["cpu_s"].mean()})
    return pd.DataFrame(out)


def markdown(summary, split: str = "test") -> str:
    """``method | dataset ...`` table: ``test`` AUC mean +- std (seeds) [mean 95 % CI], or ``val`` (the model
    selection split: mean +- std over seeds; the trainer's validation AUC carries no bootstrap CI)."""
    datasets = list(dict.fromkeys(summary["dataset"]))
    lines = ["| method | " + " | ".join(datasets) + " |", "|---|" + "---|" * len(datasets)]
    for method in dict.fromkeys(summary["method"]):
        cells = []
        for d in datasets:
            r = summary[(summary["method"] == method) & (summary["dataset"] == d)]
            if r.empty:
                cells.append("")
                continue
            r = r.iloc[0]
            mean, sd = r[f"{split}_auc_mean"], r[f"{split}_auc_std"]
            std = f" ± {sd:.3f}" if sd == sd else ""
            ci = f" [{r.ci_lo_mean:.2f}-{r.ci_hi_mean:.2f}]" if split == "test" else ""
            cells.append(f"{mean:.3f}{std} ({int(r.seeds)}){ci}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="zhanglab,cxr,msk,demo")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="registered methods, optionally @preset")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--workdir", type=Path, default=REPO / ".bench" / "accuracy")
    parser.add_argument("--n-boot", type=int, default=500)
    args = parser.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", "2")
    import pandas as pd

    if not SHARED.is_dir():
        print(f"shared data not found at {SHARED}: skipped")
        return 0
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    rows = []
    for dataset in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        if dataset != "demo" and not (SHARED / DATASETS[dataset]["folder"]).is_dir():
            print(f"{dataset}: {SHARED / DATASETS[dataset]['folder']} not found: skipped")
            continue
        splits = prepare(dataset, work)
        for method in methods:
            for seed in seeds:
                r = run_one(dataset, method, seed, work, splits, args.n_boot)
                rows.append(r)
                print(f"  {dataset} {method} seed {seed}: test AUC {r['test_auc']:.3f} "
                      f"[{r['test_auc_ci95'][0]:.3f}-{r['test_auc_ci95'][1]:.3f}] (val {r['val_auc']:.3f}, "
                      f"epoch {r['best_epoch']}/{r['epochs']}, {r['cpu_s']:.0f} CPU s)", flush=True)
    if not rows:
        return 0
    summary = summarise(rows)
    table = ("test AUC, mean ± std over seeds (number of seeds) [mean bootstrap 95 % CI]\n\n" + markdown(summary)
             + "\n\nvalidation AUC (model selection; the ZhangLab targets are on it), mean ± std over seeds\n\n"
             + markdown(summary, "val"))
    print("\n" + table)
    pd.DataFrame(rows).to_csv(work / "accuracy_runs.csv", index=False)
    summary.to_csv(work / "accuracy.csv", index=False, float_format="%.4f")
    (work / "accuracy.md").write_text(table + "\n")
    print(f"wrote {work / 'accuracy.csv'} and {work / 'accuracy.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
