"""The workflow's cost model (holopipe.run.resources): memory and walltime as functions of the frame, the planes,
the holograms and the attempt, without Snakemake."""

import math

import pytest
import torch
import yaml
from helpers import REPO, TINY

from holopipe.core.config import load_config, merged_config
from holopipe.data.regrid import plan_axis
from holopipe.detect.infer import infer_memory, plane_batch
from holopipe.run import resources as cost

FRAME, PADDED = 2048 * 1536, (2048 + 512) * (1536 + 512)
"""A frame and its padded frame large enough that the data, not the libraries or the start-up, set the figures."""

HOLODEC_FRAME = (5120, 3584)
"""HOLODEC's 4872 x 3248 camera frame regridded to whole 512-pixel tiles (config/holodec.yaml, frame pad)."""

# Each rule's figures as functions of the numbers that drive them: (function, keyword arguments, the arguments that
# make it grow). Memory depends on the frame a job holds; walltime on the frame, the holograms and the planes.
MEMORY = {
    "acquire": (cost.acquire_mem_mb, {"nx": 2048, "ny": 1536, "pad": 256}, ("nx", "ny", "pad")),
    "regrid": (cost.regrid_mem_mb, {"source_pixels": FRAME, "frame_pixels": FRAME}, ("source_pixels", "frame_pixels")),
    "augment": (cost.augment_mem_mb, {"frame_pixels": FRAME, "padded_pixels": PADDED},
                ("frame_pixels", "padded_pixels")),
    "examples": (cost.examples_mem_mb, {"padded_pixels": PADDED}, ("padded_pixels",)),
    "train_cpu": (cost.train_mem_mb, {"kind": "cpu", "batch_size": 8, "tile_size": 512}, ("batch_size", "tile_size")),
    "infer_cpu": (cost.infer_mem_mb, {"frame_pixels": FRAME, "padded_pixels": PADDED, "batch_planes": 4, "kind": "cpu"},
                  ("frame_pixels", "padded_pixels", "batch_planes")),
    "infer_gpu": (cost.infer_mem_mb, {"frame_pixels": FRAME, "padded_pixels": PADDED, "batch_planes": 4, "kind": "gpu"},
                  ("frame_pixels", "padded_pixels", "batch_planes")),
    "sweep": (cost.sweep_mem_mb, {"padded_pixels": PADDED}, ("padded_pixels",)),
    "label_candidates": (cost.label_candidates_mem_mb, {"padded_pixels": PADDED, "kind": "cpu"}, ("padded_pixels",)),
}
RUNTIME = {
    "simulate": (cost.simulate_runtime_min, {"nx": 2048, "ny": 1536, "holograms": 100, "slabs": 29, "pad": 256},
                 ("nx", "ny", "holograms", "slabs", "pad")),
    "copy": (cost.copy_runtime_min, {"source_pixels": 4872 * 3248, "holograms": 600}, ("source_pixels", "holograms")),
    "regrid": (cost.regrid_runtime_min, {"source_pixels": 4872 * 3248, "frame_pixels": 5120 * 3584, "holograms": 100},
               ("source_pixels", "frame_pixels", "holograms")),
    "augment": (cost.augment_runtime_min, {"frame_pixels": FRAME, "holograms": 100}, ("frame_pixels", "holograms")),
    "standardize": (cost.standardize_runtime_min, {"frame_pixels": FRAME, "holograms": 100},
                    ("frame_pixels", "holograms")),
    "examples": (cost.examples_runtime_min, {"padded_pixels": PADDED, "holograms": 100, "planes": 14},
                 ("padded_pixels", "holograms", "planes")),
    "train_gpu": (cost.train_runtime_min, {"epochs": 50, "epoch_pixels": 10**12, "kind": "gpu"},
                  ("epochs", "epoch_pixels")),
    "tune_worker_cpu": (cost.tune_worker_runtime_min, {"n_trials": 20, "workers": 2, "epochs": 4,
                                                       "epoch_pixels": 10**9, "kind": "cpu"},
                        ("n_trials", "epochs", "epoch_pixels")),
    "infer_cpu": (cost.infer_runtime_min, {"padded_pixels": PADDED, "holograms": 10, "planes": 100, "kind": "cpu"},
                  ("padded_pixels", "holograms", "planes")),
    "infer_gpu": (cost.infer_runtime_min, {"padded_pixels": PADDED, "holograms": 100, "planes": 1000, "kind": "gpu"},
                  ("padded_pixels", "holograms", "planes")),
    "sweep_cpu": (cost.sweep_runtime_min, {"padded_pixels": PADDED, "holograms": 10, "planes": 100, "kind": "cpu"},
                  ("padded_pixels", "holograms", "planes")),
}


