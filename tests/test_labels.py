"""Hand labels: candidates of a simulated split (union, crops, manifest), label files (add, undo, resume,
atomic, refusals), the page order, and the evaluation with labels (against the truth, kappa, files)."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from helpers import TINY, snakemake

import holopipe.evaluation.labels
from holopipe.core.config import load_config
from holopipe.core.io import write_zarr
from holopipe.evaluation.evaluate import cohen_kappa, evaluate_files
from holopipe.evaluation.labels import (
    CROP_PIXELS,
    PLANES_EACH_SIDE,
    LabelFile,
    crop_indices,
    label_order,
    open_candidates,
    read_label_files,
    union_candidates,
    write_candidates,
)
from holopipe.evaluation.matching import match
from holopipe.evaluation.plots import LABEL_PLOT_NAMES, PLOT_NAMES
from holopipe.optics.simulate import Optics, ParticleSet, opaque_disks_field

# 160 x 96 pixels of 2.96 x 3.6 µm (a frame wider than tall, pixels taller than wide), as in test_axes.
OPTICS = Optics(wavelength=3.55e-7, dx=2.96e-6, dy=3.6e-6, nx=160, ny=96, z_min=2e-3, z_max=10e-3)
PAD, Z_BINS = 32, 60
# Three droplets (metres) in hologram 1, one in hologram 2.
DROPLETS = {1: ParticleSet(x=np.array([-150e-6, 140e-6, 0.0]), y=np.array([-70e-6, -40e-6, 80e-6]),
                           z=np.array([3.5e-3, 6.2e-3, 8.5e-3]), d=np.array([25e-6, 32e-6, 40e-6])),
            2: ParticleSet(x=np.array([60e-6]), y=np.array([10e-6]), z=np.array([5e-3]), d=np.array([30e-6]))}


def table(*rows):
    """Particles (hid, x, y, z, d in µm)."""
    return pd.DataFrame(rows, columns=["hid", "x", "y", "z", "d"]).astype({"hid": np.int64})


def truth_table() -> pd.DataFrame:
    return table(*((hid, x * 1e6, y * 1e6, z * 1e6, d * 1e6) for hid, p in DROPLETS.items()
                   for x, y, z, d in zip(p.x, p.y, p.z, p.d)))


@pytest.fixture(scope="module")
def config():
    return load_config({
        "splits": {"test": {"source": "simulate", "n_holograms": 2, "seed": 1}},
        "optics": dataclasses.asdict(OPTICS),
        "reconstruction": {"z_bins": Z_BINS, "pad": PAD},
        "evaluate": {"diameter_bins": [0.0, 30e-6, 100e-6]},
    })


def split_store(path):
    """A standardized split store (noise-free contrast I / mean I) of :data:`DROPLETS`, with their truth."""
    images = []
    for particles in DROPLETS.values():
        intensity = np.abs(opaque_disks_field(particles, OPTICS, pad=PAD)) ** 2  # (ny, nx)
        images.append((intensity / intensity.mean()).astype(np.float32).T)
    truth = truth_table()
    ds = xr.Dataset(
        {"image": (("hologram_number", "xsize", "ysize"), np.stack(images)),
         **{name: ("particle", truth[name].to_numpy(np.float32)) for name in ("hid", "x", "y", "z", "d")}},
        attrs={"Nx": OPTICS.nx, "Ny": OPTICS.ny, "dx": OPTICS.dx, "dy": OPTICS.dy, "lambda": OPTICS.wavelength,
               "zMin": OPTICS.z_min, "zMax": OPTICS.z_max})
    return write_zarr(ds, path)


# The U-Net finds all four droplets (a few µm off) and a false one; the baseline finds two droplets of
# hologram 1 and a false one in hologram 2. Candidates: 4 droplets (2 found by both) + 2 false = 6.
UNET = table((1, -148.0, -71.0, 3550.0, 26.0), (1, 141.0, -38.0, 6150.0, 31.0), (1, 2.0, 79.0, 8450.0, 41.0),
             (2, 61.0, 11.0, 5020.0, 29.0), (1, -100.0, 120.0, 9800.0, 20.0))
BASELINE = table((1, -151.0, -69.0, 3600.0, 24.0), (1, 0.0, 82.0, 8600.0, 39.0), (2, -200.0, -100.0, 2100.0, 15.0))


@pytest.fixture(scope="module")
def split(config, tmp_path_factory):
    """The store, both particle CSVs and the written candidates directory."""
    tmp = tmp_path_factory.mktemp("labels")
    store = split_store(tmp / "test.zarr")
    unet, baseline = tmp / "test_unet.csv", tmp / "test_baseline.csv"
    UNET.assign(prob=0.9).to_csv(unet, index=False)
    BASELINE.assign(score=0.5).to_csv(baseline, index=False)
    out = write_candidates(config, "test", store, unet, baseline, tmp / "labels" / "test" / "candidates")
    return {"tmp": tmp, "store": store, "unet": unet, "baseline": baseline, "candidates": out}


def test_the_union_holds_matched_pairs_once_with_the_unet_values_and_both_flags():
    union = union_candidates(UNET, BASELINE, 50e-6, 360e-6)
    assert len(union) == 6 and union["candidate"].is_unique
    assert list(union["candidate"]) == [f"c{i:04d}" for i in range(6)]
    flags = {(row.hid, round(row.x), round(row.z)): (row.unet, row.baseline) for row in union.itertuples()}
    assert flags == {(1, -148, 3550): (1, 1), (1, 141, 6150): (1, 0), (1, 2, 8450): (1, 1), (2, 61, 5020): (1, 0),
                     (1, -100, 9800): (1, 0), (2, -200, 2100): (0, 1)}
    assert union[["hid", "z"]].equals(union[["hid", "z"]].sort_values(["hid", "z"], ignore_index=True))
    assert union_candidates(UNET.iloc[::-1], BASELINE.iloc[::-1], 50e-6, 360e-6).equals(union), "input order"


def test_crop_indices_centre_the_pixel_and_repeat_the_edges():
    assert list(crop_indices(10, 6, 40)) == [7, 8, 9, 10, 11, 12]
    assert list(crop_indices(1, 6, 40)) == [0, 0, 0, 1, 2, 3]
    assert list(crop_indices(38, 6, 40)) == [35, 36, 37, 38, 39, 39]


def test_candidates_directory_crops_are_centred_on_the_dark_droplet_and_the_manifest_complete(config, split):
    candidates = open_candidates(split["candidates"])
    manifest, table_ = candidates.manifest, candidates.table
    assert set(manifest) == {"candidates_id", "split", "n_candidates", "dx_um", "dy_um", "crop_pixels",
                             "planes_each_side", "focus_plane", "tolerance_xy_um", "tolerance_z_um",
                             "holopipe_version"}
    assert (manifest["split"], manifest["n_candidates"], manifest["focus_plane"]) == ("test", 6, PLANES_EACH_SIDE)
    assert manifest["dx_um"] == pytest.approx(2.96) and manifest["dy_um"] == pytest.approx(3.6)
    assert (manifest["tolerance_xy_um"], manifest["tolerance_z_um"]) == pytest.approx((50.0, 360.0))
    assert len(manifest["candidates_id"]) == 16 and int(manifest["candidates_id"], 16) >= 0
    planes_um = 1e6 * (OPTICS.z_min + (np.arange(Z_BINS) + 0.5) * (OPTICS.z_max - OPTICS.z_min) / Z_BINS)
    centre = CROP_PIXELS // 2
    truth = truth_table()
    for row in table_.itertuples():
        amplitude, phase, z_um = candidates.crops(row.Index)
        assert amplitude.shape == phase.shape == (2 * PLANES_EACH_SIDE + 1, CROP_PIXELS, CROP_PIXELS)
        assert amplitude.dtype == np.float32 and np.all(np.isfinite(phase))
        nearest = int(np.argmin(np.abs(planes_um - row.z)))
        expected = planes_um[np.clip(nearest + np.arange(-PLANES_EACH_SIDE, PLANES_EACH_SIDE + 1), 0, Z_BINS - 1)]
        assert z_um == pytest.approx(expected)
        focus = amplitude[PLANES_EACH_SIDE]
        if len(match(truth, table_.iloc[[row.Index]], 50e-6, 360e-6)):  # a droplet: dark at the crop's centre
            assert focus[centre - 1:centre + 2, centre - 1:centre + 2].mean() < 0.5, row
            assert focus[centre - 1:centre + 2, centre - 1:centre + 2].mean() < np.median(focus) - 0.3, row
        else:  # a false candidate: background
            assert focus[centre, centre] > 0.7, row
    # z = 9800 µm lies in the last bins: the planes after the end repeat the last one.
    assert candidates.crops("c0003")[2][-3:] == pytest.approx([planes_um[-1]] * 3)
    assert not list(split["candidates"].parent.glob(".*tmp*"))


def test_same_inputs_give_the_same_candidates_id_and_other_inputs_another(config, split):
    again = write_candidates(config, "test", split["store"], split["unet"], split["baseline"],
                             split["tmp"] / "again")
    first, second = open_candidates(split["candidates"]), open_candidates(again)
    assert second.candidates_id == first.candidates_id and second.table.equals(first.table)
    fewer = split["tmp"] / "fewer_unet.csv"
    UNET.iloc[:4].assign(prob=0.9).to_csv(fewer, index=False)
    other = write_candidates(config, "test", split["store"], fewer, split["baseline"], split["tmp"] / "other")
    assert open_candidates(other).candidates_id != first.candidates_id
    assert label_order(second) == label_order(first)
    assert sorted(label_order(first)) == sorted(first.table["candidate"])


def test_label_order_is_seeded_and_does_not_follow_the_table(split):
    candidates = open_candidates(split["candidates"])
    order = label_order(candidates)
    assert order == label_order(candidates) and order != label_order(candidates, seed=14)
    assert order != list(candidates.table["candidate"])


def test_label_file_adds_undoes_resumes_and_rewrites_atomically(split):
    candidates = open_candidates(split["candidates"])
    folder = split["tmp"] / "labels_ana"
    labels = LabelFile(folder / "ana.csv", candidates)
    assert labels.labels().empty and labels.undo() is None
    labels.add("c0001", "particle", 5)
    labels.add("c0003", "not_particle", 2)
    labels.add("c0002", "unsure", 1)
    assert labels.undo() == "c0002"
    labels.add("c0002", "particle", 4)
    labels.add("c0001", "not_particle", 3)  # labelled again: the latest counts

    resumed = LabelFile(folder / "ana.csv", candidates)  # a new server on the same file
    current = resumed.labels()
    assert list(current["candidate"]) == ["c0003", "c0002", "c0001"]
    assert list(current["label"]) == ["not_particle", "particle", "not_particle"]
    assert list(current["confidence"]) == [2, 4, 3] and set(current["labeller"]) == {"ana"}
    raw = pd.read_csv(folder / "ana.csv")
    assert len(raw) == 4 and set(raw["candidates_id"]) == {candidates.candidates_id}
    assert all(pd.to_datetime(raw["time"], utc=True).notna())
    assert [p.name for p in folder.iterdir()] == ["ana.csv"], "no temporary file left"
    assert resumed.undo() == "c0001" and len(pd.read_csv(folder / "ana.csv")) == 3
    by_folder = read_label_files(folder, candidates)
    # Undoing the second label of c0001 brings its first one back.
    assert list(by_folder["candidate"]) == ["c0001", "c0003", "c0002"] and set(by_folder["labeller"]) == {"ana"}
    assert list(by_folder["label"]) == ["particle", "not_particle", "particle"]


def test_a_failed_write_keeps_file_and_labels_as_they_were(split, monkeypatch):
    candidates = open_candidates(split["candidates"])
    labels = LabelFile(split["tmp"] / "labels_full_disk" / "ana.csv", candidates)
    labels.add("c0001", "particle", 5)

    def disk_full(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(holopipe.evaluation.labels, "_replace_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        labels.add("c0002", "particle", 4)
    with pytest.raises(OSError, match="No space left"):
        labels.undo()
    assert list(labels.labels()["candidate"]) == ["c0001"]
    monkeypatch.undo()
    assert list(LabelFile(labels.path, candidates).labels()["candidate"]) == ["c0001"]


def test_stale_unknown_and_bad_label_files_are_refused(split, tmp_path):
    candidates = open_candidates(split["candidates"])
    stale = tmp_path / "ana.csv"
    stale.write_text("candidates_id,candidate,label,confidence,labeller,time\n"
                     "1a2b3c4d5e6f7a8b,c0001,particle,5,ana,2026-12-01T10:00:00+00:00\n")
    with pytest.raises(ValueError, match=f"ana.csv was given for candidates 1a2b3c4d5e6f7a8b but .*candidates "
                                         f"holds {candidates.candidates_id}: the candidates changed"):
        LabelFile(stale, candidates)
    with pytest.raises(ValueError, match="ana.csv was given for candidates 1a2b3c4d5e6f7a8b"):
        read_label_files(tmp_path, candidates)
    unknown = tmp_path / "bob.csv"
    unknown.write_text("candidates_id,candidate,label,confidence,labeller,time\n"
                       + "".join(f"{candidates.candidates_id},c000{i},particle,3,bob,2026-12-01T10:00:00+00:00\n"
                                 for i in (1, 2, 3, 4)) +
                       f"{candidates.candidates_id},c0099,particle,3,bob,2026-12-01T10:00:00+00:00\n")
    with pytest.raises(ValueError, match=r"bob.csv: unknown candidate c0099 \(row 5\)"):
        LabelFile(unknown, candidates)
    with pytest.raises(ValueError, match="labeller name 'ana smith'"):
        LabelFile(tmp_path / "ana smith.csv", candidates)
    fresh = LabelFile(tmp_path / "eve.csv", candidates)
    with pytest.raises(ValueError, match="unknown candidate c0099"):
        fresh.add("c0099", "particle", 3)
    with pytest.raises(ValueError, match="label 'yes'"):
        fresh.add("c0001", "yes", 3)
    with pytest.raises(ValueError, match="confidence 6"):
        fresh.add("c0001", "particle", 6)
    assert not (tmp_path / "eve.csv").exists(), "a refused label writes nothing"


def label_from_truth(candidates, path):
    """A labeller standing in for a person: particle iff the candidate matches a true droplet, surest
    (confidence 5) where it does and 3 where it does not."""
    pairs = match(truth_table(), candidates.table, 50e-6, 360e-6)
    real = set(candidates.table.loc[pairs["pred_index"], "candidate"])
    labels = LabelFile(path, candidates)
    for candidate in label_order(candidates):
        labels.add(candidate, "particle" if candidate in real else "not_particle", 5 if candidate in real else 3)
    return path


def evaluated(config, split, out_dir, labels=None) -> dict:
    predictions = {"unet": {"test": split["unet"]}, "baseline": {"test": split["baseline"]}}
    out = evaluate_files(config, {"test": split["store"]}, predictions, out_dir / "metrics.json", out_dir / "plots",
                         labels=labels)
    return json.loads(out.read_text())


def test_labels_from_the_truth_give_the_truth_based_precision_and_recall_exactly(config, split):
    candidates = open_candidates(split["candidates"])
    label_file = label_from_truth(candidates, split["tmp"] / "truth_labels" / "oracle.csv")
    metrics = evaluated(config, split, split["tmp"] / "with_oracle", {"test": (split["candidates"], [label_file])})
    assert (metrics["unet"]["precision"], metrics["unet"]["recall"]) == (4 / 5, 1.0)
    assert (metrics["baseline"]["precision"], metrics["baseline"]["recall"]) == (2 / 3, 2 / 4)
    for method in ("unet", "baseline"):
        by_labels = metrics[method]["labels"]["test"]
        assert by_labels["precision"]["value"] == metrics[method]["precision"], method
        assert by_labels["recall"]["value"] == metrics[method]["recall"], method
        low, high = by_labels["precision"]["low"], by_labels["precision"]["high"]
        assert 0 <= low < by_labels["precision"]["value"] <= high <= 1
        # Only the droplets carry confidence 5: from k = 4 on,
        # every method's remaining labelled candidate is a particle.
        confidences = by_labels["by_confidence"]
        assert [c["min_confidence"] for c in confidences] == [1, 2, 3, 4, 5]
        assert confidences[0]["precision"] == by_labels["precision"]
        assert confidences[4]["precision"]["value"] == 1.0 and confidences[4]["recall"] == by_labels["recall"]
    # d bins [0, 30) and [30, 100] µm: the U-Net's candidates 26, 31, 41, 29, 20 µm, the baseline's false one 15 µm.
    unet_bins = metrics["unet"]["labels"]["test"]["by_diameter"]
    assert [(b["precision"]["hits"], b["precision"]["n"]) for b in unet_bins] == [(2, 3), (2, 2)]
    assert metrics["unet"]["labels"]["test"]["agreement"] == [], "one labeller: no pair"


def test_majority_of_labellers_and_cohen_kappa(config, split):
    assert cohen_kappa(["particle", "particle", "not_particle", "unsure", "particle", "not_particle"],
                       ["particle", "not_particle", "not_particle", "unsure", "particle", "particle"]) \
        == pytest.approx(10 / 22)  # p_o = 4/6, p_e = (9 + 4 + 1)/36
    assert cohen_kappa(["particle", "not_particle"], ["particle", "not_particle"]) == 1.0
    assert cohen_kappa([], []) is None and cohen_kappa(["particle"], ["particle"]) is None

    candidates = open_candidates(split["candidates"])
    folder = split["tmp"] / "three_labellers"
    given = {"ana": ["particle", "particle", "not_particle", "particle"],
             "bob": ["particle", "not_particle", "not_particle", "unsure"],
             "eve": ["particle", "particle", "not_particle"]}
    for name, labels in given.items():
        label_file = LabelFile(folder / f"{name}.csv", candidates)
        for i, label in enumerate(labels):
            label_file.add(f"c{i:04d}", label, 4 if name == "ana" else 2)
    metrics = evaluated(config, split, split["tmp"] / "three", {"test": (split["candidates"],
                                                                          sorted(folder.glob("*.csv")))})
    by_labels = metrics["unet"]["labels"]["test"]
    pairs = {tuple(a["labellers"]): (a["n"], a["kappa"]) for a in by_labels["agreement"]}
    assert pairs.keys() == {("ana", "bob"), ("ana", "eve"), ("bob", "eve")}
    assert pairs[("ana", "eve")] == (3, 1.0)
    assert pairs[("ana", "bob")][0] == 4
    assert pairs[("ana", "bob")][1] == pytest.approx(cohen_kappa(given["ana"], given["bob"]))
    # Majorities: c0000 particle (3 of 3), c0001 particle (2 of 3), c0002 not_particle, c0003 a tie -> unsure.
    # The U-Net found all four: 2 particles of 3 decided, 1 unsure; the baseline c0000 and c0002: 1 of 2.
    assert (by_labels["precision"]["hits"], by_labels["precision"]["n"], by_labels["n_unsure"]) == (2, 3, 1)
    baseline = metrics["baseline"]["labels"]["test"]
    assert (baseline["precision"]["hits"], baseline["precision"]["n"]) == (1, 2)
    assert (baseline["recall"]["hits"], baseline["recall"]["n"]) == (1, 2)
    assert by_labels["by_confidence"][2]["precision"]["n"] == 0, "c0000-c0002 rest on a confidence-2 vote"


@pytest.mark.slow
def test_evaluate_writes_the_label_plots_and_without_labels_is_unchanged(config, split):
    plain = evaluated(config, split, split["tmp"] / "plain")
    no_files = evaluated(config, split, split["tmp"] / "no_files", {"test": (split["candidates"], [])})
    assert no_files == plain and all("labels" not in entry for entry in plain.values())
    for name in (*PLOT_NAMES, *LABEL_PLOT_NAMES):
        assert (split["tmp"] / "no_files" / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    candidates = open_candidates(split["candidates"])
    label_file = label_from_truth(candidates, split["tmp"] / "plot_labels" / "oracle.csv")
    labelled = evaluated(config, split, split["tmp"] / "labelled", {"test": (split["candidates"], [label_file])})
    assert {key: value for key, value in labelled["unet"].items() if key != "labels"} == plain["unet"]
    sizes = {}
    for name in LABEL_PLOT_NAMES:
        with_labels = split["tmp"] / "labelled" / "plots" / name
        assert with_labels.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        sizes[name] = (with_labels.stat().st_size, (split["tmp"] / "no_files" / "plots" / name).stat().st_size)
    assert all(labelled_size > note_size for labelled_size, note_size in sizes.values()), sizes
    with pytest.raises(ValueError, match="labels given for split.*'real'.*not evaluated"):
        evaluated(config, split, split["tmp"] / "bad", {"real": (split["candidates"], [label_file])})


@pytest.mark.workflow
def test_the_workflow_writes_candidates_and_evaluate_takes_the_label_files_present(tmp_path):
    plain = snakemake(tmp_path, "-n", "-p", "--cores", "1")
    assert plain.returncode == 0, plain.stderr
    assert "rule label_candidates" in plain.stdout and "--out results/labels/valid/candidates" in plain.stdout
    assert "--candidates valid=results/labels/valid/candidates" in plain.stdout
    assert "--labels" not in plain.stdout, "no label files: no --labels"
    (tmp_path / "labels" / "valid").mkdir(parents=True)
    for name in ("ana", "bob"):
        (tmp_path / "labels" / "valid" / f"{name}.csv").write_text("candidates_id,candidate,label,confidence\n")
    labelled = snakemake(tmp_path, "-n", "-p", "--cores", "1", "results/evaluation/metrics.json")
    assert labelled.returncode == 0, labelled.stderr
    assert "--labels valid=labels/valid/ana.csv valid=labels/valid/bob.csv --config-json" in labelled.stdout
    assert TINY["infer"]["splits"] == ["valid"]


def test_the_commands_write_empty_candidates_and_evaluate_with_label_files(config, split, tmp_path):
    from holopipe.run.cli import main

    settings = json.dumps(config)
    empty_unet, empty_baseline = tmp_path / "unet.csv", tmp_path / "baseline.csv"
    table().assign(prob=0.5).to_csv(empty_unet, index=False)
    table().assign(score=0.5).to_csv(empty_baseline, index=False)
    assert main(["label-candidates", "--split", "test", "--store", str(split["store"]), "--unet", str(empty_unet),
                 "--baseline", str(empty_baseline), "--out", str(tmp_path / "none"), "--config-json", settings]) == 0
    none = open_candidates(tmp_path / "none")
    assert none.table.empty and none.manifest["n_candidates"] == 0 and label_order(none) == []

    candidates = open_candidates(split["candidates"])
    label_file = label_from_truth(candidates, tmp_path / "labels" / "oracle.csv")
    out = tmp_path / "evaluation"
    assert main(["evaluate", "--truth", f"test={split['store']}", "--prediction", f"unet:test={split['unet']}",
                 f"baseline:test={split['baseline']}", "--candidates", f"test={split['candidates']}",
                 "--labels", f"test={label_file}", "--out", str(out / "metrics.json"), "--plots", str(out),
                 "--config-json", settings]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["baseline"]["labels"]["test"]["precision"]["value"] == metrics["baseline"]["precision"]
    assert main(["evaluate", "--truth", f"test={split['store']}", "--prediction", f"unet:test={split['unet']}",
                 f"baseline:test={split['baseline']}", "--labels", f"test={label_file}", "--out",
                 str(out / "m.json"), "--plots", str(out), "--config-json", settings]) == 1, "labels need candidates"
