"""WorkDir / RunDir / BundleLayout: the work folder's layout, byte for byte as before, and run discovery."""

from __future__ import annotations

from pathlib import Path

from medseg.io.workdir import ALL, BundleLayout, RunDir, WorkDir, fold_name, parse_fold


def test_work_folder_files(tmp_path):
    wd = WorkDir(str(tmp_path))
    assert wd.root == tmp_path
    assert [
        p.relative_to(tmp_path).as_posix()
        for p in (
            wd.plans,
            wd.fingerprint,
            wd.dataset_ref,
            wd.splits,
            wd.best,
            wd.postprocessing,
            wd.preprocessed_root,
            wd.preprocessed("3d_fullres"),
            wd.previous_stage("3d_cascade_fullres", "3d_lowres"),
            wd.runs_root,
            wd.arch_runs("3d_fullres", "unet"),
        )
    ] == [
        "plans.json",
        "fingerprint.json",
        "dataset_ref.json",
        "splits.json",
        "best.json",
        "postprocessing.json",
        "preprocessed",
        "preprocessed/3d_fullres",
        "preprocessed/3d_cascade_fullres_from_3d_lowres",
        "runs",
        "runs/3d_fullres/unet",
    ]


def test_run_folder_files(tmp_path):
    run = WorkDir(tmp_path).run("3d_fullres", "unet", 2)
    assert run.path == tmp_path / "runs" / "3d_fullres" / "unet" / "fold_2"
    assert (run.fold_name, run.fold, run.configuration, run.arch, run.in_runs_folder) == (
        "fold_2",
        2,
        "3d_fullres",
        "unet",
        True,
    )
    assert [
        p.relative_to(run.path).as_posix()
        for p in (
            run.checkpoint("final"),
            run.checkpoint("latest"),
            run.config,
            run.plans,
            run.progress,
            run.training_log,
            run.training_curves,
            run.postprocessing_prior,
            run.lock,
            run.validation,
            run.validation_metrics,
            run.validation_file("case_1", ".nii.gz"),
        )
    ] == [
        "checkpoint_final.pt",
        "checkpoint_latest.pt",
        "config.json",
        "plans.json",
        "progress.json",
        "training_log.txt",
        "training_curves.png",
        "postprocessing_prior.json",
        ".lock",
        "validation",
        "validation/metrics.json",
        "validation/case_1.nii.gz",
    ]
    assert WorkDir(tmp_path).run("2d", "unet", ALL).path.name == "fold_all"
    assert not RunDir(tmp_path / "elsewhere" / "fold_0").in_runs_folder
    assert RunDir.checkpoint_file("best") == "checkpoint_best.pt"


def test_fold_names():
    assert (fold_name(0), fold_name("all")) == ("fold_0", "fold_all")
    assert (parse_fold("fold_12"), parse_fold("fold_all"), parse_fold("fold_x"), parse_fold("runs")) == (
        12,
        "all",
        None,
        None,
    )


def test_discovery(tmp_path):
    wd = WorkDir(tmp_path)
    assert wd.fold_runs("3d_fullres", "unet") == {} and wd.run_pairs() == []
    for fold in (10, "all", 2, 0):
        wd.run("3d_fullres", "unet", fold).path.mkdir(parents=True)
    (wd.arch_runs("3d_fullres", "unet") / "notes").mkdir()
    (wd.arch_runs("3d_fullres", "unet") / "fold_3").write_text("a file, not a run")
    wd.run("2d", "deeplab", 0).path.mkdir(parents=True)
    assert list(wd.fold_runs("3d_fullres", "unet")) == ["fold_0", "fold_2", "fold_10", "fold_all"]
    assert wd.run_pairs() == [("2d", "deeplab"), ("3d_fullres", "unet")]
    run = wd.run("3d_fullres", "unet", 0)
    assert run.checkpoints_present() == [] and run.validation_files(".npz") == {}
    for name in ("checkpoint_final.pt", "checkpoint_latest.pt", "config.json"):
        (run.path / name).write_bytes(b"")
    run.validation.mkdir()
    for name in ("b.npz", "a.npz", "a.nii.gz"):
        (run.validation / name).write_bytes(b"")
    assert run.checkpoints_present() == ["checkpoint_final.pt", "checkpoint_latest.pt"]
    assert run.validation_files(".npz") == {"a": run.validation / "a.npz", "b": run.validation / "b.npz"}
    assert wd.run_label(run) == wd.run_label(run.path) == str(Path("3d_fullres/unet/fold_0"))


def test_bundle_layout():
    member = BundleLayout.member("3d_fullres", "unet", "fold_0")
    assert member == "members/3d_fullres/unet/fold_0"
    assert (BundleLayout.member_weights(member), BundleLayout.member_plans(member)) == (
        "members/3d_fullres/unet/fold_0/model.pt",
        "members/3d_fullres/unet/fold_0/plans.json",
    )
    assert (
        BundleLayout.MANIFEST,
        BundleLayout.PLANS,
        BundleLayout.PREPROCESSING,
        BundleLayout.POSTPROCESSING,
        BundleLayout.BEST,
    ) == ("manifest.json", "plans.json", "preprocessing.json", "postprocessing.json", "best.json")
