"""Issue 37's table: each technique against the plain run at the same compute, from ``bench_arms.py`` folders.

    PYTHONPATH=. python scripts/bench_techniques.py ARMS [ARMS_SEED2 ...] --test-images DIR --test-labels DIR \\
        [--plain plain] [--predict-args snapshots="--checkpoint snapshots"] [--student STUDENT_ARMS] \\
        [-o OUT] [--threads 1] [--skip crf] [--dry-run]

``ARMS`` is the output of ``scripts/bench_arms.py ... --fold K --find-best`` (``arms.json``, ``work_<arm>``,
``metrics_<arm>.json``): one row per arm (technique = its train arguments) with iterations, training seconds,
the fold's final validation Dice, held-out Dice / HD95 (``medseg predict`` with find-best's choice), prediction
seconds, total compute (training + prediction) and the difference to the plain arm. Rows derived without
training (every step's command is printed and stored, its result cached under ``OUT``, so a re-run only
does what is missing):

- held-out probabilities of every arm (``medseg predict --save-probabilities --no-postprocessing``, timed);
- ensemble rules: those find-best reported in an arm's ``best.json`` (only when it has several members), and a
  cross-arm ensemble: the arms' validation predictions copied into one work folder as configurations named after
  the arms (a work folder holds one run per configuration/architecture/fold, and the arms share those), ranked by
  ``medseg find-best``; each rule (mean, weighted, vote, stacking) of all arms scored on the fold's validation cases
  (the fitted rules cross-fitted on two halves of them: one fold has no other folds to fit on) and on the held-out
  cases (fitted on every validation case), from the raw probabilities (no postprocessing);
- dense CRF: ``find-best --try-crf`` on a copy of the plain arm's work folder, then ``predict --postprocess crf``;
- distillation: the student command for the lead (teachers: every arm's run) and, with ``--student``, the
  student's held-out Dice and prediction seconds against the teacher ensemble (the mean of the arms).

Writes ``OUT/techniques.json`` and ``OUT/techniques.md`` (default ``OUT``: ``ARMS/techniques``); subprocesses
run with ``OMP_NUM_THREADS=--threads``. ``--dry-run`` runs nothing: it prints the commands and assembles the
table from the results already cached. Nothing is written into the arm folders.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers beside this script

from technique_table import (  # noqa: E402
    RULES,
    Case,
    Runner,
    arm_run,
    build_cross_work,
    class_index,
    copy_work,
    distill_row,
    fmt,
    fold_dice,
    header,
    load_probs,
    mean_fg_dice,
    medseg_cmd,
    read_labels,
    render,
    rule_scores,
    show,
)

from medseg.ensembling.references import reference_loader  # noqa: E402
from medseg.io.workdir import WorkDir  # noqa: E402
from medseg.planning.plan import Plan  # noqa: E402


def train_command(arm: dict[str, Any], work: Path, fold: str) -> str:
    """How ``arm`` (a row of ``arms.json``) was trained: its ``medseg train`` line, or, for an arm that
    ``bench_arms.py --reuse`` copied from an earlier run, where that run came from (its command is not known)."""
    if arm.get("reused_from"):
        return f"(trained earlier in {arm['reused_from']}; copied, not retrained)"
    return show(medseg_cmd("train", str(work), "--fold", fold, *arm["train_args"]))


class Bench:
    """The table's rows for one arms folder (see the module docstring)."""

    def __init__(self, arms_dir: Path, args: argparse.Namespace, runner: Runner) -> None:
        self.dir, self.args, self.runner = arms_dir, args, runner
        self.tag = arms_dir.name
        self.arms = json.loads((arms_dir / "arms.json").read_text())
        self.works = {a["arm"]: arms_dir / f"work_{a['arm']}" for a in self.arms}
        self.plain = next((a for a in self.arms if a["arm"] == args.plain), None)
        self.refs = read_labels(args.test_labels) if args.test_labels.is_dir() else {}
        self.rows: list[dict[str, Any]] = []

    def predict_cmd(self, arm: str, out: Path, *extra: str) -> list[str]:
        """``medseg predict`` of an arm: its ``--predict-args``; without find-best's choice, the run's architecture."""
        a, work = self.args, self.works[arm]
        given = a.predict_args.get(arm, [])
        run = arm_run(work, a.fold)
        if "--arch" not in given and not WorkDir(work).best.is_file() and run is not None:
            given = [*given, "--arch", run.parent.name]
        return medseg_cmd(
            "predict", "-i", str(a.test_images), "-o", str(out), "-m", str(work), "-q", *given, *extra
        )  # fmt: skip

    def heldout_probs(self, arm: str) -> tuple[dict[str, np.ndarray], float | None]:
        """``({case: (K, Z, Y, X) probabilities}, prediction seconds)`` of an arm on the held-out cases (raw)."""
        out = self.runner.out / self.tag / f"probs_{arm}"
        cmd = self.predict_cmd(arm, out, "--save-probabilities", "--no-postprocessing", "--overwrite")
        res = self.runner.step(f"{self.tag}/probs_{arm}", [cmd], lambda: {})
        if res is None:
            return {}, None
        return {p.stem: load_probs(p) for p in sorted(out.glob("*.npz"))}, res["seconds"][0]

    def raw_dice(self, probs: dict[str, np.ndarray], label_ids: Sequence[int]) -> float | None:
        cases = [c for c in probs if c in self.refs]
        if not cases:
            return None
        k = len(label_ids)
        return float(
            np.mean([mean_fg_dice(probs[c].argmax(0), class_index(self.refs[c], label_ids), k) for c in cases])
        )

    def arm_rows(self, label_ids: Sequence[int]) -> dict[str, dict[str, np.ndarray]]:
        """One row per arm; returns each arm's held-out probabilities."""
        fold = str(self.args.fold)
        probs: dict[str, dict[str, np.ndarray]] = {}
        for a in self.arms:
            name, work = a["arm"], self.works[a["arm"]]
            probs[name], raw_s = self.heldout_probs(name)
            self.rows.append(
                {
                    "technique": name if a["train_args"] else f"{name} (no train options)",
                    "commands": [
                        train_command(a, work, fold),
                        *([show(medseg_cmd("find-best", str(work), "-q"))] if WorkDir(work).best.is_file() else []),
                        show(self.predict_cmd(name, self.dir / f"pred_{name}")),
                    ],
                    "iterations": a.get("iterations"),
                    "train_s": a["train_s"],
                    "fold_dice": a.get("fold_dice") or fold_dice(work, self.args.fold),
                    "dice": a["dice"],
                    "raw_dice": self.raw_dice(probs[name], label_ids),
                    "hd95": a.get("hd95"),
                    "predict_s": a["predict_s"],
                    "raw_predict_s_1thread": raw_s,
                    "total_s": a["train_s"] + a["predict_s"],
                    "vs": "dice",
                }
            )
            report = json.loads(WorkDir(work).best.read_text()) if WorkDir(work).best.is_file() else {}
            for rule, cv in (report.get("ensemble_rules") or {}).items():
                self.rows.append({"technique": f"{name}: find-best rule {rule}", "fold_dice": cv, "vs": "none"})
        return probs

    def cross_rows(self, probs: dict[str, dict[str, np.ndarray]], label_ids: Sequence[int]) -> None:
        """find-best over the arms' validation predictions, and each rule of all arms (see the module docstring)."""
        cross = self.runner.out / self.tag / "cross_work"
        fold = self.args.fold

        def read_best() -> dict[str, Any]:
            return dict(json.loads(WorkDir(cross).best.read_text()))

        best = self.runner.step(
            f"{self.tag}/cross_find_best",
            [medseg_cmd("find-best", str(cross), "-q")],
            read_best,
            prepare=lambda: build_cross_work(self.works, fold, cross),
        )
        names = [a["arm"] for a in self.arms]
        train_s = sum(a["train_s"] for a in self.arms)
        predict_s = sum(a["predict_s"] for a in self.arms)
        base = {"train_s": train_s, "predict_s": predict_s, "total_s": train_s + predict_s, "vs": "raw_dice"}
        cmd = f"medseg find-best {cross} -q  (after copying each arm's validation/ to runs/<arm>/<arch>/fold_{fold})"
        if best is not None:
            winner = [m["configuration"] for m in best["members"]]
            held = {c: np.mean([probs[m][c] for m in winner], axis=0) for c in probs[winner[0]]} if probs else {}
            self.rows.append(
                {
                    **base,
                    "technique": f"cross-arm find-best winner: {' + '.join(winner)} (mean)",
                    "commands": [cmd],
                    "fold_dice": best["score"],
                    "fold_dice_postprocessed": best["score_postprocessed"],
                    "raw_dice": self.raw_dice(held, label_ids),
                    "train_s": sum(a["train_s"] for a in self.arms if a["arm"] in winner),
                    "predict_s": sum(a["predict_s"] for a in self.arms if a["arm"] in winner),
                    "ranking": best["ranking"],
                }
            )
            self.rows[-1]["total_s"] = self.rows[-1]["train_s"] + self.rows[-1]["predict_s"]

        def fit_rules() -> dict[str, Any]:
            val, test = self.rule_cases(names, probs, label_ids)
            return rule_scores(val, test)

        rules = self.runner.step(f"{self.tag}/rules", [], fit_rules)
        for rule in RULES:
            self.rows.append(
                {
                    **base,
                    "technique": f"all {len(names)} arms, rule {rule}",
                    "commands": ["scripts/bench_techniques.py (combine on the saved probabilities)"],
                    "fold_dice": None if rules is None else rules["cv"][rule],
                    "raw_dice": None if rules is None else rules["heldout"][rule],
                    **({"weights": rules["weights"]} if rules and rule == "weighted" else {}),
                }
            )

    def rule_cases(
        self, names: Sequence[str], probs: dict[str, dict[str, np.ndarray]], label_ids: Sequence[int]
    ) -> tuple[list[Case], list[Case]]:
        """Validation and held-out cases with every arm's probabilities stacked ``(M, K, *spatial)``."""
        cross = WorkDir(self.runner.out / self.tag / "cross_work")
        val_files = {
            n: {p.stem: p for p in cross.run(n, a, self.args.fold).validation.glob("*.npz")}
            for n in names
            for c, a in cross.run_pairs()
            if c == n
        }
        load_ref = reference_loader(cross.root, Plan.load(cross.plans))
        common = sorted(set.intersection(*(set(v) for v in val_files.values())))
        val = [
            (
                np.stack([load_probs(val_files[n][c]) for n in names]),
                class_index(load_ref(c), label_ids),
            )
            for c in common
        ]
        cases = sorted(set.intersection(*(set(p) for p in probs.values())) & set(self.refs))
        test = [(np.stack([probs[n][c] for n in names]), class_index(self.refs[c], label_ids)) for c in cases]
        return val, test

    def crf_rows(self) -> None:
        """``find-best --try-crf`` on a copy of the plain arm, held-out with and without the CRF (same threads)."""
        if self.plain is None:
            return
        base = self.runner.out / self.tag
        work = base / "crf_work"
        tests, labels = str(self.args.test_images), str(self.args.test_labels)
        cmds = [
            medseg_cmd("predict", "-i", tests, "-o", str(base / "pred_rules"), "-m", str(work), "-q", "--overwrite"),
            medseg_cmd("find-best", str(work), "--try-crf", "-q"),
            medseg_cmd(
                "predict", "-i", tests, "-o", str(base / "pred_crf"), "-m", str(work), "-q", "--overwrite",
                "--postprocess", "crf",
            ),
            medseg_cmd("evaluate", str(base / "pred_rules"), labels, "-o", str(base / "metrics_rules.json"), "-q"),
            medseg_cmd("evaluate", str(base / "pred_crf"), labels, "-o", str(base / "metrics_crf.json"), "-q"),
        ]  # fmt: skip

        def read() -> dict[str, Any]:
            rules = json.loads(WorkDir(work).postprocessing.read_text())
            return {
                "crf_search": rules.get("crf_search"),
                "kept": rules.get("crf"),
                "rules": json.loads((base / "metrics_rules.json").read_text())["foreground_mean"],
                "crf": json.loads((base / "metrics_crf.json").read_text())["foreground_mean"],
            }

        res = self.runner.step(
            f"{self.tag}/crf", cmds, read, prepare=lambda: copy_work(self.works[self.plain["arm"]], work)
        )
        row: dict[str, Any] = {
            "technique": f"{self.plain['arm']} + dense CRF (predict --postprocess crf)",
            "commands": [show(c) for c in cmds[1:3]],
            "train_s": self.plain["train_s"],
            "vs": "dice",
        }
        if res is not None:
            search = res["crf_search"] or {}
            best_cv = max((c["mean_foreground_dice"] for c in search.get("candidates", [])), default=None)
            row.update(
                fold_dice=best_cv,
                fold_dice_without=search.get("mean_foreground_dice_without"),
                crf_kept=res["kept"] is not None,
                crf_s_per_case=search.get("seconds_per_case"),
                dice=res["crf"]["dice"],
                hd95=res["crf"]["hd95"],
                dice_same_threads_without=res["rules"]["dice"],
                predict_s=res["seconds"][2],
                predict_s_without=res["seconds"][0],
                find_best_s=res["seconds"][1],
            )
            row["total_s"] = row["train_s"] + row["predict_s"]
            row["note"] = (
                f"find-best {'kept' if row['crf_kept'] else 'did not keep'} a CRF (CV {fmt(row['fold_dice_without'])} "
                f"without); CRF {fmt(row['crf_s_per_case'], '.2f')} s/case; the same copy without CRF, same "
                f"threads: Dice {fmt(row['dice_same_threads_without'])}, {fmt(row['predict_s_without'], '.1f')} s"
            )
        self.rows.append(row)