def holodec_config() -> dict:
    """config/holodec.yaml merged over config/config.yaml, as `snakemake --configfile config/holodec.yaml` reads."""
    read = [yaml.safe_load((REPO / "config" / name).read_text()) for name in ("config.yaml", "holodec.yaml")]
    return load_config(merged_config(*read))


@pytest.mark.parametrize("name", sorted(MEMORY))
def test_memory_grows_with_what_the_job_holds(name):
    function, arguments, growing = MEMORY[name]
    base = function(**arguments)
    for key in growing:
        assert function(**{**arguments, key: 2 * arguments[key]}) > base, key


@pytest.mark.parametrize("name", sorted(RUNTIME))
def test_walltime_grows_with_the_work(name):
    function, arguments, growing = RUNTIME[name]
    base = function(**arguments)
    for key in growing:
        assert function(**{**arguments, key: 2 * arguments[key]}) > base, key


@pytest.mark.parametrize("name", sorted(MEMORY))
def test_a_retry_asks_for_half_as_much_memory_again(name):
    function, arguments, _ = MEMORY[name]
    first = function(**arguments)
    # Rounded up to whole MB once, from the unrounded figure: within 1 MB of 1.5 and 2 times the first.
    assert 1.5 * first - 1 <= function(**arguments, attempt=2) <= 1.5 * first + 1
    assert 2 * first - 2 <= function(**arguments, attempt=3) <= 2 * first


@pytest.mark.parametrize("name", sorted(RUNTIME))
def test_a_retry_asks_for_the_walltime_times_the_attempt(name):
    function, arguments, _ = RUNTIME[name]
    first = function(**arguments)
    assert [function(**arguments, attempt=attempt) for attempt in (2, 3)] == [2 * first, 3 * first]


def test_walltime_is_twice_the_work_plus_the_start_up_in_whole_minutes():
    assert cost.runtime_min(0) == cost.RUNTIME_FLOOR_MIN
    assert cost.runtime_min(60) == cost.RUNTIME_FLOOR_MIN + 2
    assert cost.runtime_min(61) == cost.RUNTIME_FLOOR_MIN + 3  # 122 s of walltime: 3 minutes, not 2
    assert cost.runtime_min(61, attempt=2) == 2 * (cost.RUNTIME_FLOOR_MIN + 3)


def test_memory_is_the_libraries_plus_the_frames_in_whole_mb():
    assert cost.memory_mb(0) == cost.PYTHON_LIBRARIES_MB
    assert cost.memory_mb(2**20 + 1) == cost.PYTHON_LIBRARIES_MB + 2
    assert cost.memory_mb(0, libraries_mb=100, attempt=2) == 150


def test_a_cpu_inference_job_on_a_full_holodec_frame_asks_for_the_per_plane_figure():
    config = holodec_config()
    frame = cost.regridded_frame_pixels(config, 4872, 3248, 2.96e-6, 2.96e-6)
    padded = cost.regridded_frame_pixels(config, 4872, 3248, 2.96e-6, 2.96e-6, config["reconstruction"]["pad"])
    assert frame == HOLODEC_FRAME[0] * HOLODEC_FRAME[1] and padded == (5120 + 512) * (3584 + 512)
    one, two = (cost.infer_mem_mb(frame, padded, planes, "cpu") for planes in (1, 2))
    assert (two - one) * 2**20 == pytest.approx(9.3e9, rel=0.01)  # the model's activations, 9.3 GB per plane
    assert one * 2**20 == pytest.approx(1100 * 2**20 + 40 * padded + 9.3e9, rel=0.01)
    # On a GPU the host holds the plane's probability and amplitude only; with infer.device auto a node without a
    # GPU runs the job on the CPU, so it asks for one CPU plane at least.
    assert cost.infer_mem_mb(frame, padded, 8, "gpu") < one
    assert cost.infer_mem_mb(frame, padded, 8, "gpu", auto=True) == one
    assert cost.infer_mem_mb(frame, padded, 8, "cpu", auto=True) == cost.infer_mem_mb(frame, padded, 8, "cpu")


@pytest.mark.parametrize("batch_planes", [1, 3])
def test_an_infer_job_runs_the_planes_its_rule_declared_memory_for(batch_planes):
    # The rule and the job size memory by the same figures (holopipe.detect.host_memory): given the mem_mb the
    # rule declares for B planes on the CPU, the job takes batches of B planes, not fewer.
    frame, padded = 256 * 192, (256 + 64) * (192 + 64)
    declared = cost.infer_mem_mb(frame, padded, batch_planes, "cpu")
    memory = infer_memory(torch.device("cpu"), frame_pixels=frame, padded_pixels=padded, mem_mb=declared)
    assert plane_batch(8, memory, what="test") == batch_planes


def test_regridded_frame_reads_each_axis_at_its_own_pitch():
    # A non-square frame with dx != dy regridded to 3.7 µm: x at 2.96 µm shrinks to 800 pixels, y at 4.44 µm
    # grows to 720, each cropped to whole tiles of 64; swapping the axes (or their pitches) gives another frame.
    config = load_config({**TINY, "regrid": {"pixel_pitch": 3.7e-6, "method": "antialias", "frame": "crop"},
                          "examples": {**TINY["examples"], "tile_size": 64}})
    nx, ny, dx, dy = 1000, 600, 2.96e-6, 4.44e-6
    sizes = [plan_axis(n, pitch, 3.7e-6, method="antialias", frame="crop", tile=64, where="x").n_out
             for n, pitch in ((nx, dx), (ny, dy))]
    assert sizes == [768, 704]
    assert cost.regridded_frame_pixels(config, nx, ny, dx, dy) == 768 * 704
    assert cost.regridded_frame_pixels(config, nx, ny, dx, dy, padding=10) == 788 * 724
    assert cost.regridded_frame_pixels(config, nx, ny, dy, dx) != 768 * 704
    assert cost.regridded_frame_pixels(config, ny, nx, dx, dy) != 768 * 704


def test_the_frame_is_padded_or_cropped_to_tiles_as_regrid_frame_says():
    crop, pad = ({**TINY, "regrid": {"frame": frame}, "examples": {**TINY["examples"], "tile_size": 64}}
                 for frame in ("crop", "pad"))
    assert cost.regridded_frame_pixels(load_config(crop), 100, 70, 2.96e-6, 2.96e-6) == 64 * 64
    assert cost.regridded_frame_pixels(load_config(pad), 100, 70, 2.96e-6, 2.96e-6) == 128 * 128


def test_a_stage_asks_for_a_gpu_unless_its_config_pins_it_to_the_cpu():
    assert [cost.device_kind({"infer": {"device": device}}, "infer") for device in ("cpu", "auto", "cuda", "cuda:1")] \
        == ["cpu", "gpu", "gpu", "gpu"]
    # The device kind picks the rate: a CPU job's walltime is many times a GPU job's for the same planes.
    arguments = {"padded_pixels": PADDED, "holograms": 100, "planes": 1000}
    assert cost.infer_runtime_min(**arguments, kind="cpu") > 10 * cost.infer_runtime_min(**arguments, kind="gpu")
    assert cost.sweep_runtime_min(**arguments, kind="cpu") > 10 * cost.sweep_runtime_min(**arguments, kind="gpu")


def test_training_memory_on_a_gpu_is_the_hosts_share_whatever_the_batch():
    assert cost.train_mem_mb("gpu", 8, 512) == cost.train_mem_mb("gpu", 64, 1024) == cost.TRAIN_GPU_HOST_MB
    assert cost.train_mem_mb("cpu", 16, 512) > cost.train_mem_mb("cpu", 8, 512) > cost.TORCH_LIBRARIES_MB