def student_row(
    row: dict[str, Any],
    student_dir: Path,
    args: argparse.Namespace,
    runner: Runner,
    label_ids: Sequence[int],
    teacher: dict[str, Any],
) -> None:
    """Fill the distillation row from the student's arms folder (one arm), against the teacher ensemble ``teacher``
    (the ``all arms, rule mean`` row: raw held-out Dice, summed prediction seconds)."""
    student = Bench(student_dir, args, runner)
    if not student.arms:
        return
    a = student.arms[0]
    probs, raw_s = student.heldout_probs(a["arm"])
    row.update(
        technique=f"distilled student ({a['arm']}) of all arms",
        iterations=a.get("iterations"),
        train_s=a["train_s"],
        fold_dice=a.get("fold_dice"),
        dice=a["dice"],
        hd95=a.get("hd95"),
        raw_dice=student.raw_dice(probs, label_ids),
        predict_s=a["predict_s"],
        total_s=a["train_s"] + a["predict_s"],
        raw_predict_s_1thread=raw_s,
    )
    if row["raw_dice"] is not None and teacher.get("raw_dice") is not None and teacher.get("predict_s"):
        gap, ratio = row["raw_dice"] - teacher["raw_dice"], row["predict_s"] / teacher["predict_s"]
        ok = gap >= -0.003 and ratio <= 0.2
        row["note"] = (
            f"vs teacher ensemble (mean): raw Dice {gap:+.4f}, prediction time x{ratio:.2f} "
            f"({'meets' if ok else 'misses'} the target: within 0.003 at 1/5); " + row.get("note", "")
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("arms", type=Path, nargs="+", help="bench_arms.py output folder(s) (one per seed)")
    ap.add_argument("--test-images", type=Path, required=True)
    ap.add_argument("--test-labels", type=Path, required=True)
    ap.add_argument("-o", "--out", type=Path, default=None, help="results folder (default: FIRST_ARMS/techniques)")
    ap.add_argument("--plain", default="plain", help="the arm the others are compared with (default plain)")
    ap.add_argument("--fold", default="0", help="the fold the arms trained (default 0; all: no validation rows)")
    ap.add_argument("--predict-args", action="append", default=[], help='NAME="medseg predict arguments" of an arm')
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the derived steps (default 1)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["ensemble", "crf"], help="leave these rows out")
    ap.add_argument("--student", type=Path, default=None, help="bench_arms.py folder of the distilled student")
    ap.add_argument("--plan-work", default="PLAN_WORK", help="the planned work folder, for the student command")
    ap.add_argument("--dry-run", action="store_true", help="run nothing; table from the cached results")
    args = ap.parse_args(argv)
    args.predict_args = {k: shlex.split(v) for k, _, v in (s.partition("=") for s in args.predict_args)}
    out = args.out or args.arms[0] / "techniques"
    runner = Runner(out, args.threads, args.dry_run)
    result: dict[str, Any] = {"header": header(args.threads), "dirs": {}}
    for arms_dir in args.arms:
        bench = Bench(arms_dir, args, runner)
        metrics = json.loads((arms_dir / f"metrics_{bench.arms[0]['arm']}.json").read_text())
        label_ids = [0, *(int(v) for v in metrics["label_ids"])]  # evaluate lists the foreground labels
        probs = bench.arm_rows(label_ids)
        if "ensemble" not in args.skip:
            bench.cross_rows(probs, label_ids)
        if "crf" not in args.skip:
            bench.crf_rows()
        runs = [r for r in (arm_run(w, args.fold) for w in bench.works.values()) if r is not None]
        student_dir = args.student or arms_dir.parent / f"{arms_dir.name}_student"
        row = distill_row(
            bench.arms,
            runs,
            args.fold,
            args.plan_work,
            str(student_dir),
            (str(args.test_images), str(args.test_labels)),
        )
        teacher = next((r for r in bench.rows if r["technique"].endswith("rule mean")), {})
        if args.student is not None:
            student_row(row, args.student, args, runner, label_ids, teacher)
        bench.rows.append(row)
        plain = next((i for i, r in enumerate(bench.rows) if r["technique"].startswith(args.plain)), None)
        result["dirs"][bench.tag] = {"rows": bench.rows, "plain_index": plain}
    result["commands"] = runner.commands
    text = render(result)
    if not args.dry_run:
        out.mkdir(parents=True, exist_ok=True)
        for name, content in (("techniques.json", json.dumps(result, indent=2) + "\n"), ("techniques.md", text)):
            tmp = out / f"{name}.tmp"
            tmp.write_text(content)
            tmp.replace(out / name)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