def test_training_is_sized_for_the_largest_batch_a_trial_may_draw():
    config = load_config(TINY)
    assert cost.largest_batch_size(config) == TINY["train"]["batch_size"]
    choices = load_config({**TINY, "tune": {**TINY["tune"], "search_space": {
        "train.batch_size": {"type": "categorical", "choices": [2, 16, 8]}}}})
    assert cost.largest_batch_size(choices) == 16
    drawn = load_config({**TINY, "tune": {**TINY["tune"], "search_space": {
        "train.batch_size": {"type": "int", "low": 2, "high": 24}}}})
    assert cost.largest_batch_size(drawn) == 24


def test_an_epoch_passes_over_every_example_tile():
    config = load_config(TINY)
    examples = TINY["examples"]
    per_hologram = examples["positives_per_hologram"] + examples["negatives_per_hologram"]
    assert cost.epoch_tile_pixels(config, 3) == 3 * per_hologram * examples["tile_size"] ** 2


def test_more_tuning_workers_share_the_trials():
    arguments = {"n_trials": 20, "epochs": 4, "epoch_pixels": 10**9, "kind": "cpu"}
    one, four, twenty = (cost.tune_worker_runtime_min(**arguments, workers=workers) for workers in (1, 4, 20))
    assert one > four > twenty
    # A worker runs whole trials: 20 trials on 3 workers are 7 each, as many as on ceil(20 / 7) = 3.
    assert cost.tune_worker_runtime_min(**arguments, workers=3) == cost.train_runtime_min(7 * 4, 10**9, "cpu")


def test_simulation_propagates_through_every_slab_of_the_sample_volume():
    config = load_config(TINY)  # 1 to 3 mm in slabs of 1 mm
    assert cost.simulation_slabs(config) == 2
    thin = load_config({**TINY, "simulate": {**TINY["simulate"], "slab_thickness": 3e-4}})
    assert cost.simulation_slabs(thin) == math.ceil(2e-3 / 3e-4)


def test_a_window_division_asks_for_its_window_reconstructions_and_propagation():
    settings = {"background": "smooth", "window": 9, "stationary": "off"}
    off = cost.standardize_bytes_per_pixel(settings)
    everywhere = cost.standardize_bytes_per_pixel({**settings, "stationary": "everywhere"})
    windows = cost.standardize_bytes_per_pixel({**settings, "stationary": "windows"})
    assert off == 4 + cost.STANDARDIZE_WORK_BYTES_PER_PIXEL
    assert everywhere == 4 * 9 + cost.STANDARDIZE_WORK_BYTES_PER_PIXEL
    assert windows == 4 * 9 * 3 + cost.STANDARDIZE_WORK_BYTES_PER_PIXEL + cost.WINDOW_PROPAGATION_BYTES_PER_PIXEL
    # a running median divides out the stationary by itself: no window planes, whatever the key says
    median = {**settings, "background": "running_median", "stationary": "windows"}
    assert cost.standardize_bytes_per_pixel(median) == everywhere


def test_the_window_planes_propagate_the_frame_padded_by_the_reach_of_their_rings():
    config = load_config(merged_config(yaml.safe_load((REPO / "config" / "config.yaml").read_text()), {
        "optics": {"nx": 768, "ny": 640, "dx": 2.96e-6, "dy": 2.5e-6, "z_min": 0.014, "z_max": 0.026},
        "examples": {"tile_size": 128}}))
    # λz/(2 pitch²) at 14 mm: 284 px along x, 398 along y (capped at half the frame, 320); at 26 mm 527 and 739:
    # both capped
    near = (768 + 2 * 284) * (640 + 2 * 320)
    far = (768 + 2 * 384) * (640 + 2 * 320)
    assert cost.window_grid_pixels(config, 768, 640, 2.96e-6, 2.5e-6) == near + far
    off = merged_config(config, {"standardize": {"stationary": "off"}})
    assert cost.window_grid_pixels(off, 768, 640, 2.96e-6, 2.5e-6) == 0
    frame = 768 * 640
    assert cost.standardize_runtime_min(frame, 100, window_grid_pixels=near + far) > cost.standardize_runtime_min(
        frame, 100)
    assert cost.standardize_runtime_min(frame, 100, window_grid_pixels=near + far, kind="gpu") <= \
        cost.standardize_runtime_min(frame, 100, window_grid_pixels=near + far)
